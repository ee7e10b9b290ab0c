//! loadgen end to end: runs the real `loadgen` binary against a real Herald
//! node (the workspace's `herald` binary) on loopback, small and bounded, and
//! checks the JSON summary a user would read.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const SECRET: &str = "e2e-secret-0123456789abcdef";
const KEY: &str = "e2e-api-key-0123456789abcdef";

/// The `herald` binary built into the same target directory as `loadgen`.
fn herald_bin() -> PathBuf {
    let loadgen = PathBuf::from(env!("CARGO_BIN_EXE_loadgen"));
    let herald = loadgen.with_file_name(format!("herald{}", std::env::consts::EXE_SUFFIX));
    assert!(
        herald.exists(),
        "{} missing: run `cargo test --workspace` (it builds herald too)",
        herald.display()
    );
    herald
}

struct Node {
    child: Child,
    url: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_node() -> Node {
    let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
    let child = Command::new(herald_bin())
        .env_clear()
        .env("HERALD_SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .env("HERALD_AUTH__JWT_SECRET", SECRET)
        .env("HERALD_API__KEYS", KEY)
        .env("HERALD_AUTH__MEMBERSHIP", "open")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("herald starts");
    let node = Node { child, url: format!("http://127.0.0.1:{port}") };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "herald did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    node
}

fn loadgen(node: &Node, args: &[&str]) -> serde_json::Value {
    let pid = node.child.id().to_string();
    let out: Output = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(args)
        .args(["--url", &node.url, "--jwt-secret", SECRET, "--api-key", KEY, "--json", "--server-pid", &pid])
        .output()
        .expect("loadgen runs");
    assert!(out.status.success(), "loadgen failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("--json prints one JSON object")
}

#[test]
fn fanout_counts_every_delivery_with_no_loss() {
    let node = start_node();
    let r = loadgen(
        &node,
        &[
            "fanout",
            "--conns",
            "60",
            "--rooms",
            "3",
            "--rate",
            "200",
            "--warmup",
            "300ms",
            "--duration",
            "1s",
        ],
    );
    assert_eq!(r["conns_subscribed"], 60, "{r}");
    let accepted = r["events_accepted"].as_u64().expect("events_accepted");
    assert!(accepted > 0, "{r}");
    // Every accepted event reaches the 20 subscribers of its room.
    assert_eq!(r["expected_deliveries"].as_u64(), Some(accepted * 20), "{r}");
    assert_eq!(r["deliveries_total"], r["expected_deliveries"], "{r}");
    assert_eq!(r["lost"], 0, "{r}");
    assert_eq!(r["duplicated"], 0, "{r}");
    assert_eq!(r["seq_gap_missing"], 0, "{r}");
    assert!(r["latency_us"]["p50"].as_f64().is_some_and(|p| p > 0.0), "{r}");
    assert!(r["server_cpu_us_per_delivery"].as_f64().is_some(), "{r}");
}

#[test]
fn idle_holds_connections_and_every_one_answers_ping() {
    let node = start_node();
    let r = loadgen(&node, &["idle", "--conns", "100", "--rooms", "10", "--hold", "500ms", "--ping-check"]);
    assert_eq!(r["conns_subscribed"], 100, "{r}");
    assert_eq!(r["ping_check_sent"], 100, "{r}");
    assert_eq!(r["ping_check_pongs"], 100, "{r}");
    assert!(r["bytes_per_conn"].as_f64().is_some(), "{r}");
}

#[test]
fn recovery_resumes_dropped_and_stalled_readers_with_no_loss() {
    let node = start_node();
    let r = loadgen(
        &node,
        &[
            "recovery",
            "--conns",
            "60",
            "--rooms",
            "3",
            "--rate",
            "150",
            "--churn",
            "0.3",
            "--churn-every",
            "300ms",
            "--outage",
            "100ms",
            "--stall",
            "0.2",
            "--stall-for",
            "500ms",
            "--stall-every",
            "300ms",
            "--duration",
            "2s",
            "--drain",
            "2s",
        ],
    );
    assert_eq!(r["conns_subscribed"], 60, "{r}");
    assert_eq!((r["churn_conns"].as_u64(), r["stall_conns"].as_u64()), (Some(18), Some(12)), "{r}");
    assert!(r["events_accepted"].as_u64().is_some_and(|n| n > 0), "{r}");
    assert_eq!(r["lost"], 0, "{r}");
    assert_eq!(r["duplicated"], 0, "{r}");
    assert_eq!(r["not_recovered"], 0, "{r}");
    let class = |name: &str| {
        r["classes"].as_array().and_then(|cs| cs.iter().find(|c| c["class"] == name)).cloned().expect(name)
    };
    for name in ["steady", "churn", "stall"] {
        let c = class(name);
        assert!(c["expected_deliveries"].as_u64().is_some_and(|n| n > 0), "{name}: {c}");
        assert_eq!(c["deliveries"], c["expected_deliveries"], "{name}: {c}");
        assert_eq!(
            (c["gap_missing"].as_u64(), c["tail_missing"].as_u64()),
            (Some(0), Some(0)),
            "{name}: {c}"
        );
    }
    // Churners really dropped and every resume was recovered, as the server counted too.
    let churn = class("churn");
    let resumes = churn["resumes"].as_u64().expect("resumes");
    assert!(resumes > 0 && churn["drops"].as_u64() >= Some(resumes), "{churn}");
    assert_eq!(churn["recovered"].as_u64(), Some(resumes), "{churn}");
    assert!(churn["recovered_events"].as_u64().is_some_and(|n| n > 0), "{churn}");
    let server = &r["server_metrics_delta"];
    assert_eq!(server["herald_recoveries_total{result=\"recovered\"}"].as_f64(), Some(resumes as f64), "{r}");
    // Stallers really stopped reading and still saw everything.
    assert!(class("stall")["stalls"].as_u64().is_some_and(|n| n > 0), "{r}");
}

#[test]
fn idle_subscribes_each_connection_to_several_rooms() {
    let node = start_node();
    let r = loadgen(
        &node,
        &["idle", "--conns", "4", "--rooms", "40", "--subs-per-conn", "10", "--hold", "100ms"],
    );
    assert_eq!(r["conns_subscribed"], 4, "{r}");
    assert_eq!(r["subs_per_conn"], 10, "{r}");
    assert!(r["bytes_per_subscription"].as_f64().is_some(), "{r}");
    // A refused or unanswered subscribe fails the connection: all 40 were answered.
    assert_eq!(r["connect_errors"], 0, "{r}");
}
