//! `herald check-config`: checks what `Config::load` cannot (the public key
//! file parses; the Redis URLs and the CA file are usable, as startup reads
//! them) and renders the effective config as YAML with every secret
//! masked, so it can be pasted into a bug report. With `--connect` it also
//! reaches every configured Redis server (each sentinel and the master it
//! names) and reports each.

use std::time::Duration;

use crate::auth::{KeyError, Verifier};
use crate::bus::redis::endpoint::{Endpoint, CHECK_ALL_STEPS};
use crate::config::{mask_url_password, BusKind, Config};

/// How long `--connect` waits for Redis to answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The config loaded but cannot be shown or used.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("cannot render the effective config: {0}")]
    Render(String),
    #[error("{what}: {message}")]
    Redis { what: String, message: String },
}

/// Checks `config` beyond `Config::load` without binding or connecting, and
/// returns the effective config as YAML with secrets masked.
pub fn check(config: &Config) -> Result<String, CheckError> {
    if config.auth.jwt_public_key_file.is_some() {
        Verifier::from_config(&config.auth)?;
    }
    // What startup reads before it connects: every URL parses, the CA file holds trust anchors.
    if config.bus.kind.is_redis() {
        Endpoint::from_config(&config.bus)
            .map_err(|e| CheckError::Redis { what: "bus".into(), message: e.to_string() })?;
    }
    // Rendered from the struct, not a map, so the keys keep the documented order.
    let yaml = serde_saphyr::to_string(&masked(config)).map_err(|e| CheckError::Render(e.to_string()))?;
    let mut notes = String::new();
    if config.auth.jwt_secret.is_none() && config.auth.jwt_public_key_file.is_none() {
        notes.push_str("# no auth.jwt_secret or auth.jwt_public_key_file: each run makes a random secret\n");
    }
    if config.api.keys.is_empty() {
        notes.push_str("# no api.keys: each run makes a random API key\n");
    }
    Ok(format!("# effective config (file + HERALD_* environment + defaults); secrets masked\n{notes}{yaml}"))
}

/// `--connect`: reaches every configured Redis server (the one server; or each sentinel, and
/// the master they name) and says, per server, that it answered or why not (passwords masked);
/// says so when the bus is in memory and there is nothing to reach.
pub async fn connect(config: &Config) -> Result<String, CheckError> {
    if config.bus.kind == BusKind::Memory {
        return Ok("bus.kind is memory: nothing to connect to".into());
    }
    let endpoint = Endpoint::from_config(&config.bus)
        .map_err(|e| CheckError::Redis { what: "bus".into(), message: e.to_string() })?;
    // A safety net: every step of `check_all` has its own deadline.
    let limit = CONNECT_TIMEOUT * (CHECK_ALL_STEPS + 1);
    let checked = tokio::time::timeout(limit, endpoint.check_all(CONNECT_TIMEOUT)).await.map_err(|_| {
        CheckError::Redis {
            what: endpoint.describe(),
            message: format!("no answer within {}", humantime::format_duration(limit)),
        }
    })?;
    let mut report = String::new();
    let mut failed = 0;
    for (what, result) in checked {
        match result {
            Ok(said) => report.push_str(&format!("ok     {what}: {said}\n")),
            Err(failure) => {
                failed += 1;
                report.push_str(&format!("FAILED {failure}\n"));
            }
        }
    }
    if failed > 0 {
        return Err(CheckError::Redis {
            what: format!("{failed} of the configured Redis servers"),
            message: format!("not reachable as configured:\n{}", report.trim_end()),
        });
    }
    Ok(report.trim_end().to_string())
}

/// A copy with the JWT secret, every API key and every Redis password masked.
fn masked(config: &Config) -> Config {
    let mask = |s: &String| format!("<masked, {} bytes>", s.len());
    let mut copy = config.clone();
    copy.auth.jwt_secret = config.auth.jwt_secret.as_ref().map(mask);
    copy.api.keys = config.api.keys.iter().map(mask).collect();
    copy.bus.redis_url = mask_url_password(&config.bus.redis_url);
    for urls in [&mut copy.bus.redis_cluster_urls, &mut copy.bus.redis_sentinel_urls] {
        for url in urls.iter_mut() {
            *url = mask_url_password(url);
        }
    }
    copy
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    #[test]
    fn secrets_are_masked_and_the_rest_is_shown() -> TestResult {
        let mut config = Config::default();
        config.auth.jwt_secret = Some("very-secret-0123456789".into());
        config.api.keys = vec!["publisher-key-0123456789".into(), "second-key-0123456789".into()];
        config.bus.redis_url = "redis://herald:hunter2hunter2@10.0.0.5:6379/0".into();
        config.bus.redis_sentinel_urls = vec!["rediss://herald:hunter3hunter3@10.0.0.6:26379".into()];
        let text = check(&config)?;
        for secret in [
            "very-secret-0123456789",
            "publisher-key-0123456789",
            "second-key-0123456789",
            "hunter2",
            "hunter3",
        ] {
            assert!(!text.contains(secret), "{secret} leaked:\n{text}");
        }
        for shown in [
            "<masked, 22 bytes>",
            "redis://herald:***@10.0.0.5:6379/0",
            "rediss://herald:***@10.0.0.6:26379",
            "127.0.0.1:8080",
            "ping_interval",
            "30s",
        ] {
            assert!(text.contains(shown), "{shown} missing:\n{text}");
        }
        Ok(())
    }

    #[test]
    fn urls_without_a_password_are_unchanged() {
        for url in ["redis://127.0.0.1:6379", "rediss://h:6380/0"] {
            assert_eq!(mask_url_password(url), url);
        }
        // An `@` anywhere is taken as the end of a password: masking too much is harmless.
        assert_eq!(mask_url_password("redis://h/0?x=a@b"), "redis://***@b");
        assert_eq!(mask_url_password("redis://:pw@h:1"), "redis://:***@h:1");
        // A lone userinfo is taken as a password by some clients: masked too.
        assert_eq!(mask_url_password("rediss://pw@h:1/0"), "rediss://***@h:1/0");
    }

    #[test]
    fn an_unreadable_public_key_is_named() {
        let mut config = Config::default();
        config.auth.jwt_public_key_file = Some("/nonexistent/key.pem".into());
        let err = check(&config).map(|_| ()).unwrap_err().to_string();
        assert!(err.contains("auth.jwt_public_key_file /nonexistent/key.pem"), "{err}");
    }
}
