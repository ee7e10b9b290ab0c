//! Custom events (`events.passthrough`), `api.reject_unknown` and the room
//! history route, over real sockets on the memory bus (PROTOCOL.md sections
//! 3, 5 and 7). The Redis versions are in `tests/redis.rs`.

mod support;

use herald::protocol::ChatId;
use serde_json::{json, Value};
use support::{chat, message_sent, start, user, Gateway, API_KEY};

/// A published `data` with odd spacing, key order and number forms: it must arrive untouched.
const RAW: &str = r#"{ "emoji" : "\u2764", "n": 1.50e3, "z":1,"a":[true ,null]}"#;

fn passthrough_config(globs: &[&str]) -> herald::config::Config {
    let mut config = support::config();
    config.events.passthrough = globs.iter().map(|g| g.to_string()).collect();
    config
}

/// GETs a path with the test API key (or `key`); returns status and body.
async fn get_with_key(gw: &Gateway, path: &str, key: Option<&str>) -> (u16, String) {
    let auth = key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    gw.http(&format!("GET {path} HTTP/1.1\r\nHost: test\r\n{auth}Connection: close\r\n\r\n")).await
}

async fn history(gw: &Gateway, room: ChatId, query: &str) -> (u16, Value, String) {
    let (status, body) = get_with_key(gw, &format!("/api/rooms/{room}/history{query}"), Some(API_KEY)).await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null), body)
}

#[tokio::test]
async fn a_passthrough_room_event_is_delivered_as_published_with_seq_and_recovered() {
    let gw = start(passthrough_config(&["reaction.*"])).await;
    let room = chat();
    let mut live = gw.connect(user(), &[]).await;
    let head = live.subscribe(room).await;
    let body = format!(r#"{{"type":"reaction.added","chat_id":"{room}","data":{RAW}}}"#);
    assert_eq!(gw.publish(&body).await, (202, json!({"accepted":1})));
    let want = format!(r#"{{"type":"reaction.added","chat_id":"{room}","seq":{},"data":{RAW}}}"#, head + 1);
    assert_eq!(live.recv_text().await, want, "byte for byte, with the room's next seq");

    // Kept in history like any room event: a client recovering with `since` gets the same bytes.
    let mut late = gw.connect(user(), &[]).await;
    assert_eq!(late.subscribe_since(room, head).await, (head + 1, true));
    assert_eq!(late.recv_text().await, want);
}

#[tokio::test]
async fn a_passthrough_user_event_reaches_every_connection_of_its_user_without_seq() {
    let gw = start(passthrough_config(&["receipt.read", "reaction.*"])).await;
    let (ann, markers) = (user(), chat());
    let mut first = gw.connect(ann, &[]).await;
    let mut second = gw.connect(ann, &[]).await;
    let mut other = gw.connect(user(), &[]).await;
    other.subscribe(markers).await;
    let body = format!(r#"{{"type":"receipt.read","user_id":"{ann}","data":{RAW}}}"#);
    assert_eq!(gw.publish(&body).await, (202, json!({"accepted":1})));
    let want = format!(r#"{{"type":"receipt.read","data":{RAW}}}"#);
    assert_eq!(first.recv_text().await, want);
    assert_eq!(second.recv_text().await, want);
    other.expect_nothing_else(&gw, markers).await;
}

#[tokio::test]
async fn passthrough_events_are_validated_and_reserved_types_never_pass() {
    let gw = start(passthrough_config(&["reaction.*"])).await;
    let (room, ann) = (chat(), user());
    let refused = [
        (
            format!(r#"{{"type":"reaction.added","chat_id":"{room}","user_id":"{ann}","data":{{}}}}"#),
            "exactly one of",
        ),
        (r#"{"type":"reaction.added","data":{}}"#.to_string(), "exactly one of"),
        (
            format!(r#"{{"type":"reaction.added","user_ids":["{ann}"],"chat_id":"{room}","data":{{}}}}"#),
            "exactly one of",
        ),
        (format!(r#"{{"type":"reaction.added","chat_id":"{room}"}}"#), "needs field `data`"),
        (format!(r#"{{"type":"reaction.added","chat_id":"{room}","data":null}}"#), "needs field `data`"),
        (format!(r#"{{"type":"reaction.Added\"x","chat_id":"{room}","data":{{}}}}"#), "at most 64 bytes"),
        (
            format!(r#"{{"type":"reaction.{}","chat_id":"{room}","data":{{}}}}"#, "x".repeat(60)),
            "at most 64 bytes",
        ),
    ];
    for (body, why) in refused {
        let ok = format!(r#"{{"type":"reaction.ok","chat_id":"{room}","data":{{}}}}"#);
        let (status, reply) = gw.publish(&format!("[{ok},{body}]")).await;
        assert_eq!(status, 400, "{body}: {reply}");
        let error = reply["error"].as_str().unwrap_or_default();
        assert!(error.starts_with("event 1: ") && error.contains(why), "{body}: {reply}");
    }
    // Not matching a glob: unknown, counted and ignored as before.
    let other = format!(r#"{{"type":"receipt.read","chat_id":"{room}","data":{{}}}}"#);
    assert_eq!(gw.publish(&other).await, (202, json!({"accepted":0,"ignored":1})));

    // A glob that would let an event pass for one of Herald's own types is refused at startup.
    for glob in ["*", "sub*", "*.new", "e*r", "po?g", "Reaction.*", "", "chat.*", "task.*"] {
        let config = passthrough_config(&[glob]);
        let err = config.validate().expect_err(glob).to_string();
        assert!(err.contains("events.passthrough"), "{glob}: {err}");
    }
    passthrough_config(&["reaction.*", "receipt.read", "x-*_y"]).validate().expect("valid globs");
}

#[tokio::test]
async fn reject_unknown_refuses_the_whole_batch_naming_the_type() {
    let room = chat();
    let batch = format!(
        r#"[{},{{"type":"chat.poked","chat_id":"{room}"}},{{"type":"reaction.x","chat_id":"{room}","data":{{}}}}]"#,
        message_sent(room, &json!({"n":1}))
    );
    // Default: unknown types are counted and ignored.
    let lenient = start(passthrough_config(&["reaction.*"])).await;
    assert_eq!(lenient.publish(&batch).await, (202, json!({"accepted":2,"ignored":1})));

    let mut config = passthrough_config(&["reaction.*"]);
    config.api.reject_unknown = true;
    let strict = start(config).await;
    let mut c = strict.connect(user(), &[]).await;
    c.subscribe(room).await;
    assert_eq!(strict.publish(&batch).await, (400, json!({"error":"event 1: unknown type `chat.poked`"})));
    // Nothing of the refused batch was delivered; known and passthrough types still are.
    let fine = format!(
        r#"[{},{{"type":"reaction.x","chat_id":"{room}","data":{{}}}}]"#,
        message_sent(room, &json!({}))
    );
    assert_eq!(strict.publish(&fine).await, (202, json!({"accepted":2})));
    assert_eq!(c.recv().await["type"], "message.new");
    assert_eq!(c.recv().await["type"], "reaction.x");
    c.expect_nothing_else(&strict, room).await;
}

#[tokio::test]
async fn history_over_http_equals_what_a_recovering_client_receives() {
    let gw = start(passthrough_config(&["reaction.*"])).await;
    let room = chat();
    let head = support::position(gw.addr, room).await;
    for n in 0..5 {
        let body = if n % 2 == 0 {
            message_sent(room, &json!({"n": n}))
        } else {
            format!(r#"{{"type":"reaction.added","chat_id":"{room}","data":{RAW}}}"#)
        };
        assert_eq!(gw.publish(&body).await.0, 202);
    }
    let mut c = gw.connect(user(), &[]).await;
    assert_eq!(c.subscribe_since(room, head).await, (head + 5, true));
    let mut recovered = Vec::new();
    for _ in 0..5 {
        recovered.push(c.recv_text().await);
    }
    let (status, reply, body) = history(&gw, room, &format!("?since={head}")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        format!(
            r#"{{"chat_id":"{room}","seq":{},"recovered":true,"events":[{}]}}"#,
            head + 5,
            recovered.join(",")
        ),
        "the frames' JSON, byte for byte"
    );
    assert_eq!(reply["events"].as_array().map(Vec::len), Some(5));

    // `limit` pages from `since`, oldest first.
    let (_, page, _) = history(&gw, room, &format!("?since={}&limit=2", head + 1)).await;
    let seqs: Vec<u64> =
        page["events"].as_array().unwrap().iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert_eq!(seqs, [head + 2, head + 3]);
    let (_, at_head, _) = history(&gw, room, &format!("?since={}", head + 5)).await;
    assert_eq!(at_head["events"], json!([]));

    // A room nobody published to: its position and no events.
    let quiet = chat();
    let (status, reply, _) = history(&gw, quiet, "").await;
    assert_eq!(status, 200);
    assert_eq!(reply["events"], json!([]));
    assert_eq!(reply["seq"], support::position(gw.addr, quiet).await);
}

#[tokio::test]
async fn history_refuses_bad_requests_with_clear_errors() {
    let gw = start(support::config()).await;
    let room = chat();
    for query in [
        "?since=-1",
        "?since=abc",
        "?limit=0",
        "?limit=101",
        "?since=1&since=2",
        "?from=1",
        "?since=99999999999999999999999",
    ] {
        let (status, reply, _) = history(&gw, room, query).await;
        assert_eq!(status, 400, "{query}: {reply}");
        assert!(reply["error"].as_str().is_some_and(|e| !e.is_empty()), "{query}: {reply}");
    }
    let (status, reply, _) = history(&gw, room, "?limit=100").await;
    assert_eq!(status, 200, "limit up to rooms.history_size: {reply}");
    let (status, body) = get_with_key(&gw, "/api/rooms/not-a-uuid/history", Some(API_KEY)).await;
    assert_eq!((status, body.as_str()), (400, r#"{"error":"chat_id in the path must be a UUID"}"#));
    let path = format!("/api/rooms/{room}/history");
    assert_eq!(get_with_key(&gw, &path, None).await.0, 401);
    assert_eq!(get_with_key(&gw, &path, Some("wrong-key-0123456789")).await.0, 401);
    let post = format!("POST {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {API_KEY}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    assert_eq!(gw.http(&post).await.0, 405);
}
