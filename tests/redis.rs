//! Redis bus tests against a real `redis-server`: several `RedisBus` nodes on one Redis, each
//! with a recording sink, checked for cross-node delivery, `seq`, subscriptions and restarts.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald::bus::redis::{channel, RedisBus, RedisOptions};
use herald::bus::{Bus, Deliver, Health, Topic};
use herald::config::{BusConfig, BusKind, Membership};
use herald::protocol::event::{parse_batch, DomainEvent, EventKind};
use herald::protocol::{ChatId, UserId};
use serde_json::json;
use support::redis::{
    assert_fixed_503, gateway, http_publish_eventually, mark_settled, redis_cmd, two_nodes, RedisServer,
};
use support::{seqs_until, Gateway};
use tokio::sync::Notify;
use tokio::time::{sleep, timeout, timeout_at, Instant};

/// What a sink saw, one entry per `deliver` call.
#[derive(Debug, Clone, PartialEq)]
struct Got {
    kind: EventKind,
    chat: Option<ChatId>,
    user: Option<UserId>,
    users: Vec<UserId>,
    seq: Option<u64>,
    data: Option<String>,
}

#[derive(Default)]
struct Recorder {
    got: Mutex<Vec<Got>>,
    /// Woken on every delivery, for [`Recorder::wait`].
    delivered: Notify,
}

impl Deliver for Recorder {
    fn deliver(&self, event: &DomainEvent, seq: Option<u64>) {
        self.got.lock().unwrap().push(Got {
            kind: event.kind,
            chat: event.chat_id,
            user: event.user_id,
            users: event.user_ids.clone(),
            seq,
            data: event.data.as_ref().map(|d| d.get().to_string()),
        });
        self.delivered.notify_waiters();
    }
}

impl Recorder {
    fn all(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    /// Waits until `done` holds for what was delivered, or panics after 10 s.
    async fn wait(&self, what: &str, done: impl Fn(&[Got]) -> bool) -> Vec<Got> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // Registered before looking, so a delivery in between still wakes us.
            let delivered = self.delivered.notified();
            let mut delivered = std::pin::pin!(delivered);
            delivered.as_mut().enable();
            let got = self.all();
            if done(&got) {
                return got;
            }
            if timeout_at(deadline, delivered).await.is_err() {
                panic!("timed out waiting for {what}; got {got:#?}");
            }
        }
    }

    /// Room seqs delivered for `chat`, in delivery order.
    fn seqs(&self, chat: ChatId) -> Vec<u64> {
        self.all().iter().filter(|g| g.chat == Some(chat) && g.seq.is_some()).filter_map(|g| g.seq).collect()
    }
}

/// Short timings so restart tests run in seconds; `settle` still exceeds the backoff cap.
fn options() -> RedisOptions {
    RedisOptions {
        settle: Duration::from_millis(1500),
        backoff_max: Duration::from_millis(300),
        ping_interval: Duration::from_millis(200),
        ping_timeout: Duration::from_millis(500),
        connect_timeout: Duration::from_millis(500),
        ..RedisOptions::default()
    }
}

async fn node(redis: &RedisServer) -> (RedisBus, Arc<Recorder>) {
    node_with(redis, options()).await
}

async fn node_with(redis: &RedisServer, options: RedisOptions) -> (RedisBus, Arc<Recorder>) {
    let sink = Arc::new(Recorder::default());
    let config = BusConfig { kind: BusKind::Redis, redis_url: redis.url(), ..BusConfig::default() };
    let bus = RedisBus::connect_with(&config, sink.clone(), options).await.expect("connect");
    (bus, sink)
}

fn id() -> uuid::Uuid {
    uuid::Uuid::new_v4()
}

fn message(chat: ChatId, n: usize) -> DomainEvent {
    events(&format!(r#"{{"type":"message.sent","chat_id":"{chat}","data":{{"n":{n}}}}}"#)).remove(0)
}

fn events(json: &str) -> Vec<DomainEvent> {
    parse_batch(json.as_bytes()).expect("valid test events")
}

async fn redis_channels(redis: &RedisServer, pattern: &str) -> Vec<String> {
    let mut channels: Vec<String> = redis_cmd(redis, &["PUBSUB", "CHANNELS", pattern]).await;
    channels.sort();
    channels
}

/// Waits (up to 5 s) until Redis's `herald:*` channels other than the global one are `want`.
async fn expect_channels(redis: &RedisServer, want: &[String]) {
    let mut want: Vec<String> = want.to_vec();
    want.sort();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut got = redis_channels(redis, "herald:{*}:room").await;
        got.extend(redis_channels(redis, "herald:{*}:user").await);
        got.sort();
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "redis channels {got:?}, expected {want:?}");
        sleep(Duration::from_millis(20)).await;
    }
}

/// Publishes, retrying while the bus refuses (Redis down or settling), for up to 15 s.
async fn publish_eventually(bus: &RedisBus, batch: Vec<DomainEvent>) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match bus.publish(batch.clone()).await {
            Ok(()) => return,
            Err(e) => assert!(Instant::now() < deadline, "publish still failing: {e}"),
        }
        sleep(Duration::from_millis(50)).await;
    }
}

/// What `sink` (node `to`'s) was delivered before a marker event that `from` publishes now.
/// Redis pushes to a connection in publish order, so anything still on its way from an earlier
/// publish arrives before the marker: this proves "nothing more arrived" without a sleep.
async fn delivered_before_marker(from: &RedisBus, to: &RedisBus, sink: &Recorder) -> Vec<Got> {
    let marker = id();
    to.watch(Topic::User(marker)).await.unwrap();
    let body = format!(r#"{{"type":"notification.created","user_id":"{marker}","data":{{"marker":1}}}}"#);
    from.publish(events(&body)).await.unwrap();
    let got = sink.wait("the marker event", |g| g.iter().any(|g| g.user == Some(marker))).await;
    to.unwatch(Topic::User(marker));
    got.into_iter().take_while(|g| g.user != Some(marker)).collect()
}

async fn wait_health(bus: &RedisBus, ok: bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while (bus.health() == Health::Ok) != ok {
        assert!(Instant::now() < deadline, "health stayed {:?}", bus.health());
        sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn event_published_on_one_node_reaches_the_other_with_the_same_consecutive_seq() {
    let redis = RedisServer::start();
    let (a, sink_a) = node(&redis).await;
    let (b, sink_b) = node(&redis).await;
    let chat = id();
    a.watch(Topic::Room(chat)).await.unwrap();
    b.watch(Topic::Room(chat)).await.unwrap();
    let head = a.head(chat).await.unwrap();

    // A batch, then single calls from both nodes.
    b.publish((0..4).map(|n| message(chat, n)).collect()).await.unwrap();
    for n in 4..8 {
        b.publish(vec![message(chat, n)]).await.unwrap();
    }
    a.publish(vec![message(chat, 8)]).await.unwrap();

    let want: Vec<u64> = (head + 1..=head + 9).collect();
    sink_a.wait("9 events on A", |g| g.len() >= 9).await;
    sink_b.wait("9 events on B", |g| g.len() >= 9).await;
    assert_eq!(sink_a.seqs(chat), want);
    assert_eq!(sink_a.all(), sink_b.all(), "both nodes see the same events with the same seq");
    let data: Vec<String> = sink_a.all().into_iter().filter_map(|g| g.data).collect();
    let expected: Vec<String> = (0..9).map(|n| format!(r#"{{"n":{n}}}"#)).collect();
    assert_eq!(data, expected, "order and bytes preserved");

    // The counter lives under the room's hash tag, next to its channel.
    assert_eq!(redis_counter(&redis, chat).await, head + 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn a_node_subscribes_to_a_room_only_while_it_has_local_subscribers() {
    let redis = RedisServer::start();
    let (a, sink_a) = node(&redis).await;
    let (b, _sink_b) = node(&redis).await;
    let chat = id();
    // The room's position before any publish: every publish counts from it.
    let head = a.head(chat).await.unwrap();
    let room = channel(Topic::Room(chat));
    assert_eq!(room, format!("herald:{{{chat}}}:room"), "room channels carry a Cluster hash tag");

    // Every node listens to the global membership channel, and to no room yet.
    assert_eq!(redis_channels(&redis, "herald:members").await, vec!["herald:members".to_string()]);
    expect_channels(&redis, &[]).await;
    b.publish(vec![message(chat, 0)]).await.unwrap();

    a.watch(Topic::Room(chat)).await.unwrap();
    a.watch(Topic::Room(chat)).await.unwrap();
    expect_channels(&redis, std::slice::from_ref(&room)).await;
    b.publish(vec![message(chat, 1)]).await.unwrap();
    sink_a.wait("the event after watch", |g| !g.is_empty()).await;
    assert_eq!(sink_a.seqs(chat), vec![head + 2], "nothing from before the watch, seq counts every publish");

    a.unwatch(Topic::Room(chat));
    // A watch of another topic resolves after a supervisor round that followed the unwatch: had
    // that unwatch unsubscribed the room, it would be gone by now.
    let barrier = Topic::User(id());
    a.watch(barrier).await.unwrap();
    a.unwatch(barrier);
    expect_channels(&redis, std::slice::from_ref(&room)).await;
    a.unwatch(Topic::Room(chat));
    expect_channels(&redis, &[]).await;
    b.publish(vec![message(chat, 2)]).await.unwrap();
    delivered_before_marker(&b, &a, &sink_a).await;
    assert_eq!(sink_a.seqs(chat), vec![head + 2], "nothing after the last unwatch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn user_events_cross_nodes_once_per_event() {
    let redis = RedisServer::start();
    let (a, sink_a) = node(&redis).await;
    let (b, _sink_b) = node(&redis).await;
    let (alice, bob, carol, chat) = (id(), id(), id(), id());
    a.watch(Topic::User(alice)).await.unwrap();
    a.watch(Topic::User(carol)).await.unwrap();
    a.watch(Topic::Room(chat)).await.unwrap();
    let head = a.head(chat).await.unwrap();

    let batch = format!(
        r#"[{{"type":"notification.created","user_id":"{bob}","data":{{"to":"bob"}}}},
           {{"type":"notification.created","user_id":"{alice}","data":{{"to":"alice"}}}},
           {{"type":"task.status_changed","user_ids":["{alice}","{carol}"],"data":{{"t":1}}}},
           {{"type":"task.status_changed","chat_id":"{chat}","user_ids":["{alice}","{carol}"],"data":{{"t":2}}}}]"#
    );
    b.publish(events(&batch)).await.unwrap();
    let got = sink_a.wait("three events", |g| g.len() >= 3).await;
    let got_later = delivered_before_marker(&b, &a, &sink_a).await;
    assert_eq!(got, got_later, "each event delivered once although it came on several channels");
    assert_eq!(got.len(), 3, "{got:#?}");
    assert_eq!(got[0].data.as_deref(), Some(r#"{"to":"alice"}"#));
    assert_eq!((got[0].kind, got[0].seq), (EventKind::NotificationCreated, None));
    assert_eq!((got[1].data.as_deref(), got[1].seq), (Some(r#"{"t":1}"#), None));
    assert_eq!(
        (got[2].data.as_deref(), got[2].seq, got[2].users.len()),
        (Some(r#"{"t":2}"#), Some(head + 1), 2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn membership_events_reach_every_node_and_later_nodes_load_them() {
    let redis = RedisServer::start();
    let (a, sink_a) = node(&redis).await;
    let (b, sink_b) = node(&redis).await;
    let (chat, u1, u2) = (id(), id(), id());
    let batch = format!(
        r#"[{{"type":"chat.member_added","chat_id":"{chat}","user_id":"{u1}"}},
           {{"type":"chat.member_added","chat_id":"{chat}","user_id":"{u2}"}},
           {{"type":"chat.member_removed","chat_id":"{chat}","user_id":"{u1}"}}]"#
    );
    a.publish(events(&batch)).await.unwrap();
    let kinds = |g: &[Got]| g.iter().map(|g| (g.kind, g.user)).collect::<Vec<_>>();
    let want = vec![
        (EventKind::MemberAdded, Some(u1)),
        (EventKind::MemberAdded, Some(u2)),
        (EventKind::MemberRemoved, Some(u1)),
    ];
    assert_eq!(kinds(&sink_a.wait("members on A", |g| g.len() >= 3).await), want);
    assert_eq!(kinds(&sink_b.wait("members on B", |g| g.len() >= 3).await), want);

    // A node started now learns the current membership from Redis.
    let (c, sink_c) = node(&redis).await;
    let got = sink_c.wait("snapshot on C", |g| !g.is_empty()).await;
    assert_eq!(delivered_before_marker(&a, &c, &sink_c).await, got);
    assert_eq!(kinds(&got), vec![(EventKind::MemberAdded, Some(u2))]);
    assert_eq!(got[0].chat, Some(chat));
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn redis_restart_mid_stream_refuses_then_resumes_without_duplicates_or_seq_reset() {
    let mut redis = RedisServer::start();
    let (a, sink_a) = node(&redis).await;
    let (b, _sink_b) = node(&redis).await;
    let (chat, user) = (id(), id());
    a.watch(Topic::Room(chat)).await.unwrap();
    a.watch(Topic::User(user)).await.unwrap();
    let head = a.head(chat).await.unwrap();
    for n in 0..5 {
        b.publish(vec![message(chat, n)]).await.unwrap();
    }
    sink_a.wait("5 events", |g| g.len() >= 5).await;

    redis.kill();
    // Never Ok for an event Redis did not take.
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.publish(vec![message(chat, 99)]).await.is_ok() {
        assert!(Instant::now() < deadline, "publish kept succeeding with Redis down");
    }
    assert!(b.publish(vec![message(chat, 99)]).await.is_err());
    wait_health(&a, false).await;
    wait_health(&b, false).await;
    assert!(a.watch(Topic::Room(id())).await.is_err(), "watch refused while down");

    redis.restart();
    publish_eventually(&b, vec![message(chat, 5)]).await;
    for n in 6..10 {
        b.publish(vec![message(chat, n)]).await.unwrap();
    }
    let notification = format!(r#"{{"type":"notification.created","user_id":"{user}","data":{{}}}}"#);
    b.publish(events(&notification)).await.unwrap();
    sink_a.wait("events after the restart", |g| g.len() >= 11).await;
    wait_health(&a, true).await;
    wait_health(&b, true).await;
    let got = delivered_before_marker(&b, &a, &sink_a).await;
    assert_eq!(sink_a.seqs(chat), (head + 1..=head + 10).collect::<Vec<u64>>(), "no duplicate, no reset");
    assert_eq!(got.len(), 11, "the user subscription was restored too");
    let stats = a.stats();
    assert!(stats.reconnects.load(std::sync::atomic::Ordering::Relaxed) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn seq_continues_after_restart_even_when_the_publisher_never_saw_the_room() {
    let mut redis = RedisServer::start();
    // A, the only node that knows the room, reconnects slowly (backoff up to 1.5 s with jitter);
    // B, which never saw the room, reconnects fast and publishes first.
    let settle = Duration::from_millis(2500);
    let slow = RedisOptions { backoff_max: Duration::from_secs(1), settle, ..options() };
    let fast = RedisOptions { backoff_max: Duration::from_millis(100), settle, ..options() };
    let (a, sink_a) = node_with(&redis, slow).await;
    let (b, _sink_b) = node_with(&redis, fast).await;
    let chat = id();
    a.watch(Topic::Room(chat)).await.unwrap();
    let head = a.head(chat).await.unwrap();
    a.publish((0..3).map(|n| message(chat, n)).collect()).await.unwrap();
    sink_a.wait("3 events", |g| g.len() >= 3).await;

    redis.kill();
    wait_health(&b, false).await;
    // After five failed attempts A's backoff is at its cap (50 ms doubling to 1 s).
    let failures = a.stats();
    let deadline = Instant::now() + Duration::from_secs(10);
    while failures.connect_failures.load(std::sync::atomic::Ordering::Relaxed) < 5 {
        assert!(Instant::now() < deadline, "A never failed to reconnect five times");
        sleep(Duration::from_millis(20)).await;
    }
    redis.restart();
    // B knows nothing of the room: Redis refuses room events until A has re-seeded it.
    let started = Instant::now();
    publish_eventually(&b, vec![message(chat, 3)]).await;
    assert!(started.elapsed() >= Duration::from_secs(1), "room events were refused while settling");
    sink_a.wait("the event after the restart", |g| g.len() >= 4).await;
    assert_eq!(sink_a.seqs(chat), vec![head + 1, head + 2, head + 3, head + 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn concurrent_publishes_are_batched_in_order_with_unique_seqs() {
    let redis = RedisServer::start();
    let (a, sink_a) = node(&redis).await;
    let b = Arc::new(node(&redis).await.0);
    let chat = id();
    a.watch(Topic::Room(chat)).await.unwrap();
    let head = a.head(chat).await.unwrap();
    let tasks: Vec<_> = (0..20)
        .map(|t| {
            let b = b.clone();
            tokio::spawn(async move {
                for n in 0..50 {
                    b.publish(vec![message(chat, t * 1000 + n)]).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    sink_a.wait("1000 events", |g| g.len() >= 1000).await;
    assert_eq!(sink_a.seqs(chat), (head + 1..=head + 1000).collect::<Vec<u64>>());
    // Each publisher's own events keep their order.
    let data: Vec<u64> = sink_a
        .all()
        .iter()
        .filter_map(|g| g.data.as_ref()?.trim_start_matches(r#"{"n":"#).trim_end_matches('}').parse().ok())
        .collect();
    for t in 0..20u64 {
        let mine: Vec<u64> = data.iter().copied().filter(|n| n / 1000 == t).collect();
        assert_eq!(mine, (0..50).map(|n| t * 1000 + n).collect::<Vec<_>>());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn racing_watch_and_unwatch_end_subscribed_iff_the_count_is_positive() {
    let redis = RedisServer::start();
    let a = Arc::new(node(&redis).await.0);
    let topics: Vec<Topic> = (0..4).map(|_| Topic::Room(id())).collect();
    // After churning up and down, tasks of topics 1 and 3 end holding `t % 3` watches, the
    // others none.
    let tasks: Vec<_> = (0..24usize)
        .map(|t| {
            let (a, topic) = (a.clone(), topics[t % topics.len()]);
            tokio::spawn(async move {
                for round in 0..20 {
                    a.watch(topic).await.unwrap();
                    if round % 3 == 0 {
                        tokio::task::yield_now().await;
                    }
                    a.unwatch(topic);
                }
                let hold = if t % 2 == 1 { t % 3 } else { 0 };
                for _ in 0..hold {
                    a.watch(topic).await.unwrap();
                }
                hold
            })
        })
        .collect();
    let mut counts = vec![0usize; topics.len()];
    for (t, task) in tasks.into_iter().enumerate() {
        counts[t % topics.len()] += task.await.unwrap();
    }
    let want: Vec<String> =
        topics.iter().zip(&counts).filter(|(_, c)| **c > 0).map(|(t, _)| channel(*t)).collect();
    assert!(!want.is_empty() && want.len() < topics.len(), "the mix covers both outcomes: {counts:?}");
    expect_channels(&redis, &want).await;

    // Drop every remaining watch, with fresh watches racing the last unwatches.
    for (topic, count) in topics.iter().zip(&counts) {
        for _ in 0..*count {
            a.unwatch(*topic);
        }
        let a2 = a.clone();
        let topic = *topic;
        tokio::spawn(async move {
            a2.watch(topic).await.unwrap();
            a2.unwatch(topic);
        })
        .await
        .unwrap();
    }
    expect_channels(&redis, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn starts_degraded_when_redis_is_down_and_recovers_without_restart() {
    let mut redis = RedisServer::start();
    redis.kill();
    let started = Instant::now();
    let (a, sink_a) =
        timeout(Duration::from_secs(5), node(&redis)).await.expect("connect returns while down");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(matches!(a.health(), Health::Degraded(_)));
    let chat = id();
    assert!(a.publish(vec![message(chat, 0)]).await.is_err());

    redis.restart();
    wait_health(&a, true).await;
    a.watch(Topic::Room(chat)).await.unwrap();
    let head = a.head(chat).await.unwrap();
    publish_eventually(&a, vec![message(chat, 1)]).await;
    sink_a.wait("the event", |g| !g.is_empty()).await;
    assert_eq!(sink_a.seqs(chat), vec![head + 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn unknown_events_stay_local_and_an_unusable_url_names_the_key() {
    let redis = RedisServer::start();
    let (a, sink_a) = node(&redis).await;
    let (b, sink_b) = node(&redis).await;
    a.publish(events(r#"{"type":"invoice.paid","data":{}}"#)).await.unwrap();
    assert_eq!(sink_a.all().len(), 1, "counted by this node's broadcaster");
    assert!(delivered_before_marker(&a, &b, &sink_b).await.is_empty(), "not counted again on every node");

    let config = BusConfig { kind: BusKind::Redis, redis_url: "redis://[::1".into(), ..BusConfig::default() };
    match RedisBus::connect(&config, sink_a).await {
        Err(e) => assert!(e.to_string().contains("bus.redis_url"), "{e}"),
        Ok(_) => panic!("accepted an unusable URL"),
    }
}

// ---------------------------------------------------------------------------------------------
// End to end: two Herald nodes on one Redis, real WebSocket clients, HTTP publishing.

/// One client per node, both subscribed to a new chat; each with the position its `subscribed`
/// reply carried.
async fn subscribed_on_both(
    a: &Gateway,
    b: &Gateway,
) -> (uuid::Uuid, (support::Client, u64), (support::Client, u64)) {
    let chat = id();
    let mut on_a = a.connect(id(), &[]).await;
    let mut on_b = b.connect(id(), &[]).await;
    let head_a = on_a.subscribe(chat).await;
    let head_b = on_b.subscribe(chat).await;
    (chat, (on_a, head_a), (on_b, head_b))
}

/// The room's counter as Redis holds it: its last `seq` (its origin when nothing was published).
async fn redis_counter(redis: &RedisServer, chat: ChatId) -> u64 {
    redis_cmd(redis, &["GET", &format!("herald:{{{chat}}}:seq")]).await
}

/// Subscribes `client` to `chat`, retrying while the node answers `forbidden` (it has not learnt
/// the membership from Redis yet), for up to `within`.
async fn subscribe_when_allowed(client: &mut support::Client, chat: ChatId, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        client.send_json(json!({"type":"subscribe","chat_id":chat})).await;
        let reply = client.recv().await;
        if reply["type"] == "subscribed" {
            return;
        }
        assert_eq!(reply["code"], "forbidden", "{reply}");
        assert!(Instant::now() < deadline, "membership never reached node A: {reply}");
        sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn e2e_clients_on_both_nodes_see_an_event_with_the_same_seq() {
    let redis = RedisServer::start();
    let (a, b) = two_nodes(&redis, Membership::Open).await;
    let (chat, mut on_a, mut on_b) = subscribed_on_both(&a, &b).await;

    // Raw text: `data` must cross Redis byte for byte (key order, `1.50`).
    let raw = format!(r#"{{"type":"message.sent","chat_id":"{chat}","data":{{"text":"from b","n":1.50}}}}"#);
    let (status, _) = b.publish(&raw).await;
    assert_eq!(status, 202);
    let (status, _) = a.publish(&support::message_sent(chat, &json!({"text": "from a"}))).await;
    assert_eq!(status, 202);
    for (client, head) in [&mut on_a, &mut on_b] {
        let first = client.recv_text().await;
        assert_eq!(
            first,
            format!(
                r#"{{"type":"message.new","chat_id":"{chat}","seq":{},"data":{{"text":"from b","n":1.50}}}}"#,
                *head + 1
            )
        );
        let second = client.recv().await;
        assert_eq!(
            second,
            json!({"type":"message.new","chat_id":chat,"seq":*head + 2,"data":{"text":"from a"}})
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn e2e_notifications_cross_nodes() {
    let redis = RedisServer::start();
    let (a, b) = two_nodes(&redis, Membership::Open).await;
    let (alice, bob) = (id(), id());
    let mut alice_on_a = a.connect(alice, &[]).await;
    let mut bob_on_b = b.connect(bob, &[]).await;
    // The user topic is watched as the connection starts; a round trip proves it is in place.
    for client in [&mut alice_on_a, &mut bob_on_b] {
        client.send_json(json!({"type":"ping"})).await;
        assert_eq!(client.recv().await, json!({"type":"pong"}));
    }

    let body = json!({"type":"notification.created","user_id":alice,"data":{"title":"hi"}}).to_string();
    assert_eq!(b.publish(&body).await.0, 202);
    assert_eq!(alice_on_a.recv().await, json!({"type":"notification.new","data":{"title":"hi"}}));
    // Bob's own notification, published after: his first frame, so alice's never reached him.
    let marker = json!({"type":"notification.created","user_id":bob,"data":{"marker":1}}).to_string();
    assert_eq!(b.publish(&marker).await.0, 202);
    assert_eq!(bob_on_b.recv().await, json!({"type":"notification.new","data":{"marker":1}}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn e2e_membership_removal_on_one_node_unsubscribes_a_client_on_the_other() {
    let redis = RedisServer::start();
    let (a, b) = two_nodes(&redis, Membership::Events).await;
    let (user, chat) = (id(), id());
    // Node A learns the membership from Redis; the client retries until it has.
    let mut client = member_on_a(&a, &b, Membership::Events, user, chat).await;

    assert_eq!(b.publish(&removed_body(chat, user)).await.0, 202);
    assert_eq!(client.recv().await, json!({"type":"unsubscribed","chat_id":chat,"reason":"removed"}));
    // A notification for the same user follows the message: a room frame, had node A still
    // delivered the room to this client, would come first.
    assert_eq!(b.publish(&message_then_marker(chat, user)).await.0, 202);
    assert_eq!(client.recv().await, json!({"type":"notification.new","data":{"marker":1}}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn e2e_redis_restart_keeps_clients_connected_and_seq_growing() {
    let mut redis = RedisServer::start();
    let (a, b) = two_nodes(&redis, Membership::Open).await;
    let (chat, mut on_a, mut on_b) = subscribed_on_both(&a, &b).await;
    for n in 1..=3 {
        assert_eq!(b.publish(&support::message_sent(chat, &json!({ "n": n }))).await.0, 202);
    }
    for (client, head) in [&mut on_a, &mut on_b] {
        for n in 1..=3 {
            assert_eq!(client.recv().await["seq"], *head + n);
        }
    }

    redis.kill();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, reply) = b.publish(&support::message_sent(chat, &json!({"lost": true}))).await;
        if status == 503 {
            assert_fixed_503(&reply);
            break;
        }
        assert!(Instant::now() < deadline, "publish kept succeeding with Redis down ({status})");
    }
    // Alive, but not ready: a load balancer sends new clients elsewhere.
    assert_eq!(b.get("/healthz").await.0, 200);
    let (status, body) = b.get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).ok().map(|v| v["status"].clone()),
        Some(json!("not_ready"))
    );
    redis.restart();
    http_publish_eventually(&b, &support::message_sent(chat, &json!({"n": 4}))).await;
    assert_eq!(a.publish(&support::message_sent(chat, &json!({"n": 5}))).await.0, 202);
    for (client, head) in [&mut on_a, &mut on_b] {
        let next = client.recv().await;
        assert_eq!(next, json!({"type":"message.new","chat_id":chat,"seq":*head + 4,"data":{"n":4}}));
        assert_eq!(client.recv().await["seq"], *head + 5);
        client.send_json(json!({"type":"ping"})).await;
        assert_eq!(client.recv().await, json!({"type":"pong"}));
    }
    // The outage is visible to operators.
    assert!(b.metric("redis_reconnects_total").await >= 1.0);
    assert!(b.metric("publish_unavailable_total").await >= 1.0);
    assert_eq!(b.metric("bus_up").await, 1.0);
    assert_eq!(b.get("/readyz").await.0, 200);
}

/// Issue: a node that reconnected loaded the membership snapshot as additions only, so a
/// removal published while it was cut off left the user subscribed. The snapshot now replaces
/// the table, and what it no longer holds is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn e2e_a_removal_missed_during_an_outage_is_applied_on_reconnect() {
    let redis = RedisServer::start();
    let (a, b) = two_nodes(&redis, Membership::Events).await;
    let (chat, member) = (id(), id());
    let added = json!({"type":"chat.member_added","chat_id":chat,"user_id":member}).to_string();
    assert_eq!(b.publish(&added).await.0, 202);
    let mut on_a = a.connect(member, &[]).await;
    // Node A learns the membership from Redis; subscribe once it has.
    subscribe_when_allowed(&mut on_a, chat, Duration::from_secs(5)).await;
    // The removal A never hears of: gone from Redis's sets, never published.
    let _: () =
        redis_cmd(&redis, &["SREM", &format!("herald:{{{chat}}}:members"), &member.to_string()]).await;
    // Cut every node off (subscribed RESP3 clients count as pubsub); each reconnects and
    // loads the snapshot.
    let killed: i64 = redis_cmd(&redis, &["CLIENT", "KILL", "TYPE", "pubsub"]).await;
    assert_eq!(killed, 2, "both nodes were cut off");
    assert_eq!(on_a.recv().await, json!({"type":"unsubscribed","chat_id":chat,"reason":"removed"}));
    on_a.send_json(json!({"type":"subscribe","chat_id":chat})).await;
    assert_eq!(on_a.recv().await["code"], "forbidden");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn a_watch_racing_the_last_unwatch_resolves_only_once_deliveries_flow() {
    let redis = RedisServer::start();
    let (a, sink_a) = node(&redis).await;
    let (b, _sink_b) = node(&redis).await;
    let chat = id();
    let topic = Topic::Room(chat);
    let head = b.head(chat).await.unwrap();
    for n in 0..200usize {
        a.watch(topic).await.unwrap();
        // The last unwatch makes the supervisor UNSUBSCRIBE; the next watch lands before, during
        // or after that command, depending on how long this task lets it run.
        a.unwatch(topic);
        for _ in 0..n % 7 {
            tokio::task::yield_now().await;
        }
        a.watch(topic).await.unwrap();
        // Resolved: an event published now must arrive.
        b.publish(vec![message(chat, n)]).await.unwrap();
        let want = format!(r#"{{"n":{n}}}"#);
        sink_a
            .wait(&format!("event {n} after watch resolved"), |g| {
                g.iter().any(|g| g.data.as_deref() == Some(&want))
            })
            .await;
        a.unwatch(topic);
    }
    let seqs = sink_a.seqs(chat);
    assert_eq!(seqs, (head + 1..=head + 200).collect::<Vec<u64>>(), "every event once, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn e2e_events_published_on_a_while_nobody_listened_are_recovered_on_b() {
    let redis = RedisServer::start();
    let (a, b) = two_nodes(&redis, Membership::Open).await;
    let chat = id();
    for n in 1..=5 {
        let (status, _) = a.publish(&support::message_sent(chat, &json!({ "n": n }))).await;
        assert_eq!(status, 202);
    }
    // The five events are the room's first: it starts right below them.
    let base = redis_counter(&redis, chat).await - 5;
    // B never watched this room: the history comes from Redis, byte for byte.
    let mut on_b = b.connect(id(), &[]).await;
    assert_eq!(on_b.subscribe_since(chat, base).await, (base + 5, true));
    for n in 1..=5u64 {
        let v = on_b.recv().await;
        assert_eq!(v, json!({"type":"message.new","chat_id":chat,"seq":base + n,"data":{"n":n}}));
    }
    // Then live from A, nothing twice.
    let (status, _) = a.publish(&support::message_sent(chat, &json!({"n": 6}))).await;
    assert_eq!(status, 202);
    assert_eq!(on_b.recv().await["seq"], base + 6);
    // A client that asks from further back than anything exists is told so.
    let mut late = b.connect(id(), &[]).await;
    assert_eq!(late.subscribe(chat).await, base + 6, "without since: the position only");
    assert_eq!(b.labelled("recoveries_total", "result", "recovered").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn e2e_a_client_moving_from_a_to_b_recovers_what_it_missed_while_publishes_race() {
    let redis = RedisServer::start();
    let (a, b) = two_nodes(&redis, Membership::Open).await;
    let (chat, (mut on_a, head), _on_b) = subscribed_on_both(&a, &b).await;
    for n in 1..=3 {
        assert_eq!(a.publish(&support::message_sent(chat, &json!({ "n": n }))).await.0, 202);
    }
    assert_eq!(seqs_until(&mut on_a, head + 3).await, vec![head + 1, head + 2, head + 3]);
    drop(on_a);
    // Publishes keep flowing through A while the client reconnects to B.
    const TOTAL: u64 = 60;
    let publisher = a.publisher.clone();
    let stream = tokio::spawn(async move {
        for n in 4..=TOTAL {
            let body = support::message_sent(chat, &json!({ "n": n }));
            publisher.publish(parse_batch(body.as_bytes()).expect("valid")).await.expect("published");
        }
    });
    let mut again = b.connect(id(), &[]).await;
    let (now, recovered) = again.subscribe_since(chat, head + 3).await;
    assert!(recovered, "Redis holds everything after {} (head {now})", head + 3);
    assert_eq!(seqs_until(&mut again, head + TOTAL).await, (head + 4..=head + TOTAL).collect::<Vec<_>>());
    stream.await.expect("publisher");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn e2e_redis_history_is_bounded_by_count() {
    let redis = RedisServer::start();
    mark_settled(&redis).await;
    let mut config = support::redis::config(&redis);
    config.rooms.history_size = 3;
    let a = support::start(config.clone()).await;
    let b = support::start(config).await;
    let chat = id();
    for n in 1..=10 {
        assert_eq!(a.publish(&support::message_sent(chat, &json!({ "n": n }))).await.0, 202);
    }
    // The ten events are the room's first: it starts right below them.
    let base = redis_counter(&redis, chat).await - 10;
    let mut c = b.connect(id(), &[]).await;
    assert_eq!(c.subscribe_since(chat, base + 5).await, (base + 10, false), "Redis kept only 8..=10");
    let mut d = b.connect(id(), &[]).await;
    assert_eq!(d.subscribe_since(chat, base + 7).await, (base + 10, true));
    assert_eq!(seqs_until(&mut d, base + 10).await, vec![base + 8, base + 9, base + 10]);
    let history = format!("herald:{{{chat}}}:history");
    let len: usize = redis_cmd(&redis, &["LLEN", &history]).await;
    assert_eq!(len, 3);
    let ttl: i64 = redis_cmd(&redis, &["PTTL", &history]).await;
    assert!(ttl > 0 && ttl <= 300_000, "the history list expires with rooms.history_ttl: {ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn a_flushed_script_cache_is_reloaded_and_each_event_published_once() {
    let redis = RedisServer::start();
    let (a, sink_a) = node(&redis).await;
    let (b, _sink_b) = node(&redis).await;
    let chat = id();
    a.watch(Topic::Room(chat)).await.unwrap();
    let head = a.head(chat).await.unwrap();
    b.publish(vec![message(chat, 0)]).await.unwrap();

    let _: () = redis_cmd(&redis, &["SCRIPT", "FLUSH"]).await;
    b.publish(vec![message(chat, 1), message(chat, 2)]).await.unwrap();
    let got = delivered_before_marker(&b, &a, &sink_a).await;
    assert_eq!(got.len(), 3, "{got:#?}");
    assert_eq!(sink_a.seqs(chat), vec![head + 1, head + 2, head + 3]);
}

// ---------------------------------------------------------------------------------------------
// Membership first after a reconnect (issue 17, item 6): node A is cut off from Redis alone
// (it connects as its own Redis user, which the test disables), Redis keeps its state, and node B
// keeps publishing.

const NODE_A_USER: &str = "herald-node-a";
const NODE_A_PASSWORD: &str = "node-a-password-0123";

/// Two nodes on a settled Redis; A connects as its own Redis user, so [`cut_off`] can take it
/// alone off Redis.
async fn two_nodes_a_separable(redis: &RedisServer, membership: Membership) -> (Gateway, Gateway) {
    mark_settled(redis).await;
    let password = format!(">{NODE_A_PASSWORD}");
    let _: () =
        redis_cmd(redis, &["ACL", "SETUSER", NODE_A_USER, "on", &password, "~*", "&*", "+@all"]).await;
    let mut config = support::config();
    let url = format!("redis://{NODE_A_USER}:{NODE_A_PASSWORD}@127.0.0.1:{}", redis.port());
    config.bus = BusConfig { kind: BusKind::Redis, redis_url: url, ..BusConfig::default() };
    config.auth.membership = membership;
    (support::start(config).await, gateway(redis, membership).await)
}

/// Drops A's connection and keeps it from reconnecting (its Redis user is disabled) until
/// [`let_back`]; Redis and its state stay up for B.
async fn cut_off(redis: &RedisServer, a: &Gateway) {
    let _: () = redis_cmd(redis, &["ACL", "SETUSER", NODE_A_USER, "off"]).await;
    let killed: i64 = redis_cmd(redis, &["CLIENT", "KILL", "USER", NODE_A_USER]).await;
    assert!(killed >= 1, "node A had a connection");
    a.wait_metric("bus_up", 0.0).await;
}

/// Lets A reconnect (it retries by itself).
async fn let_back(redis: &RedisServer) {
    let _: () = redis_cmd(redis, &["ACL", "SETUSER", NODE_A_USER, "on"]).await;
}

/// A client of `user` on `a`, subscribed to `chat`, allowed under `membership` (under `events`,
/// B publishes the membership first and the client retries until A has learnt it).
async fn member_on_a(
    a: &Gateway,
    b: &Gateway,
    membership: Membership,
    user: UserId,
    chat: ChatId,
) -> support::Client {
    let mut client = match membership {
        Membership::Token => a.connect(user, &[chat]).await,
        _ => a.connect(user, &[]).await,
    };
    if membership == Membership::Events {
        let added = json!({"type":"chat.member_added","chat_id":chat,"user_id":user}).to_string();
        assert_eq!(b.publish(&added).await.0, 202);
    }
    subscribe_when_allowed(&mut client, chat, Duration::from_secs(10)).await;
    client
}

fn removed_body(chat: ChatId, user: UserId) -> String {
    json!({"type":"chat.member_removed","chat_id":chat,"user_id":user}).to_string()
}

/// A message to `chat` and then a notification for `user`, in one batch: a client of `user` that
/// still received the room would get the message before the notification.
fn message_then_marker(chat: ChatId, user: UserId) -> String {
    let message = support::message_sent(chat, &json!({"after": "removal"}));
    let marker = json!({"type":"notification.created","user_id":user,"data":{"marker":1}});
    format!("[{message},{marker}]")
}

/// The removal B published while A was cut off is applied on A when it reconnects, before any
/// room event of the new connection: the client gets one `unsubscribed` and not the message.
async fn removal_missed_while_cut_off_is_applied_first(membership: Membership) {
    let redis = RedisServer::start();
    let (a, b) = two_nodes_a_separable(&redis, membership).await;
    let (user, chat) = (id(), id());
    let mut client = member_on_a(&a, &b, membership, user, chat).await;

    cut_off(&redis, &a).await;
    assert_eq!(b.publish(&removed_body(chat, user)).await.0, 202);
    let_back(&redis).await;
    a.wait_metric("bus_up", 1.0).await;
    assert_eq!(b.publish(&message_then_marker(chat, user)).await.0, 202);

    assert_eq!(client.recv().await, json!({"type":"unsubscribed","chat_id":chat,"reason":"removed"}));
    assert_eq!(
        client.recv().await,
        json!({"type":"notification.new","data":{"marker":1}}),
        "once, no message"
    );
    assert_eq!(a.metric("redis_membership_log_gaps_total").await, 0.0);
    assert!(a.metric("redis_reconnects_total").await >= 1.0);
}

/// Issue 17, item 6: under `membership: token` a node ignored the snapshot, so a removal
/// published while it was cut off from Redis was never applied and the user kept the room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn e2e_token_a_removal_missed_while_cut_off_is_applied_before_room_events() {
    removal_missed_while_cut_off_is_applied_first(Membership::Token).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn e2e_open_a_removal_missed_while_cut_off_is_applied_before_room_events() {
    removal_missed_while_cut_off_is_applied_first(Membership::Open).await;
}

/// Under `events` the snapshot would also drop the pair: the replayed removal and the snapshot
/// together still make one `unsubscribed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn e2e_events_a_removal_missed_while_cut_off_is_applied_before_room_events_once() {
    removal_missed_while_cut_off_is_applied_first(Membership::Events).await;
}

/// Issue 17, item 6: a reconnecting node resubscribed its rooms before it applied the membership
/// snapshot, so a removal published right after the room came back, and a message after it,
/// could deliver the message to the removed user. A large membership makes the snapshot slow to
/// read, which widens that window past the time this test takes to publish into it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn e2e_a_removal_right_after_a_reconnect_comes_before_the_next_message() {
    let redis = RedisServer::start();
    let (a, b) = two_nodes_a_separable(&redis, Membership::Events).await;
    let (user, chat) = (id(), id());
    let mut client = member_on_a(&a, &b, Membership::Events, user, chat).await;
    let populate = r#"
        for i = 1, tonumber(ARGV[1]) do
          redis.call('SADD', KEYS[1], string.format('00000000-0000-4000-8000-%012d', i))
        end
        redis.call('SADD', KEYS[2], ARGV[2])
    "#;
    let big = id();
    let members = format!("herald:{{{big}}}:members");
    let _: () = redis_cmd(
        &redis,
        &["EVAL", populate, "2", &members, "herald:member-chats", "50000", &big.to_string()],
    )
    .await;

    cut_off(&redis, &a).await;
    let_back(&redis).await;
    // The moment A's room subscription is back, B publishes the removal, the message and a marker.
    let room = channel(Topic::Room(chat));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let counts: Vec<redis::Value> = redis_cmd(&redis, &["PUBSUB", "NUMSUB", &room]).await;
        if counts.get(1) == Some(&redis::Value::Int(1)) {
            break;
        }
        assert!(Instant::now() < deadline, "node A never resubscribed the room");
    }
    let batch = format!(
        "[{},{}]",
        removed_body(chat, user),
        message_then_marker(chat, user).trim_matches(['[', ']'])
    );
    b.publisher.publish(parse_batch(batch.as_bytes()).expect("valid")).await.expect("published");

    assert_eq!(client.recv().await, json!({"type":"unsubscribed","chat_id":chat,"reason":"removed"}));
    assert_eq!(client.recv().await, json!({"type":"notification.new","data":{"marker":1}}), "no message");
}

/// More missed than the member log holds: what it still holds is replayed, and the gap is
/// counted for operators.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn e2e_a_member_log_that_no_longer_reaches_back_is_counted() {
    let redis = RedisServer::start();
    let (a, b) = two_nodes_a_separable(&redis, Membership::Token).await;
    let (first, second, chat) = (id(), id(), id());
    let mut client = member_on_a(&a, &b, Membership::Token, second, chat).await;

    cut_off(&redis, &a).await;
    assert_eq!(b.publish(&removed_body(chat, first)).await.0, 202);
    assert_eq!(b.publish(&removed_body(chat, second)).await.0, 202);
    // As if 10,000 more had been logged since the first removal: only the last entry remains.
    let _: () = redis_cmd(&redis, &["LTRIM", "herald:member-log", "-1", "-1"]).await;
    let_back(&redis).await;
    a.wait_metric("bus_up", 1.0).await;

    assert_eq!(client.recv().await, json!({"type":"unsubscribed","chat_id":chat,"reason":"removed"}));
    assert_eq!(a.metric("redis_membership_log_gaps_total").await, 1.0);
    assert_eq!(b.metric("redis_membership_log_gaps_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn api_info_names_the_redis_bus_and_its_state() {
    let mut redis = RedisServer::start();
    let gw = gateway(&redis, Membership::Open).await;
    let info = || async {
        let request = format!(
            "GET /api/info HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
            support::API_KEY
        );
        let (status, body) = gw.http(&request).await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).expect("JSON")
    };
    assert_eq!(info().await["bus"], json!({"kind": "redis", "state": "ok", "reason": null}));

    redis.kill();
    let deadline = Instant::now() + support::PATIENCE;
    loop {
        let bus = info().await["bus"].clone();
        if bus["state"] == "degraded" {
            assert_eq!(bus["kind"], "redis");
            assert!(bus["reason"].as_str().is_some_and(|r| !r.is_empty()), "{bus}");
            break;
        }
        assert!(Instant::now() < deadline, "still {bus} with Redis down");
        sleep(Duration::from_millis(50)).await;
    }
}

/// Issue 21: a custom (`events.passthrough`) room event crosses Redis with its `seq` and its bytes,
/// is recovered on another node from Redis's history, and the history route of a node that never
/// watched the room reads it the same way; a custom user event crosses too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn e2e_passthrough_events_cross_nodes_and_history_is_read_through_the_bus() {
    let redis = RedisServer::start();
    mark_settled(&redis).await;
    let start = |redis: &RedisServer| {
        let mut config = support::redis::config(redis);
        config.events.passthrough = vec!["reaction.*".into()];
        support::start(config)
    };
    let (a, b) = (start(&redis).await, start(&redis).await);
    let (room, ann) = (id(), id());
    let raw = r#"{ "emoji" : "\u2764", "n": 1.50e3 }"#;

    let mut on_b = b.connect(id(), &[]).await;
    let head = on_b.subscribe(room).await;
    let mut ann_on_b = b.connect(ann, &[]).await;
    ann_on_b.subscribe(room).await;
    let body = format!(
        r#"[{{"type":"reaction.added","chat_id":"{room}","data":{raw}}},{{"type":"reaction.seen","user_id":"{ann}","data":{raw}}}]"#
    );
    http_publish_eventually(&a, &body).await;
    let want = format!(r#"{{"type":"reaction.added","chat_id":"{room}","seq":{},"data":{raw}}}"#, head + 1);
    assert_eq!(on_b.recv_text().await, want, "the room event crossed with its seq, byte for byte");
    let user_frame = format!(r#"{{"type":"reaction.seen","data":{raw}}}"#);
    let mut got = vec![ann_on_b.recv_text().await, ann_on_b.recv_text().await];
    got.sort();
    let mut expected = vec![want.clone(), user_frame];
    expected.sort();
    assert_eq!(got, expected, "the user event crossed too");

    // Node A never watched the room: its history is Redis's, read like a recovery.
    let (status, body) = a
        .http(&format!(
            "GET /api/rooms/{room}/history?since={head} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
            support::API_KEY
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        format!(r#"{{"chat_id":"{room}","seq":{},"recovered":true,"events":[{want}]}}"#, head + 1)
    );
    let mut on_a = a.connect(id(), &[]).await;
    assert_eq!(on_a.subscribe_since(room, head).await, (head + 1, true));
    assert_eq!(on_a.recv_text().await, want, "recovered on the other node, byte for byte");
}

/// `POST <path>` on `gw` with the test API key.
async fn act_on(gw: &Gateway, path: String, body: &str) -> (u16, serde_json::Value) {
    support::api_post(gw.addr, &path, body, Some(support::API_KEY)).await
}

/// A client answers a ping: its connection is open.
async fn alive(client: &mut support::Client) {
    client.send_json(json!({"type":"ping"})).await;
    assert_eq!(client.recv().await, json!({"type":"pong"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn e2e_disconnect_on_one_node_closes_the_users_connections_on_every_node() {
    let redis = RedisServer::start();
    let (a, b) = two_nodes(&redis, Membership::Open).await;
    let (alice, bob) = (id(), id());
    let mut alice_a = a.connect(alice, &[]).await;
    let mut alice_b = b.connect(alice, &[]).await;
    let mut bob_b = b.connect(bob, &[]).await;
    alive(&mut alice_a).await;
    alive(&mut alice_b).await;
    alive(&mut bob_b).await;

    let (status, reply) = act_on(&a, format!("/api/users/{alice}/disconnect"), "").await;
    // The count is this node's connections; the other node's close too.
    assert_eq!((status, reply), (200, json!({"disconnected": 1})));
    assert_eq!(alice_a.closed().await.0, Some(4003));
    assert_eq!(alice_b.closed().await.0, Some(4003));
    alive(&mut bob_b).await;
    b.wait_metric("users", 1.0).await;
    assert_eq!(b.labelled("closes_total", "code", "4003").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn e2e_revoke_on_one_node_refuses_old_tokens_on_every_node_and_a_later_one() {
    let redis = RedisServer::start();
    let (a, b) = two_nodes(&redis, Membership::Open).await;
    let (alice, bob) = (id(), id());
    let now = herald::auth::now_secs();
    let old = support::token_at(alice, &[], Some(now - 100));
    let fresh = support::token_at(alice, &[], Some(now));
    let mut old_on_b = b.connect_token(&old).await;
    let mut fresh_on_b = b.connect_token(&fresh).await;
    let mut bob_on_b = b.connect_token(&support::token_at(bob, &[], Some(now - 100))).await;
    alive(&mut old_on_b).await;
    // B has checked alice with Redis (no revocation) and may cache that answer.
    let mut probe = b.connect_token(&old).await;
    alive(&mut probe).await;

    let body = json!({"before": now - 50}).to_string();
    let (status, reply) = act_on(&a, format!("/api/users/{alice}/revoke"), &body).await;
    assert_eq!((status, reply), (200, json!({"revoked_before": now - 50})));
    assert_eq!(old_on_b.closed().await.0, Some(4003));
    assert_eq!(probe.closed().await.0, Some(4003));
    alive(&mut fresh_on_b).await;
    alive(&mut bob_on_b).await;

    // Refused at upgrade on both nodes, and on a node started after the revocation (which
    // learns it from Redis); a token issued after the cut-off is accepted everywhere.
    let c = gateway(&redis, Membership::Open).await;
    for node in [&a, &b, &c] {
        assert_eq!(
            support::refusal(node.ws_url(&old)).await,
            Some((401, json!({"error": "token_revoked"}))),
            "node {}",
            node.addr
        );
        let mut accepted = node.connect_token(&fresh).await;
        alive(&mut accepted).await;
    }
    let ttl: i64 = redis_cmd(&redis, &["PTTL", &format!("herald:{{{alice}}}:revoked")]).await;
    assert!(ttl > 86_000_000 && ttl <= 86_400_000, "kept in Redis for auth.max_token_ttl: {ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn e2e_a_removal_sticks_under_token_membership_on_every_node_until_a_readd() {
    let redis = RedisServer::start();
    let (a, b) = two_nodes(&redis, Membership::Token).await;
    let (alice, room) = (id(), id());
    let old = support::token_at(alice, &[room], Some(herald::auth::now_secs() - 100));
    let mut client = b.connect_token(&old).await;
    client.subscribe(room).await;

    assert_eq!(a.publish(&removed_body(room, alice)).await.0, 202);
    assert_eq!(client.recv().await, json!({"type":"unsubscribed","chat_id":room,"reason":"removed"}));
    client.send_json(json!({"type":"subscribe","chat_id":room})).await;
    let reply = client.recv().await;
    assert_eq!(reply["code"], "forbidden", "the same token cannot subscribe again: {reply}");

    // A node started after the removal knows it from Redis.
    let c = gateway(&redis, Membership::Token).await;
    let mut on_c = c.connect_token(&old).await;
    on_c.send_json(json!({"type":"subscribe","chat_id":room})).await;
    assert_eq!(on_c.recv().await["code"], "forbidden");
    // A token issued after the removal is let in.
    let mut newer = c.connect_token(&support::token_at(alice, &[room], Some(herald::auth::now_secs()))).await;
    newer.subscribe(room).await;

    // A re-add published on A lifts it on B and C.
    let added = json!({"type":"chat.member_added","chat_id":room,"user_id":alice}).to_string();
    assert_eq!(a.publish(&added).await.0, 202);
    subscribe_when_allowed(&mut client, room, Duration::from_secs(10)).await;
    subscribe_when_allowed(&mut on_c, room, Duration::from_secs(10)).await;
    let left: i64 = redis_cmd(&redis, &["HLEN", &format!("herald:{{{room}}}:removed")]).await;
    assert_eq!(left, 0, "the re-add cleared the removal in Redis");
}

/// A revocation answered by another node while this one was cut off from Redis still closes this
/// node's connections holding an older token once it is back (it reads the revocations of its
/// connected users on reconnect), and a token between an older cut-off this node held and the
/// newer one it missed is refused at upgrade here too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn a_revocation_missed_while_cut_off_applies_once_the_node_is_back() {
    let redis = RedisServer::start();
    let (a, b) = two_nodes_a_separable(&redis, Membership::Open).await;
    let (alice, bob) = (support::user(), support::user());
    let now = herald::auth::now_secs();
    // Bob: A learns an old cut-off first.
    let old = json!({"before": now - 1000}).to_string();
    assert_eq!(
        support::api_post(b.addr, &format!("/api/users/{bob}/revoke"), &old, Some(support::API_KEY)).await.0,
        200
    );
    let deadline = Instant::now() + support::PATIENCE;
    while a.metric("revocations").await < 1.0 {
        assert!(Instant::now() < deadline, "A never heard the first revocation");
        sleep(Duration::from_millis(50)).await;
    }
    let mut alice_on_a = a.connect_token(&support::token_at(alice, &[], Some(now - 100))).await;
    alice_on_a.send_json(json!({"type":"ping"})).await;
    assert_eq!(alice_on_a.recv().await, json!({"type":"pong"}));

    cut_off(&redis, &a).await;
    for who in [alice, bob] {
        let (status, reply) =
            support::api_post(b.addr, &format!("/api/users/{who}/revoke"), "", Some(support::API_KEY)).await;
        assert_eq!(status, 200, "{reply}");
    }
    let_back(&redis).await;
    a.wait_metric("bus_up", 1.0).await;

    let (code, _) = timeout(support::PATIENCE, alice_on_a.closed()).await.expect("closed in time");
    assert_eq!(code, Some(4003), "the old-token connection on A closes once A is back");
    let between = support::token_at(bob, &[], Some(now - 100));
    let refused = support::refusal(format!("ws://{}/ws?token={between}", a.addr)).await;
    assert_eq!(refused.map(|(status, _)| status), Some(401), "A refuses a token B's newer cut-off refuses");
}
