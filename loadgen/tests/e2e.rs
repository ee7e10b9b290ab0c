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
    start_node_with(&[])
}

/// A node with more `HERALD_*` settings.
fn start_node_with(env: &[(&str, &str)]) -> Node {
    let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
    let child = Command::new(herald_bin())
        .env_clear()
        .envs(env.iter().copied())
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

/// The soak runs' mix of client behaviours (churners, stallers, room switchers) with its sampling
/// and drain, shared so that the runs with and without presence differ only in presence.
const SOAK_MIX: &[&str] = &[
    "--churn",
    "0.2",
    "--churn-every",
    "500ms",
    "--outage",
    "100ms",
    "--stall",
    "0.1",
    "--stall-for",
    "500ms",
    "--stall-every",
    "500ms",
    "--switch",
    "0.2",
    "--switch-every",
    "500ms",
    "--sample-every",
    "2s",
    "--drain",
    "2s",
];

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
    assert!(r["bytes_per_conn_held"].as_f64().is_some(), "{r}");
    // Nothing was published: the rooms stayed cold.
    assert_eq!(r["warm"], false, "{r}");
    assert!(r["warm_events_received"].is_null(), "{r}");
}

#[test]
fn idle_warm_delivers_one_event_per_room_to_every_connection() {
    let node = start_node();
    let r = loadgen(
        &node,
        &["idle", "--conns", "50", "--rooms", "40", "--subs-per-conn", "2", "--hold", "200ms", "--warm"],
    );
    assert_eq!(r["conns_subscribed"], 50, "{r}");
    assert_eq!(r["warm"], true, "{r}");
    // 100 subscriptions cover all 40 rooms: one event each, one frame per subscription.
    assert_eq!(r["warm_rooms"], 40, "{r}");
    assert_eq!(r["warm_publish"]["events_accepted"], 40, "{r}");
    assert_eq!(r["warm_events_expected"], 100, "{r}");
    assert_eq!(r["warm_events_received"], 100, "{r}");
    assert_eq!(r["warm_events_duplicated"], 0, "{r}");
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

#[test]
fn soak_loses_nothing_for_healthy_clients_and_closes_abusers_with_the_promised_codes() {
    // Short limits so that every abusive kind is closed, more than once, within 10 s. A history
    // longer than the run: returning clients must recover whatever a loaded machine delays them by
    // (the default 100 events is 1.5 s of one of these rooms).
    let node = start_node_with(&[
        ("HERALD_WEBSOCKET__WRITE_WAIT", "2s"),
        ("HERALD_SERVER__HEADER_READ_TIMEOUT", "1s"),
        ("HERALD_ROOMS__HISTORY_SIZE", "2000"),
    ]);
    let r = loadgen(
        &node,
        &[
            &[
                "soak",
                "--duration",
                "10s",
                "--conns",
                "60",
                "--rooms",
                "3",
                "--rate",
                "200",
                "--content-bytes",
                "200",
            ],
            SOAK_MIX,
        ]
        .concat(),
    );
    assert_eq!(r["conns_subscribed"], 60, "{r}");
    assert_eq!(r["verdict"]["pass"], true, "{r}");
    assert_eq!((r["lost"].as_u64(), r["duplicated"].as_u64()), (Some(0), Some(0)), "{r}");
    let classes = r["classes"].as_array().expect("classes");
    let names: Vec<&str> = classes.iter().filter_map(|c| c["class"].as_str()).collect();
    assert_eq!(names, ["steady", "churn", "stall", "switch"], "{r}");
    for c in classes {
        assert!(c["expected_deliveries"].as_u64().is_some_and(|n| n > 0), "{c}");
        assert_eq!(c["deliveries"], c["expected_deliveries"], "{c}");
    }
    // Switchers really moved, came back to rooms with since, and every return was recovered.
    let switch = &classes[3];
    let resumes = switch["resumes"].as_u64().expect("resumes");
    assert!(switch["switches"].as_u64().is_some_and(|n| n > 3) && resumes > 0, "{switch}");
    assert_eq!(switch["recovered"].as_u64(), Some(resumes), "{switch}");
    // Every abusive kind was closed, only ever as its limit promises.
    let abuse = r["abuse"].as_array().expect("abuse");
    assert_eq!(abuse.len(), 6, "{r}");
    for a in abuse {
        assert_eq!(a["unexpected"], 0, "{a}");
        let closed: u64 =
            a["outcomes"].as_object().expect("outcomes").values().filter_map(|n| n.as_u64()).sum();
        assert!(closed > 0, "never closed: {a}");
    }
    let trickle = abuse.iter().find(|a| a["kind"] == "trickle").expect("trickle");
    assert!(trickle["outcomes"]["4008"].as_u64().is_some_and(|n| n > 0), "{trickle}");
    // The server was sampled throughout: RSS, tasks, and a growth figure after warm-up.
    let series = r["series"].as_array().expect("series");
    assert!(series.len() >= 5, "{r}");
    assert!(
        series.iter().all(|p| p["server_rss_kb"].as_u64().is_some() && p["tasks"].as_f64().is_some()),
        "{r}"
    );
    assert!(r["rss_growth"]["slope_kb_per_min"].as_f64().is_some(), "{r}");
}

#[test]
fn fanout_with_presence_and_typing_still_counts_every_delivery() {
    let node = start_node_with(&[("HERALD_PRESENCE__TYPING_INTERVAL", "100ms")]);
    let r = loadgen(
        &node,
        &[
            "fanout",
            "--conns",
            "30",
            "--rooms",
            "3",
            "--rate",
            "200",
            "--warmup",
            "300ms",
            "--duration",
            "1s",
            "--presence",
            "--typing-every",
            "200ms",
        ],
    );
    assert_eq!(r["conns_subscribed"], 30, "{r}");
    assert_eq!((r["lost"].as_u64(), r["duplicated"].as_u64()), (Some(0), Some(0)), "{r}");
    assert_eq!(r["deliveries_total"], r["expected_deliveries"], "{r}");
    let p = &r["presence"];
    // Each room's 10 listeners hear the joins of those who came after them: 45 per room at least.
    assert!(p["presence_events_received"].as_u64().is_some_and(|n| n >= 3 * 45), "{r}");
    assert!(p["typing_sent"].as_u64().is_some_and(|n| n >= 30), "{r}");
    assert!(p["typing_received"].as_u64().is_some_and(|n| n > 0), "{r}");
}

#[test]
fn soak_with_presence_and_typing_loses_nothing() {
    // A history longer than the run, as in the soak above.
    let node =
        start_node_with(&[("HERALD_PRESENCE__LEAVE_DELAY", "200ms"), ("HERALD_ROOMS__HISTORY_SIZE", "2000")]);
    let r = loadgen(
        &node,
        &[
            &["soak", "--duration", "6s", "--conns", "40", "--rooms", "2", "--rate", "100"],
            SOAK_MIX,
            &["--presence", "--typing-every", "300ms"],
        ]
        .concat(),
    );
    assert_eq!(r["conns_subscribed"], 40, "{r}");
    assert_eq!(r["verdict"]["pass"], true, "{r}");
    assert_eq!((r["lost"].as_u64(), r["duplicated"].as_u64()), (Some(0), Some(0)), "{r}");
    let p = &r["presence"];
    assert!(p["typing_sent"].as_u64().is_some_and(|n| n > 0), "{r}");
    assert!(p["typing_received"].as_u64().is_some_and(|n| n > 0), "{r}");
    assert!(p["presence_events_received"].as_u64().is_some_and(|n| n > 0), "{r}");
}
