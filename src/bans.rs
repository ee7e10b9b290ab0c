//! What a node remembers against tokens: revocations (tokens of a user
//! issued before a time are refused) and removals (a token issued before a
//! `chat.member_removed` may no longer subscribe to that chat). Each is kept
//! for `auth.max_token_ttl` (no token outlives it), bounded in count and
//! counted. Pure state: callers pass `now` (Unix seconds) in.
//!
//! Under the memory bus this is the node's whole truth. Under the Redis bus
//! Redis holds the truth (`herald:{<user>}:revoked`, `herald:{<chat>}:removed`)
//! and this is what the node learned of it: every revocation and removal
//! reaches every node on the members channel, a (re)connecting node loads
//! the removals, and an upgrade whose user this node knows no revocation of
//! asks Redis ([`crate::bus::Bus::revoked`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::protocol::{ChatId, UserId};
use crate::sync::lock;

/// Revocations a node holds at most (about 64 bytes each with the map's
/// overhead: 6.4 MB).
pub const MAX_REVOCATIONS: usize = 100_000;
/// Removals a node holds at most (about 80 bytes each: 16 MB).
pub const MAX_REMOVALS: usize = 200_000;
/// Bytes one entry is counted as, map overhead included.
const REVOCATION_BYTES: usize = 64;
const REMOVAL_BYTES: usize = 80;

/// The node's revocations and removals.
pub struct Bans {
    /// `auth.max_token_ttl` in seconds: how long an entry is kept.
    ttl: u64,
    revoked: Mutex<HashMap<UserId, Entry>>,
    removed: Mutex<HashMap<(ChatId, UserId), Entry>>,
    /// Entries not kept because their table was full.
    dropped: AtomicU64,
}

/// One remembered cut-off.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Tokens issued before this (Unix seconds) are refused.
    before: u64,
    /// When the entry may be forgotten (Unix seconds).
    until: u64,
}

/// No room for another entry, even after dropping the expired ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many revocations held")]
pub struct Full;

impl Bans {
    pub fn new(ttl_secs: u64) -> Bans {
        Bans {
            ttl: ttl_secs,
            revoked: Mutex::default(),
            removed: Mutex::default(),
            dropped: AtomicU64::new(0),
        }
    }

    /// Counts an entry a full table did not keep (and says so in the log).
    pub fn count_dropped(&self) {
        if self.dropped.fetch_add(1, Ordering::Relaxed) % 1_000 == 0 {
            tracing::warn!("revocations or removals full; an entry is not remembered on this node");
        }
    }

    /// Gauges and the counter for `/metrics`: (name without `herald_`, type, help, value).
    pub fn metrics(&self) -> [(&'static str, &'static str, &'static str, u64); 4] {
        let (revoked, removed) = self.len();
        [
            ("revocations", "gauge", "User revocations remembered (auth.max_token_ttl).", revoked as u64),
            ("removals", "gauge", "(chat, user) removals remembered against older tokens.", removed as u64),
            (
                "bans_bytes",
                "gauge",
                "Bytes the revocations and removals are counted as.",
                self.bytes() as u64,
            ),
            (
                "bans_dropped_total",
                "counter",
                "Revocations or removals not remembered on this node because its table was full.",
                self.dropped.load(Ordering::Relaxed),
            ),
        ]
    }

    /// How long entries are kept, in seconds.
    pub fn ttl_secs(&self) -> u64 {
        self.ttl
    }

    /// Refuses `user`'s tokens issued before `before`. Keeps the later
    /// cut-off when one is held already.
    pub fn revoke(&self, user: UserId, before: u64, now: u64) -> Result<(), Full> {
        let mut map = lock(&self.revoked);
        insert(&mut map, user, Entry { before, until: now.saturating_add(self.ttl) }, MAX_REVOCATIONS, now)
    }

    /// The cut-off held for `user`, if any.
    pub fn revoked_before(&self, user: UserId, now: u64) -> Option<u64> {
        lock(&self.revoked).get(&user).filter(|e| e.until > now).map(|e| e.before)
    }

    /// True when a token of `user` issued at `iat` is revoked here.
    pub fn is_revoked(&self, user: UserId, iat: Option<u64>, now: u64) -> bool {
        self.revoked_before(user, now).is_some_and(|before| issued_before(iat, before))
    }

    /// Records that `user` was removed from `chat` at `at`. A full table
    /// keeps what it has (and says so).
    pub fn remove(&self, chat: ChatId, user: UserId, at: u64, now: u64) -> Result<(), Full> {
        let mut map = lock(&self.removed);
        let entry = Entry { before: at, until: at.saturating_add(self.ttl) };
        insert(&mut map, (chat, user), entry, MAX_REMOVALS, now)
    }

    /// `user` was added to `chat` again: its removal no longer holds.
    pub fn readd(&self, chat: ChatId, user: UserId) {
        lock(&self.removed).remove(&(chat, user));
    }

    /// Makes the removals exactly `entries` (chat, user, at): what the bus
    /// holds, loaded on (re)connect.
    pub fn replace_removals(&self, entries: &[(ChatId, UserId, u64)], now: u64) {
        let mut map = lock(&self.removed);
        map.clear();
        for (chat, user, at) in entries {
            let _ = insert(
                &mut map,
                (*chat, *user),
                Entry { before: *at, until: at.saturating_add(self.ttl) },
                MAX_REMOVALS,
                now,
            );
        }
    }

    /// True when a token of `user` issued at `iat` may not subscribe to
    /// `chat` because the user was removed from it after that.
    pub fn is_removed(&self, chat: ChatId, user: UserId, iat: Option<u64>, now: u64) -> bool {
        lock(&self.removed).get(&(chat, user)).is_some_and(|e| e.until > now && issued_before(iat, e.before))
    }

    /// Drops what is past its time (the node's sweeper calls it).
    pub fn sweep(&self, now: u64) {
        lock(&self.revoked).retain(|_, e| e.until > now);
        lock(&self.removed).retain(|_, e| e.until > now);
    }

    /// (revocations, removals) held.
    pub fn len(&self) -> (usize, usize) {
        (lock(&self.revoked).len(), lock(&self.removed).len())
    }

    /// Bytes the entries are counted as.
    pub fn bytes(&self) -> usize {
        let (revoked, removed) = self.len();
        revoked * REVOCATION_BYTES + removed * REMOVAL_BYTES
    }
}

/// True when a token issued at `iat` (none: before anything) predates `before`.
pub fn issued_before(iat: Option<u64>, before: u64) -> bool {
    iat.is_none_or(|iat| iat < before)
}

/// Inserts or raises `key`'s entry within `max` entries, dropping expired
/// ones first when full.
fn insert<K: std::hash::Hash + Eq>(
    map: &mut HashMap<K, Entry>,
    key: K,
    entry: Entry,
    max: usize,
    now: u64,
) -> Result<(), Full> {
    if let Some(held) = map.get_mut(&key) {
        held.before = held.before.max(entry.before);
        held.until = held.until.max(entry.until);
        return Ok(());
    }
    if map.len() >= max {
        map.retain(|_, e| e.until > now);
        if map.len() >= max {
            return Err(Full);
        }
    }
    map.insert(key, entry);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revocation_refuses_older_tokens_until_it_expires() {
        let bans = Bans::new(100);
        let user = UserId::from_u128(1);
        assert!(!bans.is_revoked(user, None, 1_000));
        bans.revoke(user, 1_000, 1_000).unwrap();
        assert!(bans.is_revoked(user, Some(999), 1_000));
        assert!(bans.is_revoked(user, None, 1_000), "no iat counts as issued before");
        assert!(!bans.is_revoked(user, Some(1_000), 1_000), "issued at the cut-off is not before it");
        bans.revoke(user, 900, 1_000).unwrap();
        assert!(bans.is_revoked(user, Some(950), 1_000), "the later cut-off is kept");
        assert!(!bans.is_revoked(user, Some(1), 1_100), "forgotten after the ttl");
        bans.sweep(1_100);
        assert_eq!(bans.len(), (0, 0));
    }

    #[test]
    fn a_removal_holds_for_older_tokens_until_a_readd() {
        let bans = Bans::new(100);
        let (chat, user) = (ChatId::from_u128(2), UserId::from_u128(3));
        bans.remove(chat, user, 500, 500).unwrap();
        assert!(bans.is_removed(chat, user, Some(499), 500));
        assert!(!bans.is_removed(chat, user, Some(500), 500));
        assert!(!bans.is_removed(ChatId::from_u128(9), user, None, 500));
        bans.readd(chat, user);
        assert!(!bans.is_removed(chat, user, None, 500));
        bans.replace_removals(&[(chat, user, 400)], 450);
        assert!(bans.is_removed(chat, user, None, 450));
        assert!(!bans.is_removed(chat, user, None, 500), "removed at 400, kept 100 s");
        assert_eq!(bans.bytes(), REMOVAL_BYTES);
    }

    #[test]
    fn a_full_table_refuses_until_entries_expire() {
        let bans = Bans::new(10);
        let mut map = HashMap::new();
        let e = Entry { before: 1, until: 11 };
        for i in 0..4u128 {
            insert(&mut map, i, e, 4, 1).unwrap();
        }
        assert_eq!(insert(&mut map, 9, e, 4, 1), Err(Full));
        assert_eq!(insert(&mut map, 9, e, 4, 11), Ok(()), "expired entries make room");
        assert_eq!(bans.len(), (0, 0));
    }
}
