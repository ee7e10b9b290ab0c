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
