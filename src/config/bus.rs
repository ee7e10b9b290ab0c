//! The `bus` section: which bus, where its Redis servers are and how to reach them (TLS roots,
//! ACL users), validated naming the key; and the one way a Redis URL is shown (password masked).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{key_error, string_or_list, ConfigError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BusKind {
    #[default]
    Memory,
    /// One Redis server, `bus.redis_url`.
    Redis,
    /// Redis Cluster, `bus.redis_cluster_urls` (sharded pub/sub, Redis 7 or later).
    RedisCluster,
    /// A master found through Redis Sentinel, `bus.redis_sentinel_urls`.
    RedisSentinel,
}

impl BusKind {
    /// True for every kind that runs on Redis.
    pub fn is_redis(self) -> bool {
        self != BusKind::Memory
    }

    /// The kind as written in the config.
    pub fn name(self) -> &'static str {
        match self {
            BusKind::Memory => "memory",
            BusKind::Redis => "redis",
            BusKind::RedisCluster => "redis_cluster",
            BusKind::RedisSentinel => "redis_sentinel",
        }
    }
}

/// Where the bus is. `Debug` masks every password (URLs carry them).
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BusConfig {
    pub kind: BusKind,
    /// `kind: redis`: `redis://` or `rediss://` (TLS), with `user:password@` for an ACL user.
    pub redis_url: String,
    /// `kind: redis_cluster`: seed nodes, asked in turn for the slot map; their scheme and
    /// `user:password@` are used for every primary.
    #[serde(deserialize_with = "string_or_list")]
    pub redis_cluster_urls: Vec<String>,
    /// `kind: redis_sentinel`: the sentinels, asked in order for the master; their
    /// scheme and `user:password@` are used for the master too.
    #[serde(deserialize_with = "string_or_list")]
    pub redis_sentinel_urls: Vec<String>,
    /// `kind: redis_sentinel`: the monitored master's name.
    pub redis_sentinel_master: String,
    /// CA certificates (PEM) that `rediss://` servers must chain to; unset: the system roots.
    pub redis_tls_ca_file: Option<PathBuf>,
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig {
            kind: BusKind::Memory,
            redis_url: "redis://127.0.0.1:6379".into(),
            redis_cluster_urls: Vec::new(),
            redis_sentinel_urls: Vec::new(),
            redis_sentinel_master: String::new(),
            redis_tls_ca_file: None,
        }
    }
}

impl std::fmt::Debug for BusConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let masked = |urls: &[String]| urls.iter().map(|u| mask_url_password(u)).collect::<Vec<_>>();
        f.debug_struct("BusConfig")
            .field("kind", &self.kind)
            .field("redis_url", &mask_url_password(&self.redis_url))
            .field("redis_cluster_urls", &masked(&self.redis_cluster_urls))
            .field("redis_sentinel_urls", &masked(&self.redis_sentinel_urls))
            .field("redis_sentinel_master", &self.redis_sentinel_master)
            .field("redis_tls_ca_file", &self.redis_tls_ca_file)
            .finish()
    }
}

/// `redis://user:pass@host/0` -> `redis://user:***@host/0`: the one way a Redis URL is shown
/// (logs, errors, `check-config`, `Debug`).
///
/// Everything up to the last `@` counts as user and password, even past a `/`, `?` or `#`: a
/// password written without percent-encoding may hold those, and where the URL's authority ends
/// is then anyone's guess. Masking too much is harmless; showing such a password is not.
pub fn mask_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        // No scheme: maybe the tail of a URL a comma in its password split (`HERALD_*` lists
        // are comma-separated): `b@host` still ends with a password.
        return match url.rfind('@') {
            Some(at) => format!("***{}", &url[at..]),
            None => url.to_string(),
        };
    };
    let Some(at) = rest.rfind('@') else { return url.to_string() };
    match rest[..at].split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***{}", &rest[at..]),
        // `redis://password@host` is read as a password by some clients: mask it too.
        None => format!("{scheme}://***{}", &rest[at..]),
    }
}

/// Checks one Redis URL of `key`: `redis://` or `rediss://`, a host, and no `#` fragment (the
/// redis crate's `#insecure` would turn off certificate checks; Herald never does).
fn check_redis_url(key: &str, url: &str) -> Result<(), ConfigError> {
    let shown = mask_url_password(url);
    let Some(rest) = url.strip_prefix("redis://").or_else(|| url.strip_prefix("rediss://")) else {
        return Err(key_error(
            key,
            format!(
                "`{shown}` must be a redis:// or rediss:// (TLS) URL (a `,` in a password splits a \
                 list: write it %2C)"
            ),
        ));
    };
    if url.contains('#') {
        return Err(key_error(
            key,
            format!(
                "`{shown}`: no #fragment allowed (TLS certificate checks cannot be turned off; write \
                 a `#` in a password as %23)"
            ),
        ));
    }
    let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    if host.is_empty() || host.starts_with(['/', ':', '?']) {
        return Err(key_error(key, format!("`{shown}` names no host")));
    }
    Ok(())
}

impl BusConfig {
    /// The checks each kind needs; files are read when the bus starts (`herald check-config`
    /// reads them too).
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        match self.kind {
            BusKind::Memory => {}
            BusKind::Redis => check_redis_url("bus.redis_url", &self.redis_url)?,
            BusKind::RedisCluster => {
                if self.redis_cluster_urls.is_empty() {
                    return Err(key_error("bus.redis_cluster_urls", "list at least one seed node"));
                }
                for url in &self.redis_cluster_urls {
                    check_redis_url("bus.redis_cluster_urls", url)?;
                }
                // Every primary is reached with the scheme of the seed that answered: mixed
                // seeds would send the bus in plain text whenever a `redis://` one answers.
                let tls = |u: &String| u.starts_with("rediss://");
                if self.redis_cluster_urls.iter().any(tls) && !self.redis_cluster_urls.iter().all(tls) {
                    return Err(key_error(
                        "bus.redis_cluster_urls",
                        "mixes redis:// and rediss:// seeds: every node of one cluster is reached the \
                         same way, so list them all with one scheme",
                    ));
                }
            }
            BusKind::RedisSentinel => {
                if self.redis_sentinel_urls.is_empty() {
                    return Err(key_error("bus.redis_sentinel_urls", "list at least one sentinel"));
                }
                for url in &self.redis_sentinel_urls {
                    check_redis_url("bus.redis_sentinel_urls", url)?;
                }
                if self.redis_sentinel_master.trim().is_empty() {
                    return Err(key_error(
                        "bus.redis_sentinel_master",
                        "name the master the sentinels monitor",
                    ));
                }
            }
        }
        // Keys of another kind would be ignored: a node meant for Sentinel would run alone on
        // the memory bus, or on whatever `bus.redis_url` says.
        let sentinel_keys = !self.redis_sentinel_urls.is_empty() || !self.redis_sentinel_master.is_empty();
        if self.kind != BusKind::RedisSentinel && sentinel_keys {
            return Err(key_error(
                "bus.kind",
                format!(
                    "is {} but bus.redis_sentinel_urls or bus.redis_sentinel_master is set: use kind \
                     redis_sentinel or remove them",
                    self.kind.name()
                ),
            ));
        }
        if self.kind != BusKind::RedisCluster && !self.redis_cluster_urls.is_empty() {
            return Err(key_error(
                "bus.kind",
                format!(
                    "is {} but bus.redis_cluster_urls is set: use kind redis_cluster or remove it",
                    self.kind.name()
                ),
            ));
        }
        if let Some(path) = &self.redis_tls_ca_file {
            if path.as_os_str().is_empty() {
                return Err(key_error(
                    "bus.redis_tls_ca_file",
                    "is empty: name a PEM file or leave it unset",
                ));
            }
            // A CA file next to a plain-text URL is ignored for it: the operator who set it
            // expects TLS, and Redis (under Sentinel: a master named by that sentinel) would be
            // reached in plain text.
            let (key, urls): (&str, &[String]) = match self.kind {
                BusKind::Redis => ("bus.redis_url", std::slice::from_ref(&self.redis_url)),
                BusKind::RedisSentinel => ("bus.redis_sentinel_urls", &self.redis_sentinel_urls),
                BusKind::RedisCluster => ("bus.redis_cluster_urls", &self.redis_cluster_urls),
                BusKind::Memory => ("", &[]),
            };
            if let Some(plain) = urls.iter().find(|u| !u.starts_with("rediss://")) {
                return Err(key_error(
                    "bus.redis_tls_ca_file",
                    format!(
                        "is set but {key} has `{}`, not rediss:// (TLS): the CA file would be ignored \
                         and Redis reached in plain text",
                        mask_url_password(plain)
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::Config;

    /// The config from YAML text and `HERALD_*` pairs, or the error's text.
    fn parse(yaml: &str, env: &[(&str, &str)]) -> Result<Config, String> {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Config::parse(yaml, Path::new("test.yaml"), env).map_err(|e| e.to_string())
    }

    #[test]
    fn tls_and_acl_urls_are_taken_and_the_tls_off_switch_is_refused() {
        let ok = parse("bus:\n  kind: redis\n  redis_url: rediss://herald:pw@redis.internal:6380/0\n", &[]);
        assert!(ok.is_ok(), "{ok:?}");
        for (url, says) in [
            ("rediss://h:6380/#insecure", "no #fragment"),
            ("http://h:6379", "redis:// or rediss://"),
            ("redis://", "names no host"),
        ] {
            let err = parse(&format!("bus:\n  kind: redis\n  redis_url: {url}\n"), &[]).unwrap_err();
            assert!(err.contains("bus.redis_url") && err.contains(says), "{url}: {err}");
        }
        let err =
            parse("bus:\n  kind: redis\n  redis_url: redis://u:hunter2hunter2@h/#x\n", &[]).unwrap_err();
        assert!(!err.contains("hunter2"), "password in the error: {err}");
    }

    #[test]
    fn sentinel_needs_its_sentinels_and_master_and_takes_them_from_the_environment() {
        let err = parse("bus:\n  kind: redis_sentinel\n", &[]).unwrap_err();
        assert!(err.contains("bus.redis_sentinel_urls"), "{err}");
        let err = parse("bus:\n  kind: redis_sentinel\n  redis_sentinel_urls: [redis://a:26379]\n", &[])
            .unwrap_err();
        assert!(err.contains("bus.redis_sentinel_master"), "{err}");
        let env = [
            ("HERALD_BUS__KIND", "redis_sentinel"),
            ("HERALD_BUS__REDIS_SENTINEL_URLS", "rediss://a:26379, rediss://u:pw@b:26379"),
            ("HERALD_BUS__REDIS_SENTINEL_MASTER", "herald"),
            ("HERALD_BUS__REDIS_TLS_CA_FILE", "/etc/herald/ca.pem"),
        ];
        let config = parse("", &env).expect("valid");
        assert_eq!(config.bus.redis_sentinel_urls, ["rediss://a:26379", "rediss://u:pw@b:26379"]);
        assert_eq!(config.bus.redis_sentinel_master, "herald");
        assert_eq!(config.bus.redis_tls_ca_file.as_deref(), Some(Path::new("/etc/herald/ca.pem")));
        let shown = format!("{config:?}");
        assert!(shown.contains("rediss://u:***@b:26379") && !shown.contains(":pw@"), "{shown}");
    }

    #[test]
    fn keys_the_kind_would_ignore_are_refused() {
        // A node meant for Sentinel whose kind was forgotten would run alone on the memory bus.
        for kind in ["memory", "redis"] {
            let env = [("HERALD_BUS__KIND", kind), ("HERALD_BUS__REDIS_SENTINEL_URLS", "redis://a:26379")];
            let err = parse("", &env).unwrap_err();
            assert!(err.contains("bus.kind") && err.contains("redis_sentinel"), "{kind}: {err}");
        }
        let err = parse("bus:\n  kind: redis\n  redis_sentinel_master: herald\n", &[]).unwrap_err();
        assert!(err.contains("bus.kind"), "{err}");
        // A CA file with a plain-text URL: no TLS, although the operator asked for it.
        let err = parse(
            "bus:\n  kind: redis\n  redis_url: redis://u:hunter2hunter2@h:6379\n  redis_tls_ca_file: ca.pem\n",
            &[],
        )
        .unwrap_err();
        assert!(err.contains("bus.redis_tls_ca_file") && err.contains("plain text"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        let env = [
            ("HERALD_BUS__KIND", "redis_sentinel"),
            ("HERALD_BUS__REDIS_SENTINEL_URLS", "rediss://a:26379,redis://b:26379"),
            ("HERALD_BUS__REDIS_SENTINEL_MASTER", "herald"),
            ("HERALD_BUS__REDIS_TLS_CA_FILE", "ca.pem"),
        ];
        let err = parse("", &env).unwrap_err();
        assert!(err.contains("bus.redis_tls_ca_file") && err.contains("redis://b:26379"), "{err}");
    }

    #[test]
    fn a_password_a_comma_splits_is_not_shown() {
        let env = [
            ("HERALD_BUS__KIND", "redis_sentinel"),
            ("HERALD_BUS__REDIS_SENTINEL_URLS", "redis://herald:hunter2,hunter3hunter3@s1:26379"),
            ("HERALD_BUS__REDIS_SENTINEL_MASTER", "herald"),
        ];
        let err = parse("", &env).unwrap_err();
        assert!(err.contains("bus.redis_sentinel_urls") && err.contains("%2C"), "{err}");
        assert!(!err.contains("hunter3") && !err.contains("hunter2"), "password in the error: {err}");
    }

    #[test]
    fn cluster_needs_its_seeds_and_takes_them_from_the_environment() {
        let err = parse("bus:\n  kind: redis_cluster\n", &[]).unwrap_err();
        assert!(err.contains("bus.redis_cluster_urls"), "{err}");
        let err =
            parse("bus:\n  kind: redis_cluster\n  redis_cluster_urls: [http://a:7000]\n", &[]).unwrap_err();
        assert!(err.contains("bus.redis_cluster_urls") && err.contains("rediss://"), "{err}");
        let mixed = "bus:\n  kind: redis_cluster\n  redis_cluster_urls: [rediss://a:7000, redis://b:7000]\n";
        let err = parse(mixed, &[]).unwrap_err();
        assert!(err.contains("bus.redis_cluster_urls") && err.contains("mixes"), "{err}");
        let env = [
            ("HERALD_BUS__KIND", "redis_cluster"),
            ("HERALD_BUS__REDIS_CLUSTER_URLS", "rediss://a:7000, rediss://u:pw@b:7000"),
        ];
        let config = parse("", &env).expect("valid");
        assert_eq!(config.bus.redis_cluster_urls, ["rediss://a:7000", "rediss://u:pw@b:7000"]);
        let shown = format!("{config:?}");
        assert!(shown.contains("rediss://u:***@b:7000") && !shown.contains(":pw@"), "{shown}");
        // Seeds under another kind would be ignored.
        let env = [("HERALD_BUS__KIND", "redis"), ("HERALD_BUS__REDIS_CLUSTER_URLS", "redis://a:7000")];
        let err = parse("", &env).unwrap_err();
        assert!(err.contains("bus.kind") && err.contains("redis_cluster"), "{err}");
        let err = parse(
            "bus:\n  kind: redis_cluster\n  redis_cluster_urls: [redis://a:7000]\n  redis_tls_ca_file: ca.pem\n",
            &[],
        )
        .unwrap_err();
        assert!(err.contains("bus.redis_tls_ca_file"), "{err}");
    }
}
