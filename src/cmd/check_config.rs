//! `herald check-config`: checks what `Config::load` cannot (the public key
//! file parses) and renders the effective config as YAML with every secret
//! masked, so it can be pasted into a bug report. With `--connect` it also
//! asks the configured Redis for a PING.

use std::time::Duration;

use crate::auth::{KeyError, Verifier};
use crate::config::{BusKind, Config};

/// How long `--connect` waits for Redis to answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The config loaded but cannot be shown or used.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("cannot render the effective config: {0}")]
    Render(String),
    #[error("bus.redis_url {url}: {message}")]
    Redis { url: String, message: String },
}

/// Checks `config` beyond `Config::load` without binding or connecting, and
/// returns the effective config as YAML with secrets masked.
pub fn check(config: &Config) -> Result<String, CheckError> {
    if config.auth.jwt_public_key_file.is_some() {
        Verifier::from_config(&config.auth)?;
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

/// `--connect`: PINGs the configured Redis (password masked in any error);
/// says so when the bus is in memory and there is nothing to reach.
pub async fn connect(config: &Config) -> Result<String, CheckError> {
    if config.bus.kind != BusKind::Redis {
        return Ok("bus.kind is memory: nothing to connect to".into());
    }
    let url = mask_url_password(&config.bus.redis_url);
    let fail = |message: String| CheckError::Redis { url: url.clone(), message };
    let ping = async {
        let client = redis::Client::open(config.bus.redis_url.as_str())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, ping).await {
        Ok(Ok(_)) => Ok(format!("redis at {url} answers PING")),
        Ok(Err(e)) => Err(fail(e.to_string())),
        Err(_) => Err(fail(format!("no answer within {}", humantime::format_duration(CONNECT_TIMEOUT)))),
    }
}

/// A copy with the JWT secret, every API key and a Redis password masked.
fn masked(config: &Config) -> Config {
    let mask = |s: &String| format!("<masked, {} bytes>", s.len());
    let mut copy = config.clone();
    copy.auth.jwt_secret = config.auth.jwt_secret.as_ref().map(mask);
    copy.api.keys = config.api.keys.iter().map(mask).collect();
    copy.bus.redis_url = mask_url_password(&config.bus.redis_url);
    copy
}

/// `redis://user:pass@host/0` -> `redis://user:***@host/0`.
fn mask_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else { return url.to_string() };
    match rest[..at].split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***{}", &rest[at..]),
        None => url.to_string(),
    }
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
        let text = check(&config)?;
        for secret in
            ["very-secret-0123456789", "publisher-key-0123456789", "second-key-0123456789", "hunter2"]
        {
            assert!(!text.contains(secret), "{secret} leaked:\n{text}");
        }
        for shown in [
            "<masked, 22 bytes>",
            "redis://herald:***@10.0.0.5:6379/0",
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
        for url in ["redis://127.0.0.1:6379", "redis://user@host", "redis://h/0?x=a@b"] {
            assert_eq!(mask_url_password(url), url);
        }
        assert_eq!(mask_url_password("redis://:pw@h:1"), "redis://:***@h:1");
    }

    #[test]
    fn an_unreadable_public_key_is_named() {
        let mut config = Config::default();
        config.auth.jwt_public_key_file = Some("/nonexistent/key.pem".into());
        let err = check(&config).map(|_| ()).unwrap_err().to_string();
        assert!(err.contains("auth.jwt_public_key_file /nonexistent/key.pem"), "{err}");
    }
}
