//! Hostile clients over real sockets: floods, trickles, malformed frames,
//! slow and oversized handshakes, connection floods, and the races a
//! membership change invites. Each bound holds, is counted, and the node's
//! other clients never notice.

mod support;

use std::time::Duration;

use herald::config::Membership;
use herald::protocol::ChatId;
use serde_json::json;
use support::{message_sent, stalled_reader, start, user, Gateway, RawClient, API_KEY};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A healthy client in its own room still gets its events: the node as a
/// whole did not notice the abuse.
async fn others_are_unaffected(gw: &Gateway) {
    let room = ChatId::new_v4();
    let mut c = gw.connect(user(), &[]).await;
    c.subscribe(room).await;
    assert_eq!(gw.publish(&message_sent(room, &json!({"ok": true}))).await.0, 202);
    assert_eq!(c.recv().await["data"], json!({"ok": true}));
}

/// Issue: a client that streamed pings and never read grew the node by
/// 944 MB in 12 s and was never closed. Now one pong waits at most, pings
/// spend the command budget, and a flood ends with 1008.
#[tokio::test]
async fn a_client_that_pings_without_reading_is_bounded_then_closed() {
    let gw = start(support::config()).await;
    let mut flood = RawClient::connect_small(gw.addr, &support::token(user(), &[]), 4096).await;
    let pings: Vec<u8> = (0..10_000).flat_map(|_| support::masked_frame(0x89, b"")).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        if flood.stream.write_all(&pings).await.is_err() {
            break; // The server closed the connection.
        }
        if gw.labelled("closes_total", "code", "1008").await >= 1.0 {
            break;
        }
    }
    gw.wait_metric("connections", 0.0).await;
    assert_eq!(gw.labelled("closes_total", "code", "1008").await, 1.0);
    assert!(gw.metric("pongs_dropped_total").await > 0.0, "pings past the budget got no pong");
    others_are_unaffected(&gw).await;
}

/// Issue: write_wait counted only "no progress", so a reader taking a few
/// bytes at a time held its queue forever.
#[tokio::test]
async fn a_reader_that_trickles_meets_write_wait() {
    let mut config = support::config();
    config.websocket.write_wait = Duration::from_secs(1);
    config.rooms.history_size = 5_000;
    let gw = start(config).await;
    let room = ChatId::new_v4();
    let (mut slow, _) = stalled_reader(&gw, room).await;
    // 8 MB: more than the kernel's socket buffers hold, so Herald's own
    // queue must wait on the trickling reader.
    let blob = "t".repeat(4_000);
    for _ in 0..2_000 {
        let events =
            herald::protocol::event::parse_batch(message_sent(room, &json!({"blob": blob})).as_bytes());
        gw.publisher.publish(events.expect("valid")).await.expect("published");
    }
    // 16 bytes every 20 ms: 800 B/s, far below 64 KiB per write_wait.
    let trickle = tokio::spawn(async move {
        let mut buf = [0u8; 16];
        while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(5), slow.stream.read(&mut buf)).await {
            if n == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    gw.wait_metric("slow_consumers_dropped_total", 1.0).await;
    assert_eq!(gw.labelled("closes_total", "code", "4008").await, 1.0);
    trickle.abort();
    others_are_unaffected(&gw).await;
}

/// Issue: under `membership: events`, `[member_removed(C,U), message.sent(C)]`
/// delivered the message to U (20 of 20 tries).
#[tokio::test]
async fn a_removed_member_never_sees_the_next_message() {
    let mut config = support::config();
    config.auth.membership = Membership::Events;
    let gw = start(config).await;
    for attempt in 0..20 {
        let (room, markers, member, watcher) = (ChatId::new_v4(), ChatId::new_v4(), user(), user());
        for (chat, who) in [(room, member), (markers, member), (room, watcher)] {
            let added = json!({"type":"chat.member_added","chat_id":chat,"user_id":who}).to_string();
            assert_eq!(gw.publish(&added).await.0, 202);
        }
        let mut m = gw.connect(member, &[]).await;
        m.subscribe(room).await;
        m.subscribe(markers).await;
        let mut w = gw.connect(watcher, &[]).await;
        w.subscribe(room).await;
        let batch = json!([
            {"type":"chat.member_removed","chat_id":room,"user_id":member},
            {"type":"message.sent","chat_id":room,"data":{"secret": attempt}},
        ]);
        assert_eq!(gw.publish(&batch.to_string()).await.0, 202);
        assert_eq!(w.recv().await["data"], json!({"secret": attempt}), "the watcher gets it");
        assert_eq!(m.recv().await, json!({"type":"unsubscribed","chat_id":room,"reason":"removed"}));
        m.expect_nothing_else(&gw, markers).await;
    }
}

#[tokio::test]
async fn a_fragmented_control_frame_is_a_protocol_error() {
    let gw = start(support::config()).await;
    let mut raw = RawClient::connect(gw.addr, &support::token(user(), &[])).await;
    raw.send_frame(0x09, b"no fin").await;
    assert_eq!(raw.read_close().await, Some(1002));
    others_are_unaffected(&gw).await;
}

#[tokio::test]
async fn a_text_message_that_is_not_utf8_closes_with_1007() {
    let gw = start(support::config()).await;
    let mut raw = RawClient::connect(gw.addr, &support::token(user(), &[])).await;
    raw.send_frame(0x81, &[b'{', 0xff, 0xfe, b'}']).await;
    assert_eq!(raw.read_close().await, Some(1007));
    assert_eq!(gw.labelled("closes_total", "code", "1007").await, 1.0);
}

#[tokio::test]
async fn a_connection_that_vanishes_mid_frame_is_cleaned_up() {
    let gw = start(support::config()).await;
    let room = ChatId::new_v4();
    let mut raw = RawClient::connect(gw.addr, &support::token(user(), &[])).await;
    raw.send_frame(0x81, json!({"type":"subscribe","chat_id":room}).to_string().as_bytes()).await;
    assert!(raw.read_json().await.is_some());
    let half = support::masked_frame(0x81, &[b'x'; 1000]);
    raw.stream.write_all(&half[..500]).await.expect("half a frame");
    drop(raw);
    for gauge in ["connections", "subscriptions"] {
        gw.wait_metric(gauge, 0.0).await;
    }
    assert_eq!(gw.labelled("closes_total", "code", "none").await, 1.0);
    others_are_unaffected(&gw).await;
}

/// A handshake trickled a byte at a time is cut off after
/// `server.header_read_timeout`.
#[tokio::test]
async fn a_slowloris_handshake_is_cut_off() {
    let mut config = support::config();
    config.server.header_read_timeout = Duration::from_millis(500);
    let gw = start(config).await;
    let mut slow = TcpStream::connect(gw.addr).await.expect("connect");
    let request = format!("GET /ws?token={} HTTP/1.1\r\nHost: t\r\nX-Slow: ", support::token(user(), &[]));
    slow.write_all(request.as_bytes()).await.expect("write");
    let started = tokio::time::Instant::now();
    let mut closed = false;
    while started.elapsed() < Duration::from_secs(10) {
        if slow.write_all(b"a").await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(100), slow.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(_)) => {} // a 408, then the close
            Err(_) => {}
        }
    }
    assert!(closed, "the slow handshake was never cut off");
    others_are_unaffected(&gw).await;
}

#[tokio::test]
async fn oversized_request_headers_are_refused_without_harm() {
    let gw = start(support::config()).await;
    let huge = "h".repeat(1 << 20);
    let (status, _) = gw.http(&format!("GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: {huge}\r\n\r\n")).await;
    assert!(status == 431 || status == 0, "refused (431) or closed, not served: {status}");
    let body = message_sent(ChatId::new_v4(), &json!({}));
    let auth = format!("Bearer {API_KEY}");
    assert_eq!(gw.publish(&body).await.0, 202, "{auth} still publishes");
    others_are_unaffected(&gw).await;
}

/// Plain HTTP connections are bounded like WebSockets: past
/// `server.max_http_connections` open ones, more are closed at accept.
#[tokio::test]
async fn a_flood_of_idle_http_connections_is_bounded_and_counted() {
    let mut config = support::config();
    config.server.max_http_connections = 8;
    let gw = start(config).await;
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(TcpStream::connect(gw.addr).await.expect("connect"));
    }
    // Each idle connection is accepted in turn; the ninth is closed at once.
    let mut extra = TcpStream::connect(gw.addr).await.expect("connect");
    let mut buf = [0u8; 16];
    let shed = tokio::time::timeout(support::PATIENCE, extra.read(&mut buf)).await;
    assert!(matches!(shed, Ok(Ok(0)) | Ok(Err(_))), "the connection past the bound was closed: {shed:?}");
    drop(idle);
    // Room again once they are gone.
    let deadline = tokio::time::Instant::now() + support::PATIENCE;
    loop {
        let (status, _) = gw.get("/healthz").await;
        if status == 200 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the node did not recover");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gw.metric("http_rejected_total").await >= 1.0);
}

#[tokio::test]
async fn readyz_says_ready_while_the_node_serves() {
    let gw = start(support::config()).await;
    let (status, body) = gw.get("/readyz").await;
    assert_eq!(
        (status, serde_json::from_str::<serde_json::Value>(&body).ok()),
        (200, Some(json!({"status":"ready"})))
    );
}
