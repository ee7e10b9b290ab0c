//! Test fixture: a real `redis-server` child process on a free loopback port, with nothing kept on
//! disk, that a test can kill and restart on the same port; and the helpers the tests share that
//! start Herald nodes on it, inspect it and publish while it settles.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use herald::bus::BusError;
use herald::config::{BusConfig, BusKind, Config, Membership};
use serde_json::json;

use super::Gateway;

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
