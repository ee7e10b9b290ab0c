//! `herald token` mints an HS256 token with the configured secret;
//! `herald check-token` verifies one through the same `auth::Verifier` as
//! `/ws` and, when it is refused, reads the unverified token to say exactly
//! why (which expiry, which audience, which algorithm).

use std::fmt;
use std::time::{Duration, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;
use serde_json::Value;

use crate::auth::{self, AuthError, Claims, KeyError, Verifier};
use crate::config::AuthConfig;
use crate::protocol::{ChatId, UserId};

/// Why no token could be minted.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error(
        "auth.jwt_public_key_file is configured: Herald holds only the public key and cannot mint tokens; \
         sign them where the private key is"
    )]
    PublicKeyOnly,
    #[error("no auth.jwt_secret configured (in --config or HERALD_AUTH__JWT_SECRET): nothing to sign with")]
    NoSecret,
    #[error("--ttl must be at least 1s")]
    ZeroTtl,
    #[error("cannot sign the token: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
}

/// The claims Herald reads, plus `iss` / `aud` when the config checks them.
#[derive(Serialize)]
struct MintClaims<'a> {
    sub: UserId,
    exp: u64,
    iat: u64,
    chats: &'a [ChatId],
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

/// Mints an HS256 token that `/ws` on a node with this config accepts.
pub fn mint(auth: &AuthConfig, sub: UserId, chats: &[ChatId], ttl: Duration) -> Result<String, MintError> {
    let Some(secret) = &auth.jwt_secret else {
        return Err(if auth.jwt_public_key_file.is_some() {
            MintError::PublicKeyOnly
        } else {
            MintError::NoSecret
        });
    };
    if ttl.as_secs() == 0 {
        return Err(MintError::ZeroTtl);
    }
    let now = auth::now_secs();
    let claims = MintClaims {
        sub,
        exp: now.saturating_add(ttl.as_secs()),
        iat: now,
        chats,
        iss: auth.issuer.as_deref(),
        aud: auth.audience.as_deref(),
    };
    let key = EncodingKey::from_secret(secret.as_bytes());
    Ok(jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key)?)
}

/// What `/ws` would do with a token.
#[derive(Debug)]
pub enum Verdict {
    Accepted(Claims),
    /// `error` is exactly what `/ws` answers (its `reason()` is the 401
    /// body's `error`); `detail` is what the token itself says about it.
    Refused {
        error: AuthError,
        detail: Option<String>,
    },
}

/// Verifies `token` with the verifier `/ws` would build from `auth`.
pub fn check(auth: &AuthConfig, token: &str) -> Result<Verdict, KeyError> {
    let verifier = Verifier::from_config(auth)?;
    let token = token.trim();
    Ok(match verifier.verify(token) {
        Ok(claims) => Verdict::Accepted(claims),
        Err(error) => {
            let detail = explain(&error, auth, verifier.algorithm(), token);
            Verdict::Refused { error, detail }
        }
    })
}

/// Reads the unverified token for the facts behind a refusal.
fn explain(error: &AuthError, auth: &AuthConfig, accepted: Algorithm, token: &str) -> Option<String> {
    let payload = unverified(token, 1);
    let claim = |name: &str| payload.as_ref().and_then(|p| p.get(name)).cloned();
    let leeway = humantime::format_duration(auth.leeway);
    match error {
        AuthError::Missing => None,
        AuthError::Expired => {
            let exp = claim("exp")?.as_u64()?;
            let ago = auth::now_secs().saturating_sub(exp);
            Some(format!(
                "expired at {} ({} ago; auth.leeway {leeway})",
                timestamp(exp),
                humantime::format_duration(Duration::from_secs(ago))
            ))
        }
        AuthError::NotYetValid => {
            let nbf = claim("nbf")?.as_u64()?;
            Some(format!("not valid before {} (auth.leeway {leeway})", timestamp(nbf)))
        }
        AuthError::BadSignature => Some(match accepted {
            Algorithm::HS256 => "it was not signed with auth.jwt_secret".to_string(),
            _ => "it was not signed by the private key of auth.jwt_public_key_file".to_string(),
        }),
        AuthError::Algorithm => {
            let alg = unverified(token, 0).and_then(|h| h.get("alg").cloned()).unwrap_or(Value::Null);
            Some(format!("its header says alg {alg}; this config accepts only {accepted:?}"))
        }
        AuthError::WrongIssuer => Some(format!(
            "its iss is {}; auth.issuer is {:?}",
            claim("iss").map_or("missing".into(), |v| v.to_string()),
            auth.issuer.as_deref().unwrap_or_default()
        )),
        AuthError::WrongAudience => Some(format!(
            "its aud is {}; auth.audience is {:?}",
            claim("aud").map_or("missing".into(), |v| v.to_string()),
            auth.audience.as_deref().unwrap_or_default()
        )),
        AuthError::Malformed => Some(malformed(token, payload.as_ref())),
        // Only the running node knows its revocations; the signature check never says this.
        AuthError::Revoked => None,
    }
}

/// The most specific reason a token does not parse as Herald's claims.
fn malformed(token: &str, payload: Option<&Value>) -> String {
    if token.split('.').count() != 3 {
        return "a JWT has three base64url parts separated by dots".into();
    }
    if let Some(alg) = unverified(token, 0).and_then(|h| h.get("alg").cloned()) {
        if alg == "none" {
            return "its header says alg \"none\": unsigned tokens are never accepted".into();
        }
    } else {
        return "its header is not base64url JSON with an `alg`".into();
    }
    let Some(payload) = payload else { return "its payload is not base64url JSON".into() };
    match payload.get("sub") {
        None => return "it has no `sub` claim".into(),
        Some(Value::String(s)) if s.parse::<UserId>().is_ok() => {}
        Some(other) => return format!("its `sub` {other} is not a UUID"),
    }
    if !payload.get("exp").is_some_and(Value::is_u64) {
        return "it has no numeric `exp` claim".into();
    }
    if let Some(chats) = payload.get("chats") {
        let all_uuids = chats
            .as_array()
            .is_some_and(|list| list.iter().all(|c| c.as_str().is_some_and(|s| s.parse::<ChatId>().is_ok())));
        if !all_uuids {
            return "its `chats` claim is not a list of UUIDs".into();
        }
    }
    "it lacks a claim this config requires (iss / aud when configured) or has a bad one".into()
}

/// Part `index` (0 header, 1 payload) of a token as JSON, unverified.
fn unverified(token: &str, index: usize) -> Option<Value> {
    let part = token.split('.').nth(index)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(part.trim_end_matches('=')).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Seconds since the epoch as RFC 3339 UTC.
fn timestamp(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Accepted(claims) => {
                let left = claims.exp.saturating_sub(auth::now_secs());
                writeln!(f, "valid: /ws accepts this token")?;
                writeln!(f, "  sub:   {}", claims.sub)?;
                writeln!(
                    f,
                    "  exp:   {} (in {})",
                    timestamp(claims.exp),
                    humantime::format_duration(Duration::from_secs(left))
                )?;
                let chats: Vec<String> = claims.chats.iter().map(ToString::to_string).collect();
                write!(f, "  chats: [{}]", chats.join(", "))
            }
            Verdict::Refused { error, detail } => {
                write!(f, "refused ({}): {error}", error.reason())?;
                match detail {
                    Some(detail) => write!(f, ": {detail}"),
                    None => Ok(()),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn hs(audience: Option<&str>) -> AuthConfig {
        AuthConfig {
            jwt_secret: Some("unit-test-secret-0123456789".into()),
            audience: audience.map(Into::into),
            ..Default::default()
        }
    }

    fn refusal(auth: &AuthConfig, token: &str) -> Result<(AuthError, String), Box<dyn std::error::Error>> {
        match check(auth, token)? {
            v @ Verdict::Refused { .. } => {
                let text = v.to_string();
                let Verdict::Refused { error, .. } = v else { unreachable!() };
                Ok((error, text))
            }
            Verdict::Accepted(c) => Err(format!("accepted {c:?}").into()),
        }
    }

    #[test]
    fn a_minted_token_carries_the_configured_party_and_verifies() -> TestResult {
        let mut auth = hs(Some("herald"));
        auth.issuer = Some("https://auth.example".into());
        let (user, chat) = (UserId::from_u128(1), ChatId::from_u128(2));
        let token = mint(&auth, user, &[chat], Duration::from_secs(600))?;
        let Verdict::Accepted(claims) = check(&auth, &token)? else { return Err("refused".into()) };
        assert_eq!((claims.sub, claims.chats), (user, vec![chat]));
        let payload = unverified(&token, 1).ok_or("payload")?;
        assert_eq!(
            (payload["aud"].as_str(), payload["iss"].as_str()),
            (Some("herald"), Some("https://auth.example"))
        );
        Ok(())
    }

    #[test]
    fn minting_needs_a_secret() {
        let user = UserId::from_u128(1);
        let ttl = Duration::from_secs(60);
        let public = AuthConfig { jwt_public_key_file: Some("k.pem".into()), ..Default::default() };
        assert!(matches!(mint(&public, user, &[], ttl), Err(MintError::PublicKeyOnly)));
        assert!(matches!(mint(&AuthConfig::default(), user, &[], ttl), Err(MintError::NoSecret)));
        assert!(matches!(mint(&hs(None), user, &[], Duration::ZERO), Err(MintError::ZeroTtl)));
    }

    #[test]
    fn refusals_say_what_the_token_says() -> TestResult {
        let auth = hs(Some("herald"));
        let user = UserId::from_u128(1);
        let secret = auth.jwt_secret.as_deref().ok_or("secret")?;
        let key = EncodingKey::from_secret(secret.as_bytes());
        let expired = serde_json::json!({"sub": user, "exp": 1_000_000_000u64, "aud": "herald"});
        let expired = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &expired, &key)?;
        let (error, text) = refusal(&auth, &expired)?;
        assert_eq!(error, AuthError::Expired);
        assert!(text.contains("expired at 2001-09-09T01:46:40Z"), "{text}");
        assert!(text.starts_with("refused (token_expired)"), "{text}");

        let forger = AuthConfig { jwt_secret: Some("another-secret-0123456789".into()), ..auth.clone() };
        let other = mint(&forger, user, &[], Duration::from_secs(60))?;
        let (error, text) = refusal(&auth, &other)?;
        assert_eq!(error, AuthError::BadSignature, "another secret signed it");
        assert!(text.contains("auth.jwt_secret"), "{text}");
        let wrong_aud = serde_json::json!({"sub": user, "exp": auth::now_secs() + 60, "aud": "elsewhere"});
        let wrong_aud = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &wrong_aud, &key)?;
        let (error, text) = refusal(&auth, &wrong_aud)?;
        assert_eq!(error, AuthError::WrongAudience);
        assert!(text.contains(r#"its aud is "elsewhere"; auth.audience is "herald""#), "{text}");

        let hs384 =
            jsonwebtoken::encode(&Header::new(Algorithm::HS384), &serde_json::json!({"sub": user}), &key)?;
        let (error, text) = refusal(&auth, &hs384)?;
        assert_eq!(error, AuthError::Algorithm);
        assert!(text.contains(r#"alg "HS384"; this config accepts only HS256"#), "{text}");

        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiIwMDAwMDAwMC0wMDAwLTAwMDAtMDAwMC0wMDAwMDAwMDAwMDciLCJleHAiOjQxMDI0NDQ4MDB9.";
        let (_, text) = refusal(&auth, none)?;
        assert!(text.contains("alg \"none\""), "{text}");
        let (error, text) = refusal(&auth, "not-a-token")?;
        assert_eq!(error, AuthError::Malformed);
        assert!(text.contains("three base64url parts"), "{text}");
        Ok(())
    }
}
