//! Black-box delivery tests over real sockets: subscribe/unsubscribe, room
//! fan-out with byte-identical data and consecutive seq, membership, per-user
//! routing and member removal.

mod support;

use herald::config::Membership;
use serde_json::{json, Value};
use support::{chat, message_sent, start, user, Client};

/// The raw JSON text of the `data` member: everything after `"data":` up to the final `}`.
fn raw_data(text: &str) -> &str {
    let start = text.find("\"data\":").expect("has data") + 7;
    &text[start..text.len() - 1]
}

#[tokio::test]
async fn subscribers_receive_messages_and_unsubscribe_stops_them() {
    let gw = start(support::config()).await;
    let room = chat();
    let mut c = gw.connect(user(), &[]).await;
    let head = c.subscribe(room).await;
    let (status, body) = gw.publish(&message_sent(room, &json!({"content":"Hello!"}))).await;
    assert_eq!((status, body), (202, json!({"accepted":1})));
    assert_eq!(
        c.recv().await,
        json!({"type":"message.new","chat_id":room,"seq":head + 1,"data":{"content":"Hello!"}})
    );

    // Subscribing twice is idempotent: one more `subscribed`, still one delivery.
    c.subscribe(room).await;
    gw.publish(&message_sent(room, &json!({"n":2}))).await;
    assert_eq!(c.recv().await["seq"], head + 2);
    c.expect_nothing_else(&gw, room).await;

    let markers = chat();
    c.subscribe(markers).await;
    c.send_json(json!({"type":"unsubscribe","chat_id":room})).await;
    assert_eq!(c.recv().await, json!({"type":"unsubscribed","chat_id":room}));
    gw.publish(&message_sent(room, &json!({"n":3}))).await;
    c.expect_nothing_else(&gw, markers).await;
}

#[tokio::test]
async fn every_subscriber_gets_byte_identical_data_with_consecutive_seq() {
    let gw = start(support::config()).await;
    let room = chat();
    let mut clients = Vec::new();
    for _ in 0..4 {
        let mut c = gw.connect(user(), &[]).await;
        let head = c.subscribe(room).await;
        clients.push((c, head));
    }
    // Odd spacing, key order, number forms and escapes must survive untouched.
    let payloads = [
        r#"{"z":1,"a":2}"#,
        r#"{ "content" : "caf\u00e9 \"quoted\"", "n": 1.50e3 }"#,
        r#"{"nested":{"list":[1,2,{"x":null}]},"big":12345678901234567890}"#,
        r#"[1, 2, 3]"#,
        r#""just a string""#,
    ];
    let batch: Vec<String> = payloads
        .iter()
        .map(|p| format!(r#"{{"type":"message.sent","chat_id":"{room}","data":{p}}}"#))
        .collect();
    let (status, body) = gw.publish(&format!("[{}]", batch.join(","))).await;
    assert_eq!((status, body), (202, json!({"accepted":5})));
    for (c, head) in &mut clients {
        for (i, p) in payloads.iter().enumerate() {
            let text = c.recv_text().await;
            assert_eq!(raw_data(&text), *p, "data must arrive byte-for-byte");
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["seq"], *head + i as u64 + 1);
            assert_eq!(v["type"], "message.new");
            assert_eq!(v["chat_id"], room.to_string());
        }
    }
}

#[tokio::test]
async fn seq_is_per_room_and_chat_updates_share_it() {
    let gw = start(support::config()).await;
    let (a, b) = (chat(), chat());
    let mut c = gw.connect(user(), &[]).await;
    let head_a = c.subscribe(a).await;
    let head_b = c.subscribe(b).await;
    gw.publish(&message_sent(a, &json!({"n":1}))).await;
    gw.publish(&json!({"type":"chat.updated","chat_id":a,"data":{"name":"New Chat Name"}}).to_string()).await;
    gw.publish(&message_sent(b, &json!({"n":1}))).await;
    assert_eq!(c.recv().await, json!({"type":"message.new","chat_id":a,"seq":head_a + 1,"data":{"n":1}}));
    assert_eq!(
        c.recv().await,
        json!({"type":"chat.updated","chat_id":a,"seq":head_a + 2,"data":{"name":"New Chat Name"}})
    );
    assert_eq!(c.recv().await, json!({"type":"message.new","chat_id":b,"seq":head_b + 1,"data":{"n":1}}));
}

#[tokio::test]
async fn token_membership_forbids_other_chats_and_leaks_nothing() {
    let mut config = support::config();
    config.auth.membership = Membership::Token;
    let gw = start(config).await;
    let (mine, theirs) = (chat(), chat());
    let mut c = gw.connect(user(), &[mine]).await;
    c.subscribe(mine).await;
    c.send_json(json!({"type":"subscribe","chat_id":theirs})).await;
    let err = c.recv().await;
    assert_eq!((err["type"].as_str(), err["code"].as_str()), (Some("error"), Some("forbidden")));
    assert_eq!(err["chat_id"], theirs.to_string());
    gw.publish(&message_sent(theirs, &json!({"secret":true}))).await;
    gw.publish(&message_sent(mine, &json!({"ok":true}))).await;
    assert_eq!(c.recv().await["data"], json!({"ok":true}));
    c.expect_nothing_else(&gw, mine).await;
}

#[tokio::test]
async fn event_membership_is_learned_and_removal_unsubscribes() {
    let mut config = support::config();
    config.auth.membership = Membership::Events;
    let gw = start(config).await;
    let (room, markers, alice) = (chat(), chat(), user());
    let mut c = gw.connect(alice, &[room]).await;
    let in_markers = json!({"type":"chat.member_added","chat_id":markers,"user_id":alice}).to_string();
    assert_eq!(gw.publish(&in_markers).await.0, 202);
    c.subscribe(markers).await;
    // The token's `chats` claim does not count under `events`.
    c.send_json(json!({"type":"subscribe","chat_id":room})).await;
    assert_eq!(c.recv().await["code"], "forbidden");

    let added = json!({"type":"chat.member_added","chat_id":room,"user_id":alice}).to_string();
    assert_eq!(gw.publish(&added).await.0, 202);
    c.subscribe(room).await;
    gw.publish(&message_sent(room, &json!({"n":1}))).await;
    assert_eq!(c.recv().await["data"], json!({"n":1}));

    let removed = json!({"type":"chat.member_removed","chat_id":room,"user_id":alice}).to_string();
    assert_eq!(gw.publish(&removed).await.0, 202);
    assert_eq!(c.recv().await, json!({"type":"unsubscribed","chat_id":room,"reason":"removed"}));
    gw.publish(&message_sent(room, &json!({"n":2}))).await;
    c.expect_nothing_else(&gw, markers).await;
    c.send_json(json!({"type":"subscribe","chat_id":room})).await;
    assert_eq!(c.recv().await["code"], "forbidden");
}

#[tokio::test]
async fn removal_under_token_membership_still_drops_the_subscription() {
    let mut config = support::config();
    config.auth.membership = Membership::Token;
    let gw = start(config).await;
    let (room, markers, bob) = (chat(), chat(), user());
    let mut c = gw.connect(bob, &[room, markers]).await;
    let mut other = gw.connect(user(), &[room]).await;
    c.subscribe(room).await;
    c.subscribe(markers).await;
    other.subscribe(room).await;
    gw.publish(&json!({"type":"chat.member_removed","chat_id":room,"user_id":bob}).to_string()).await;
    assert_eq!(c.recv().await, json!({"type":"unsubscribed","chat_id":room,"reason":"removed"}));
    gw.publish(&message_sent(room, &json!({"after":"removal"}))).await;
    assert_eq!(other.recv().await["data"], json!({"after":"removal"}));
    c.expect_nothing_else(&gw, markers).await;
}

#[tokio::test]
async fn notifications_reach_every_connection_of_that_user_and_nobody_else() {
    let gw = start(support::config()).await;
    let (alice, bob) = (user(), user());
    let mut a1 = gw.connect(alice, &[]).await;
    let mut a2 = gw.connect(alice, &[]).await;
    let mut b = gw.connect(bob, &[]).await;
    let markers = chat();
    b.subscribe(markers).await;
    let body = json!({"type":"notification.created","user_id":alice,"data":{"title":"New task assigned","body":"#123"}});
    assert_eq!(gw.publish(&body.to_string()).await.0, 202);
    let want = json!({"type":"notification.new","data":{"title":"New task assigned","body":"#123"}});
    assert_eq!(a1.recv().await, want);
    assert_eq!(a2.recv().await, want);
    b.expect_nothing_else(&gw, markers).await;
}

#[tokio::test]
async fn task_status_changes_go_to_the_room_with_seq_and_to_users_without() {
    let gw = start(support::config()).await;
    let (room, assignee, watcher) = (chat(), user(), user());
    let mut member = gw.connect(watcher, &[]).await;
    let head = member.subscribe(room).await;
    let mut direct = gw.connect(assignee, &[]).await;
    let markers = chat();
    direct.subscribe(markers).await;
    let event = json!({"type":"task.status_changed","chat_id":room,"user_ids":[assignee],
        "data":{"task_id":"5b0c1bb8-8f1f-4cf7-9d8e-8f1c7b9e0a11","status":"done"}});
    assert_eq!(gw.publish(&event.to_string()).await.0, 202);
    let in_room = member.recv().await;
    assert_eq!(in_room["type"], "task.updated");
    assert_eq!(in_room["seq"], head + 1);
    assert_eq!(in_room["data"]["status"], "done");
    let to_user = direct.recv().await;
    assert_eq!(to_user["type"], "task.updated");
    assert!(to_user.get("seq").is_none(), "per-user events carry no seq: {to_user}");
    assert_eq!(to_user["data"]["status"], "done");

    // Only user_ids: no room delivery at all.
    let event = json!({"type":"task.status_changed","user_ids":[watcher],"data":{"status":"open"}});
    gw.publish(&event.to_string()).await;
    let got = member.recv().await;
    assert!(got.get("seq").is_none() && got["data"]["status"] == "open", "{got}");
    direct.expect_nothing_else(&gw, markers).await;
}

#[tokio::test]
async fn the_in_process_publisher_delivers_like_http() {
    let gw = start(support::config()).await;
    let room = chat();
    let mut c: Client = gw.connect(user(), &[]).await;
    let head = c.subscribe(room).await;
    let events =
        herald::protocol::event::parse_batch(message_sent(room, &json!({"via":"bus"})).as_bytes()).unwrap();
    gw.publisher.publish(events).await.unwrap();
    assert_eq!(
        c.recv().await,
        json!({"type":"message.new","chat_id":room,"seq":head + 1,"data":{"via":"bus"}})
    );
}

#[tokio::test]
async fn subscription_limit_is_enforced() {
    let mut config = support::config();
    config.websocket.max_subscriptions = 2;
    let gw = start(config).await;
    let mut c = gw.connect(user(), &[]).await;
    c.subscribe(chat()).await;
    c.subscribe(chat()).await;
    let third = chat();
    c.send_json(json!({"type":"subscribe","chat_id":third})).await;
    let err = c.recv().await;
    assert_eq!(
        (err["code"].as_str(), err["chat_id"].as_str()),
        (Some("too_many_subscriptions"), Some(&*third.to_string()))
    );
}

#[tokio::test]
async fn a_user_named_twice_in_user_ids_gets_the_event_once() {
    let gw = start(support::config()).await;
    let u = user();
    let mut c = gw.connect(u, &[]).await;
    // The user topic is in place once a round trip has been answered.
    c.send_json(json!({"type":"ping"})).await;
    assert_eq!(c.recv().await, json!({"type":"pong"}));

    // A marker addressed to the same user follows in the same batch: the user's frames arrive in
    // order, so the frame after the first copy shows whether a second copy was sent.
    let batch = json!([
        {"type":"task.status_changed","user_ids":[u, u, u],"data":{"n":1}},
        {"type":"notification.created","user_id":u,"data":{"marker":true}},
    ]);
    let (status, _) = gw.publish(&batch.to_string()).await;
    assert_eq!(status, 202);
    assert_eq!(c.recv().await, json!({"type":"task.updated","data":{"n":1}}));
    assert_eq!(c.recv().await, json!({"type":"notification.new","data":{"marker":true}}));
}

/// Rooms make their live ring at their first event, not at the first
/// subscriber: whoever subscribed before it (and is still there) gets it,
/// and whoever left first leaves nothing behind.
#[tokio::test]
async fn subscribers_who_joined_before_a_room_had_any_event_get_its_first_one() {
    let gw = start(support::config()).await;
    let (busy, quiet) = (chat(), chat());
    let mut stay = Vec::new();
    for _ in 0..6 {
        let mut c = gw.connect(user(), &[]).await;
        let head = c.subscribe(busy).await;
        stay.push((c, head));
    }
    let mut gone = gw.connect(user(), &[]).await;
    gone.subscribe(busy).await;
    gone.subscribe(quiet).await;
    gone.send_json(json!({"type":"unsubscribe","chat_id":quiet})).await;
    assert_eq!(gone.recv().await["type"], "unsubscribed");
    drop(gone);
    gw.wait_metric("connections", 6.0).await;
    assert_eq!(gw.metric("rooms").await, 1.0, "the room left before any event is gone");
    assert_eq!(gw.metric("subscriptions").await, 6.0);

    for n in 1..=3 {
        let (status, _) = gw.publish(&message_sent(busy, &json!({ "n": n }))).await;
        assert_eq!(status, 202);
    }
    for (c, head) in &mut stay {
        for n in 1..=3 {
            let msg = c.recv().await;
            assert_eq!((msg["seq"].as_u64(), &msg["data"]["n"]), (Some(*head + n), &json!(n)), "{msg}");
        }
    }
    // A subscriber joining once the ring exists is live at once too.
    let origin = stay[0].1;
    let mut late = gw.connect(user(), &[]).await;
    late.subscribe(busy).await;
    gw.publish(&message_sent(busy, &json!({ "n": 4 }))).await;
    assert_eq!(late.recv().await["seq"], origin + 4);
}
