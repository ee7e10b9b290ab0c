//! Who may subscribe to which chat: the `token`, `events` and `open` sources
//! of PROTOCOL.md section 4, and the table of members the `events` source
//! reads.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;

use crate::protocol::{ChatId, UserId};

/// The configured membership source (`auth.membership`), defined with the
/// rest of the configuration.
pub use crate::config::Membership as Source;

/// Membership learned from events: chat -> members.
#[derive(Default)]
pub struct Table {
    members: DashMap<ChatId, HashSet<UserId>>,
    /// (chat, user) pairs held, for the gauge.
    pairs: AtomicUsize,
}

impl Table {
    pub fn add(&self, chat: ChatId, user: UserId) {
        if self.members.entry(chat).or_default().insert(user) {
            self.pairs.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn remove(&self, chat: ChatId, user: UserId) {
        self.members.remove_if_mut(&chat, |_, users| {
            if users.remove(&user) {
                self.pairs.fetch_sub(1, Ordering::Relaxed);
            }
            users.is_empty()
        });
    }

    /// (chat, user) pairs held.
    pub fn len(&self) -> usize {
        self.pairs.load(Ordering::Relaxed)
    }

    /// True when no membership is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Makes the table exactly `pairs`; returns the pairs it dropped.
    pub fn replace(&self, pairs: &[(ChatId, UserId)]) -> Vec<(ChatId, UserId)> {
        let wanted: HashSet<(ChatId, UserId)> = pairs.iter().copied().collect();
        let mut dropped = Vec::new();
        self.members.retain(|chat, users| {
            users.retain(|user| {
                let keep = wanted.contains(&(*chat, *user));
                if !keep {
                    dropped.push((*chat, *user));
                    self.pairs.fetch_sub(1, Ordering::Relaxed);
                }
                keep
            });
            !users.is_empty()
        });
        for (chat, user) in pairs {
            self.add(*chat, *user);
        }
        dropped
    }

    pub fn contains(&self, chat: ChatId, user: UserId) -> bool {
        self.members.get(&chat).is_some_and(|users| users.contains(&user))
    }
}

/// Whether a node keeps the [`Table`]: only under `events`, the one source
/// [`allowed`] reads it for; under `token` and `open` publishers cannot grow it.
pub fn keeps_table(source: Source) -> bool {
    source == Source::Events
}

/// Decides a `subscribe`: `token_chats` is the connection's `chats` claim.
pub fn allowed(source: Source, table: &Table, user: UserId, token_chats: &[ChatId], chat: ChatId) -> bool {
    match source {
        Source::Open => true,
        Source::Token => token_chats.contains(&chat),
        Source::Events => table.contains(chat, user),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_source_decides_as_documented() {
        let table = Table::default();
        let (user, chat, other) = (UserId::from_u128(1), ChatId::from_u128(2), ChatId::from_u128(3));
        assert!(allowed(Source::Open, &table, user, &[], chat));
        assert!(allowed(Source::Token, &table, user, &[chat], chat));
        assert!(!allowed(Source::Token, &table, user, &[chat], other));
        assert!(!allowed(Source::Events, &table, user, &[chat], chat));
        table.add(chat, user);
        assert!(allowed(Source::Events, &table, user, &[], chat));
        table.remove(chat, user);
        assert!(!allowed(Source::Events, &table, user, &[], chat));
        assert!(keeps_table(Source::Events) && !keeps_table(Source::Token) && !keeps_table(Source::Open));
    }

    #[test]
    fn a_snapshot_replaces_the_table_and_names_what_it_dropped() {
        let table = Table::default();
        let (a, b, c) = (ChatId::from_u128(1), ChatId::from_u128(2), UserId::from_u128(3));
        table.add(a, c);
        table.add(b, c);
        assert_eq!(table.replace(&[(b, c), (a, UserId::from_u128(4))]), vec![(a, c)]);
        assert!(!table.contains(a, c) && table.contains(b, c) && table.contains(a, UserId::from_u128(4)));
        assert_eq!(table.len(), 2);
    }
}
