//! A local Redis Cluster for the tests: `redis-server --cluster-enabled yes` processes on free
//! loopback ports (each also listens on port + 10000, the cluster bus), joined with
//! `redis-cli --cluster create`, three primaries with or without a replica each. Every process is
//! a child of the test with its files in a temporary directory; all are killed on drop. A TLS
//! cluster ([`Cluster::start_tls`]) listens on TLS ports only (clients, replication and the
//! cluster bus) with the default user off and one ACL user.
//! Also the helpers the cluster test files share: Herald nodes on a cluster, clients watching a
//! room, and the check that every client got every accepted event or was told it may miss some.
#![allow(dead_code, unreachable_pub)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use herald::config::{BusConfig, BusKind, Config};
use serde_json::json;
use tokio::time::{sleep, Instant};

use crate::scale::{acl_user_args, make_ca, query, Proc, TempDir, PASSWORD, USER};
use crate::support::redis::{follow, publish_through, Seen};
use crate::support::{message_sent, user, Client, Gateway, PATIENCE};

/// Nodes of the cluster; the first three start as primaries.
pub struct Cluster {
    pub nodes: Vec<Proc>,
    /// Under TLS: the CA that signed every node's certificate (IP 127.0.0.1), and another that
    /// did not.
    pub tls: Option<(PathBuf, PathBuf)>,
    _dir: TempDir,
}

/// A free port below 55536 whose cluster bus port (+10000) is free too.
fn cluster_port() -> u16 {
    loop {
        let port = crate::support::free_addr().port();
        if port < 55_536 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

/// `redis-cli` with `args`; panics with its output on failure.
fn redis_cli(args: &[String]) -> String {
    let out = Command::new("redis-cli").args(args).output().expect("run redis-cli (package redis-tools)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "redis-cli {args:?}: {text}");
    text
}

impl Cluster {
    /// Three primaries, each with `replicas` replicas (0 or 1), ready: every slot served, every
    /// replica linked.
    pub async fn start(replicas: usize) -> Cluster {
        Cluster::start_with(replicas, false).await
    }

    /// As [`Cluster::start`], on TLS ports only (`tls-cluster` and `tls-replication` too, so
    /// `CLUSTER SLOTS` announces the TLS ports), as the ACL user [`USER`] with the default user
    /// off; replicas authenticate with `masteruser`/`masterauth`.
    pub async fn start_tls(replicas: usize) -> Cluster {
        Cluster::start_with(replicas, true).await
    }

    async fn start_with(replicas: usize, tls: bool) -> Cluster {
        let dir = TempDir::new("cluster");
        let tls = tls.then(|| (make_ca(&dir.0, "herald", true), make_ca(&dir.0, "other", false)));
        let mut nodes = Vec::new();
        for _ in 0..3 * (1 + replicas) {
            let port = cluster_port();
            let path = |name: &str| dir.path(name).display().to_string();
            let listen: Vec<String> = match &tls {
                None => vec!["--port".into(), port.to_string()],
                Some((ca, _)) => [
                    "--port",
                    "0",
                    "--tls-port",
                    &port.to_string(),
                    "--tls-cert-file",
                    &path("server.pem"),
                    "--tls-key-file",
                    &path("server.key"),
                    "--tls-ca-cert-file",
                    &ca.display().to_string(),
                    "--tls-auth-clients",
                    "no",
                    "--tls-cluster",
                    "yes",
                    "--tls-replication",
                    "yes",
                    "--masteruser",
                    USER,
                    "--masterauth",
                    PASSWORD,
                ]
                .iter()
                .map(|s| s.to_string())
                .chain(acl_user_args())
                .collect(),
            };
            let mut args: Vec<String> = listen;
            args.extend(
                [
                    "--bind",
                    "127.0.0.1",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &dir.path(&format!("nodes-{port}.conf")).display().to_string(),
                    "--cluster-node-timeout",
                    "1500",
                    "--dir",
                    &dir.0.display().to_string(),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ]
                .iter()
                .map(|s| s.to_string()),
            );
            nodes.push(Proc::redis(port, &args));
        }
        let mut args: Vec<String> = match &tls {
            None => Vec::new(),
            Some((ca, _)) => {
                ["--tls", "--cacert", &ca.display().to_string(), "--user", USER, "--pass", PASSWORD]
                    .iter()
                    .map(|s| s.to_string())
                    .collect()
            }
        };
        args.extend(["--cluster".into(), "create".into()]);
        args.extend(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)));
        args.extend(["--cluster-replicas".into(), replicas.to_string(), "--cluster-yes".into()]);
        redis_cli(&args);
        let cluster = Cluster { nodes, tls, _dir: dir };
        cluster.wait_ok().await;
        cluster
    }

    /// A client for node `port`.
    pub fn client(port: u16) -> redis::Client {
        redis::Client::open(format!("redis://127.0.0.1:{port}")).expect("client")
    }

    /// A client for node `port` of this cluster: under TLS, trusting its CA, as the ACL user.
    pub fn node(&self, port: u16) -> redis::Client {
        let Some((ca, _)) = &self.tls else { return Cluster::client(port) };
        let certs = redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(std::fs::read(ca).expect("read the CA")),
        };
        redis::Client::build_with_tls(format!("rediss://{USER}:{PASSWORD}@127.0.0.1:{port}"), certs)
            .expect("a TLS client")
    }

    /// The seed URLs of every node (under TLS: `rediss://` as the ACL user).
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| match self.tls {
                None => format!("redis://127.0.0.1:{}", n.port),
                Some(_) => format!("rediss://{USER}:{PASSWORD}@127.0.0.1:{}", n.port),
            })
            .collect()
    }

    /// Waits until every live node says `cluster_state:ok` and agrees on the slot map's
    /// primaries, and every replica's link is up.
    pub async fn wait_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut ok = true;
            for node in self.nodes.iter().filter(|n| n.alive()) {
                let info: String = query(&self.node(node.port), &["CLUSTER", "INFO"]).await;
                ok &= info.contains("cluster_state:ok");
                let repl: String = query(&self.node(node.port), &["INFO", "replication"]).await;
                ok &= !repl.contains("role:slave") || repl.contains("master_link_status:up");
            }
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "the cluster never became ready");
            sleep(Duration::from_millis(100)).await;
        }
    }

    /// The port of the primary serving `key`'s slot (asked of a live node).
    pub async fn primary_of(&self, key: &str) -> u16 {
        let node = self.nodes.iter().find(|n| n.alive()).expect("a live node");
        let slot: i64 = query(&self.node(node.port), &["CLUSTER", "KEYSLOT", key]).await;
        self.owner_of_slot(slot).await
    }

    /// The port of the primary serving `slot`.
    pub async fn owner_of_slot(&self, slot: i64) -> u16 {
        let node = self.nodes.iter().find(|n| n.alive()).expect("a live node");
        let slots: redis::Value = query(&self.node(node.port), &["CLUSTER", "SLOTS"]).await;
        let redis::Value::Array(ranges) = slots else { panic!("CLUSTER SLOTS: {slots:?}") };
        for range in ranges {
            let redis::Value::Array(parts) = range else { continue };
            let (Some(redis::Value::Int(a)), Some(redis::Value::Int(b)), Some(redis::Value::Array(node))) =
                (parts.first(), parts.get(1), parts.get(2))
            else {
                continue;
            };
            if (*a..=*b).contains(&slot) {
                if let Some(redis::Value::Int(port)) = node.get(1) {
                    return u16::try_from(*port).expect("port");
                }
            }
        }
        panic!("no primary serves slot {slot}")
    }

    /// The node id of node `port` of this cluster.
    pub async fn id_of(&self, port: u16) -> String {
        query(&self.node(port), &["CLUSTER", "MYID"]).await
    }

    /// Marks the cluster's Herald state as long settled: a fresh cluster would make nodes wait
    /// out the settle window.
    pub async fn mark_settled(&self) {
        let port = self.primary_of("herald:{herald}:boot").await;
        let _: () = query(&self.node(port), &["SET", "herald:{herald}:boot", "0"]).await;
    }

    /// The port of the primary node `port` replicates (`None` for a primary).
    pub async fn primary_of_replica(&self, port: u16) -> Option<u16> {
        let info: String = query(&self.node(port), &["INFO", "replication"]).await;
        info.lines().find_map(|l| l.trim().strip_prefix("master_port:")).and_then(|p| p.parse().ok())
    }

    /// Moves `slot` from primary `from` to primary `to` by hand, key by key, as
    /// `redis-cli --cluster reshard` does (SETSLOT IMPORTING/MIGRATING, MIGRATE, SETSLOT NODE);
    /// under TLS, `MIGRATE` logs in as the ACL user (`AUTH2`) over the cluster's TLS links.
    pub async fn move_slot(&self, slot: i64, from: u16, to: u16) {
        let (src, dst) = (self.node(from), self.node(to));
        let (src_id, dst_id) = (self.id_of(from).await, self.id_of(to).await);
        let s = slot.to_string();
        let _: () = query(&dst, &["CLUSTER", "SETSLOT", &s, "IMPORTING", &src_id]).await;
        let _: () = query(&src, &["CLUSTER", "SETSLOT", &s, "MIGRATING", &dst_id]).await;
        loop {
            let keys: Vec<String> = query(&src, &["CLUSTER", "GETKEYSINSLOT", &s, "100"]).await;
            if keys.is_empty() {
                break;
            }
            let mut args: Vec<String> =
                ["MIGRATE", "127.0.0.1", &to.to_string(), "", "0", "5000"].map(String::from).to_vec();
            if self.tls.is_some() {
                args.extend(["AUTH2", USER, PASSWORD].map(String::from));
            }
            args.push("KEYS".into());
            args.extend(keys);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let _: String = query(&src, &args).await;
        }
        for node in self.nodes.iter().filter(|n| n.alive()) {
            let client = self.node(node.port);
            let role: String = query(&client, &["INFO", "replication"]).await;
            if role.contains("role:master") {
                let _: () = query(&client, &["CLUSTER", "SETSLOT", &s, "NODE", &dst_id]).await;
            }
        }
    }
}

/// The test config on the cluster behind `urls` (presence off: every `SPUBLISH` the tests count
/// is a room event).
pub fn cluster_config(urls: Vec<String>) -> Config {
    let mut config = crate::support::config();
    config.bus = BusConfig { kind: BusKind::RedisCluster, redis_cluster_urls: urls, ..BusConfig::default() };
    config.presence.enabled = false;
    config
}

/// The cluster config with `redis_tls_ca_file` set to `ca`.
pub fn tls_cluster_config(urls: Vec<String>, ca: Option<&std::path::Path>) -> Config {
    let mut config = cluster_config(urls);
    config.bus.redis_tls_ca_file = ca.map(std::path::Path::to_path_buf);
    config
}

/// Waits until every node answers `/readyz` 200.
pub async fn all_ready(nodes: &[&Gateway]) {
    for gw in nodes {
        let deadline = Instant::now() + PATIENCE * 2;
        while gw.get("/readyz").await.0 != 200 {
            assert!(Instant::now() < deadline, "a node never became ready");
            sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Three nodes with `config`, once all are ready.
pub async fn three_nodes(config: Config) -> (Gateway, Gateway, Gateway) {
    let (a, b, c) = (
        crate::support::start(config.clone()).await,
        crate::support::start(config.clone()).await,
        crate::support::start(config).await,
    );
    all_ready(&[&a, &b, &c]).await;
    (a, b, c)
}

/// A client on each node watching `room`, and the room's head.
pub async fn watching(nodes: &[&Gateway], room: uuid::Uuid) -> (Vec<Client>, u64) {
    let mut clients = Vec::new();
    let mut head = 0;
    for gw in nodes {
        let mut client = gw.connect(user(), &[]).await;
        head = client.subscribe(room).await;
        clients.push(client);
    }
    (clients, head)
}

/// Publishes to `room` on `a` through the kill of the primary on port `owner` (see
/// [`publish_through`]; a refusal is required).
pub async fn publish_killing(
    cluster: &mut Cluster,
    a: &Gateway,
    room: uuid::Uuid,
    owner: u16,
) -> (Vec<u64>, u64) {
    let victim = cluster.nodes.iter().position(|n| n.port == owner).expect("the owner is a node");
    publish_through(a, room, async || cluster.nodes[victim].kill(), true).await
}

/// After a disruption: a marker from the second node, then every client got every accepted event
/// once and in order, or was told of a gap.
pub async fn every_event_or_told(
    nodes: &[&Gateway],
    clients: &mut [Client],
    room: uuid::Uuid,
    head: u64,
    mut accepted: Vec<u64>,
    n: u64,
) {
    all_ready(nodes).await;
    let marker = n + 1;
    crate::support::redis::http_publish_eventually(nodes[1], &message_sent(room, &json!({ "n": marker })))
        .await;
    accepted.push(marker);
    for (gw, client) in nodes.iter().zip(clients.iter_mut()) {
        let mut seen = Seen::default();
        follow(gw, client, room, head, &mut seen, marker).await;
        if !seen.told_gap {
            for n in &accepted {
                assert!(seen.ns.contains(n), "accepted event {n} missing and no recovered:false");
            }
        }
    }
}
