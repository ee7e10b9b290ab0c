//! Recovery over real sockets (PROTOCOL.md section 3.1): `subscribed`
//! carries the room's position, `since` replays what a client missed (also
//! while publishes race it), history is bounded by count, age and bytes, and
//! a reader that stalls catches up from history instead of being dropped.

mod support;

use std::time::Duration;

use herald::protocol::event::parse_batch;
use herald::protocol::ChatId;
use serde_json::json;
use support::{message_sent, position, publish, seqs_until, stalled_reader, start, user};

/// Now in Unix microseconds, the clock a room's `seq` origin is taken from.
fn micros_now() -> u64 {
    let since_epoch =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock after 1970");
    u64::try_from(since_epoch.as_micros()).expect("fits")
}

#[tokio::test]
async fn a_reconnect_recovers_exactly_the_events_missed() {
    let gw = start(support::config()).await;
    let chat = ChatId::new_v4();
    let me = user();
    let mut c = gw.connect(me, &[]).await;
    let before = micros_now();
    let head = c.subscribe(chat).await;
    let after = micros_now();
    assert!(
        (before..=after).contains(&head),
        "a fresh room is at its origin, the Unix time in microseconds: {head} not in {before}..={after}"
    );
    publish(&gw, chat, 3, &json!({"n":"before"})).await;
    assert_eq!(seqs_until(&mut c, head + 3).await, vec![head + 1, head + 2, head + 3]);
    drop(c);

    publish(&gw, chat, 7, &json!({"n":"missed"})).await;
    let mut c = gw.connect(me, &[]).await;
    assert_eq!(c.subscribe_since(chat, head + 3).await, (head + 10, true));
    let mut got = Vec::new();
    for _ in 0..7 {
        let v = c.recv().await;
        assert_eq!(v["data"], json!({"n":"missed"}), "replayed byte-for-byte: {v}");
        got.push(v["seq"].as_u64().unwrap_or(0));
    }
    assert_eq!(got, (head + 4..=head + 10).collect::<Vec<_>>());
    // Then live, with nothing twice.
    publish(&gw, chat, 1, &json!({"n":"live"})).await;
    let v = c.recv().await;
    assert_eq!((v["seq"].as_u64(), &v["data"]), (Some(head + 11), &json!({"n":"live"})));
    assert_eq!(gw.labelled("recoveries_total", "result", "recovered").await, 1.0);
}

#[tokio::test]
async fn recovery_racing_a_stream_of_publishes_has_no_gap_and_no_duplicate() {
    let gw = start(support::config()).await;
    for round in 0..5u64 {
        let chat = ChatId::new_v4();
        publish(&gw, chat, 20, &json!({"round": round})).await;
        let base = position(gw.addr, chat).await - 20;
        let publisher = gw.publisher.clone();
        const TOTAL: u64 = 300;
        let stream = tokio::spawn(async move {
            for _ in 20..TOTAL {
                let body = message_sent(chat, &json!({"race": true}));
                publisher.publish(parse_batch(body.as_bytes()).expect("valid")).await.expect("published");
                tokio::task::yield_now().await;
            }
        });
        // Subscribe from a point inside history while the stream runs.
        let since = base + 10 + round;
        let mut c = gw.connect(user(), &[]).await;
        let (head, recovered) = c.subscribe_since(chat, since).await;
        assert!(recovered, "history holds everything after {since}");
        assert!(head >= base + 20, "the position is at least what was published before: {head}");
        assert_eq!(seqs_until(&mut c, base + TOTAL).await, (since + 1..=base + TOTAL).collect::<Vec<_>>());
        stream.await.expect("publisher done");
    }
}

#[tokio::test]
async fn a_room_that_never_had_a_subscriber_recovers() {
    let gw = start(support::config()).await;
    let chat = ChatId::new_v4();
    publish(&gw, chat, 5, &json!({"early": true})).await;
    // The five events are the room's first: it starts right below them.
    let base = position(gw.addr, chat).await - 5;
    let mut c = gw.connect(user(), &[]).await;
    assert_eq!(c.subscribe_since(chat, base).await, (base + 5, true));
    assert_eq!(seqs_until(&mut c, base + 5).await, (base + 1..=base + 5).collect::<Vec<_>>());
    let mut d = gw.connect(user(), &[]).await;
    assert_eq!(d.subscribe_since(chat, base + 2).await, (base + 5, true));
    assert_eq!(seqs_until(&mut d, base + 5).await, vec![base + 3, base + 4, base + 5]);
    // Without since: the position only, nothing replayed.
    let mut e = gw.connect(user(), &[]).await;
    assert_eq!(e.subscribe(chat).await, base + 5);
    publish(&gw, chat, 1, &json!({})).await;
    assert_eq!(e.recv().await["seq"], base + 6);
}

#[tokio::test]
async fn since_older_than_history_is_not_recovered_and_live_events_follow() {
    let mut config = support::config();
    config.rooms.history_size = 5;
    let gw = start(config).await;
    let chat = ChatId::new_v4();
    publish(&gw, chat, 20, &json!({})).await;
    let base = position(gw.addr, chat).await - 20;
    let mut c = gw.connect(user(), &[]).await;
    assert_eq!(c.subscribe_since(chat, base + 3).await, (base + 20, false));
    assert_eq!(
        c.subscribe_since(chat, base + 3).await,
        (base + 20, false),
        "subscribing again is idempotent"
    );
    publish(&gw, chat, 1, &json!({"live": 1})).await;
    let v = c.recv().await;
    assert_eq!(
        (v["seq"].as_u64(), &v["data"]),
        (Some(base + 21), &json!({"live": 1})),
        "nothing replayed before"
    );
    // The newest five are still there.
    let mut d = gw.connect(user(), &[]).await;
    assert_eq!(d.subscribe_since(chat, base + 16).await, (base + 21, true));
    assert_eq!(seqs_until(&mut d, base + 21).await, (base + 17..=base + 21).collect::<Vec<_>>());
    assert_eq!(gw.labelled("recoveries_total", "result", "not_recovered").await, 1.0);
}

#[tokio::test]
async fn history_expires_with_its_ttl() {
    let mut config = support::config();
    config.rooms.history_ttl = Duration::from_millis(300);
    let gw = start(config).await;
    let chat = ChatId::new_v4();
    publish(&gw, chat, 3, &json!({})).await;
    assert_eq!(gw.metric("history_frames").await, 3.0);
    // The last seq of the room's first life.
    let old_head = position(gw.addr, chat).await;
    // The sweeper drops what outlived the TTL, and the room with it: the
    // node keeps nothing for it, not even its counter.
    gw.wait_metric("history_frames", 0.0).await;
    gw.wait_metric("rooms", 0.0).await;
    gw.wait_metric("room_counters", 0.0).await;
    // A client that remembers the second seq of that life is told it cannot
    // be recovered, and where the room stands now: it starts again at a new
    // origin above every seq of its first life (never one of them again),
    // and live events follow.
    let mut c = gw.connect(user(), &[]).await;
    let (head, recovered) = c.subscribe_since(chat, old_head - 1).await;
    assert!(!recovered, "a since from the room's first life is not recovered");
    assert!(head > old_head, "the new life's position {head} is above its first life's last seq {old_head}");
    publish(&gw, chat, 1, &json!({"after": "expiry"})).await;
    assert_eq!(c.recv().await["seq"], head + 1);
}

#[tokio::test]
async fn history_is_bounded_in_bytes_node_wide() {
    let mut config = support::config();
    config.rooms.history_bytes = 65_536;
    let gw = start(config).await;
    let (a, b) = (ChatId::new_v4(), ChatId::new_v4());
    let blob = "x".repeat(8_000);
    publish(&gw, a, 10, &json!({"blob": blob})).await;
    publish(&gw, b, 10, &json!({"blob": blob})).await;
    let held = gw.metric("history_bytes").await;
    assert!(held <= 65_536.0 && held > 0.0, "history holds {held} bytes");
    let head = position(gw.addr, b).await;
    let mut c = gw.connect(user(), &[]).await;
    assert_eq!(c.subscribe_since(b, head - 10).await, (head, false), "the oldest frames were evicted");
    let mut d = gw.connect(user(), &[]).await;
    assert_eq!(d.subscribe_since(b, head - 1).await, (head, true), "the newest are kept");
    assert_eq!(seqs_until(&mut d, head).await, vec![head]);
}

#[tokio::test]
async fn bad_since_values_are_refused_or_not_recovered_and_the_connection_lives() {
    let gw = start(support::config()).await;
    let chat = ChatId::new_v4();
    publish(&gw, chat, 2, &json!({})).await;
    let head = position(gw.addr, chat).await;
    let mut c = gw.connect(user(), &[]).await;
    for since in [json!(-1), json!("3"), json!(1.5), json!([1])] {
        c.send_json(json!({"type":"subscribe","chat_id":chat,"since":since})).await;
        let reply = c.recv().await;
        assert_eq!(reply["code"], "bad_request", "since {since}: {reply}");
    }
    // Far ahead of the room: not recovered, no replay, no crash.
    assert_eq!(c.subscribe_since(chat, u64::MAX).await, (head, false));
    c.send(r#"{"type":"ping"}"#).await;
    assert_eq!(c.recv().await, json!({"type":"pong"}));
}

/// A reader that stops reading while hundreds of events pass its room: the
/// server stops queueing for it (its socket and its bounded queue are full),
/// the live ring runs past it, and once it reads again it gets every event
/// from history, in order, while a fast reader in the same room never noticed.
#[tokio::test]
async fn a_stalled_reader_catches_up_from_history_with_nothing_missed() {
    let mut config = support::config();
    config.rooms.buffer = 4;
    config.rooms.history_size = 5_000;
    config.websocket.write_wait = Duration::from_secs(60);
    let gw = start(config).await;
    let chat = ChatId::new_v4();
    let mut fast = gw.connect(user(), &[]).await;
    let head = fast.subscribe(chat).await;
    let (mut slow, slow_head) = stalled_reader(&gw, chat).await;
    assert_eq!(slow_head, head);

    // 2,000 events of 2 KB: 4 MB, far more than socket buffers and the
    // connection's own queue hold for a client that does not read.
    const EVENTS: u64 = 2_000;
    let blob = "y".repeat(2_000);
    let fast_reader = tokio::spawn(async move { seqs_until(&mut fast, head + EVENTS).await });
    publish(&gw, chat, EVENTS as usize, &json!({"blob": blob})).await;
    assert_eq!(fast_reader.await.expect("fast reader"), (head + 1..=head + EVENTS).collect::<Vec<_>>());
    assert!(gw.metric("catchups_total").await >= 1.0, "the stalled reader fell behind the ring");

    let mut seqs = Vec::new();
    while seqs.last() != Some(&(head + EVENTS)) {
        let v = slow.read_json().await.expect("events, not a close");
        seqs.push(v["seq"].as_u64().expect("a room event"));
    }
    assert_eq!(seqs, (head + 1..=head + EVENTS).collect::<Vec<_>>());
    assert_eq!(gw.metric("slow_consumers_dropped_total").await, 0.0);
}

/// The same stall with a history of 50 events: the reader fell further
/// behind than history reaches, so it gets 4008 (after what was in flight).
#[tokio::test]
async fn a_reader_stalled_past_history_gets_4008() {
    let mut config = support::config();
    config.rooms.buffer = 4;
    config.rooms.history_size = 50;
    config.websocket.write_wait = Duration::from_secs(60);
    let gw = start(config).await;
    let chat = ChatId::new_v4();
    let (mut slow, head) = stalled_reader(&gw, chat).await;
    publish(&gw, chat, 2_000, &json!({"blob": "z".repeat(2_000)})).await;
    let mut last = head;
    while let Some(v) = slow.read_json().await {
        let seq = v["seq"].as_u64().expect("a room event");
        assert_eq!(seq, last + 1, "what arrives before the close has no gap");
        last = seq;
    }
    assert!(last < head + 2_000, "it could not have received everything");
    gw.wait_metric("slow_consumers_dropped_total", 1.0).await;
    assert_eq!(gw.labelled("closes_total", "code", "4008").await, 1.0);
}
