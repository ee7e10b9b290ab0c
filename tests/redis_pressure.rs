//! Overload across nodes, over real sockets and a real `redis-server`: readers on node A fed
//! through Redis by publishers on node B. When A's readers as a whole run far behind, B pushes
//! its publishers back (wait, then 429) as A would push back its own, so no reader is dropped and
//! nothing accepted is lost; a stale or lying word in Redis holds nobody back for long.

mod support;

use std::time::Duration;

use herald::protocol::ChatId;
use serde_json::{json, Value};
use support::redis::{mark_settled, redis_cmd, RedisServer};
use support::{batch, post_until_pushed_back, read_events, stalled_reader, start, Gateway, PATIENCE};
use tokio::time::{sleep, Instant};

/// Two nodes on one settled Redis; A's readers may stall as long as the test needs.
async fn nodes(redis: &RedisServer) -> (Gateway, Gateway) {
    mark_settled(redis).await;
    let mut config = support::redis::config(redis);
    config.websocket.write_wait = Duration::from_secs(60);
    (start(config.clone()).await, start(config).await)
}

/// Publishes `body` to `gw` until it answers 202 (pressure lapsed), for up to PATIENCE.
async fn admitted_eventually(gw: &Gateway, body: &str) -> Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (status, reply) = gw.publish(body).await;
        if status == 202 {
            return reply;
        }
        assert_eq!(status, 429, "{reply}");
        assert!(Instant::now() < deadline, "still pushed back");
        sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
#[ignore = "needs redis-server"]
async fn publishers_on_one_node_are_pushed_back_for_readers_on_another() {
    let redis = RedisServer::start();
    let (a, b) = nodes(&redis).await;
    let room = ChatId::new_v4();
    let mut readers = Vec::new();
    for _ in 0..8 {
        readers.push(stalled_reader(&a, room).await);
    }
    // Paced like a steady publisher, so the few dozen ms the word takes to cross Redis
    // cost the readers a fraction of what they can fall behind.
    let body = batch(room, 10, 1_000);
    let (accepted, refusal) = post_until_pushed_back(&b, &body, 1_000, Duration::from_millis(10)).await;
    let (head, reply) = refusal.expect("B pushed its publishers back for A's readers");
    assert_eq!(serde_json::from_str::<Value>(&reply).expect("JSON"), json!({"error":"overloaded"}));
    assert!(head.to_ascii_lowercase().contains("retry-after: 1"), "{head}");
    assert_eq!(b.metric("publish_overloaded_remote_total").await, 1.0, "for another node's readers");
    assert_eq!(b.metric("backlog_frames").await, 0.0, "B itself owes nobody anything");
    assert_eq!(a.metric("redis_pressure_reporting").await, 1.0);

    // Every reader gets every accepted event, none lost, nobody dropped...
    for (reader, position) in &mut readers {
        read_events(reader, *position, accepted).await;
    }
    assert_eq!(a.metric("slow_consumers_dropped_total").await, 0.0, "nobody was dropped");
    assert_eq!(a.metric("redis_inbound_dropped_total").await, 0.0);
    // ...and once they caught up, B admits again.
    a.wait_metric("backlog_frames", 0.0).await;
    a.wait_metric("redis_pressure_reporting", 0.0).await;
    admitted_eventually(&b, &batch(room, 1, 1_000)).await;
    for (reader, position) in &mut readers {
        let event = reader.read_json().await.expect("the next event");
        assert_eq!(event["seq"].as_u64(), Some(*position + accepted + 1));
    }
    assert_eq!(b.metric("redis_pressure_rooms").await, 0.0);
    assert_eq!(a.metric("slow_consumers_dropped_total").await, 0.0);
}

/// What another node writes in Redis is external data: a word claiming to last too long is
/// deleted unheeded, and an honest word from a node that stops refreshing it lapses by itself.
#[tokio::test]
#[ignore = "needs redis-server"]
async fn a_stale_or_lying_word_in_redis_holds_publishers_back_only_briefly() {
    let redis = RedisServer::start();
    let (_a, b) = nodes(&redis).await;
    let room = ChatId::new_v4();
    let body = batch(room, 1, 10);
    let redis_ms = || async {
        let time: Vec<String> = redis_cmd(&redis, &["TIME"]).await;
        time[0].parse::<u64>().unwrap() * 1000 + time[1].parse::<u64>().unwrap() / 1000
    };

    let lie = format!("{}|*", redis_ms().await + 3_600_000);
    let _: () = redis_cmd(&redis, &["HSET", "herald:{pressure}", "liar", &lie]).await;
    sleep(Duration::from_millis(200)).await;
    assert_eq!(b.publish(&body).await.0, 202, "a word claiming an hour is not heeded");
    let kept: bool = redis_cmd(&redis, &["HEXISTS", "herald:{pressure}", "liar"]).await;
    assert!(!kept, "and is deleted");
    let junk = [("no-bar", "*".to_string()), ("bad-expiry", "soon|*".to_string())];
    for (field, value) in &junk {
        let _: () = redis_cmd(&redis, &["HSET", "herald:{pressure}", field, value]).await;
    }
    sleep(Duration::from_millis(200)).await;
    assert_eq!(b.publish(&body).await.0, 202, "nor is one that does not parse");

    // A node that names the room, then dies: its publishers wait and get 429 while the word
    // lives, and are admitted once it expired, without anyone clearing it.
    let other = ChatId::new_v4();
    let word = format!("{}|{other} not-a-room {room}", redis_ms().await + 1_500);
    let _: () = redis_cmd(&redis, &["HSET", "herald:{pressure}", "dead-node", &word]).await;
    sleep(Duration::from_millis(200)).await;
    assert_eq!(b.metric("redis_pressure_rooms").await, 2.0, "the bad id is skipped");
    let started = Instant::now();
    assert_eq!(b.publish(&body).await.0, 429, "the room named is pushed back");
    assert!(started.elapsed() >= Duration::from_millis(200), "after waiting for it to pass");
    assert_eq!(b.publish(&batch(ChatId::new_v4(), 1, 10)).await.0, 202, "other rooms are not");
    admitted_eventually(&b, &body).await;
    assert_eq!(b.metric("redis_pressure_nodes").await, 0.0);
}

/// What Redis pushes a node is read off the node's runtime, into the queue its word counts: a
/// node whose runtime is stalled (every worker busy) still tells the others it is behind, before
/// what it owes lands on its readers. Node A runs on this test's runtime, which the test blocks
/// while node B, on a thread of its own, publishes to A's reader.
#[tokio::test]
#[ignore = "needs redis-server"]
async fn a_node_whose_runtime_is_stalled_still_pushes_back_publishers_on_another() {
    let redis = RedisServer::start();
    mark_settled(&redis).await;
    let mut config = support::redis::config(&redis);
    // Room enough that the reader keeps every event A owes it once A runs again: what is checked
    // here is the word, not the history.
    config.rooms.history_size = 20_000;
    config.websocket.write_wait = Duration::from_secs(60);
    let a = start(config.clone()).await;
    let room = ChatId::new_v4();
    let (mut reader, head) = stalled_reader(&a, room).await;

    let b_node = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("B's runtime");
        runtime.block_on(async move {
            let b = start(config).await;
            let body = batch(room, 1, 100);
            let mut accepted = 0u64;
            for _ in 0..10_000 {
                let (status, reply) = b.publish(&body).await;
                if status == 429 {
                    let remote = b.metric("publish_overloaded_remote_total").await;
                    b.stop().await;
                    return (accepted, Some(remote));
                }
                assert_eq!(status, 202, "{reply}");
                accepted += 1;
            }
            b.stop().await;
            (accepted, None)
        })
    });
    // Blocks this thread, so A's runtime runs nothing until B is done.
    let (accepted, remote) = b_node.join().expect("node B's thread");
    assert_eq!(remote, Some(1.0), "B pushed back for A's stalled node after {accepted} events");
    assert!(accepted > 0);

    // A runs again: its reader gets every accepted event, in order, none lost.
    read_events(&mut reader, head, accepted).await;
    assert_eq!(a.metric("redis_inbound_dropped_total").await, 0.0);
    assert_eq!(a.metric("slow_consumers_dropped_total").await, 0.0);
    a.wait_metric("redis_pressure_reporting", 0.0).await;
}

/// Publishes `count` messages of `size` bytes on `channel` of `url`'s Redis from a thread of its
/// own, reading the nodes' words after each, then runs `after` there; blocks this thread (and so
/// a current-thread test runtime, and every node on it) until done. Returns after how many
/// messages some node first named every room.
fn push_while_stalled(
    url: String,
    channel: String,
    count: usize,
    size: usize,
    after: impl FnOnce() + Send + 'static,
) -> Option<usize> {
    let pusher = std::thread::spawn(move || {
        let client = redis::Client::open(url).expect("redis url");
        let mut conn = client.get_connection().expect("connects");
        let blob = "x".repeat(size);
        let mut named_every_room_after = None;
        for i in 0..count {
            let _: i64 = redis::cmd("PUBLISH").arg(&channel).arg(&blob).query(&mut conn).expect("PUBLISH");
            std::thread::sleep(Duration::from_millis(30));
            let words: Vec<String> =
                redis::cmd("HVALS").arg("herald:{pressure}").query(&mut conn).expect("HVALS");
            if named_every_room_after.is_none() && words.iter().any(|w| w.ends_with("|*")) {
                named_every_room_after = Some(i + 1);
            }
        }
        after();
        named_every_room_after
    });
    pusher.join().expect("the pushing thread")
}

/// What waits for a stalled node's delivery is bounded in bytes, not only in pushes: from 8 MiB
/// the node names every room, and past 32 MiB it drops what Redis pushes, counted. Room events
/// dropped are gaps its clients recover from Redis's history: the session stays.
#[tokio::test]
#[ignore = "needs redis-server"]
async fn what_waits_for_a_stalled_node_is_bounded_in_bytes() {
    let redis = RedisServer::start();
    mark_settled(&redis).await;
    let a = start(support::redis::config(&redis)).await;
    let room = ChatId::new_v4();
    let _reader = stalled_reader(&a, room).await;
    let channel = herald::bus::redis::channel(herald::bus::Topic::Room(room));
    // Each push counts its channel, its message and 64 bytes: 32 of them fill the 32 MiB exactly.
    let size = (1 << 20) - 64 - channel.len();
    // Let A deliver what the reader's subscribe published (its presence join) before it stalls:
    // one more push still waiting would leave room for 31.
    sleep(Duration::from_millis(300)).await;
    let named = push_while_stalled(redis.url(), channel, 40, size, || {});
    let named = named.expect("A named every room while 40 MiB waited for its delivery");
    assert!((8..=12).contains(&named), "from 8 MiB: named after {named} MiB");
    let dropped = a.metric("redis_inbound_dropped_total").await;
    assert!((8.0..=9.0).contains(&dropped), "what is past 32 MiB is dropped and counted: {dropped}");
    assert_eq!(a.publish(&batch(room, 1, 10)).await.0, 202);
    sleep(Duration::from_millis(300)).await;
    assert_eq!(a.metric("redis_reconnects_total").await, 0.0, "room events dropped keep the session");
}

/// A membership change or revocation a stalled node had no room for is not forgotten: the node
/// opens a new session, which reads it back, and a revoked connection still closes.
#[tokio::test]
#[ignore = "needs redis-server"]
async fn a_revocation_a_stalled_node_had_no_room_for_still_closes_the_connection() {
    let redis = RedisServer::start();
    mark_settled(&redis).await;
    let config = support::redis::config(&redis);
    let a = start(config.clone()).await;
    let room = ChatId::new_v4();
    let _reader = stalled_reader(&a, room).await;
    let alice = support::user();
    let mut alice_on_a =
        a.connect_token(&support::token_at(alice, &[], Some(herald::auth::now_secs() - 100))).await;
    alice_on_a.send_json(json!({"type":"ping"})).await;
    assert_eq!(alice_on_a.recv().await, json!({"type":"pong"}));
    let channel = herald::bus::redis::channel(herald::bus::Topic::Room(room));
    let size = (1 << 20) - 64 - channel.len();
    sleep(Duration::from_millis(300)).await;
    // 32 messages fill A's queue to the byte; then node B, on the pushing thread, revokes alice.
    push_while_stalled(redis.url(), channel, 32, size, move || {
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().expect("B's runtime");
        runtime.block_on(async move {
            let b = start(config).await;
            let path = format!("/api/users/{alice}/revoke");
            let (status, reply) = support::api_post(b.addr, &path, "", Some(support::API_KEY)).await;
            assert_eq!(status, 200, "{reply}");
            b.stop().await;
        });
    });
    assert!(a.metric("redis_inbound_dropped_total").await >= 1.0, "the revocation found no room");
    let (code, _) = tokio::time::timeout(PATIENCE, alice_on_a.closed()).await.expect("closed in time");
    assert_eq!(code, Some(4003), "the revoked connection closes");
    a.wait_metric("redis_reconnects_total", 1.0).await;
}
