//! Acting on a user (PROTOCOL.md section 7): `POST /api/users/{id}/disconnect`
//! and `/revoke`, and removals that stick for older tokens, on one node over
//! real sockets. The multi-node forms are in `redis.rs`.

mod support;

use herald::auth::now_secs;
use herald::config::Membership;
use serde_json::{json, Value};
use support::{api_post, chat, config, start, token_at, user, Client, API_KEY};

fn disconnect_path(user: impl std::fmt::Display) -> String {
    format!("/api/users/{user}/disconnect")
}

fn revoke_path(user: impl std::fmt::Display) -> String {
    format!("/api/users/{user}/revoke")
}

/// A client answers a ping: its connection is open.
async fn alive(client: &mut Client) {
    client.send_json(json!({"type":"ping"})).await;
    assert_eq!(client.recv().await, json!({"type":"pong"}));
}

#[tokio::test]
async fn disconnect_closes_every_connection_of_the_user_with_4003_and_no_other() {
    let gw = start(config()).await;
    let (alice, bob) = (user(), user());
    let mut a1 = gw.connect(alice, &[]).await;
    let mut a2 = gw.connect(alice, &[]).await;
    let mut b1 = gw.connect(bob, &[]).await;
    alive(&mut a1).await;
    alive(&mut a2).await;
    alive(&mut b1).await;

    let (status, reply) = api_post(gw.addr, &disconnect_path(alice), "", Some(API_KEY)).await;
    assert_eq!((status, reply), (200, json!({"disconnected": 2})));
    assert_eq!(a1.closed().await.0, Some(4003));
    assert_eq!(a2.closed().await.0, Some(4003));
    alive(&mut b1).await;
    gw.wait_metric("users", 1.0).await;
    assert_eq!(gw.labelled("closes_total", "code", "4003").await, 2.0);
    // A user with no connection: nothing to close, still 200.
    let (status, reply) = api_post(gw.addr, &disconnect_path(user()), "{}", Some(API_KEY)).await;
    assert_eq!((status, reply), (200, json!({"disconnected": 0})));
    gw.stop().await;
}

#[tokio::test]
async fn revoke_refuses_older_tokens_at_upgrade_and_closes_their_connections() {
    let gw = start(config()).await;
    let (alice, bob) = (user(), user());
    let now = now_secs();
    let old = token_at(alice, &[], Some(now - 100));
    let fresh = token_at(alice, &[], Some(now));
    let mut on_old = gw.connect_token(&old).await;
    let mut on_fresh = gw.connect_token(&fresh).await;
    let mut bob_old = gw.connect_token(&token_at(bob, &[], Some(now - 100))).await;
    alive(&mut on_old).await;

    let body = json!({"before": now - 50}).to_string();
    let (status, reply) = api_post(gw.addr, &revoke_path(alice), &body, Some(API_KEY)).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply, json!({"revoked_before": now - 50}));
    assert_eq!(on_old.closed().await.0, Some(4003));
    alive(&mut on_fresh).await;
    alive(&mut bob_old).await;

    for token in [old, token_at(alice, &[], None)] {
        let refused = support::refusal(gw.ws_url(&token)).await;
        assert_eq!(
            refused,
            Some((401, json!({"error": "token_revoked"}))),
            "an older token, or one without iat"
        );
    }
    let mut again = gw.connect_token(&fresh).await;
    alive(&mut again).await;
    assert_eq!(gw.metric("revocations").await, 1.0);

    // Without a body the cut-off is now: the fresh token goes too.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let (status, reply) = api_post(gw.addr, &revoke_path(alice), "", Some(API_KEY)).await;
    assert_eq!(status, 200, "{reply}");
    assert!(reply["revoked_before"].as_u64() >= Some(now + 1), "{reply}");
    assert_eq!(on_fresh.closed().await.0, Some(4003));
    assert_eq!(again.closed().await.0, Some(4003));
    gw.stop().await;
}

/// Under `membership: token` the token's `chats` alone used to decide: a removed user
/// subscribed again at once with the same token.
#[tokio::test]
async fn a_removal_sticks_for_older_tokens_until_a_readd_or_a_newer_token() {
    let mut c = config();
    c.auth.membership = Membership::Token;
    let gw = start(c).await;
    let (alice, room) = (user(), chat());
    let old = token_at(alice, &[room], Some(now_secs() - 100));
    let mut client = gw.connect_token(&old).await;
    client.subscribe(room).await;

    let removed = json!({"type":"chat.member_removed","chat_id":room,"user_id":alice}).to_string();
    assert_eq!(gw.publish(&removed).await.0, 202);
    assert_eq!(client.recv().await, json!({"type":"unsubscribed","chat_id":room,"reason":"removed"}));
    client.send_json(json!({"type":"subscribe","chat_id":room})).await;
    let reply: Value = client.recv().await;
    assert_eq!(
        (reply["type"].as_str(), reply["code"].as_str()),
        (Some("error"), Some("forbidden")),
        "{reply}"
    );
    // Another connection with the same old token is refused too.
    let mut other = gw.connect_token(&old).await;
    other.send_json(json!({"type":"subscribe","chat_id":room})).await;
    assert_eq!(other.recv().await["code"], "forbidden");
    assert_eq!(gw.metric("removals").await, 1.0);

    // A token issued after the removal that lists the chat lets the user in.
    let mut newer = gw.connect_token(&token_at(alice, &[room], Some(now_secs()))).await;
    newer.subscribe(room).await;

    // So does a re-add, for the old token too.
    let added = json!({"type":"chat.member_added","chat_id":room,"user_id":alice}).to_string();
    assert_eq!(gw.publish(&added).await.0, 202);
    client.subscribe(room).await;
    assert_eq!(gw.metric("removals").await, 0.0);
    gw.stop().await;
}

#[tokio::test]
async fn bad_requests_to_the_user_routes_are_refused_with_a_clear_4xx() {
    let gw = start(config()).await;
    let alice = user();
    let now = now_secs();
    let cases: Vec<(String, String, Option<&str>, u16)> = vec![
        (revoke_path(alice), String::new(), None, 401),
        (disconnect_path(alice), String::new(), Some("wrong-key-0123456789"), 401),
        (revoke_path("not-a-uuid"), String::new(), Some(API_KEY), 400),
        (disconnect_path("42"), String::new(), Some(API_KEY), 400),
        (revoke_path(alice), json!({"before": now + 3600}).to_string(), Some(API_KEY), 400),
        (revoke_path(alice), json!({"before": -1}).to_string(), Some(API_KEY), 400),
        (revoke_path(alice), json!({"before": "soon"}).to_string(), Some(API_KEY), 400),
        (revoke_path(alice), json!({"before": now, "extra": 1}).to_string(), Some(API_KEY), 400),
        (revoke_path(alice), "not json".into(), Some(API_KEY), 400),
        (disconnect_path(alice), json!({"now": true}).to_string(), Some(API_KEY), 400),
        (revoke_path(alice), format!("{{\"before\":{now}{}}}", " ".repeat(2000)), Some(API_KEY), 413),
        (format!("/api/users/{alice}/ban"), String::new(), Some(API_KEY), 404),
    ];
    for (path, body, key, want) in cases {
        let (status, reply) = api_post(gw.addr, &path, &body, key).await;
        assert_eq!(status, want, "{path} {body:.80}: {reply}");
        assert!(reply["error"].is_string(), "{path}: {reply}");
    }
    let (status, _) = gw.get(&revoke_path(alice)).await;
    assert_eq!(status, 405);
    let (status, _) = gw.get(&disconnect_path(alice)).await;
    assert_eq!(status, 405);
    // None of it revoked anything.
    assert_eq!(gw.metric("revocations").await, 0.0);
    gw.stop().await;
}

/// A token claiming to be issued in the future would outlive every
/// revocation and removal (they refuse tokens issued before a moment): it is
/// refused as not valid yet, like one before its `nbf`.
#[tokio::test]
async fn a_token_issued_in_the_future_is_not_valid_yet() {
    let gw = start(config()).await;
    let later = token_at(user(), &[], Some(now_secs() + 10 * 86_400));
    let refused = support::refusal(format!("ws://{}/ws?token={later}", gw.addr)).await;
    assert_eq!(refused, Some((401, json!({"error":"token_not_yet_valid"}))));
    // Inside auth.leeway (default 0) the present is fine.
    let now = token_at(user(), &[], Some(now_secs()));
    assert_eq!(support::refusal(format!("ws://{}/ws?token={now}", gw.addr)).await, None);
}
