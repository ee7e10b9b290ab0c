//! Black-box tests of connecting (PROTOCOL.md section 1): both ways of
//! presenting a token, every refusal before the upgrade with its JSON reason,
//! issuer/audience, RS256/ES256 public keys, allowed origins, the connection
//! limit, expiry while connected, and non-WebSocket requests to the edge.

mod support;

use std::time::Duration;

use herald::auth::now_secs;
use herald::protocol::UserId;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use support::{chat, message_sent, refusal, start, user, Client, Gateway, SECRET};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::http::HeaderValue;

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// Signs arbitrary claims: the shapes `mint_hs256` will not produce.
fn sign(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, key).expect("test token signs")
}

fn hs(secret: &str) -> EncodingKey {
    EncodingKey::from_secret(secret.as_bytes())
}

/// Claims that are valid in every respect, for one user.
fn good_claims(user: UserId) -> Value {
    json!({"sub": user, "exp": now_secs() + 600})
}

/// Unpadded base64url, for hand-built tokens (`alg: none`).
fn b64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// The `/ws` upgrade request without a token in the URL.
fn ws_request(gw: &Gateway) -> Request {
    format!("ws://{}/ws", gw.addr).into_client_request().expect("valid ws url")
}

fn with_header(mut req: Request, name: &'static str, value: &str) -> Request {
    req.headers_mut().insert(name, HeaderValue::from_str(value).expect("header value"));
    req
}

/// A working connection: a subscribe is answered and a published message arrives.
async fn assert_works(gw: &Gateway, c: &mut Client) {
    let room = chat();
    c.subscribe(room).await;
    assert_eq!(gw.publish(&message_sent(room, &json!({"n":1}))).await.0, 202);
    assert_eq!(c.recv().await["data"], json!({"n":1}));
}

#[tokio::test]
async fn token_in_query_or_bearer_header_connects() {
    let gw = start(support::config()).await;
    let mut by_query = gw.connect(user(), &[]).await;
    assert_works(&gw, &mut by_query).await;

    let token = support::token(user(), &[]);
    let req = with_header(ws_request(&gw), "authorization", &format!("Bearer {token}"));
    let (ws, resp) = tokio_tungstenite::connect_async(req).await.expect("header token upgrades");
    assert_eq!(resp.status().as_u16(), 101);
    let mut by_header = Client { ws };
    assert_works(&gw, &mut by_header).await;
    gw.wait_metric("connections", 2.0).await;
}

#[tokio::test]
async fn bad_tokens_are_refused_before_the_upgrade_with_a_reason() {
    let gw = start(support::config()).await;
    let key = hs(SECRET);
    let sub = user();
    let now = now_secs();
    let none_token = format!(
        "{}.{}.",
        b64url(br#"{"alg":"none","typ":"JWT"}"#),
        b64url(good_claims(sub).to_string().as_bytes())
    );
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("missing", None, "missing_token"),
        ("empty", Some(String::new()), "missing_token"),
        ("not a jwt", Some("not-a-jwt".into()), "malformed_token"),
        ("three garbage parts", Some("abc.def.ghi".into()), "malformed_token"),
        (
            "expired",
            Some(sign(Algorithm::HS256, &key, &json!({"sub": sub, "exp": now - 120}))),
            "token_expired",
        ),
        (
            "not yet valid",
            Some(sign(Algorithm::HS256, &key, &json!({"sub": sub, "exp": now + 600, "nbf": now + 300}))),
            "token_not_yet_valid",
        ),
        (
            "forged",
            Some(sign(Algorithm::HS256, &hs("some-other-secret-0123456789"), &good_claims(sub))),
            "invalid_signature",
        ),
        ("HS384", Some(sign(Algorithm::HS384, &key, &good_claims(sub))), "algorithm_not_allowed"),
        (
            "sub not a uuid",
            Some(sign(Algorithm::HS256, &key, &json!({"sub": "bob", "exp": now + 600}))),
            "malformed_token",
        ),
        ("no sub", Some(sign(Algorithm::HS256, &key, &json!({"exp": now + 600}))), "malformed_token"),
        ("no exp", Some(sign(Algorithm::HS256, &key, &json!({"sub": sub}))), "malformed_token"),
    ];
    let mut refused = 0.0;
    for (name, token, reason) in &cases {
        let req = match token {
            None => ws_request(&gw),
            Some(t) => format!("ws://{}/ws?token={t}", gw.addr).into_client_request().unwrap(),
        };
        let (status, body) = gw.refused(req).await;
        assert_eq!((status, body), (401, json!({"error": reason})), "case {name} (query)");
        refused += 1.0;
        // The same token in the header is refused the same way.
        if let Some(t) = token.as_deref().filter(|t| !t.is_empty()) {
            let req = with_header(ws_request(&gw), "authorization", &format!("Bearer {t}"));
            let (status, body) = gw.refused(req).await;
            assert_eq!((status, body), (401, json!({"error": reason})), "case {name} (header)");
            refused += 1.0;
        }
    }
    // `alg: none` is refused; the library cannot even parse that header, so
    // "malformed" is as right as "algorithm not allowed".
    for req in [
        format!("ws://{}/ws?token={none_token}", gw.addr).into_client_request().unwrap(),
        with_header(ws_request(&gw), "authorization", &format!("Bearer {none_token}")),
    ] {
        let (status, body) = gw.refused(req).await;
        assert_eq!(status, 401, "alg none: {body}");
        assert!(
            body == json!({"error": "algorithm_not_allowed"}) || body == json!({"error": "malformed_token"}),
            "alg none: {body}"
        );
        refused += 1.0;
    }
    // Refused before the upgrade: no WebSocket was ever opened.
    assert_eq!(gw.metric("connections_opened_total").await, 0.0);
    assert_eq!(gw.labelled("upgrades_rejected_total", "reason", "auth").await, refused);
}

#[tokio::test]
async fn issuer_and_audience_are_checked_when_configured() {
    let mut config = support::config();
    config.auth.issuer = Some("https://issuer.test".into());
    config.auth.audience = Some("herald".into());
    let gw = start(config).await;
    let key = hs(SECRET);
    let sub = user();
    let exp = now_secs() + 600;
    let token = |claims: Value| sign(Algorithm::HS256, &key, &claims);

    let right = token(json!({"sub": sub, "exp": exp, "iss": "https://issuer.test", "aud": "herald"}));
    let mut c = gw.connect_token(&right).await;
    assert_works(&gw, &mut c).await;

    for (name, claims) in [
        ("wrong iss", json!({"sub": sub, "exp": exp, "iss": "https://evil.test", "aud": "herald"})),
        ("wrong aud", json!({"sub": sub, "exp": exp, "iss": "https://issuer.test", "aud": "other"})),
    ] {
        let req = format!("ws://{}/ws?token={}", gw.addr, token(claims)).into_client_request().unwrap();
        let (status, body) = gw.refused(req).await;
        assert_eq!((status, body), (401, json!({"error": "invalid_issuer_or_audience"})), "{name}");
    }
    // A token that does not name the configured issuer or audience at all
    // must not pass the check either.
    let mut accepted = Vec::new();
    for (name, claims) in [
        ("missing iss", json!({"sub": sub, "exp": exp, "aud": "herald"})),
        ("missing aud", json!({"sub": sub, "exp": exp, "iss": "https://issuer.test"})),
    ] {
        let req = format!("ws://{}/ws?token={}", gw.addr, token(claims)).into_client_request().unwrap();
        match refusal(req).await {
            None => accepted.push(name),
            Some((status, body)) => {
                assert_eq!(status, 401, "{name}");
                assert!(
                    body == json!({"error": "invalid_issuer_or_audience"})
                        || body == json!({"error": "malformed_token"}),
                    "{name}: {body}"
                );
            }
        }
    }
    assert!(accepted.is_empty(), "accepted although issuer and audience are configured: {accepted:?}");
}

/// A node verifying with a public key: its own algorithm connects; HS256
/// signed with the public key's bytes (algorithm confusion) and the other
/// asymmetric algorithm are refused.
async fn check_public_key(
    alg: Algorithm,
    (public, private, forger): (&str, &str, &str),
    other: (Algorithm, &str),
) {
    let mut config = support::config();
    config.auth.jwt_secret = None;
    config.auth.jwt_public_key_file = Some(fixture(public));
    let gw = start(config).await;
    let pem = |name: &str| std::fs::read(fixture(name)).expect("fixture key");
    let encoding = |alg: Algorithm, pem: &[u8]| match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(pem).expect("RSA private key"),
        _ => EncodingKey::from_ec_pem(pem).expect("EC private key"),
    };
    let sub = user();

    let good = sign(alg, &encoding(alg, &pem(private)), &good_claims(sub));
    let mut c = gw.connect_token(&good).await;
    assert_works(&gw, &mut c).await;

    let confused = sign(Algorithm::HS256, &EncodingKey::from_secret(&pem(public)), &good_claims(sub));
    let req = format!("ws://{}/ws?token={confused}", gw.addr).into_client_request().unwrap();
    assert_eq!(gw.refused(req).await, (401, json!({"error": "algorithm_not_allowed"})));

    let (other_alg, other_private) = other;
    let wrong = sign(other_alg, &encoding(other_alg, &pem(other_private)), &good_claims(sub));
    let req = format!("ws://{}/ws?token={wrong}", gw.addr).into_client_request().unwrap();
    assert_eq!(gw.refused(req).await, (401, json!({"error": "algorithm_not_allowed"})));

    // Another key of the right algorithm: a bad signature.
    let forged = sign(alg, &encoding(alg, &pem(forger)), &good_claims(sub));
    let req = format!("ws://{}/ws?token={forged}", gw.addr).into_client_request().unwrap();
    assert_eq!(gw.refused(req).await, (401, json!({"error": "invalid_signature"})));

    let expired = sign(alg, &encoding(alg, &pem(private)), &json!({"sub": sub, "exp": now_secs() - 120}));
    let req = format!("ws://{}/ws?token={expired}", gw.addr).into_client_request().unwrap();
    assert_eq!(gw.refused(req).await, (401, json!({"error": "token_expired"})));
}

#[tokio::test]
async fn rs256_public_key_verifies_tokens() {
    check_public_key(
        Algorithm::RS256,
        ("rsa_public.pem", "rsa_private.pem", "rsa_other_private.pem"),
        (Algorithm::ES256, "ec_private.pem"),
    )
    .await;
}

#[tokio::test]
async fn es256_public_key_verifies_tokens() {
    check_public_key(
        Algorithm::ES256,
        ("ec_public.pem", "ec_private.pem", "ec_other_private.pem"),
        (Algorithm::RS256, "rsa_private.pem"),
    )
    .await;
}

#[tokio::test]
async fn origins_are_checked_when_configured() {
    let mut config = support::config();
    config.auth.allowed_origins = vec!["https://app.example".into(), "https://admin.example".into()];
    let gw = start(config).await;
    let token = support::token(user(), &[]);
    let url = gw.ws_url(&token);
    let forbidden = json!({"error": "origin not allowed"});

    let req = with_header(url.as_str().into_client_request().unwrap(), "origin", "https://evil.example");
    assert_eq!(gw.refused(req).await, (403, forbidden.clone()));
    // tungstenite sends no Origin unless asked to.
    let req = url.as_str().into_client_request().unwrap();
    assert!(req.headers().get("origin").is_none());
    assert_eq!(gw.refused(req).await, (403, forbidden.clone()));
    // A prefix of an allowed origin is not that origin.
    let req = with_header(url.as_str().into_client_request().unwrap(), "origin", "https://app.example.evil");
    assert_eq!(gw.refused(req).await, (403, forbidden));
    assert_eq!(gw.labelled("upgrades_rejected_total", "reason", "origin").await, 3.0);

    let req = with_header(url.as_str().into_client_request().unwrap(), "origin", "https://admin.example");
    let (ws, _) = tokio_tungstenite::connect_async(req).await.expect("allowed origin upgrades");
    assert_works(&gw, &mut Client { ws }).await;
}

#[tokio::test]
async fn connection_limit_sheds_with_503_and_recovers() {
    let mut config = support::config();
    config.server.max_connections = 2;
    let gw = start(config).await;
    let mut first = gw.connect(user(), &[]).await;
    let mut second = gw.connect(user(), &[]).await;
    gw.wait_metric("connections", 2.0).await;

    let req = gw.ws_url(&support::token(user(), &[])).into_client_request().unwrap();
    assert_eq!(gw.refused(req).await, (503, json!({"error": "too many connections"})));
    assert_eq!(gw.labelled("upgrades_rejected_total", "reason", "limit").await, 1.0);
    // The refusal did not disturb the connections that hold the slots.
    assert_works(&gw, &mut second).await;

    first.ws.close(None).await.expect("send close");
    assert_eq!(first.closed().await.0, Some(1000));
    drop(first);
    gw.wait_metric("connections", 1.0).await;
    let mut third = gw.connect(user(), &[]).await;
    assert_works(&gw, &mut third).await;
    gw.wait_metric("connections", 2.0).await;
}

#[tokio::test]
async fn token_expiry_while_connected_closes_with_4001() {
    let gw = start(support::config()).await;
    let token = herald::auth::mint_hs256(SECRET, user(), &[], Duration::from_secs(2));
    let mut c = gw.connect_token(&token).await;
    let room = chat();
    c.subscribe(room).await;
    let (code, _) = c.closed().await;
    assert_eq!(code, Some(4001), "expected close {}", support::code(4001));
    drop(c);
    gw.wait_metric("connections", 0.0).await;
    gw.wait_metric("subscriptions", 0.0).await;
    assert_eq!(gw.labelled("closes_total", "code", "4001").await, 1.0);
}

#[tokio::test]
async fn a_far_future_expiry_does_not_break_the_connection() {
    let gw = start(support::config()).await;
    // Valid and correctly signed; its expiry is beyond what a timer can hold.
    let token = sign(Algorithm::HS256, &hs(SECRET), &json!({"sub": user(), "exp": u64::MAX}));
    match tokio_tungstenite::connect_async(gw.ws_url(&token)).await {
        Ok((ws, _)) => assert_works(&gw, &mut Client { ws }).await,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 401, "refusing it is fine, but only as a 401")
        }
        Err(e) => panic!("unexpected error {e}"),
    }
    // The node still serves others.
    let mut other = gw.connect(user(), &[]).await;
    assert_works(&gw, &mut other).await;
}

#[tokio::test]
async fn non_websocket_requests_get_json_errors() {
    let gw = start(support::config()).await;
    let token = support::token(user(), &[]);

    let (status, body) = gw.get(&format!("/ws?token={token}")).await;
    assert_eq!(status, 400, "{body}");
    let body: Value = serde_json::from_str(&body).expect("JSON error");
    assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "{body}");
    // Without a token, auth is refused first.
    let (status, body) = gw.get("/ws").await;
    assert_eq!(
        (status, serde_json::from_str::<Value>(&body).ok()),
        (401, Some(json!({"error":"missing_token"})))
    );

    let (status, body) = gw.get("/nowhere").await;
    assert_eq!(
        (status, serde_json::from_str::<Value>(&body).ok()),
        (404, Some(json!({"error":"not found"})))
    );

    for request in [
        format!(
            "POST /ws?token={token} HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ),
        "DELETE /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".to_string(),
        "GET /api/events HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".to_string(),
    ] {
        let (status, body) = gw.http(&request).await;
        assert_eq!(
            (status, serde_json::from_str::<Value>(&body).ok()),
            (405, Some(json!({"error":"method not allowed"}))),
            "{request}"
        );
    }
    // None of that hurt the node.
    let mut c = gw.connect_token(&token).await;
    assert_works(&gw, &mut c).await;
    assert_eq!(gw.metric("connections_opened_total").await, 1.0);
}
