//! Black-box tests of operations and lifecycle: `/healthz`, `/metrics` and
//! gauge cleanup, publish errors (PROTOCOL.md section 5), graceful shutdown,
//! and the real `herald` binary: the embedded default's demo, config errors
//! that name the key, a taken port reported once, and starting from a YAML file.

mod support;

use std::time::Duration;

use herald::protocol::ChatId;
use serde_json::{json, Value};
use support::{
    chat, free_addr, message_sent, printed, publish_to, refusal, run, start, user, wait_healthy, Client,
    API_KEY, PATIENCE,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::Command;

/// Closes a client the way a well-behaved one does: close frame, wait for
/// the echo, drop the socket.
async fn close_properly(mut c: Client) {
    c.ws.close(None).await.expect("send close");
    assert_eq!(c.closed().await.0, Some(1000), "server echoes a normal close");
}

#[tokio::test]
async fn healthz_and_prometheus_metrics_are_served() {
    let gw = start(support::config()).await;
    let (status, head, body) =
        gw.exchange("GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status, 200);
    assert!(head.to_ascii_lowercase().contains("content-type: application/json"), "{head}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap(), json!({"status":"ok"}));

    let (status, head, text) =
        gw.exchange("GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status, 200);
    assert!(head.to_ascii_lowercase().contains("content-type: text/plain"), "{head}");
    let types = [
        ("connections", "gauge"),
        ("connections_opened_total", "counter"),
        ("connections_closed_total", "counter"),
        ("subscriptions", "gauge"),
        ("rooms", "gauge"),
        ("users", "gauge"),
        ("events_in_total", "counter"),
        ("events_unknown_total", "counter"),
        ("publish_rejected_total", "counter"),
        ("publish_unavailable_total", "counter"),
        ("frames_out_total", "counter"),
        ("bytes_out_total", "counter"),
        ("write_syscalls_total", "counter"),
        ("slow_consumers_dropped_total", "counter"),
        ("bus_up", "gauge"),
        ("upgrades_rejected_total", "counter"),
        ("client_errors_total", "counter"),
        ("closes_total", "counter"),
    ];
    for (name, kind) in types {
        assert!(text.contains(&format!("# TYPE herald_{name} {kind}\n")), "no {kind} {name} in:\n{text}");
        assert!(text.contains(&format!("# HELP herald_{name} ")), "no help for {name}");
    }
    // Every sample line is `name[{labels}] number`, Herald's own or the
    // standard process metrics.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (name, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad sample {line:?}"));
        assert!(name.starts_with("herald_") || name.starts_with("process_"), "{line}");
        value.parse::<f64>().unwrap_or_else(|_| panic!("bad value in {line:?}"));
    }
    assert_eq!(gw.metric("bus_up").await, 1.0);
    for code in ["bad_request", "unknown_type", "forbidden", "too_many_subscriptions", "rate_limited"] {
        assert_eq!(gw.labelled("client_errors_total", "code", code).await, 0.0);
    }
    for code in ["1000", "1001", "1008", "1009", "4001", "4008"] {
        assert_eq!(gw.labelled("closes_total", "code", code).await, 0.0);
    }
}

#[tokio::test]
async fn metrics_follow_connections_and_a_graceful_disconnect_cleans_up() {
    let gw = start(support::config()).await;
    let (lobby, side) = (chat(), chat());
    let mut a = gw.connect(user(), &[]).await;
    let mut b = gw.connect(user(), &[]).await;
    let mut c = gw.connect(user(), &[]).await;
    let head = a.subscribe(lobby).await;
    b.subscribe(lobby).await;
    c.subscribe(side).await;
    assert_eq!(gw.metric("connections").await, 3.0);
    assert_eq!(gw.metric("subscriptions").await, 3.0);
    assert_eq!(gw.metric("rooms").await, 2.0);
    assert_eq!(gw.metric("users").await, 3.0);
    assert_eq!(gw.metric("connections_opened_total").await, 3.0);

    // Frames out are counted: two deliveries of one event.
    let before = gw.metric("frames_out_total").await;
    assert_eq!(gw.publish(&message_sent(lobby, &json!({"n":1}))).await.0, 202);
    assert_eq!(a.recv().await["seq"], head + 1);
    assert_eq!(b.recv().await["seq"], head + 1);
    assert!(gw.metric("frames_out_total").await >= before + 2.0);
    assert_eq!(gw.metric("events_in_total").await, 1.0);

    // An error reply is counted by its code.
    c.send(r#"{"type":"dance"}"#).await;
    assert_eq!(c.recv().await["code"], "unknown_type");
    assert_eq!(gw.labelled("client_errors_total", "code", "unknown_type").await, 1.0);

    close_properly(a).await;
    gw.wait_metric("subscriptions", 2.0).await;
    assert_eq!(gw.metric("rooms").await, 2.0, "the lobby still has b");
    close_properly(b).await;
    close_properly(c).await;
    for gauge in ["connections", "subscriptions", "users"] {
        gw.wait_metric(gauge, 0.0).await;
    }
    // The side room is gone; the lobby stays for its history (one event).
    gw.wait_metric("rooms", 1.0).await;
    assert_eq!(gw.metric("history_frames").await, 1.0);
    assert!(gw.metric("history_bytes").await > 0.0);
    assert_eq!(gw.metric("connections_closed_total").await, 3.0);
    assert_eq!(gw.labelled("closes_total", "code", "1000").await, 3.0);
}

/// The latency histograms count what happened: every publish answered, and
/// the delivery of each event to a subscriber, with consistent buckets.
#[tokio::test]
async fn latency_histograms_count_publishes_and_deliveries() {
    let gw = start(support::config()).await;
    let room = chat();
    let mut reader = gw.connect(user(), &[]).await;
    reader.subscribe(room).await;
    assert_eq!(gw.metric("delivery_latency_seconds_count").await, 0.0);
    for i in 0..3 {
        let (status, _) = gw.publish(&message_sent(room, &json!({"n": i}))).await;
        assert_eq!(status, 202);
        assert_eq!(reader.recv().await["data"]["n"], i);
    }
    assert_eq!(gw.publish("not json").await.0, 400);
    assert_eq!(gw.metric("publish_duration_seconds_count").await, 4.0, "every answer, any status");
    // Each socket write that sent room frames counts once: three events, one to three writes.
    let deliveries = gw.metric("delivery_latency_seconds_count").await;
    assert!((1.0..=3.0).contains(&deliveries), "{deliveries}");
    let (_, text) = gw.get("/metrics").await;
    let inf = format!("herald_delivery_latency_seconds_bucket{{le=\"+Inf\"}} {deliveries}");
    assert!(text.lines().any(|l| l == inf), "{text}");
    assert!(text.contains("# TYPE herald_publish_duration_seconds histogram"));
}

#[tokio::test]
async fn publish_refuses_bad_keys_and_bodies_with_json_errors() {
    let mut config = support::config();
    config.server.max_body_bytes = 1024;
    let gw = start(config).await;
    let room = chat();
    let mut c = gw.connect(user(), &[]).await;
    let head = c.subscribe(room).await;
    let markers = chat();
    c.subscribe(markers).await;
    let good = message_sent(room, &json!({"n":1}));

    assert_eq!(gw.publish_with_key(&good, None).await, (401, json!({"error":"missing API key"})));
    assert_eq!(
        gw.publish_with_key(&good, Some("wrong-key-0123456789abc")).await,
        (401, json!({"error":"invalid API key"}))
    );
    // A prefix of the right key is a wrong key.
    assert_eq!(gw.publish_with_key(&good, Some(&API_KEY[..10])).await.0, 401);

    for body in ["{not json", "", "42", r#"[{"type":"message.sent""#, "[1]"] {
        let (status, err) = gw.publish(body).await;
        assert_eq!(status, 400, "body {body:?}: {err}");
        assert!(err["error"].as_str().is_some_and(|e| !e.is_empty()), "body {body:?}: {err}");
    }

    // Over the limit, declared up front.
    let big = message_sent(room, &json!({"pad": "x".repeat(2000)}));
    assert_eq!(gw.publish(&big).await, (413, json!({"error":"body larger than 1024 bytes"})));
    // Over the limit, chunked with no declared length.
    let request = format!(
        "POST /api/events HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {API_KEY}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
         {:x}\r\n{big}\r\n0\r\n\r\n",
        big.len()
    );
    let (status, _, body) = gw.exchange(&request).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).ok(),
        Some(json!({"error":"body larger than 1024 bytes"}))
    );

    // Nothing of it was delivered, and all of it was counted.
    assert_eq!(gw.metric("events_in_total").await, 0.0);
    assert_eq!(gw.metric("publish_rejected_total").await, 10.0);
    c.expect_nothing_else(&gw, markers).await;
    // A good one under the limit still goes through.
    assert_eq!(gw.publish(&good).await, (202, json!({"accepted":1})));
    assert_eq!(c.recv().await, json!({"type":"message.new","chat_id":room,"seq":head + 1,"data":{"n":1}}));
}

#[tokio::test]
async fn a_bad_event_rejects_the_whole_batch() {
    let gw = start(support::config()).await;
    let room = chat();
    let mut c = gw.connect(user(), &[]).await;
    let head = c.subscribe(room).await;
    let markers = chat();
    c.subscribe(markers).await;
    let batch = json!([
        {"type":"message.sent","chat_id":room,"data":{"n":0}},
        {"type":"message.sent","data":{"n":1}},
        {"type":"message.sent","chat_id":room,"data":{"n":2}},
    ]);
    let (status, err) = gw.publish(&batch.to_string()).await;
    assert_eq!(status, 400, "{err}");
    let msg = err["error"].as_str().unwrap_or_default();
    assert!(msg.contains("event 1"), "error must name event 1: {err}");
    assert!(msg.contains("chat_id"), "error must name the missing field: {err}");
    assert_eq!(gw.metric("events_in_total").await, 0.0);
    c.expect_nothing_else(&gw, markers).await;

    // Event 0 was not sequenced either: the next event is the room's first.
    assert_eq!(gw.publish(&message_sent(room, &json!({"n":3}))).await.0, 202);
    assert_eq!(c.recv().await, json!({"type":"message.new","chat_id":room,"seq":head + 1,"data":{"n":3}}));
}

#[tokio::test]
async fn unknown_event_types_are_counted_and_ignored() {
    let gw = start(support::config()).await;
    let room = chat();
    let mut c = gw.connect(user(), &[]).await;
    let head = c.subscribe(room).await;
    let markers = chat();
    c.subscribe(markers).await;

    let unknown = json!({"type":"chat.poked","chat_id":room,"data":{"n":0}});
    assert_eq!(gw.publish(&unknown.to_string()).await, (202, json!({"accepted":0,"ignored":1})));
    assert_eq!(gw.metric("events_unknown_total").await, 1.0);
    c.expect_nothing_else(&gw, markers).await;

    let mixed = json!([
        {"type":"future.thing"},
        {"type":"message.sent","chat_id":room,"data":{"n":1}},
        {"type":"chat.poked","chat_id":room,"data":{"n":2}},
    ]);
    assert_eq!(gw.publish(&mixed.to_string()).await, (202, json!({"accepted":1,"ignored":2})));
    assert_eq!(gw.metric("events_unknown_total").await, 3.0);
    assert_eq!(c.recv().await, json!({"type":"message.new","chat_id":room,"seq":head + 1,"data":{"n":1}}));
    c.expect_nothing_else(&gw, markers).await;
}

#[tokio::test]
async fn graceful_shutdown_closes_with_1001_and_drains() {
    let gw = start(support::config()).await;
    let addr = gw.addr;
    let mut subscribed = gw.connect(user(), &[]).await;
    subscribed.subscribe(chat()).await;
    let idle = gw.connect(user(), &[]).await;
    gw.wait_metric("connections", 2.0).await;

    let closing = |mut c: Client| async move {
        let (code, _) = c.closed().await;
        drop(c);
        code
    };
    // `stop` returning means the node drained (support bounds it in time).
    let (a, b, ()) = tokio::join!(closing(subscribed), closing(idle), gw.stop());
    assert_eq!((a, b), (Some(1001), Some(1001)));
    assert!(TcpStream::connect(addr).await.is_err(), "a stopped node accepts nothing");
}

// ---- the real binary -------------------------------------------------------

/// The `herald` binary ([`support::herald`]) logging warnings only.
fn herald() -> Command {
    let mut cmd = support::herald();
    cmd.env("RUST_LOG", "warn");
    cmd
}

/// Runs the binary expecting it to refuse to start; returns its stderr.
async fn refused_start(cmd: &mut Command) -> String {
    let (ok, _, stderr) = run(cmd).await;
    assert!(!ok, "started although the config is bad; stderr:\n{stderr}");
    stderr
}

#[tokio::test]
async fn embedded_default_prints_a_working_demo() {
    let addr = free_addr();
    let mut child = herald().env("HERALD_SERVER__LISTEN", addr.to_string()).spawn().expect("spawn herald");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let read = async {
        let (mut key, mut chat_id, mut token) = (None, None, None);
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            key = key.or_else(|| printed(&line, "API key:"));
            chat_id = chat_id.or_else(|| printed(&line, "demo chat:"));
            token = token.or_else(|| printed(&line, "demo token (24 h):"));
            if let Some((_, rest)) = line.split_once("-H 'Authorization: Bearer ") {
                let curl_key = rest.split_once('\'').map(|(k, _)| k.to_string());
                return (
                    key.expect("API key line"),
                    chat_id.expect("demo chat line"),
                    token.expect("demo token line"),
                    curl_key.expect("curl key ends with a quote"),
                );
            }
        }
        panic!("herald's stdout ended before the demo block");
    };
    let (key, chat_id, token, curl_key) =
        tokio::time::timeout(PATIENCE, read).await.expect("demo block printed in time");
    assert_eq!(curl_key, key, "the curl example uses the printed API key");
    let room: ChatId = chat_id.parse().expect("demo chat is a UUID");

    // The printed token connects and may subscribe to the printed chat.
    let mut c = Client::connect(addr, &token).await;
    let head = c.subscribe(room).await;
    let body = message_sent(room, &json!({"content":"Hello!"}));
    assert_eq!(publish_to(addr, &curl_key, &body).await, (202, json!({"accepted":1})));
    assert_eq!(
        c.recv().await,
        json!({"type":"message.new","chat_id":room,"seq":head + 1,"data":{"content":"Hello!"}})
    );
    // The keys are this run's: the test suite's are not accepted.
    assert_eq!(publish_to(addr, API_KEY, &body).await.0, 401);

    c.ws.close(None).await.ok();
    child.kill().await.expect("kill herald");
}

#[tokio::test]
async fn bad_config_stops_startup_naming_the_key() {
    let stderr = refused_start(herald().env("HERALD_WEBSOCKET__PING_INTERVAL", "soon")).await;
    assert!(stderr.contains("websocket.ping_interval"), "{stderr}");

    let dir = std::env::temp_dir();
    let path = dir.join(format!("herald-ops-test-{}.yaml", uuid::Uuid::new_v4()));
    std::fs::write(&path, "websocket:\n  ping_intervall: 5s\n").expect("write config");
    let stderr = refused_start(herald().arg("--config").arg(&path)).await;
    let _ = std::fs::remove_file(&path);
    assert!(stderr.contains("ping_intervall"), "{stderr}");
    assert!(stderr.contains("websocket"), "{stderr}");

    let stderr = refused_start(herald().env("HERALD_SERVER__LISTEN", "0.0.0.0:0")).await;
    assert!(stderr.contains("server.listen"), "{stderr}");

    let stderr = refused_start(herald().args(["--config", "/nonexistent.yaml"])).await;
    assert!(stderr.contains("/nonexistent.yaml"), "{stderr}");
    assert!(stderr.to_ascii_lowercase().contains("no such file"), "{stderr}");
}

#[tokio::test]
async fn a_taken_port_stops_startup_saying_the_os_error_once() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let os_error = std::net::TcpListener::bind(addr).expect_err("the port is taken").to_string();
    let stderr = refused_start(herald().env("HERALD_SERVER__LISTEN", addr.to_string())).await;
    assert!(stderr.contains(&format!("cannot listen on {addr} (server.listen)")), "{stderr}");
    assert_eq!(stderr.matches(&os_error).count(), 1, "the OS error {os_error:?} once in:\n{stderr}");
}

#[tokio::test]
async fn starts_from_a_yaml_config_file() {
    let addr = free_addr();
    let secret = "yaml-secret-0123456789abcdef";
    let key = "yaml-api-key-0123456789";
    let path = std::env::temp_dir().join(format!("herald-ops-test-{}.yaml", uuid::Uuid::new_v4()));
    let yaml = format!(
        "server:\n  listen: {addr}\nauth:\n  jwt_secret: \"{secret}\"\n  membership: open\n\
         api:\n  keys: [\"{key}\"]\n"
    );
    std::fs::write(&path, yaml).expect("write config");
    let mut child = herald().arg("--config").arg(&path).spawn().expect("spawn herald");
    wait_healthy(&mut child, addr).await;
    let _ = std::fs::remove_file(&path);

    // The file's secret, membership and key are the ones in force.
    let token = herald::auth::mint_hs256(secret, user(), &[], Duration::from_secs(600));
    let mut c = Client::connect(addr, &token).await;
    let room = chat();
    c.subscribe(room).await;
    let body = message_sent(room, &json!({"n":1}));
    assert_eq!(publish_to(addr, API_KEY, &body).await.0, 401);
    assert_eq!(publish_to(addr, key, &body).await, (202, json!({"accepted":1})));
    assert_eq!(c.recv().await["data"], json!({"n":1}));
    let foreign = support::token(user(), &[]);
    assert_eq!(
        refusal(format!("ws://{addr}/ws?token={foreign}")).await.map(|(status, _)| status),
        Some(401),
        "a token signed with another secret is refused"
    );

    // Keys were configured, so no demo secrets were printed.
    drop(c);
    child.kill().await.expect("kill herald");
    let mut out = String::new();
    child.stdout.take().expect("stdout").read_to_string(&mut out).await.expect("read stdout");
    assert!(!out.contains("demo token"), "{out}");
}
