//! JWT verification: a token string in, a user's claims out. Knows nothing of
//! HTTP or sockets; the `/ws` handler turns [`AuthError`] into a 401.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::AuthConfig;
use crate::protocol::{ChatId, UserId};

/// What a verified token says about its holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: UserId,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Chats the user may subscribe to (`membership: token`).
    #[serde(default)]
    pub chats: Vec<ChatId>,
    /// Issued at, seconds since the Unix epoch: judged against revocations
    /// and removals (a token without it counts as issued before any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
}

/// Why a token was refused; `reason()` is the JSON `error` of the 401.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no token: pass ?token=<jwt> or Authorization: Bearer <jwt>")]
    Missing,
    #[error("token is expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token algorithm is not accepted")]
    Algorithm,
    #[error("token issuer does not match auth.issuer")]
    WrongIssuer,
    #[error("token audience does not match auth.audience")]
    WrongAudience,
    #[error("token is malformed or lacks the required claims (sub as UUID, exp)")]
    Malformed,
    /// Issued before a revocation of its user (`POST /api/users/{id}/revoke`).
    #[error("token was revoked")]
    Revoked,
}

impl AuthError {
    /// Stable machine-readable reason for the 401 body.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing_token",
            AuthError::Expired => "token_expired",
            AuthError::NotYetValid => "token_not_yet_valid",
            AuthError::BadSignature => "invalid_signature",
            AuthError::Algorithm => "algorithm_not_allowed",
            AuthError::WrongIssuer | AuthError::WrongAudience => "invalid_issuer_or_audience",
            AuthError::Malformed => "malformed_token",
            AuthError::Revoked => "token_revoked",
        }
    }
}

/// A key could not be loaded at startup.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("auth: no auth.jwt_secret or auth.jwt_public_key_file configured")]
    NoKey,
    #[error("auth.jwt_public_key_file {path}: {message}")]
    PublicKey { path: String, message: String },
}

/// Verifies tokens with the configured key and checks.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    alg: Algorithm,
}

impl Verifier {
    pub fn from_config(auth: &AuthConfig) -> Result<Verifier, KeyError> {
        let (key, alg) = if let Some(secret) = &auth.jwt_secret {
            (DecodingKey::from_secret(secret.as_bytes()), Algorithm::HS256)
        } else if let Some(path) = &auth.jwt_public_key_file {
            let err = |message: String| KeyError::PublicKey { path: path.display().to_string(), message };
            let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
            match DecodingKey::from_rsa_pem(&pem) {
                Ok(key) => (key, Algorithm::RS256),
                Err(_) => (
                    DecodingKey::from_ec_pem(&pem)
                        .map_err(|e| err(format!("neither an RSA nor an EC public key in PEM: {e}")))?,
                    Algorithm::ES256,
                ),
            }
        } else {
            return Err(KeyError::NoKey);
        };
        let mut validation = Validation::new(alg);
        validation.algorithms = vec![alg];
        validation.leeway = auth.leeway.as_secs();
        validation.validate_nbf = true;
        // jsonwebtoken checks `iss` / `aud` only when present: a configured
        // check must also make the claim required.
        let mut required = vec!["exp", "sub"];
        if let Some(iss) = &auth.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        match &auth.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        Ok(Verifier { key, validation, alg })
    }

    /// The one algorithm this verifier accepts.
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    /// Verifies a token and returns its claims.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let claims = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map(|data| data.claims)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => AuthError::Algorithm,
                ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
                ErrorKind::InvalidAudience => AuthError::WrongAudience,
                _ => AuthError::Malformed,
            })?;
        // A token claiming to be issued in the future would outlive every revocation and
        // removal (they refuse tokens issued before a moment): it is not valid yet, like one
        // before its `nbf`.
        if claims.iat.is_some_and(|iat| iat > now_secs().saturating_add(self.validation.leeway)) {
            return Err(AuthError::NotYetValid);
        }
        Ok(claims)
    }
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Mints an HS256 token: for the embedded default's demo token, tests and tools.
pub fn mint_hs256(secret: &str, user: UserId, chats: &[ChatId], ttl: Duration) -> String {
    let now = now_secs();
    let claims = Claims { sub: user, exp: now + ttl.as_secs(), chats: chats.to_vec(), iat: Some(now) };
    // ok: HS256 signing of plain claims cannot fail with the rust_crypto backend.
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap_or_default()
}

/// The `token` parameter of a request's query string, percent-decoded (the
/// browser way to pass a JWT to `GET /ws`).
pub fn token_from_query(query: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == "token").then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_and_decodes_the_token_parameter() {
        assert_eq!(token_from_query("a=1&token=a.b_c-d").as_deref(), Some("a.b_c-d"));
        assert_eq!(token_from_query("token=a%2Eb").as_deref(), Some("a.b"));
        assert_eq!(token_from_query("token=bad%").as_deref(), Some("bad%"));
        assert_eq!(token_from_query("token=bad%zz").as_deref(), Some("bad%zz"));
        assert_eq!(token_from_query("token=%4").as_deref(), Some("%4"));
        assert_eq!(token_from_query("tokens=x&t=y"), None);
        assert_eq!(
            token_from_query("token=%ff%fe").as_deref(),
            Some("\u{fffd}\u{fffd}"),
            "not UTF-8: replaced"
        );
    }

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    const SECRET: &str = "unit-test-secret-0123456789";

    fn verifier() -> Result<Verifier, KeyError> {
        Verifier::from_config(&AuthConfig { jwt_secret: Some(SECRET.into()), ..Default::default() })
    }

    #[test]
    fn accepts_a_good_token_and_returns_its_claims() -> TestResult {
        let user = UserId::from_u128(7);
        let chat = ChatId::from_u128(8);
        let claims = verifier()?.verify(&mint_hs256(SECRET, user, &[chat], Duration::from_secs(60)))?;
        assert_eq!((claims.sub, claims.chats), (user, vec![chat]));
        Ok(())
    }

    #[test]
    fn refuses_bad_tokens_with_a_reason() -> TestResult {
        let v = verifier()?;
        let user = UserId::from_u128(7);
        let forged = mint_hs256("another-secret-0123456789", user, &[], Duration::from_secs(60));
        assert_eq!(v.verify(&forged), Err(AuthError::BadSignature));
        assert_eq!(v.verify("abc.def.ghi"), Err(AuthError::Malformed));
        assert_eq!(v.verify(""), Err(AuthError::Missing));
        let expired = Claims { sub: user, exp: now_secs() - 5, chats: vec![], iat: None };
        let key = EncodingKey::from_secret(SECRET.as_bytes());
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &expired, &key)?;
        assert_eq!(v.verify(&token), Err(AuthError::Expired));
        let hs384 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS384),
            &Claims { exp: now_secs() + 60, ..expired.clone() },
            &key,
        )?;
        assert_eq!(v.verify(&hs384), Err(AuthError::Algorithm));
        // alg: none, hand-built: header {"alg":"none","typ":"JWT"}.
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiIwMDAwMDAwMC0wMDAwLTAwMDAtMDAwMC0wMDAwMDAwMDAwMDciLCJleHAiOjQxMDI0NDQ4MDB9.";
        assert!(v.verify(none).is_err());
        // sub that is not a UUID.
        #[derive(Serialize)]
        struct Loose {
            sub: &'static str,
            exp: u64,
        }
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &Loose { sub: "bob", exp: now_secs() + 60 },
            &key,
        )?;
        assert_eq!(v.verify(&token), Err(AuthError::Malformed));
        Ok(())
    }
}
