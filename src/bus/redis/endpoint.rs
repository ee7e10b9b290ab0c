//! Where this node's Redis is and how to reach it: one server (`bus.redis_url`) or the master
//! Redis Sentinel names (`bus.redis_sentinel_urls`), over `rediss://` with the CA of
//! `bus.redis_tls_ca_file`, as an ACL user; and what a failed connect means. A wrong password or
//! an untrusted certificate is a configuration error (it stops startup naming the key); an
//! unreachable server is an outage (the node starts degraded and retries).
//!
//! Every address shown (logs, errors, `check-config`) goes through
//! [`crate::config::mask_url_password`]: no password leaves this module.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use redis::{AsyncConnectionConfig, IntoConnectionInfo, ProtocolVersion, TlsCertificates};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::bus::BusError;

mod cluster;
mod fault;
use crate::config::{mask_url_password, BusConfig, BusKind};
pub(crate) use fault::fault;
use fault::reset;

/// How one connect failed, as far as the operator is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// The server refused the user or password (`WRONGPASS`, `NOAUTH`, `NOPERM`).
    Auth,
    /// The server's certificate is not trusted (or TLS failed for another certificate reason).
    Certificate,
    /// A sentinel answered that it monitors no master of the configured name.
    NoSuchMaster,
    /// A server listed as a sentinel does not know the `SENTINEL` command (a Redis server).
    NotSentinel,
    /// A server listed as a cluster seed runs without cluster support.
    NotCluster,
    /// Down, refused, timed out, or not (yet) the master: worth retrying.
    Unreachable,
}

impl Fault {
    /// True for a fault no retry cures: the configuration is wrong.
    pub(crate) fn is_config(self) -> bool {
        matches!(
            self,
            Fault::Auth | Fault::Certificate | Fault::NoSuchMaster | Fault::NotSentinel | Fault::NotCluster
        )
    }
}

/// One failed step against one server, with the key that configures it.
#[derive(Debug, thiserror::Error)]
#[error("{key} {shown}: {reason}")]
pub(crate) struct Failure {
    /// The config key the operator fixes (`bus.redis_url`, `bus.redis_sentinel_urls`,
    /// `bus.redis_tls_ca_file`).
    pub(crate) key: &'static str,
    /// The server, password masked.
    pub(crate) shown: String,
    /// Its `host:port` (the per-endpoint metrics' label; empty when no server was named).
    pub(crate) addr: String,
    /// What went wrong, in words; never holds a password.
    pub(crate) reason: String,
    pub(crate) fault: Fault,
}

impl Failure {
    /// The startup error for a configuration fault.
    pub(crate) fn into_bus_error(self) -> BusError {
        BusError::Config { key: self.key, reason: format!("{}: {}", self.shown, self.reason) }
    }
}

/// The node's Redis, as configured. Cheap to clone (clients are addresses and settings).
#[derive(Clone)]
pub(crate) struct Endpoint {
    target: Target,
    /// Whether `bus.redis_tls_ca_file` is set: an untrusted certificate is then its fault.
    has_ca: bool,
    /// PEM of `bus.redis_tls_ca_file`, for the master clients made after each resolution.
    roots: Option<Vec<u8>>,
}

#[derive(Clone)]
enum Target {
    Single {
        client: Box<redis::Client>,
        shown: String,
    },
    Sentinel {
        sentinels: Vec<Sentinel>,
        master: String,
        /// The sentinel asked first: the last one whose answer was not found wrong (a sentinel
        /// cut off during a failover keeps naming the demoted master; the next one is asked).
        first: Arc<AtomicUsize>,
    },
    /// Redis Cluster: seeds asked in turn for the slot map (`shards.rs`, `cluster.rs`).
    Cluster {
        seeds: Vec<Sentinel>,
        /// The seed asked first: the last one that answered.
        first: Arc<AtomicUsize>,
    },
}

/// A configured server that names others (a sentinel, or a cluster seed).
#[derive(Clone)]
struct Sentinel {
    client: redis::Client,
    /// The configured URL (with its password): the master is reached with its scheme and user.
    url: String,
    shown: String,
}

/// The server to open the bus's connection to, and how to name it.
pub(crate) struct Master {
    pub(crate) client: redis::Client,
    /// `host:port` (no credentials): compared across resolutions to count failovers.
    pub(crate) addr: String,
    pub(crate) shown: String,
    /// Whether the bus must check, once connected, that the server is still the master.
    pub(crate) check_role: bool,
    /// The key that configures it.
    pub(crate) key: &'static str,
    /// Which of the configured sentinels named it (its index), under Sentinel.
    sentinel: Option<usize>,
}

impl Endpoint {
    /// Reads the bus config: parses every URL and the CA file. Errors name the key.
    pub(crate) fn from_config(config: &BusConfig) -> Result<Endpoint, BusError> {
        let roots = match &config.redis_tls_ca_file {
            None => None,
            Some(path) => Some(read_roots(path)?),
        };
        let target = match config.kind {
            BusKind::RedisSentinel => {
                let sentinels = config
                    .redis_sentinel_urls
                    .iter()
                    .map(|url| {
                        // Sentinels answer plain commands; RESP2 is enough.
                        let client = client(url, roots.as_deref(), false, "bus.redis_sentinel_urls")?;
                        Ok(Sentinel { client, url: url.clone(), shown: mask_url_password(url) })
                    })
                    .collect::<Result<Vec<_>, BusError>>()?;
                Target::Sentinel {
                    sentinels,
                    master: config.redis_sentinel_master.clone(),
                    first: Arc::new(AtomicUsize::new(0)),
                }
            }
            BusKind::RedisCluster => {
                let seeds = config
                    .redis_cluster_urls
                    .iter()
                    .map(|url| {
                        let client = client(url, roots.as_deref(), false, "bus.redis_cluster_urls")?;
                        Ok(Sentinel { client, url: url.clone(), shown: mask_url_password(url) })
                    })
                    .collect::<Result<Vec<_>, BusError>>()?;
                Target::Cluster { seeds, first: Arc::new(AtomicUsize::new(0)) }
            }
            _ => Target::Single {
                client: Box::new(client(&config.redis_url, roots.as_deref(), true, "bus.redis_url")?),
                shown: mask_url_password(&config.redis_url),
            },
        };
        Ok(Endpoint { target, has_ca: roots.is_some(), roots })
    }

    /// Stops startup when the configured servers answer but refuse this node: a wrong password,
    /// an untrusted certificate or an unknown master name is a configuration error no retry
    /// cures, named by its key. A server that does not answer is an outage: the node starts
    /// degraded and keeps trying.
    pub(crate) async fn refuse_misconfigured(&self, timeout: Duration) -> Result<(), BusError> {
        if let Target::Cluster { .. } = self.target {
            // Every primary: a password wrong on one node only would leave its slots unserved.
            let checked = self.check_all(timeout).await;
            return match checked.into_iter().filter_map(|(_, r)| r.err()).find(|f| f.fault.is_config()) {
                Some(failure) => Err(failure.into_bus_error()),
                None => Ok(()),
            };
        }
        let checked = match self.resolve(timeout).await {
            Ok(master) => self.check_master(&master, timeout).await.map(|_| ()),
            Err(failure) => Err(failure),
        };
        match checked {
            Err(failure) if failure.fault.is_config() => Err(failure.into_bus_error()),
            _ => Ok(()),
        }
    }

    /// The config key that says where Redis is.
    pub(crate) fn key(&self) -> &'static str {
        match self.target {
            Target::Single { .. } => "bus.redis_url",
            Target::Sentinel { .. } => "bus.redis_sentinel_urls",
            Target::Cluster { .. } => "bus.redis_cluster_urls",
        }
    }

    /// True under Redis Cluster.
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self.target, Target::Cluster { .. })
    }

    /// What this endpoint is, for logs: the URL or the sentinels and master name, masked.
    pub(crate) fn describe(&self) -> String {
        match &self.target {
            Target::Single { shown, .. } => shown.clone(),
            Target::Sentinel { sentinels, master, .. } => {
                let list: Vec<&str> = sentinels.iter().map(|s| s.shown.as_str()).collect();
                format!("master `{master}` via sentinels {}", list.join(", "))
            }
            Target::Cluster { seeds, .. } => {
                let list: Vec<&str> = seeds.iter().map(|s| s.shown.as_str()).collect();
                format!("cluster via seeds {}", list.join(", "))
            }
        }
    }

    /// The server to connect to now: the configured one, or the master the first sentinel
    /// that knows it names (each asked in turn, every time: after a failover they name the
    /// promoted replica), starting with the last one not [passed over](Self::pass_over).
    pub(crate) async fn resolve(&self, timeout: Duration) -> Result<Master, Failure> {
        match &self.target {
            Target::Single { client, shown } => Ok(Master {
                client: (**client).clone(),
                addr: client.get_connection_info().addr().to_string(),
                shown: shown.clone(),
                check_role: false,
                key: "bus.redis_url",
                sentinel: None,
            }),
            Target::Sentinel { sentinels, master, first } => {
                let mut last = None;
                let start = first.load(Ordering::Relaxed);
                for index in (0..sentinels.len()).map(|i| (start + i) % sentinels.len()) {
                    match self.ask(&sentinels[index], master, timeout).await {
                        Ok(found) => return Ok(Master { sentinel: Some(index), ..found }),
                        Err(failure) => {
                            tracing::debug!(error = %failure, "sentinel could not name the master");
                            // A configuration fault is reported over a mere outage.
                            if last.as_ref().is_none_or(|l: &Failure| !l.fault.is_config()) {
                                last = Some(failure);
                            }
                        }
                    }
                }
                Err(last.unwrap_or_else(|| Failure {
                    key: "bus.redis_sentinel_urls",
                    shown: String::new(),
                    addr: String::new(),
                    reason: "no sentinel configured".into(),
                    fault: Fault::Unreachable,
                }))
            }
            // The primary of the node-wide calls outside the bus session (the pressure hash).
            Target::Cluster { .. } => {
                let (topology, seed) = self.discover(timeout).await?;
                let key = super::pressure::PRESSURE_KEY.as_bytes();
                let primary = topology.owner_of(key).cloned().ok_or_else(|| Failure {
                    key: "bus.redis_cluster_urls",
                    shown: String::new(),
                    addr: String::new(),
                    reason: "the cluster serves no primary for the pressure slot".into(),
                    fault: Fault::Unreachable,
                })?;
                self.primary(&seed, &primary)
            }
        }
    }

    /// The server `master` could not be used as the master (down, or not a master at all):
    /// the next resolution asks the sentinel after the one that named it first, so one sentinel
    /// with a stale or wrong answer cannot keep the node off the real master.
    pub(crate) fn pass_over(&self, master: &Master) {
        if let (Target::Sentinel { sentinels, first, .. }, Some(index)) = (&self.target, master.sentinel) {
            first.store((index + 1) % sentinels.len(), Ordering::Relaxed);
        }
    }

    /// Asks one sentinel for the master's address, and makes a client for it.
    async fn ask(&self, sentinel: &Sentinel, master: &str, timeout: Duration) -> Result<Master, Failure> {
        let key = "bus.redis_sentinel_urls";
        let at = sentinel.client.get_connection_info().addr().to_string();
        let fail = |e: &redis::RedisError| self.failure(key, &sentinel.shown, &at, e);
        let mut conn = sentinel
            .client
            .get_multiplexed_async_connection_with_config(&connection_config(timeout))
            .await
            .map_err(|e| fail(&e))?;
        let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(master)
            .query_async(&mut conn)
            .await
            .map_err(|e| {
                // A Redis server in the sentinels' list: a retry never makes it one.
                if e.code() == Some("ERR") && e.to_string().contains("unknown command") {
                    return Failure {
                        key,
                        shown: sentinel.shown.clone(),
                        addr: at.clone(),
                        reason: "not a sentinel (it does not know the SENTINEL command): list the \
                                 sentinels' addresses (`redis-server --sentinel`, port 26379 by default)"
                            .into(),
                        fault: Fault::NotSentinel,
                    };
                }
                fail(&e)
            })?;
        let Some((host, port)) = addr else {
            return Err(Failure {
                key: "bus.redis_sentinel_master",
                shown: sentinel.shown.clone(),
                addr: at,
                reason: format!("the sentinel monitors no master named `{master}`"),
                fault: Fault::NoSuchMaster,
            });
        };
        let url = master_url(&sentinel.url, &host, port);
        let client = client(&url, self.roots.as_deref(), true, key).map_err(|e| Failure {
            key,
            shown: sentinel.shown.clone(),
            addr: at.clone(),
            reason: e.to_string(),
            fault: Fault::Unreachable,
        })?;
        Ok(Master {
            client,
            addr: format!("{host}:{port}"),
            shown: format!("master `{master}` at {}", mask_url_password(&url)),
            check_role: true,
            key,
            sentinel: None,
        })
    }

    /// Names what `e` means for a server configured under `key`.
    pub(crate) fn failure(
        &self,
        key: &'static str,
        shown: &str,
        addr: &str,
        e: &redis::RedisError,
    ) -> Failure {
        let fault = fault(e);
        let (key, reason) = match fault {
            Fault::Auth => (key, format!("Redis refused the user or password ({})", e.code().unwrap_or(e.category()))),
            Fault::Certificate if self.has_ca => {
                ("bus.redis_tls_ca_file", format!("the server's certificate is not trusted: {e}"))
            }
            Fault::Certificate => (
                key,
                format!("the server's certificate is not trusted by the system roots (set bus.redis_tls_ca_file): {e}"),
            ),
            // A TLS-only port resets a plain client during its first command: say so, since
            // "connection reset" alone points at the network.
            Fault::Unreachable if !shown.contains("rediss://") && reset(e) => {
                (key, format!("{e} (a server that accepts only TLS resets plain connections: use rediss://)"))
            }
            Fault::Unreachable | Fault::NoSuchMaster | Fault::NotSentinel | Fault::NotCluster => {
                (key, e.to_string())
            }
        };
        Failure { key, shown: shown.to_string(), addr: addr.to_string(), reason, fault }
    }

    /// Every server `herald check-config --connect` should reach, and whether each did: the
    /// one server, or each sentinel and the master it names (PING; a master also `ROLE`). Takes
    /// at most [`CHECK_ALL_STEPS`] times `timeout`, however many servers there are.
    pub(crate) async fn check_all(&self, timeout: Duration) -> Vec<(String, Result<String, Failure>)> {
        let mut out = Vec::new();
        match &self.target {
            Target::Single { .. } => {
                let result = match self.resolve(timeout).await {
                    Ok(master) => self.check_master(&master, timeout).await,
                    Err(f) => Err(f),
                };
                out.push((self.describe(), result));
            }
            Target::Sentinel { sentinels, master, .. } => {
                // All at once: one by one, a few sentinels that never answer would outlast the
                // caller's deadline and the report would name none of them.
                let asked = join_all(sentinels.iter().map(|s| self.ask(s, master, timeout))).await;
                let mut masters: Vec<Master> = Vec::new();
                for (sentinel, result) in sentinels.iter().zip(asked) {
                    let result = result.map(|m| {
                        let said = format!("names {}", m.addr);
                        if !masters.iter().any(|known| known.addr == m.addr) {
                            masters.push(m);
                        }
                        said
                    });
                    out.push((format!("sentinel {}", sentinel.shown), result));
                }
                let checked = join_all(masters.iter().map(|m| self.check_master(m, timeout))).await;
                for (m, result) in masters.iter().zip(checked) {
                    out.push((m.shown.clone(), result));
                }
            }
            Target::Cluster { seeds, .. } => self.check_cluster(seeds, timeout, &mut out).await,
        }
        out
    }

    /// PINGs a server (and checks it is the master where that matters).
    pub(crate) async fn check_master(&self, master: &Master, timeout: Duration) -> Result<String, Failure> {
        let fail = |e: &redis::RedisError| self.failure(master.key, &master.shown, &master.addr, e);
        let mut conn = master
            .client
            .get_multiplexed_async_connection_with_config(&connection_config(timeout))
            .await
            .map_err(|e| fail(&e))?;
        redis::cmd("PING").query_async::<String>(&mut conn).await.map_err(|e| fail(&e))?;
        if master.check_role {
            let role = role(&mut conn).await.map_err(|e| fail(&e))?;
            if role != "master" {
                return Err(Failure {
                    key: master.key,
                    shown: master.shown.clone(),
                    addr: master.addr.clone(),
                    reason: format!("the server named as master is a {role}"),
                    fault: Fault::Unreachable,
                });
            }
        }
        Ok("answers PING".into())
    }
}

/// How many `timeout`s [`Endpoint::check_all`] may take: asking the sentinels (connect, reply),
/// then checking the masters (connect, `PING`, `ROLE`), each step on every server at once; under
/// Cluster the slot map is read from one seed after another, so a dead seed costs a step more.
pub(crate) const CHECK_ALL_STEPS: u32 = 7;

/// The server's replication role (`master`, `slave`, `sentinel`), from `ROLE`.
pub(crate) async fn role(conn: &mut redis::aio::MultiplexedConnection) -> redis::RedisResult<String> {
    let reply: redis::Value = redis::cmd("ROLE").query_async(conn).await?;
    let first = match reply {
        redis::Value::Array(items) => items.into_iter().next(),
        _ => None,
    };
    Ok(match first {
        Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(&b).into_owned(),
        Some(redis::Value::SimpleString(s)) => s,
        _ => "unknown".into(),
    })
}

/// The connect and reply deadlines of short-lived check connections.
fn connection_config(timeout: Duration) -> AsyncConnectionConfig {
    AsyncConnectionConfig::new().set_connection_timeout(Some(timeout)).set_response_timeout(Some(timeout))
}

/// Reads `bus.redis_tls_ca_file`: it must hold at least one PEM certificate.
fn read_roots(path: &std::path::Path) -> Result<Vec<u8>, BusError> {
    let key = "bus.redis_tls_ca_file";
    let pem = std::fs::read(path)
        .map_err(|e| BusError::Config { key, reason: format!("cannot read {}: {e}", path.display()) })?;
    let certs = CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>().map_err(|e| {
        BusError::Config { key, reason: format!("{} is not PEM certificates: {e}", path.display()) }
    })?;
    if certs.is_empty() {
        return Err(BusError::Config { key, reason: format!("{} holds no PEM certificate", path.display()) });
    }
    // The redis crate reads them again for each TLS client and would blame the URL's key.
    let mut store = rustls::RootCertStore::empty();
    for cert in certs {
        store.add(cert).map_err(|e| BusError::Config {
            key,
            reason: format!("{} holds a certificate that cannot be a trust anchor: {e}", path.display()),
        })?;
    }
    Ok(pem)
}

/// A client for `url` under `key`; RESP3 when the connection carries pushes; TLS roots from the
/// CA file when one is configured (else the system's).
fn client(
    url: &str,
    roots: Option<&[u8]>,
    resp3: bool,
    key: &'static str,
) -> Result<redis::Client, BusError> {
    let bad = |e: redis::RedisError| BusError::Config {
        key,
        reason: format!("`{}` is not a usable Redis URL: {e}", mask_url_password(url)),
    };
    let info = url.into_connection_info().map_err(bad)?;
    let info = if resp3 {
        let settings = info.redis_settings().clone().set_protocol(ProtocolVersion::RESP3);
        info.set_redis_settings(settings)
    } else {
        info
    };
    let tls = matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. });
    match roots {
        Some(pem) if tls => {
            let certs = TlsCertificates { client_tls: None, root_cert: Some(pem.to_vec()) };
            redis::Client::build_with_tls(info, certs).map_err(bad)
        }
        _ => redis::Client::open(info).map_err(bad),
    }
}

/// The master's URL: the sentinel's scheme and `user:password@`, the master's host and port.
fn master_url(sentinel_url: &str, host: &str, port: u16) -> String {
    let (scheme, rest) = sentinel_url.split_once("://").unwrap_or(("redis", sentinel_url));
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    let user = authority.rfind('@').map_or("", |at| &authority[..=at]);
    let host = if host.contains(':') { format!("[{host}]") } else { host.to_string() };
    format!("{scheme}://{user}{host}:{port}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_master_is_reached_with_the_sentinels_scheme_and_user() {
        assert_eq!(
            master_url("rediss://herald:pw@10.0.0.1:26379", "10.0.0.9", 6380),
            "rediss://herald:pw@10.0.0.9:6380"
        );
        assert_eq!(master_url("redis://s:26379/0", "::1", 7000), "redis://[::1]:7000");
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused_naming_the_key() {
        let path = std::env::temp_dir().join(format!("herald-ca-{}.pem", uuid::Uuid::new_v4()));
        std::fs::write(&path, "not a certificate").expect("write");
        let err = read_roots(&path).map(|_| ()).expect_err("refused").to_string();
        let _ = std::fs::remove_file(&path);
        assert!(err.contains("bus.redis_tls_ca_file"), "{err}");
    }

    #[test]
    fn descriptions_never_hold_the_password() {
        let config = BusConfig {
            kind: BusKind::RedisSentinel,
            redis_sentinel_urls: vec!["redis://u:hunter2hunter2@127.0.0.1:26379".into()],
            redis_sentinel_master: "herald".into(),
            ..BusConfig::default()
        };
        let endpoint = Endpoint::from_config(&config).map_err(|e| e.to_string()).expect("usable");
        let text = endpoint.describe();
        assert!(!text.contains("hunter2") && text.contains("u:***@127.0.0.1:26379"), "{text}");
    }
}
