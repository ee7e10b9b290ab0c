//! Bad input and misbehaving clients: each gets the contract's answer while
//! the server and every other connection carry on unharmed.

mod support;

use std::time::Duration;

use herald::protocol::{ChatId, UserId};
use serde_json::json;
use support::{message_sent, start, RawClient};
use tokio_tungstenite::tungstenite::Message;

use futures_util::SinkExt;

#[tokio::test]
async fn invalid_commands_get_error_replies_and_the_connection_stays_usable() {
    let gw = start(support::config()).await;
    let room = ChatId::new_v4();
    let mut bystander = gw.connect(UserId::new_v4(), &[]).await;
    let head = bystander.subscribe(room).await;
    let mut c = gw.connect(UserId::new_v4(), &[]).await;
    let cases = [
        ("not json at all", "bad_request"),
        ("[1,2,3]", "bad_request"),
        (r#"{"chat_id":"x"}"#, "bad_request"),
        (r#"{"type":"subscribe"}"#, "bad_request"),
        (r#"{"type":"subscribe","chat_id":"not-a-uuid"}"#, "bad_request"),
        (r#"{"type":"teleport"}"#, "unknown_type"),
    ];
    for (input, code) in cases {
        c.send(input).await;
        let reply = c.recv().await;
        assert_eq!((reply["type"].as_str(), reply["code"].as_str()), (Some("error"), Some(code)), "{input}");
        assert!(reply["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    c.ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(c.recv().await["code"], "bad_request");
    // Still alive and served.
    c.send_json(json!({"type":"ping"})).await;
    assert_eq!(c.recv().await, json!({"type":"pong"}));
    c.subscribe(room).await;
    gw.publish(&message_sent(room, &json!({"n":1}))).await;
    assert_eq!(c.recv().await["seq"], head + 1);
    assert_eq!(bystander.recv().await["seq"], head + 1);
    assert_eq!(gw.metric("connections").await, 2.0);
}

#[tokio::test]
async fn an_oversized_frame_closes_with_1009_and_others_are_unaffected() {
    let mut config = support::config();
    config.websocket.max_message_size = 1024;
    let gw = start(config).await;
    let room = ChatId::new_v4();
    let mut bystander = gw.connect(UserId::new_v4(), &[]).await;
    bystander.subscribe(room).await;

    let mut big = gw.connect(UserId::new_v4(), &[]).await;
    big.send(&"x".repeat(2000)).await;
    assert_eq!(big.closed().await.0, Some(1009));

    // A fragmented message is bounded by its total, not per fragment.
    let mut raw = RawClient::connect(gw.addr, &support::token(UserId::new_v4(), &[])).await;
    raw.send_frame(0x01, &[b' '; 600]).await;
    raw.send_frame(0x80, &[b' '; 600]).await;
    assert_eq!(raw.read_close().await, Some(1009));

    gw.publish(&message_sent(room, &json!({"still":"here"}))).await;
    assert_eq!(bystander.recv().await["data"], json!({"still":"here"}));
}

#[tokio::test]
async fn fragmented_commands_are_reassembled() {
    let gw = start(support::config()).await;
    let mut raw = RawClient::connect(gw.addr, &support::token(UserId::new_v4(), &[])).await;
    raw.send_frame(0x01, br#"{"type""#).await;
    raw.send_frame(0x89, b"mid").await; // a ping between fragments is allowed
    raw.send_frame(0x80, br#":"ping"}"#).await;
    let (first, payload) = raw.read_frame().await.unwrap();
    assert_eq!((first, payload.as_slice()), (0x8A, &b"mid"[..]), "pong echoes the ping payload");
    let (first, payload) = raw.read_frame().await.unwrap();
    assert_eq!((first, payload.as_slice()), (0x81, &br#"{"type":"pong"}"#[..]));
}

#[tokio::test]
async fn protocol_violations_close_with_1002() {
    let gw = start(support::config()).await;
    let token = support::token(UserId::new_v4(), &[]);
    // Unmasked client frame.
    let mut raw = RawClient::connect(gw.addr, &token).await;
    use tokio::io::AsyncWriteExt;
    raw.stream.write_all(b"\x81\x02hi").await.unwrap();
    assert_eq!(raw.read_close().await, Some(1002));
    // Continuation without a start.
    let mut raw = RawClient::connect(gw.addr, &token).await;
    raw.send_frame(0x80, b"x").await;
    assert_eq!(raw.read_close().await, Some(1002));
    assert_eq!(gw.get("/healthz").await.0, 200);
}

#[tokio::test]
async fn websocket_and_application_pings_are_answered() {
    let gw = start(support::config()).await;
    let mut c = gw.connect(UserId::new_v4(), &[]).await;
    c.ws.send(Message::Ping(b"hb".to_vec().into())).await.unwrap();
    use futures_util::StreamExt;
    let pong = tokio::time::timeout(support::PATIENCE, c.ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(pong, Message::Pong(b"hb".to_vec().into()));
    c.send_json(json!({"type":"ping"})).await;
    assert_eq!(c.recv().await, json!({"type":"pong"}));
}

#[tokio::test]
async fn the_server_pings_and_drops_a_silent_client_after_pong_wait() {
    let mut config = support::config();
    config.websocket.ping_interval = Duration::from_millis(200);
    config.websocket.pong_wait = Duration::from_millis(700);
    let gw = start(config).await;
    // A client that answers pings (tungstenite does, while it reads) stays.
    let mut live = gw.connect(UserId::new_v4(), &[]).await;
    let mut raw = RawClient::connect(gw.addr, &support::token(UserId::new_v4(), &[])).await;
    for _ in 0..2 {
        // Again and again: each ring re-arms the connection's alarm.
        let (first, _) = raw.read_frame().await.expect("a server ping");
        assert_eq!(first, 0x89);
    }
    // The raw client never answers and never sends: dropped, without waiting for TCP.
    // `live` keeps reading (and so answering pings) until the raw client is gone.
    let dropped = tokio::select! {
        dropped = raw.wait_eof(Duration::from_secs(5)) => dropped,
        msg = live.recv() => panic!("nothing was published, got {msg}"),
    };
    assert!(dropped, "silent client was not dropped");
    assert_eq!(gw.metric("connections").await, 1.0);
    // Several rounds of pings later, deadlines have not piled up: a few
    // per connection (the dropped one's last may still wait to ring).
    let alarms = gw.metric("alarms").await;
    assert!((1.0..=6.0).contains(&alarms), "{alarms} alarms armed for two connections");
    live.send_json(json!({"type":"ping"})).await;
    assert_eq!(live.recv().await, json!({"type":"pong"}));
}

#[tokio::test]
async fn a_vanished_client_is_cleaned_up() {
    let mut config = support::config();
    config.websocket.ping_interval = Duration::from_millis(100);
    config.websocket.pong_wait = Duration::from_millis(400);
    let gw = start(config).await;
    let room = ChatId::new_v4();
    let mut c = RawClient::connect(gw.addr, &support::token(UserId::new_v4(), &[])).await;
    c.send_frame(0x81, format!(r#"{{"type":"subscribe","chat_id":"{room}"}}"#).as_bytes()).await;
    assert_eq!(c.read_frame().await.unwrap().0, 0x81);
    gw.wait_metric("rooms", 1.0).await;
    // Abort without a close frame: the socket is dropped.
    drop(c);
    gw.wait_metric("connections", 0.0).await;
    gw.wait_metric("rooms", 0.0).await;
    gw.wait_metric("subscriptions", 0.0).await;
}

#[tokio::test]
async fn a_slow_consumer_is_dropped_with_4008_while_its_room_mate_gets_everything() {
    let mut config = support::config();
    config.rooms.buffer = 16;
    let gw = start(config).await;
    let room = ChatId::new_v4();
    let mut fast = gw.connect(UserId::new_v4(), &[]).await;
    let head = fast.subscribe(room).await;
    let mut slow = RawClient::connect(gw.addr, &support::token(UserId::new_v4(), &[])).await;
    slow.send_frame(0x81, format!(r#"{{"type":"subscribe","chat_id":"{room}"}}"#).as_bytes()).await;
    assert_eq!(slow.read_frame().await.unwrap().0, 0x81);

    // ~24 MB: far more than loopback socket buffers hold for a reader that
    // stopped reading, so the slow client's queue must overflow.
    const EVENTS: u64 = 400;
    let blob = "x".repeat(60_000);
    // The fast client acknowledges each event; the publisher stays at most
    // a few events ahead of it, well inside the room buffer.
    let (progress_tx, mut progress) = tokio::sync::watch::channel(0u64);
    let reader = tokio::spawn(async move {
        for want in 1..=EVENTS {
            let v = fast.recv().await;
            assert_eq!(v["seq"], head + want, "fast client missed or reordered an event");
            let _ = progress_tx.send(want);
        }
        fast
    });
    for i in 0..EVENTS {
        progress.wait_for(|done| i < done + 4).await.expect("fast reader alive");
        let body = message_sent(room, &json!({"i": i, "blob": blob}));
        let events = herald::protocol::event::parse_batch(body.as_bytes()).unwrap();
        gw.publisher.publish(events).await.unwrap();
    }
    let _fast = reader.await.expect("fast client got all events in order");
    gw.wait_metric("slow_consumers_dropped_total", 1.0).await;
    // The slow client, reading at last, finds 4008 after what was already in flight.
    assert_eq!(slow.read_close().await, Some(4008));
}

#[tokio::test]
async fn command_floods_are_rate_limited_then_closed_with_1008() {
    let gw = start(support::config()).await;
    let mut c = gw.connect(UserId::new_v4(), &[]).await;
    for _ in 0..400 {
        c.ws.feed(Message::text(r#"{"type":"ping"}"#)).await.unwrap();
    }
    c.ws.flush().await.unwrap();
    let (mut pongs, mut limited) = (0, 0);
    use futures_util::StreamExt;
    loop {
        match tokio::time::timeout(support::PATIENCE, c.ws.next()).await.unwrap() {
            Some(Ok(Message::Text(t))) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                match v["type"].as_str() {
                    Some("pong") => pongs += 1,
                    Some("error") if v["code"] == "rate_limited" => limited += 1,
                    _ => panic!("unexpected {v}"),
                }
            }
            Some(Ok(Message::Close(frame))) => {
                assert_eq!(frame.map(|f| u16::from(f.code)), Some(1008));
                break;
            }
            Some(Ok(_)) => {}
            other => panic!("unexpected end {other:?}"),
        }
    }
    assert!(pongs >= 100, "the burst allowance is served: {pongs}");
    assert!(limited > 0, "excess commands are refused with rate_limited");
}
