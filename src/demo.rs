//! The embedded default's demo and what a run generates for itself: the
//! credentials the config lacks, and (only on the true embedded default) a
//! demo user, chat and token, with the banners that say so. No IO: `main`
//! prints the banners.

use std::net::SocketAddr;
use std::time::Duration;

use crate::auth;
use crate::config::{Config, Membership};
use crate::http::DemoPage;
use crate::protocol::{ChatId, UserId};

/// How long the demo token is valid.
pub const TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// The OS random number generator failed: there is no safe secret to make.
#[derive(Debug, thiserror::Error)]
#[error("the OS random number generator is unavailable: {0}")]
pub struct RandomError(getrandom::Error);

/// Whether this run is the true embedded default: no config file, and no
/// JWT key or API key from anywhere (a `HERALD_AUTH__JWT_SECRET` or
/// `HERALD_API__KEYS` variable counts as configured). Only then does the
/// node run a demo: everything the demo hands out was made for this run and
/// guards nothing else, so a request that merely claims a loopback `Host`
/// (a same-host proxy, a port-forward or a tunnel sends exactly that) gets
/// nothing an operator configured.
pub fn is_embedded_default(config: &Config, config_file: bool) -> bool {
    !config_file
        && config.auth.jwt_secret.is_none()
        && config.auth.jwt_public_key_file.is_none()
        && config.api.keys.is_empty()
}

/// What a run made for itself. Everything here is already in force in the
/// `Config` it was prepared from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prepared {
    /// A JWT key and API keys are configured: nothing made, nothing printed.
    Configured,
    /// The true embedded default: both credentials made, and a demo.
    Demo(Demo),
    /// A configured node that lacks a JWT key or API keys (or both): they
    /// were made so the node can run, but there is no demo.
    Generated(Generated),
}

/// The embedded default's demo. Its secret and key are always generated:
/// nothing configured ever reaches the demo page or its banner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Demo {
    /// The generated HS256 secret tokens are signed with.
    pub secret: String,
    /// The generated `POST /api/events` key.
    pub api_key: String,
    /// A fresh user the demo token is for.
    pub user: UserId,
    /// A fresh chat listed in the demo token's `chats` claim.
    pub chat: ChatId,
    /// A token for `user` valid for [`TOKEN_TTL`].
    pub token: String,
}

/// Credentials a configured node lacked and got for this run only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    /// A generated HS256 secret, when no JWT key was configured.
    pub secret: Option<String>,
    /// A generated API key, when `api.keys` was empty.
    pub api_key: Option<String>,
}

/// Makes what `config` lacks for this run: a JWT secret without a JWT key,
/// an API key without API keys, and a demo only when [`is_embedded_default`].
/// `config_file` is whether a config file was loaded. `Config::validate` has
/// already refused a non-loopback address that lacks either.
pub fn prepare(config: &mut Config, config_file: bool) -> Result<Prepared, RandomError> {
    let embedded = is_embedded_default(config, config_file);
    let no_jwt_key = config.auth.jwt_secret.is_none() && config.auth.jwt_public_key_file.is_none();
    let secret = no_jwt_key.then(|| random_hex(32)).transpose()?;
    let api_key = config.api.keys.is_empty().then(|| random_hex(24)).transpose()?;
    if let Some(secret) = &secret {
        config.auth.jwt_secret = Some(secret.clone());
    }
    if let Some(key) = &api_key {
        config.api.keys.push(key.clone());
    }
    Ok(match (embedded, secret, api_key) {
        (true, Some(secret), Some(api_key)) => {
            let (user, chat) = (UserId::new_v4(), ChatId::new_v4());
            let token = auth::mint_hs256(&secret, user, &[chat], TOKEN_TTL);
            Prepared::Demo(Demo { secret, api_key, user, chat, token })
        }
        (_, None, None) => Prepared::Configured,
        (_, secret, api_key) => Prepared::Generated(Generated { secret, api_key }),
    })
}

impl Demo {
    /// What the page at `/` runs as: the demo user, and the generated
    /// secret and key (never configured ones: see [`Demo`]).
    pub fn page(&self) -> DemoPage {
        DemoPage {
            secret: self.secret.clone(),
            user: self.user,
            chat: self.chat,
            api_key: self.api_key.clone(),
            token_ttl: TOKEN_TTL,
        }
    }

    /// The text printed once the node listens on `addr`, with its server
    /// API on `api` (the internal listener when there is one, else `addr`).
    pub fn banner(&self, config: &Config, addr: SocketAddr, api: SocketAddr) -> String {
        let Demo { secret, api_key: key, user, chat, token } = self;
        let membership_note = match config.auth.membership {
            Membership::Token => "the token's `chats` claim lets it subscribe to the demo chat",
            Membership::Events => "membership: events -- publish chat.member_added for this user first",
            Membership::Open => "membership: open -- any chat may be subscribed",
        };
        format!(
            r#"
Herald is running on the embedded default (in-memory bus, secrets for this run only).

  JWT secret (HS256): {secret}
  API key:            {key}
  demo user:          {user}
  demo chat:          {chat}
  demo token (24 h):  {token}
  ({membership_note})

Connect (websocat):
  websocat 'ws://{addr}/ws?token={token}'
  then send: {{"type":"subscribe","chat_id":"{chat}"}}

Or in a browser console:
  const ws = new WebSocket('ws://{addr}/ws?token={token}');
  ws.onmessage = (e) => console.log(e.data);
  ws.onopen = () => ws.send(JSON.stringify({{type: 'subscribe', chat_id: '{chat}'}}));

Publish a message:
  curl -sS -X POST http://{api}/api/events \
    -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \
    -d '{{"type":"message.sent","chat_id":"{chat}","data":{{"id":"{msg}","content":"Hello!","sender_id":"{user}","created_at":"2026-01-15T10:30:00Z"}}}}'
"#,
            msg = uuid::Uuid::new_v4(),
        )
    }
}

impl Generated {
    /// The config keys that were filled in, for the startup log line: names,
    /// never values.
    pub fn keys(&self) -> &'static str {
        match (&self.secret, &self.api_key) {
            (Some(_), Some(_)) => "auth.jwt_secret and api.keys",
            (Some(_), None) => "auth.jwt_secret",
            (None, _) => "api.keys",
        }
    }

    /// The text printed once the node serves its API on `addr`. It shows only what
    /// was generated: nobody else knows those values and they guard only this
    /// run, while without them the node could not be connected to or
    /// published to. What was configured is never printed.
    pub fn banner(&self, addr: SocketAddr) -> String {
        let mut out = String::from(
            "\nHerald generated what its configuration lacks, for this run only (no demo runs\n\
             on a configured node, and configured credentials are never printed):\n\n",
        );
        if let Some(secret) = &self.secret {
            out.push_str(&format!("  JWT secret (HS256): {secret}\n"));
        }
        if let Some(key) = &self.api_key {
            out.push_str(&format!("  API key:            {key}\n"));
        }
        if self.secret.is_some() {
            out.push_str(
                "\nMint a token with it (the same --config, if any):\n  \
                 HERALD_AUTH__JWT_SECRET=<the secret above> herald token --sub <user uuid> --chat <chat uuid>\n",
            );
        }
        if let Some(key) = &self.api_key {
            out.push_str(&format!(
                "\nPublish with it:\n  curl -sS -X POST http://{addr}/api/events \\\n    \
                 -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' -d '<event>'\n"
            ));
        }
        let them = if self.secret.is_some() && self.api_key.is_some() { "them" } else { "it" };
        out.push_str(&format!("\nConfigure {} to keep {them} across restarts.\n", self.keys()));
        out
    }
}

/// `bytes` random bytes as lowercase hex: secrets and API keys.
pub fn random_hex(bytes: usize) -> Result<String, RandomError> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(RandomError)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Verifier;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    const ADDR: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 8080));
    const SECRET: &str = "configured-secret-0123456789";
    const KEY: &str = "configured-key-0123456789";

    fn demo(prepared: Prepared) -> Result<Demo, String> {
        match prepared {
            Prepared::Demo(demo) => Ok(demo),
            other => Err(format!("expected a demo, got {other:?}")),
        }
    }

    fn generated(prepared: Prepared) -> Result<Generated, String> {
        match prepared {
            Prepared::Generated(generated) => Ok(generated),
            other => Err(format!("expected generated credentials and no demo, got {other:?}")),
        }
    }

    #[test]
    fn the_embedded_default_gets_working_secrets_and_a_token_for_the_demo_chat() -> TestResult {
        let mut config = Config::default();
        let demo = demo(prepare(&mut config, false)?)?;
        assert_eq!(config.auth.jwt_secret.as_deref(), Some(demo.secret.as_str()), "the secret in force");
        assert_eq!(config.api.keys, vec![demo.api_key.clone()]);
        assert_eq!(demo.api_key.len(), 48);
        let claims = Verifier::from_config(&config.auth)?.verify(&demo.token)?;
        assert_eq!((claims.sub, claims.chats), (demo.user, vec![demo.chat]));
        let page = demo.page();
        assert_eq!((page.secret, page.api_key), (demo.secret.clone(), demo.api_key.clone()));

        let banner = demo.banner(&config, ADDR, ADDR);
        for needle in [
            &demo.secret,
            &demo.api_key,
            &demo.chat.to_string(),
            &format!("ws://{ADDR}/ws?token={}", demo.token),
            &format!("Bearer {}", demo.api_key),
        ] {
            assert!(banner.contains(needle.as_str()), "{needle} missing from:\n{banner}");
        }
        Ok(())
    }

    #[test]
    fn two_runs_get_different_secrets() -> TestResult {
        let (mut a, mut b) = (Config::default(), Config::default());
        let (a, b) = (demo(prepare(&mut a, false)?)?, demo(prepare(&mut b, false)?)?);
        assert_ne!(a.secret, b.secret);
        assert_ne!(a.api_key, b.api_key);
        Ok(())
    }

    #[test]
    fn only_no_config_file_and_no_credential_is_the_embedded_default() {
        let mut secret = Config::default();
        secret.auth.jwt_secret = Some(SECRET.into());
        let mut public = Config::default();
        public.auth.jwt_public_key_file = Some("tests/fixtures/rsa_public.pem".into());
        let mut key = Config::default();
        key.api.keys = vec![KEY.into()];
        assert!(is_embedded_default(&Config::default(), false));
        assert!(!is_embedded_default(&Config::default(), true), "a config file, even without credentials");
        for configured in [secret, public, key] {
            assert!(!is_embedded_default(&configured, false), "{:?} {:?}", configured.auth, configured.api);
        }
    }

    #[test]
    fn a_fully_configured_node_gets_nothing() -> TestResult {
        for config_file in [false, true] {
            let mut config = Config::default();
            config.auth.jwt_secret = Some(SECRET.into());
            config.api.keys = vec![KEY.into()];
            assert_eq!(prepare(&mut config, config_file)?, Prepared::Configured);
            assert_eq!((config.auth.jwt_secret.as_deref(), config.api.keys.len()), (Some(SECRET), 1));
        }
        Ok(())
    }

    /// Issue 17: a configured secret used to sign the demo's tokens.
    #[test]
    fn a_configured_secret_gets_a_generated_key_and_no_demo() -> TestResult {
        for config_file in [false, true] {
            let mut config = Config::default();
            config.auth.jwt_secret = Some(SECRET.into());
            let generated = generated(prepare(&mut config, config_file)?)?;
            assert_eq!(generated.secret, None);
            let key = generated.api_key.clone().ok_or("a generated API key")?;
            assert_eq!(
                (config.auth.jwt_secret.as_deref(), config.api.keys.clone()),
                (Some(SECRET), vec![key.clone()])
            );
            let banner = generated.banner(ADDR);
            assert!(!banner.contains(SECRET), "{banner}");
            assert!(banner.contains(&format!("API key:            {key}")), "{banner}");
            assert!(banner.contains(&format!("Bearer {key}")), "{banner}");
            assert!(!banner.contains("JWT secret") && !banner.contains("demo token"), "{banner}");
        }
        Ok(())
    }

    #[test]
    fn a_configured_key_gets_a_generated_secret_and_no_demo() -> TestResult {
        let mut config = Config::default();
        config.api.keys = vec![KEY.into()];
        let generated = generated(prepare(&mut config, false)?)?;
        assert_eq!(generated.api_key, None);
        let secret = generated.secret.clone().ok_or("a generated secret")?;
        assert_eq!((config.auth.jwt_secret.as_deref(), config.api.keys.len()), (Some(secret.as_str()), 1));
        let banner = generated.banner(ADDR);
        assert!(!banner.contains(KEY), "{banner}");
        assert!(banner.contains(&format!("JWT secret (HS256): {secret}")), "{banner}");
        assert!(!banner.contains("API key") && !banner.contains("demo token"), "{banner}");
        Ok(())
    }

    #[test]
    fn a_config_file_without_credentials_gets_both_and_no_demo() -> TestResult {
        let mut config = Config::default();
        let generated = generated(prepare(&mut config, true)?)?;
        assert!(generated.secret.is_some() && generated.api_key.is_some());
        assert_eq!(generated.keys(), "auth.jwt_secret and api.keys");
        assert!(!generated.banner(ADDR).contains("demo token"));
        Ok(())
    }

    #[test]
    fn with_a_public_key_and_no_api_keys_only_the_generated_key_is_printed() -> TestResult {
        let mut config = Config::default();
        config.auth.jwt_public_key_file = Some("tests/fixtures/rsa_public.pem".into());
        let generated = generated(prepare(&mut config, false)?)?;
        assert_eq!(generated.secret, None);
        assert!(config.auth.jwt_secret.is_none(), "no secret next to a public key");
        let key = generated.api_key.clone().ok_or("a generated API key")?;
        let banner = generated.banner(ADDR);
        assert!(banner.contains(&format!("API key:            {key}")), "{banner}");
        assert!(!banner.contains("demo token") && !banner.contains("JWT secret"), "{banner}");
        Ok(())
    }
}
