//! Test fixture: a real `redis-server` child process on a free loopback port, with nothing kept on
//! disk, that a test can kill and restart on the same port; and the helpers the tests share that
//! start Herald nodes on it, inspect it and publish while it settles.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use herald::bus::BusError;
use herald::config::{BusConfig, BusKind, Config, Membership};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use super::{message_sent, user, Client, Gateway, PATIENCE};

/// A running (or killed, until restarted) `redis-server`. Killed on drop.
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server. Panics when `redis-server` is not installed: the tests that use this are
    /// `#[ignore = "needs redis-server"]`, so they run only when asked to (`--include-ignored`).
    pub fn start() -> RedisServer {
        if Command::new("redis-server").arg("--version").stdout(Stdio::null()).status().is_err() {
            panic!(
                "redis-server is not on PATH: install the Debian package `redis-server` \
                 (apt-get install redis-server) to run the Redis bus tests"
            );
        }
        // A free port can be taken by someone else before redis binds it: try a few.
        for _ in 0..5 {
            let port = super::free_addr().port();
            let mut server = RedisServer { port, child: None };
            if server.spawn() {
                return server;
            }
        }
        panic!("redis-server did not start on any of 5 free ports");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`, the form `bus.redis_url` takes.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A plain client for inspecting the server (e.g. `PUBSUB CHANNELS`).
    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).expect("a valid redis URL")
    }

    /// Kills the server (SIGKILL): its state is gone, like a crash with no persistence.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a fresh server on the same port (after [`RedisServer::kill`]).
    pub fn restart(&mut self) {
        self.kill();
        // The old listener's port may take a moment to be free again.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.spawn() {
            assert!(Instant::now() < deadline, "redis-server did not restart on port {}", self.port);
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Spawns the child and waits for it to answer PING; false if it exited or never answered.
    fn spawn(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--dir", &std::env::temp_dir().to_string_lossy()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    self.child = None;
                    return false;
                }
            }
            if ping(self.port) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        false
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// True when a server on `port` answers `PING` with `+PONG`.
fn ping(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    stream.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// Runs one command on the test Redis.
pub async fn redis_cmd<T: redis::FromRedisValue>(redis: &RedisServer, args: &[&str]) -> T {
    let mut conn = redis.client().get_multiplexed_async_connection().await.expect("inspect redis");
    redis::cmd(args[0])
        .arg(&args[1..])
        .query_async(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// Marks the fresh test Redis's state as long settled, so nodes start without the post-restart
/// settle window (which exists for Redis restarts, tested separately) and room events are not
/// refused while it settles.
pub async fn mark_settled(redis: &RedisServer) {
    let _: () = redis_cmd(redis, &["SET", "herald:boot", "0"]).await;
}

/// The test configuration ([`super::config`]) on the Redis bus of `redis`.
pub fn config(redis: &RedisServer) -> Config {
    let mut config = super::config();
    config.bus = BusConfig { kind: BusKind::Redis, redis_url: redis.url(), ..BusConfig::default() };
    config
}

/// A node on `redis` with `membership`.
pub async fn gateway(redis: &RedisServer, membership: Membership) -> Gateway {
    let mut config = config(redis);
    config.auth.membership = membership;
    super::start(config).await
}

/// Two nodes on a settled Redis, both with `membership`.
pub async fn two_nodes(redis: &RedisServer, membership: Membership) -> (Gateway, Gateway) {
    mark_settled(redis).await;
    (gateway(redis, membership).await, gateway(redis, membership).await)
}

/// A 503 body carries one of the bus's fixed messages, never Redis's own error text.
pub fn assert_fixed_503(reply: &serde_json::Value) {
    let fixed = [BusError::Unreachable, BusError::Settling, BusError::Timeout, BusError::Rejected]
        .map(|e| json!({ "error": e.to_string() }));
    assert!(fixed.contains(reply), "503 body is not a fixed bus message: {reply}");
}

/// Publishes over HTTP until the node answers 202 (it answers 503, with a fixed bus message,
/// while Redis is down or settling), for up to 20 s.
pub async fn http_publish_eventually(gw: &Gateway, body: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, reply) = gw.publish(body).await;
        if status == 202 {
            return;
        }
        assert_eq!(status, 503, "{reply}");
        assert_fixed_503(&reply);
        assert!(tokio::time::Instant::now() < deadline, "still 503: {reply}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a client saw of a room: the events (`seq` and `data.n` of each), and whether it was ever
/// told that something may be missing.
#[derive(Default)]
pub struct Seen {
    pub seqs: Vec<u64>,
    pub ns: Vec<u64>,
    pub told_gap: bool,
}

/// Reads room events into `seen` until the event with `data.n == last` arrives. A close (4008 at
/// a gap) is followed by a reconnect with `since`, as a client would.
pub async fn follow(
    gw: &Gateway,
    client: &mut Client,
    room: uuid::Uuid,
    head: u64,
    seen: &mut Seen,
    last: u64,
) {
    let deadline = tokio::time::Instant::now() + PATIENCE * 3;
    loop {
        let next = tokio::time::timeout_at(deadline, client.ws.next()).await.expect("the stream keeps going");
        match next {
            Some(Ok(Message::Text(text))) => {
                let v: Value = serde_json::from_str(&text).expect("JSON");
                if v["type"] != "message.new" {
                    continue;
                }
                let (seq, n) = (v["seq"].as_u64().expect("seq"), v["data"]["n"].as_u64().expect("n"));
                if let Some(prev) = seen.seqs.last() {
                    assert!(seq > *prev, "seq went back or repeated: {prev} then {seq}");
                }
                assert!(!seen.ns.contains(&n), "event {n} delivered twice");
                seen.seqs.push(seq);
                seen.ns.push(n);
                if n == last {
                    return;
                }
            }
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                let since = seen.seqs.last().copied().unwrap_or(head);
                *client = gw.connect(user(), &[]).await;
                let (_, recovered) = client.subscribe_since(room, since).await;
                seen.told_gap |= !recovered;
            }
            Some(Ok(_)) => {}
        }
    }
}

/// Publishes to `room` on `a` without pause; runs `disrupt` once 20 events are accepted, and
/// goes on until 20 more are accepted after the last refusal (every refusal a clean 503).
/// Returns the accepted events and the last `n`.
pub async fn publish_through(
    a: &Gateway,
    room: uuid::Uuid,
    mut disrupt: impl AsyncFnMut(),
    need_refusal: bool,
) -> (Vec<u64>, u64) {
    let (mut accepted, mut refused, mut since_refusal, mut disrupted) = (Vec::new(), 0, 0, false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut n = 0u64;
    while !disrupted || since_refusal < 20 || (need_refusal && refused == 0) {
        n += 1;
        let (status, reply) = a.publish(&message_sent(room, &json!({ "n": n }))).await;
        match status {
            202 => {
                accepted.push(n);
                since_refusal += 1;
            }
            503 => {
                assert_fixed_503(&reply);
                refused += 1;
                since_refusal = 0;
            }
            other => panic!("publish answered {other}: {reply}"),
        }
        if accepted.len() == 20 && !disrupted {
            disrupt().await;
            disrupted = true;
        }
        assert!(tokio::time::Instant::now() < deadline, "no recovery within 60 s ({refused} refused)");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (accepted, n)
}

/// Polls `done` every `every` until it holds; fails with `what` after `within`.
pub async fn wait_until(what: &str, within: Duration, every: Duration, mut done: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !done().await {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(every).await;
    }
}

/// `herald_<name>{endpoint="<endpoint>"}`, or 0 while the node has not counted it (unlike
/// `Gateway::labelled`, which wants the series to exist).
pub async fn endpoint_count(gw: &Gateway, name: &str, endpoint: &str) -> f64 {
    let (_, text) = gw.get("/metrics").await;
    let prefix = format!("herald_{name}{{endpoint=\"{endpoint}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok()).unwrap_or(0.0)
}
