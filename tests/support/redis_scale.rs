//! Test fixtures for Redis beyond one plain server: a TLS-only `redis-server` with an ACL user and
//! a certificate made here with `openssl`, and a Sentinel group (one master, one replica, three
//! `redis-server --sentinel`). Every process is a child of the test, on free loopback ports, with
//! its files in a temporary directory; all are killed and removed on drop.
#![allow(dead_code, unreachable_pub)]

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The ACL user the fixtures create, and its password.
pub const USER: &str = "herald";
pub const PASSWORD: &str = "s3cret-pa55word-for-tests";

/// A temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(what: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("herald-{what}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("make a temporary directory");
        TempDir(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Panics with a clear message when a program the test needs is missing.
fn need(program: &str, package: &str) {
    let found = Command::new(program).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status();
    assert!(found.is_ok(), "{program} is not on PATH: install the Debian package `{package}`");
}

/// Runs `openssl` with `args` in `dir`; panics with its stderr on failure.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("run openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Makes a CA (`<name>-ca.pem`) in `dir`; with `server`, also a server key and certificate
/// (`server.key`, `server.pem`) it signed, valid for IP 127.0.0.1.
pub fn make_ca(dir: &Path, name: &str, server: bool) -> PathBuf {
    need("openssl", "openssl");
    let (key, ca) = (format!("{name}-ca.key"), format!("{name}-ca.pem"));
    openssl(dir, &["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", &key]);
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            &key,
            "-sha256",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name} test CA"),
            "-out",
            &ca,
        ],
    );
    if server {
        openssl(dir, &["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "server.key"]);
        openssl(dir, &["req", "-new", "-key", "server.key", "-subj", "/CN=127.0.0.1", "-out", "server.csr"]);
        std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").expect("write ext.cnf");
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                &ca,
                "-CAkey",
                &key,
                "-CAcreateserial",
                "-days",
                "2",
                "-sha256",
                "-extfile",
                "ext.cnf",
                "-out",
                "server.pem",
            ],
        );
    }
    dir.join(ca)
}

/// A free loopback port; with `bus`, one whose +10000 is free too (not needed here).
pub fn free_port() -> u16 {
    crate::support::free_addr().port()
}

/// True once something accepts TCP connections on `port`.
fn listening(port: u16) -> bool {
    TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_millis(200)).is_ok()
}

/// A child process killed on drop.
pub struct Proc {
    pub port: u16,
    child: Option<Child>,
}

impl Proc {
    /// Spawns `redis-server` with `args` and waits until it listens on `port`.
    pub fn redis(port: u16, args: &[String]) -> Proc {
        need("redis-server", "redis-server");
        let child = Command::new("redis-server")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        let mut proc = Proc { port, child: Some(child) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !listening(port) {
            if let Some(Ok(Some(status))) = proc.child.as_mut().map(Child::try_wait) {
                panic!("redis-server {args:?} exited: {status}");
            }
            assert!(Instant::now() < deadline, "redis-server {args:?} never listened on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        proc
    }

    /// Sends `signal` (`STOP`, `CONT`) to the process: a server that hangs, then resumes.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().map(Child::id).expect("the process runs");
        let status = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{signal} {pid}");
    }

    /// True until [`Proc::kill`].
    pub fn alive(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `redis-server` listening on a TLS port only, with the default user off and one ACL user.
pub struct TlsRedis {
    pub server: Proc,
    /// The CA that signed the server's certificate.
    pub ca: PathBuf,
    /// Another CA, which did not.
    pub other_ca: PathBuf,
    pub dir: TempDir,
}

/// `redis-server` arguments: the default user off, [`USER`] with [`PASSWORD`] allowed everything.
pub fn acl_user_args() -> Vec<String> {
    let password = format!(">{PASSWORD}");
    ["--user", "default", "off", "--user", USER, "on", &password, "~*", "&*", "+@all"]
        .map(String::from)
        .to_vec()
}

impl TlsRedis {
    pub fn start() -> TlsRedis {
        let dir = TempDir::new("tls-redis");
        let ca = make_ca(&dir.0, "herald", true);
        let other_ca = make_ca(&dir.0, "other", false);
        let port = free_port();
        let path = |name: &str| dir.path(name).to_string_lossy().into_owned();
        let args: Vec<String> = [
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            &path("server.pem"),
            "--tls-key-file",
            &path("server.key"),
            "--tls-ca-cert-file",
            &ca.to_string_lossy(),
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &dir.0.to_string_lossy(),
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(acl_user_args())
        .collect();
        let server = Proc::redis(port, &args);
        TlsRedis { server, ca, other_ca, dir }
    }

    /// `rediss://<user>:<password>@127.0.0.1:<port>`.
    pub fn url(&self, password: &str) -> String {
        format!("rediss://{USER}:{password}@127.0.0.1:{}", self.server.port)
    }

    /// A client that trusts the test CA, as the ACL user.
    pub fn client(&self) -> redis::Client {
        let certs = redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(std::fs::read(&self.ca).expect("read the CA")),
        };
        redis::Client::build_with_tls(self.url(PASSWORD), certs).expect("a TLS client")
    }
}

/// Runs one command with `client`, panicking with the command on error. Connect and reply may
/// take up to 10 s (the client's defaults, 1 s and 500 ms, are too short for a TLS handshake or a
/// `MIGRATE` on a loaded machine).
pub async fn query<T: redis::FromRedisValue>(client: &redis::Client, args: &[&str]) -> T {
    let patient = Some(Duration::from_secs(10));
    let config =
        redis::AsyncConnectionConfig::new().set_connection_timeout(patient).set_response_timeout(patient);
    let mut conn =
        client.get_multiplexed_async_connection_with_config(&config).await.expect("connect to redis");
    redis::cmd(args[0])
        .arg(&args[1..])
        .query_async(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// Waits until the replica behind `replica` has applied everything the primary behind `primary`
/// was given so far: its processed replication offset reaches the primary's. (`WAIT` would not
/// do: it waits for the writes of its own connection only, and the test's connection wrote
/// nothing. A replica's link is up right after its first sync while the primary still holds
/// back the writes made since, for up to a second.)
pub async fn replica_caught_up(primary: &redis::Client, replica: &redis::Client) {
    let offset = |info: &str, field: &str| -> Option<u64> {
        info.lines().find_map(|l| l.trim().strip_prefix(field)).and_then(|v| v.parse().ok())
    };
    let info: String = query(primary, &["INFO", "replication"]).await;
    let target = offset(&info, "master_repl_offset:").expect("the primary's replication offset");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let info: String = query(replica, &["INFO", "replication"]).await;
        let applied = offset(&info, "slave_repl_offset:");
        if info.contains("master_link_status:up") && applied.is_some_and(|o| o >= target) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "the replica never caught up: {info}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The name the sentinels monitor.
pub const MASTER_NAME: &str = "herald";

/// A master, its replica and three sentinels that fail over within a few seconds; with `tls`,
/// every one of them on a TLS port only (replication and sentinel links too), the default user
/// off and the ACL user the only way in (sentinels log in to the servers and each other as it).
pub struct SentinelGroup {
    pub master: Proc,
    pub replica: Proc,
    pub sentinels: Vec<Proc>,
    /// The CA of the servers' certificate, when on TLS.
    pub ca: Option<PathBuf>,
    pub dir: TempDir,
}

impl SentinelGroup {
    pub fn start() -> SentinelGroup {
        SentinelGroup::start_with(false)
    }

    pub fn start_with(tls: bool) -> SentinelGroup {
        let dir = TempDir::new("sentinel");
        let d = dir.0.to_string_lossy().into_owned();
        let ca = tls.then(|| make_ca(&dir.0, "herald", true));
        let path = |name: &str| dir.path(name).to_string_lossy().into_owned();
        // The settings servers and sentinels share, as `name value...` lines.
        let mut shared: Vec<String> = vec!["bind 127.0.0.1".into(), format!("dir {d}")];
        if let Some(ca) = &ca {
            shared.extend([
                format!("tls-cert-file {}", path("server.pem")),
                format!("tls-key-file {}", path("server.key")),
                format!("tls-ca-cert-file {}", ca.display()),
                "tls-auth-clients no".into(),
                "tls-replication yes".into(),
                "user default off".into(),
                format!("user {USER} on >{PASSWORD} ~* &* +@all"),
            ]);
        }
        let listen = |port: u16| -> Vec<String> {
            if tls {
                vec!["port 0".into(), format!("tls-port {port}")]
            } else {
                vec![format!("port {port}")]
            }
        };
        let server = |port: u16, extra: &[String]| -> Proc {
            let mut lines = listen(port);
            lines.extend(shared.iter().cloned());
            lines.extend(["save \"\"".into(), "appendonly no".into()]);
            if tls {
                lines.extend([format!("masteruser {USER}"), format!("masterauth {PASSWORD}")]);
            }
            lines.extend(extra.iter().cloned());
            let conf = dir.path(&format!("redis-{port}.conf"));
            std::fs::write(&conf, lines.join("\n") + "\n").expect("write redis.conf");
            Proc::redis(port, &[conf.to_string_lossy().into_owned()])
        };
        let (m, r) = (free_port(), free_port());
        let master = server(m, &[]);
        let replica = server(r, &[format!("replicaof 127.0.0.1 {m}")]);
        let mut sentinels = Vec::new();
        for n in 0..3 {
            let port = free_port();
            let mut lines = listen(port);
            lines.extend(shared.iter().cloned());
            lines.extend([
                format!("sentinel monitor {MASTER_NAME} 127.0.0.1 {m} 2"),
                format!("sentinel down-after-milliseconds {MASTER_NAME} 1000"),
                format!("sentinel failover-timeout {MASTER_NAME} 4000"),
                format!("sentinel parallel-syncs {MASTER_NAME} 1"),
            ]);
            if tls {
                lines.extend([
                    format!("sentinel auth-user {MASTER_NAME} {USER}"),
                    format!("sentinel auth-pass {MASTER_NAME} {PASSWORD}"),
                    format!("sentinel sentinel-user {USER}"),
                    format!("sentinel sentinel-pass {PASSWORD}"),
                ]);
            }
            // Sentinels rewrite their config file: each gets its own, writable.
            let conf = dir.path(&format!("sentinel-{n}.conf"));
            std::fs::write(&conf, lines.join("\n") + "\n").expect("write sentinel.conf");
            sentinels.push(Proc::redis(port, &[conf.to_string_lossy().into_owned(), "--sentinel".into()]));
        }
        SentinelGroup { master, replica, sentinels, ca, dir }
    }

    /// Each sentinel's URL as a node is configured with it (`rediss://` and the ACL user on
    /// TLS, with `password`).
    pub fn sentinel_urls_with(&self, password: &str) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|s| match self.ca {
                Some(_) => format!("rediss://{USER}:{password}@127.0.0.1:{}", s.port),
                None => format!("redis://127.0.0.1:{}", s.port),
            })
            .collect()
    }

    /// `redis://127.0.0.1:<port>` of each sentinel.
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinel_urls_with(PASSWORD)
    }

    /// A client for a server or sentinel of this group.
    pub fn client_of(&self, port: u16) -> redis::Client {
        match &self.ca {
            Some(ca) => {
                let certs = redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(std::fs::read(ca).expect("read the CA")),
                };
                let url = format!("rediss://{USER}:{PASSWORD}@127.0.0.1:{port}");
                redis::Client::build_with_tls(url, certs).expect("a TLS client")
            }
            None => Self::client(port),
        }
    }

    pub fn client(port: u16) -> redis::Client {
        redis::Client::open(format!("redis://127.0.0.1:{port}")).expect("a redis URL")
    }

    /// Waits until the replica is in sync and every sentinel knows the replica and the other
    /// two sentinels, so a failover can be agreed on.
    pub async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let info: String = query(&self.client_of(self.replica.port), &["INFO", "replication"]).await;
            let mut ready = info.contains("master_link_status:up");
            for s in &self.sentinels {
                let client = self.client_of(s.port);
                let replicas: Vec<redis::Value> =
                    query(&client, &["SENTINEL", "REPLICAS", MASTER_NAME]).await;
                let others: Vec<redis::Value> = query(&client, &["SENTINEL", "SENTINELS", MASTER_NAME]).await;
                ready &= replicas.len() == 1 && others.len() == 2;
            }
            if ready {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "the sentinel group never became ready");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A fourth sentinel (plain text only) with a stale view: it monitors the group's master
    /// name at the replica's address, as one cut off during a failover would (the group's
    /// sentinels do not correct it: no failover has raised the config epoch). It waits a
    /// minute before it calls that "master" down, so it keeps naming the replica.
    pub fn stale_sentinel(&self) -> Proc {
        assert!(self.ca.is_none(), "a plain-text group only");
        let port = free_port();
        let lines = [
            format!("port {port}"),
            "bind 127.0.0.1".into(),
            format!("dir {}", self.dir.0.display()),
            format!("sentinel monitor {MASTER_NAME} 127.0.0.1 {} 2", self.replica.port),
            format!("sentinel down-after-milliseconds {MASTER_NAME} 60000"),
        ];
        let conf = self.dir.path("sentinel-stale.conf");
        std::fs::write(&conf, lines.join("\n") + "\n").expect("write sentinel.conf");
        Proc::redis(port, &[conf.to_string_lossy().into_owned(), "--sentinel".into()])
    }

    /// The master's port as the first sentinel answers.
    pub async fn master_port(&self) -> u16 {
        let first = self.client_of(self.sentinels[0].port);
        let addr: (String, u16) = query(&first, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME]).await;
        addr.1
    }
}

/// A TCP relay on a loopback port to a server the test can change: the address of a managed
/// Redis, which a failover moves to the promoted replica. Connections made before a switch stay
/// where they were. Stops on drop.
pub struct Relay {
    pub port: u16,
    target: std::sync::Arc<std::sync::atomic::AtomicU16>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub async fn start(target: u16) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the relay");
        let port = listener.local_addr().expect("the relay's address").port();
        let target = std::sync::Arc::new(std::sync::atomic::AtomicU16::new(target));
        let to = target.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let port = to.load(std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Relay { port, target, task }
    }

    /// New connections go to `port` from now on.
    pub fn switch(&self, port: u16) {
        self.target.store(port, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
