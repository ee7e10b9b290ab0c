//! Identities: deterministic room ids (so several loadgen processes share rooms) and the HS256
//! tokens each connection presents.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Prefix of every loadgen room id ("loadgeN" in hex), followed by the room group and index.
const ROOM_NAMESPACE: u128 = 0x6c6f_6164_6765_4e00_8000_0000_0000_0000;

/// How long a minted token is valid.
const TOKEN_TTL_SECS: u64 = 3600;

/// Room `index` of room group `base`: the same numbers give the same room in every process.
pub(crate) fn room_id(base: u32, index: u32) -> Uuid {
    Uuid::from_u128(ROOM_NAMESPACE | (u128::from(base) << 32) | u128::from(index))
}

/// The claims Herald reads: `sub`, `exp`, and `chats` for the `token` membership source.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Claims {
    pub(crate) sub: String,
    pub(crate) exp: u64,
    pub(crate) chats: Vec<String>,
}

/// Signs connection tokens with the server's `auth.jwt_secret`.
pub(crate) struct Minter {
    key: EncodingKey,
    header: Header,
}

impl Minter {
    pub(crate) fn new(secret: &str) -> Self {
        Minter { key: EncodingKey::from_secret(secret.as_bytes()), header: Header::new(Algorithm::HS256) }
    }

    /// A token for a fresh random user who may subscribe to `chats`, valid for an hour.
    pub(crate) fn mint(&self, chats: &[Uuid]) -> anyhow::Result<String> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).context("clock before 1970")?.as_secs();
        let claims = Claims {
            sub: Uuid::new_v4().to_string(),
            exp: now + TOKEN_TTL_SECS,
            chats: chats.iter().map(Uuid::to_string).collect(),
        };
        jsonwebtoken::encode(&self.header, &claims, &self.key).context("signing the connection token")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    #[test]
    fn room_ids_are_deterministic_and_distinct() {
        assert_eq!(room_id(0, 3), room_id(0, 3));
        assert_ne!(room_id(0, 3), room_id(0, 4));
        assert_ne!(room_id(0, 3), room_id(1, 3));
        assert_eq!(room_id(0, 3).to_string(), "6c6f6164-6765-4e00-8000-000000000003");
    }

    #[test]
    fn minted_token_decodes_with_the_secret() {
        let chats = [room_id(0, 1), room_id(0, 2)];
        let token = Minter::new("s").mint(&chats).expect("mint");
        let data = jsonwebtoken::decode::<Claims>(
            &token,
            &DecodingKey::from_secret(b"s"),
            &Validation::new(Algorithm::HS256),
        )
        .expect("decodes with the same secret");
        assert_eq!(data.header.alg, Algorithm::HS256);
        let claims = data.claims;
        assert_eq!(Uuid::parse_str(&claims.sub).map(|u| u.get_version_num()).ok(), Some(4));
        assert_eq!(claims.chats, vec![chats[0].to_string(), chats[1].to_string()]);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        assert!(claims.exp > now + 3500 && claims.exp <= now + 3600);

        let wrong = jsonwebtoken::decode::<Claims>(
            &token,
            &DecodingKey::from_secret(b"other"),
            &Validation::new(Algorithm::HS256),
        );
        assert!(wrong.is_err(), "another secret must not verify");
    }
}
