//! The embedded default's demo: the secrets a keyless run makes for itself,
//! a demo user, chat and token, and the banner that tells the user how to
//! connect and publish. No IO: `main` prints the banner.

use std::net::SocketAddr;
use std::time::Duration;

use crate::auth;
use crate::config::{Config, Membership};
use crate::protocol::{ChatId, UserId};

/// How long the demo token is valid.
pub const TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// The OS random number generator failed: there is no safe secret to make.
#[derive(Debug, thiserror::Error)]
#[error("the OS random number generator is unavailable: {0}")]
pub struct RandomError(getrandom::Error);

/// What the embedded default generated for this run. Everything here is
/// already in force in the `Config` it was prepared from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Demo {
    /// The HS256 secret tokens are signed with; `None` when the config has a
    /// public key instead (no private key, so Herald cannot mint a token).
    pub secret: Option<String>,
    /// False when the secret came from the config: then it is not printed.
    pub secret_generated: bool,
    /// The first accepted `POST /api/events` key.
    pub api_key: String,
    /// False when the key came from the config.
    pub api_key_generated: bool,
    /// A fresh user the demo token is for.
    pub user: UserId,
    /// A fresh chat listed in the demo token's `chats` claim.
    pub chat: ChatId,
    /// A token for `user` valid for [`TOKEN_TTL`]; `None` without a secret.
    pub token: Option<String>,
}

impl Demo {
    /// Without a configured JWT key or API key, generates them for this run
    /// and returns what was made; returns `None` when both are configured.
    /// `Config::validate` has already refused keyless non-loopback addresses.
    pub fn prepare(config: &mut Config) -> Result<Option<Demo>, RandomError> {
        let no_jwt_key = config.auth.jwt_secret.is_none() && config.auth.jwt_public_key_file.is_none();
        let no_api_key = config.api.keys.is_empty();
        if !no_jwt_key && !no_api_key {
            return Ok(None);
        }
        if no_jwt_key {
            config.auth.jwt_secret = Some(random_hex(32)?);
        }
        if no_api_key {
            config.api.keys.push(random_hex(24)?);
        }
        let user = UserId::new_v4();
        let chat = ChatId::new_v4();
        let secret = config.auth.jwt_secret.clone();
        let token = secret.as_deref().map(|s| auth::mint_hs256(s, user, &[chat], TOKEN_TTL));
        Ok(Some(Demo {
            secret,
            secret_generated: no_jwt_key,
            // Never empty here: a key was pushed above when the list was.
            api_key: config.api.keys.first().cloned().unwrap_or_default(),
            api_key_generated: no_api_key,
            user,
            chat,
            token,
        }))
    }

    /// The text printed once the node listens on `addr`.
    pub fn banner(&self, config: &Config, addr: SocketAddr) -> String {
        let secret = match (&self.secret, self.secret_generated) {
            (Some(secret), true) => secret.as_str(),
            (Some(_), false) => "(configured)",
            (None, _) => "(none: auth.jwt_public_key_file is configured)",
        };
        let mut out = format!(
            "\nHerald is running on the embedded default (in-memory bus, secrets for this run only).\n\n  \
             JWT secret (HS256): {secret}\n  API key:            {key}\n",
            key = self.api_key,
        );
        let (user, chat) = (self.user, self.chat);
        match &self.token {
            Some(token) => {
                let membership_note = match config.auth.membership {
                    Membership::Token => "the token's `chats` claim lets it subscribe to the demo chat",
                    Membership::Events => {
                        "membership: events -- publish chat.member_added for this user first"
                    }
                    Membership::Open => "membership: open -- any chat may be subscribed",
                };
                out.push_str(&format!(
                    r#"  demo user:          {user}
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
"#
                ));
            }
            None => out.push_str(
                "  (Herald cannot mint tokens here: whoever holds the private key of\n   \
                 auth.jwt_public_key_file signs them)\n",
            ),
        }
        out.push_str(&format!(
            r#"
Publish a message:
  curl -sS -X POST http://{addr}/api/events \
    -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \
    -d '{{"type":"message.sent","chat_id":"{chat}","data":{{"id":"{msg}","content":"Hello!","sender_id":"{user}","created_at":"2026-01-15T10:30:00Z"}}}}'
"#,
            key = self.api_key,
            msg = uuid::Uuid::new_v4(),
        ));
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

    #[test]
    fn a_keyless_config_gets_working_secrets_and_a_token_for_the_demo_chat() -> TestResult {
        let mut config = Config::default();
        let demo = Demo::prepare(&mut config)?.ok_or("a keyless config gets a demo")?;
        assert!(demo.secret_generated && demo.api_key_generated);
        assert_eq!(config.auth.jwt_secret, demo.secret, "the demo secret is the one in force");
        assert_eq!(config.api.keys, vec![demo.api_key.clone()]);
        assert_eq!(demo.api_key.len(), 48);
        let claims = Verifier::from_config(&config.auth)?.verify(demo.token.as_deref().ok_or("token")?)?;
        assert_eq!((claims.sub, claims.chats), (demo.user, vec![demo.chat]));

        let banner = demo.banner(&config, ADDR);
        for needle in [
            demo.secret.as_deref().ok_or("secret")?,
            &demo.api_key,
            &demo.chat.to_string(),
            &format!("ws://{ADDR}/ws?token={}", demo.token.as_deref().ok_or("token")?),
            &format!("Bearer {}", demo.api_key),
        ] {
            assert!(banner.contains(needle), "{needle} missing from:\n{banner}");
        }
        Ok(())
    }

    #[test]
    fn two_runs_get_different_secrets() -> TestResult {
        let (mut a, mut b) = (Config::default(), Config::default());
        let (a, b) = (Demo::prepare(&mut a)?.ok_or("demo")?, Demo::prepare(&mut b)?.ok_or("demo")?);
        assert_ne!(a.secret, b.secret);
        assert_ne!(a.api_key, b.api_key);
        Ok(())
    }

    #[test]
    fn a_fully_configured_node_has_no_demo() -> TestResult {
        let mut config = Config::default();
        config.auth.jwt_secret = Some("configured-secret-0123456789".into());
        config.api.keys = vec!["configured-key-0123456789".into()];
        assert_eq!(Demo::prepare(&mut config)?, None);
        Ok(())
    }

    #[test]
    fn a_configured_secret_signs_the_token_but_is_not_printed() -> TestResult {
        let mut config = Config::default();
        let secret = "configured-secret-0123456789";
        config.auth.jwt_secret = Some(secret.into());
        let demo = Demo::prepare(&mut config)?.ok_or("no api key: demo")?;
        assert!(!demo.secret_generated && demo.api_key_generated);
        Verifier::from_config(&config.auth)?.verify(demo.token.as_deref().ok_or("token")?)?;
        let banner = demo.banner(&config, ADDR);
        assert!(!banner.contains(secret), "{banner}");
        assert!(banner.contains("JWT secret (HS256): (configured)"), "{banner}");
        Ok(())
    }

    #[test]
    fn with_a_public_key_and_no_api_keys_the_generated_key_is_printed() -> TestResult {
        let mut config = Config::default();
        config.auth.jwt_public_key_file = Some("tests/fixtures/rsa_public.pem".into());
        let demo = Demo::prepare(&mut config)?.ok_or("no api key: demo")?;
        assert_eq!((demo.secret.as_deref(), demo.token.as_deref()), (None, None));
        assert!(config.auth.jwt_secret.is_none(), "no secret next to a public key");
        let banner = demo.banner(&config, ADDR);
        assert!(banner.contains(&format!("API key:            {}", demo.api_key)), "{banner}");
        assert!(banner.contains(&format!("Bearer {}", demo.api_key)), "{banner}");
        assert!(!banner.contains("demo token"), "{banner}");
        Ok(())
    }
}
