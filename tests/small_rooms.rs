//! Small rooms over real sockets: a room of at most 8 subscribers carries
//! its events without a live ring (each subscriber reads the frame from the
//! room's history when its ticket is nudged), and makes the ring when it
//! grows past that. Nothing is lost, repeated or reordered across the
//! change: for subscribers reading while it happens, for one that lags
//! through it, and for a recovery (`since`) that spans it.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use herald::protocol::event::parse_batch;
use herald::protocol::ChatId;
use serde_json::json;
use support::{publish, seqs_until, stalled_reader, start, user, Client, Gateway};

/// Subscribers a room reaches before it makes its ring (`rooms::SMALL_ROOM`).
const SMALL_ROOM: usize = 8;

async fn subscribers(gw: &Gateway, chat: ChatId, n: usize) -> Vec<(Client, u64)> {
    let mut all = Vec::new();
    for _ in 0..n {
        let mut c = gw.connect(user(), &[]).await;
        let head = c.subscribe(chat).await;
        all.push((c, head));
    }
    all
}

/// Every subscriber reads `(its position, last]`, in order, once each.
async fn all_read_until(readers: Vec<(Client, u64)>, last: u64) {
    let reads = readers.into_iter().map(|(mut c, head)| async move {
        let seqs = seqs_until(&mut c, last).await;
        assert_eq!(seqs, (head + 1..=last).collect::<Vec<_>>(), "subscribed at {head}");
    });
    join_all(reads).await;
}

#[tokio::test]
async fn a_two_person_room_delivers_every_event_in_order() {
    let gw = start(support::config()).await;
    let chat = ChatId::new_v4();
    let pair = subscribers(&gw, chat, 2).await;
    let head = pair[0].1;
    assert_eq!(pair[1].1, head);
    publish(&gw, chat, 50, &json!({"n": 1})).await;
    all_read_until(pair, head + 50).await;
}

/// Publishes run on while the room grows from 2 subscribers to past
/// [`SMALL_ROOM`]: the publish that makes the ring races readers of the
/// history and joiners. Each subscriber gets everything after its position.
#[tokio::test]
async fn publishing_while_a_room_grows_loses_nothing() {
    let gw = start(support::config()).await;
    let chat = ChatId::new_v4();
    let mut readers = subscribers(&gw, chat, 2).await;
    let head = readers[0].1;
    let stop = Arc::new(AtomicBool::new(false));
    let (publisher, stopped) = (gw.publisher.clone(), stop.clone());
    let publishing = tokio::spawn(async move {
        let mut published = 0;
        while !stopped.load(Ordering::Relaxed) {
            let event = support::message_sent(chat, &json!({"grow": published}));
            let events = parse_batch(event.as_bytes()).expect("valid event");
            publisher.publish(events).await.expect("published");
            published += 1;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        published
    });
    for _ in 0..SMALL_ROOM + 2 {
        readers.extend(subscribers(&gw, chat, 1).await);
    }
    stop.store(true, Ordering::Relaxed);
    let published = publishing.await.expect("publisher");
    assert!(readers.last().is_some_and(|(_, at)| *at > head), "the last joined while events flowed");
    // The ring is made by the first of these at the latest.
    publish(&gw, chat, 5, &json!({"grown": true})).await;
    all_read_until(readers, head + published + 5).await;
}

/// A reader that stops reading in a small room falls behind it (the
/// history holds what it has not taken); the room then grows and makes its
/// ring, and more events follow. The reader, reading again, gets every
/// event in order and is not dropped.
#[tokio::test]
async fn a_reader_lagging_while_the_ring_is_made_catches_up_in_order() {
    let mut config = support::config();
    config.websocket.write_wait = Duration::from_secs(60);
    let gw = start(config).await;
    let chat = ChatId::new_v4();
    let (mut slow, head) = stalled_reader(&gw, chat).await;
    // 2 KB events: far more than the socket buffers hold for a stalled reader.
    let blob = "x".repeat(2_000);
    publish(&gw, chat, 100, &json!({ "blob": blob })).await;
    let joiners = subscribers(&gw, chat, SMALL_ROOM + 1).await;
    publish(&gw, chat, 100, &json!({ "blob": blob })).await;
    let last = head + 200;
    all_read_until(joiners, last).await;
    support::read_events(&mut slow, head, 200).await;
    assert!(gw.metric("catchups_total").await >= 1.0, "the stalled reader fell behind");
    assert_eq!(gw.metric("slow_consumers_dropped_total").await, 0.0);
}

/// A client leaves a small room, the room grows past [`SMALL_ROOM`] and
/// makes its ring, events follow; the client comes back with `since` and
/// gets exactly what it missed, then live events from the ring.
#[tokio::test]
async fn a_recovery_spans_the_ring_being_made() {
    let gw = start(support::config()).await;
    let chat = ChatId::new_v4();
    let mut pair = subscribers(&gw, chat, 2).await;
    let head = pair[0].1;
    publish(&gw, chat, 5, &json!({"before": true})).await;
    let (mut gone, _) = pair.remove(0);
    assert_eq!(seqs_until(&mut gone, head + 5).await, (head + 1..=head + 5).collect::<Vec<_>>());
    drop(gone);
    publish(&gw, chat, 5, &json!({"small": true})).await;
    let joiners = subscribers(&gw, chat, SMALL_ROOM + 1).await;
    publish(&gw, chat, 5, &json!({"ring": true})).await;

    let mut back = gw.connect(user(), &[]).await;
    let (position, recovered) = back.subscribe_since(chat, head + 5).await;
    assert!(recovered, "the history holds what it missed");
    assert_eq!(position, head + 15);
    publish(&gw, chat, 5, &json!({"after": true})).await;
    assert_eq!(seqs_until(&mut back, head + 20).await, (head + 6..=head + 20).collect::<Vec<_>>());
    pair.extend(joiners);
    all_read_until(pair, head + 20).await;
}

/// `rooms.history_size` below `rooms.buffer` (here 1 against 8): a small
/// room's history would hold less than the ring it goes without, so two
/// events published back to back would evict the first before its
/// subscribers read it (4008 where a ring of 8 delivered both). Such a node
/// gives every room its ring, as before small rooms went without one.
#[tokio::test]
async fn a_history_shorter_than_the_ring_loses_nothing_in_a_small_room() {
    let mut config = support::config();
    config.rooms.history_size = 1;
    let gw = start(config).await;
    let chat = ChatId::new_v4();
    let mut pair = subscribers(&gw, chat, 2).await;
    let head = pair[0].1;
    for round in 0..5 {
        // One batch: the bus delivers both before any reader runs.
        let mut events = Vec::new();
        for n in 0..2 {
            let event = support::message_sent(chat, &json!({ "round": round, "n": n }));
            events.extend(parse_batch(event.as_bytes()).expect("valid event"));
        }
        gw.publisher.publish(events).await.expect("published");
        let last = head + 2 * round + 2;
        for (c, _) in &mut pair {
            assert_eq!(seqs_until(c, last).await, vec![last - 1, last]);
        }
    }
    assert_eq!(gw.metric("slow_consumers_dropped_total").await, 0.0);
}
