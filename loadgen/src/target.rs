//! The server under test: parses `--url`, resolves it, and refuses anything but loopback unless
//! `--allow-remote` is given.

use std::net::{IpAddr, SocketAddr};

use anyhow::{bail, Context as _};

/// Where requests go and how they are addressed.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) addr: SocketAddr,
    /// `Host` header value: the authority as the user wrote it.
    pub(crate) host: String,
    /// Path prefix without a trailing slash ("" for the root).
    pub(crate) prefix: String,
}

impl Target {
    /// Path of the WebSocket endpoint carrying `token` in the query.
    pub(crate) fn ws_path(&self, token: &str) -> String {
        format!("{}/ws?token={token}", self.prefix)
    }

    pub(crate) fn events_path(&self) -> String {
        format!("{}/api/events", self.prefix)
    }

    pub(crate) fn metrics_path(&self) -> String {
        format!("{}/metrics", self.prefix)
    }
}

/// The pieces of a base URL: host (no brackets), port, authority, path prefix.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct UrlParts {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) authority: String,
    pub(crate) prefix: String,
}

/// Parses `http://host[:port][/prefix]` (also `ws://`). TLS is not supported.
pub(crate) fn parse_url(url: &str) -> anyhow::Result<UrlParts> {
    let rest = if let Some(r) = url.strip_prefix("http://").or_else(|| url.strip_prefix("ws://")) {
        r
    } else if url.starts_with("https://") || url.starts_with("wss://") {
        bail!("{url}: TLS is not supported; point --url at the plain-HTTP listener");
    } else {
        bail!("{url}: expected http://host:port");
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if authority.is_empty() {
        bail!("{url}: missing host");
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']').with_context(|| format!("{url}: unclosed '['"))?;
        (h, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        Some(p) => p.parse().with_context(|| format!("{url}: bad port {p:?}"))?,
        None => 80,
    };
    let prefix = path.split(['?', '#']).next().unwrap_or("").trim_end_matches('/').to_owned();
    Ok(UrlParts { host: host.to_owned(), port, authority: authority.to_owned(), prefix })
}

/// Refuses non-loopback addresses unless the user said `--allow-remote`.
pub(crate) fn check_loopback(url: &str, addrs: &[SocketAddr], allow_remote: bool) -> anyhow::Result<()> {
    if allow_remote {
        return Ok(());
    }
    if let Some(bad) = addrs.iter().find(|a| !is_loopback(a.ip())) {
        bail!(
            "{url} resolves to {}, which is not a loopback address. loadgen only targets this machine \
             (127.0.0.0/8, ::1) by default; pass --allow-remote if you really mean to load a server you \
             operate elsewhere",
            bad.ip()
        );
    }
    Ok(())
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

/// Parses and resolves `url`, enforcing the loopback rule on every resolved address.
pub(crate) async fn resolve(url: &str, allow_remote: bool) -> anyhow::Result<Target> {
    let parts = parse_url(url)?;
    let addrs: Vec<SocketAddr> = match parts.host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, parts.port)],
        Err(_) => tokio::net::lookup_host((parts.host.as_str(), parts.port))
            .await
            .with_context(|| format!("resolving {}", parts.host))?
            .collect(),
    };
    if addrs.is_empty() {
        bail!("{} resolves to no address", parts.host);
    }
    check_loopback(url, &addrs, allow_remote)?;
    // Prefer IPv4 (the usual listen address) when a name resolves to both families.
    let addr = addrs.iter().find(|a| a.is_ipv4()).copied().unwrap_or(addrs[0]);
    Ok(Target { addr, host: parts.authority, prefix: parts.prefix })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(host: &str, port: u16, authority: &str, prefix: &str) -> UrlParts {
        UrlParts { host: host.into(), port, authority: authority.into(), prefix: prefix.into() }
    }

    #[test]
    fn parses_base_urls() {
        assert_eq!(
            parse_url("http://127.0.0.1:8080").ok(),
            Some(parts("127.0.0.1", 8080, "127.0.0.1:8080", ""))
        );
        assert_eq!(parse_url("http://localhost/").ok(), Some(parts("localhost", 80, "localhost", "")));
        assert_eq!(
            parse_url("ws://[::1]:9000/herald/").ok(),
            Some(parts("::1", 9000, "[::1]:9000", "/herald"))
        );
        assert!(parse_url("https://127.0.0.1").is_err());
        assert!(parse_url("127.0.0.1:8080").is_err());
        assert!(parse_url("http://127.0.0.1:notaport").is_err());
        assert!(parse_url("http:///x").is_err());
    }

    #[test]
    fn only_loopback_without_allow_remote() {
        let ok: Vec<SocketAddr> = ["127.0.0.1:80", "127.0.0.2:80", "[::1]:80", "[::ffff:127.0.0.1]:80"]
            .iter()
            .map(|s| s.parse().expect("literal"))
            .collect();
        assert!(check_loopback("u", &ok, false).is_ok());
        for remote in ["10.0.0.1:80", "192.168.1.1:80", "8.8.8.8:80", "[2001:db8::1]:80", "0.0.0.0:80"] {
            let addr: SocketAddr = remote.parse().expect("literal");
            let err = check_loopback("u", &[ok[0], addr], false).expect_err("refused");
            assert!(err.to_string().contains("--allow-remote"), "{err}");
            assert!(check_loopback("u", &[addr], true).is_ok());
        }
    }

    #[tokio::test]
    async fn resolve_enforces_the_rule() {
        let t = resolve("http://127.0.0.1:8080/p", false).await.expect("loopback resolves");
        assert_eq!(t.addr, "127.0.0.1:8080".parse().expect("literal"));
        assert_eq!(t.ws_path("abc"), "/p/ws?token=abc");
        assert_eq!(t.events_path(), "/p/api/events");
        assert!(resolve("http://192.0.2.1:8080", false).await.is_err());
    }
}
