//! Admission control over real sockets: a node whose readers as a whole run
//! far behind pushes back on its publishers (wait, then 429 with
//! `Retry-After`) instead of dropping readers, and admits again once they
//! catch up; one stalled reader never pushes back on anyone. With
//! `api.overload_latency`, a node writing late pushes back by time too, long
//! before the frames owed reach the backlog limit.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use herald::protocol::ChatId;
use serde_json::{json, Value};
use support::{batch, post_until_pushed_back, read_events, stalled_reader, start, user, PATIENCE};

#[tokio::test]
async fn a_node_whose_readers_all_fall_behind_pushes_back_instead_of_dropping_them() {
    let mut config = support::config();
    // Stalled on purpose: the write deadline must not end them first.
    config.websocket.write_wait = Duration::from_secs(60);
    let gw = start(config).await;
    let room = ChatId::new_v4();
    let mut readers = Vec::new();
    for _ in 0..8 {
        readers.push(stalled_reader(&gw, room).await);
    }
    let body = batch(room, 20, 1_000);
    let (accepted, refusal) = post_until_pushed_back(&gw, &body, 500, Duration::ZERO).await;
    let (head, reply) = refusal.expect("publishers were pushed back");
    assert_eq!(serde_json::from_str::<Value>(&reply).expect("JSON"), json!({"error":"overloaded"}));
    assert!(head.to_ascii_lowercase().contains("retry-after: 1"), "{head}");
    assert_eq!(gw.metric("publish_overloaded_total").await, 1.0);
    assert!(gw.metric("backlog_frames").await > gw.metric("backlog_limit_frames").await);
    assert_eq!(gw.metric("slow_consumers_dropped_total").await, 0.0, "nobody was dropped");

    // Every reader gets every accepted event, none lost to the overload...
    for (reader, position) in &mut readers {
        read_events(reader, *position, accepted).await;
    }
    // ...and the node, caught up, admits publishes again at once.
    gw.wait_metric("backlog_frames", 0.0).await;
    assert_eq!(gw.publish(&batch(room, 1, 1_000)).await.0, 202);
    for (reader, position) in &mut readers {
        let event = reader.read_json().await.expect("the next event");
        assert_eq!(event["seq"].as_u64(), Some(*position + accepted + 1));
    }
    assert_eq!(gw.metric("slow_consumers_dropped_total").await, 0.0);
}

#[tokio::test]
async fn one_stalled_reader_never_pushes_back_on_publishers() {
    let mut config = support::config();
    config.websocket.write_wait = Duration::from_secs(60);
    let gw = start(config).await;
    let room = ChatId::new_v4();
    let (mut stalled, _) = stalled_reader(&gw, room).await;
    let mut healthy = gw.connect(user(), &[]).await;
    let head = healthy.subscribe(room).await;
    let reading = tokio::spawn(async move {
        for want in head + 1..=head + 3_000u64 {
            let event = healthy.recv().await;
            assert_eq!(event["seq"].as_u64(), Some(want));
        }
    });
    // 3,000 events of 4 KB: more than the kernel's socket buffers hold, so
    // the stalled reader fills its queue in Herald and falls 30 times its
    // room's history behind; all the while the node keeps accepting.
    let body = batch(room, 20, 4_000);
    for _ in 0..150 {
        let (status, reply) = gw.publish(&body).await;
        assert_eq!(status, 202, "{reply}");
    }
    tokio::time::timeout(PATIENCE, reading).await.expect("healthy reader in time").expect("in order");
    assert_eq!(gw.metric("publish_overloaded_total").await, 0.0);
    // The stalled reader, once it reads, gets what it had queued and is then
    // closed: it fell further behind than history reaches.
    assert_eq!(stalled.read_close().await, Some(4008));
    gw.wait_metric("backlog_frames", 0.0).await;
}

/// The backlog is an exact count: whatever way a connection ends with room
/// frames still queued (here the client closes while stalled), they stop
/// being owed. A drift would leave the node refusing publishers forever.
#[tokio::test]
async fn a_connection_closing_with_frames_queued_leaves_nothing_owed() {
    let gw = start(support::config()).await;
    let room = ChatId::new_v4();
    let (mut reader, _) = stalled_reader(&gw, room).await;
    let body = batch(room, 20, 4_000);
    let mut owed = 0.0;
    for _ in 0..100 {
        assert_eq!(gw.publish(&body).await.0, 202);
        owed = gw.metric("backlog_frames").await;
        if owed > 0.0 {
            break;
        }
    }
    assert!(owed > 0.0, "frames queued behind the stalled socket are owed");
    reader.send_frame(0x88, &1000u16.to_be_bytes()).await;
    assert_eq!(reader.read_close().await, Some(1000));
    gw.wait_metric("connections", 0.0).await;
    gw.wait_metric("backlog_frames", 0.0).await;
    assert_eq!(gw.metric("subscriptions").await, 0.0);
}

/// Latency admission over real sockets: a node too slow for its load (here
/// a task that hogs the test's one runtime thread 30 ms at a time, so every
/// socket write comes late) refuses publishes by time (they wait, then 429
/// with `Retry-After`) while the frames it owes stay far under the backlog
/// limit, drops nobody, and admits again once it is on time.
#[test]
fn a_node_writing_late_pushes_back_by_time_until_it_is_on_time() {
    // One thread that polls for IO after every task: the hog below then
    // runs between a publish and the writes it wakes, every time.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .event_interval(1)
        .build()
        .expect("runtime");
    runtime.block_on(writing_late_pushes_back());
}

async fn writing_late_pushes_back() {
    let mut config = support::config();
    config.api.overload_latency = Duration::from_millis(25);
    let gw = start(config).await;
    let room = ChatId::new_v4();
    // The readers' sockets take what the node writes; they are read at the end.
    let mut readers = Vec::new();
    for _ in 0..20 {
        let mut reader = gw.connect(user(), &[]).await;
        let head = reader.subscribe(room).await;
        readers.push((reader, head));
    }
    let hogging = Arc::new(AtomicBool::new(true));
    let hog = {
        let hogging = hogging.clone();
        tokio::spawn(async move {
            while hogging.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(30));
                // Back of the run queue at once (`yield_now` would wait for
                // everything else, deliveries included): tasks woken from
                // now on, the connections a publish wakes among them, run
                // after the next 30 ms.
                let mut queued = false;
                std::future::poll_fn(|cx| {
                    if std::mem::replace(&mut queued, true) {
                        return std::task::Poll::Ready(());
                    }
                    cx.waker().wake_by_ref();
                    std::task::Poll::Pending
                })
                .await;
            }
        })
    };
    let (accepted, refusal) = post_until_pushed_back(&gw, &batch(room, 5, 100), 200, Duration::ZERO).await;
    let (head, reply) = refusal.expect("publishers were pushed back by time");
    assert_eq!(serde_json::from_str::<Value>(&reply).expect("JSON"), json!({"error":"overloaded"}));
    assert!(head.to_ascii_lowercase().contains("retry-after: 1"), "{head}");
    // Refused for lateness, not for the backlog (`herald_delivery_late`
    // itself lapses a window after the publishes, and so their writes, stop).
    let (owed, limit) = (gw.metric("backlog_frames").await, gw.metric("backlog_limit_frames").await);
    assert!(owed < limit, "not for the backlog: {owed} owed, limit {limit}");

    // On time again, the node admits publishes; every reader got every
    // accepted event, and nobody was dropped.
    hogging.store(false, Ordering::Relaxed);
    hog.await.expect("hog");
    gw.wait_metric("delivery_late", 0.0).await;
    let last = json!([{"type":"message.sent","chat_id":room,"data":{"last":true}}]).to_string();
    assert_eq!(gw.publish(&last).await.0, 202);
    for (reader, head) in &mut readers {
        let events = seqs_until_last(reader).await;
        let want: Vec<u64> = (*head + 1..=*head + accepted + 1).collect();
        assert_eq!(events, want, "every accepted event, in order");
    }
    assert_eq!(gw.metric("slow_consumers_dropped_total").await, 0.0);
}

/// Reads a client's room events up to the one whose data says `"last"`; returns their seqs.
async fn seqs_until_last(reader: &mut support::Client) -> Vec<u64> {
    let mut seqs = Vec::new();
    loop {
        let event = reader.recv().await;
        seqs.push(event["seq"].as_u64().unwrap_or_default());
        if event["data"]["last"] == json!(true) {
            return seqs;
        }
    }
}
