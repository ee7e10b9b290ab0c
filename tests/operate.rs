//! Black-box tests of operating a node: the internal listener
//! (`server.internal_listen`) takes the operator's routes off the public
//! port, `GET /api/info`, and the build and process metrics.

mod support;

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use herald::server::Server;
use serde_json::{json, Value};
use support::{chat, exchange, message_sent, post_events, start, user, Client, API_KEY};

/// `GET path` on `addr`, with `key` as the API key if any: status and body.
async fn get(addr: SocketAddr, path: &str, key: Option<&str>) -> (u16, String) {
    let auth = key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    let (status, _, body) =
        exchange(addr, &format!("GET {path} HTTP/1.1\r\nHost: test\r\n{auth}Connection: close\r\n\r\n"))
            .await;
    (status, body)
}

fn parsed(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body:?}"))
}

/// The value of the unlabelled sample `name` in a `/metrics` text.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
}

fn with_internal_listener() -> herald::config::Config {
    let mut config = support::config();
    config.server.internal_listen = Some("127.0.0.1:0".parse().unwrap());
    config
}

#[tokio::test]
async fn the_internal_listener_serves_the_operators_routes_and_the_public_one_does_not() {
    let gw = start(with_internal_listener()).await;
    let public = gw.addr;
    let internal = gw.internal.expect("an internal listener");
    assert_ne!(public, internal);
    let not_found = json!({"error": "not found"});

    // The operator's routes: only on the internal listener.
    for path in ["/healthz", "/readyz", "/metrics", "/api/info", "/api/stats", "/api/anything"] {
        let (status, body) = get(public, path, Some(API_KEY)).await;
        assert_eq!((status, parsed(&body)), (404, not_found.clone()), "public {path}");
    }
    let (status, _, body) = post_events(public, &message_sent(chat(), &json!({})), Some(API_KEY)).await;
    assert_eq!((status, parsed(&body)), (404, not_found.clone()), "public POST /api/events");
    for path in ["/healthz", "/readyz", "/metrics", "/api/info", "/api/stats"] {
        assert_eq!(get(internal, path, Some(API_KEY)).await.0, 200, "internal {path}");
    }
    assert_eq!(get(internal, "/api/anything", Some(API_KEY)).await.0, 404);

    // The browser's routes: only on the public listener.
    for path in ["/ws", "/client.js", "/", "/demo/token"] {
        let (status, body) = get(internal, path, None).await;
        assert_eq!((status, parsed(&body)), (404, not_found.clone()), "internal {path}");
    }
    assert_eq!(get(public, "/client.js", None).await.0, 200);

    // A WebSocket on the public port receives what the internal port publishes.
    let room = chat();
    let mut client = gw.connect(user(), &[]).await;
    let head = client.subscribe(room).await;
    let (status, _, body) = post_events(internal, &message_sent(room, &json!({"n": 1})), Some(API_KEY)).await;
    assert_eq!((status, parsed(&body)), (202, json!({"accepted": 1})));
    let got = client.recv().await;
    assert_eq!((got["seq"].as_u64(), &got["data"]), (Some(head + 1), &json!({"n": 1})));

    // Shutdown closes both listeners.
    gw.stop().await;
    for addr in [public, internal] {
        assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "{addr} still accepts");
    }
}

#[tokio::test]
async fn without_an_internal_listener_one_port_serves_every_route() {
    let gw = start(support::config()).await;
    assert_eq!(gw.internal, None);
    for path in ["/healthz", "/readyz", "/metrics", "/api/info", "/client.js"] {
        assert_eq!(get(gw.addr, path, Some(API_KEY)).await.0, 200, "{path}");
    }
    let _client = Client::connect(gw.addr, &support::token(user(), &[])).await;
}

#[tokio::test]
async fn an_internal_listener_that_cannot_bind_is_a_startup_error_naming_the_key() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut config = support::config();
    config.server.internal_listen = Some(taken.local_addr().unwrap());
    let err = Server::bind(config).await.err().expect("the taken port is refused").to_string();
    assert!(err.contains("server.internal_listen") && err.contains("cannot listen"), "{err}");

    let mut config = support::config();
    config.server.listen = "127.0.0.1:9087".parse().unwrap();
    config.server.internal_listen = Some(config.server.listen);
    let err = config.validate().expect_err("one port for both is refused").to_string();
    assert!(err.contains("server.internal_listen"), "{err}");
}

#[tokio::test]
async fn api_info_needs_the_key_and_tells_version_uptime_connections_rooms_and_bus() {
    let gw = start(support::config()).await;
    let (status, body) = get(gw.addr, "/api/info", None).await;
    assert_eq!((status, parsed(&body)), (401, json!({"error": "missing API key"})));
    let (status, body) = get(gw.addr, "/api/info", Some("not-the-key-0123456789")).await;
    assert_eq!((status, parsed(&body)), (401, json!({"error": "invalid API key"})));
    let (status, _, body) = exchange(
        gw.addr,
        &format!(
            "POST /api/info HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {API_KEY}\r\nContent-Length: 0\r\n\
             Connection: close\r\n\r\n"
        ),
    )
    .await;
    assert_eq!((status, parsed(&body)), (405, json!({"error": "method not allowed"})));

    let mut client = gw.connect(user(), &[]).await;
    client.subscribe(chat()).await;
    let (status, body) = get(gw.addr, "/api/info", Some(API_KEY)).await;
    assert_eq!(status, 200, "{body}");
    let info = parsed(&body);
    let uptime = info["uptime_seconds"].as_u64().unwrap_or_else(|| panic!("no uptime_seconds: {info}"));
    assert!(uptime < 60, "{info}");
    assert_eq!(
        info,
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": uptime,
            "connections": 1,
            "rooms": 1,
            "bus": {"kind": "memory", "state": "ok", "reason": null},
        })
    );
}

#[tokio::test]
async fn metrics_carry_the_build_and_plausible_process_facts() {
    let gw = start(support::config()).await;
    let (status, text) = get(gw.addr, "/metrics", None).await;
    assert_eq!(status, 200);
    let build = format!("herald_build_info{{version=\"{}\"}} 1\n", env!("CARGO_PKG_VERSION"));
    assert!(text.contains("# TYPE herald_build_info gauge\n") && text.contains(&build), "{text}");
    if !cfg!(target_os = "linux") {
        return;
    }
    for (name, kind) in [
        ("process_resident_memory_bytes", "gauge"),
        ("process_cpu_seconds_total", "counter"),
        ("process_open_fds", "gauge"),
        ("process_start_time_seconds", "gauge"),
    ] {
        assert!(text.contains(&format!("# TYPE {name} {kind}\n")), "no {kind} {name} in:\n{text}");
    }
    assert!(sample(&text, "process_resident_memory_bytes") > 1_000_000.0, "{text}");
    assert!(sample(&text, "process_cpu_seconds_total") >= 0.0);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
    let started = sample(&text, "process_start_time_seconds");
    assert!(started <= now + 2.0 && started > now - 3600.0, "started {started}, now {now}");

    // Each open connection holds a descriptor.
    let fds = sample(&text, "process_open_fds");
    assert!(fds > 0.0);
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(gw.connect(user(), &[]).await);
    }
    let (_, text) = get(gw.addr, "/metrics", None).await;
    assert!(sample(&text, "process_open_fds") >= fds + 10.0, "{text}");
}
