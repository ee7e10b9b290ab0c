//! The names of Herald's global keys and channels, which differ by bus kind: on one server (or
//! Sentinel's master) they keep their historical names; under Redis Cluster they all share the
//! `{herald}` slot under cluster-only names, so one script call can touch them together and
//! one-server deployments keep their keys. Per-room and per-user names (already hash-tagged) are
//! the same for every kind (`scripts.rs`).

use crate::protocol::{ChatId, UserId};

/// One kind's global names.
#[derive(Debug, Clone, Copy)]
pub(super) struct Names {
    pub(super) cluster: bool,
    pub(super) boot: &'static str,
    pub(super) gseq: &'static str,
    pub(super) member_index: &'static str,
    pub(super) removed_index: &'static str,
    pub(super) member_log: &'static str,
    /// The channel every node listens to for its whole life (membership and revocations).
    pub(super) members_channel: &'static str,
    /// A room's member set is `member_prefix <chat> member_suffix`, its removed hash
    /// `member_prefix <chat> removed_suffix` (the snapshot script builds both from these).
    member_prefix: &'static str,
    member_suffix: &'static str,
    removed_suffix: &'static str,
    /// A user's revocation is `revoked_prefix <user> revoked_suffix`.
    revoked_prefix: &'static str,
    revoked_suffix: &'static str,
}

/// One server: the names `scripts.rs` documents.
pub(super) const SINGLE: Names = Names {
    cluster: false,
    boot: super::scripts::BOOT_KEY,
    gseq: super::scripts::GSEQ_KEY,
    member_index: super::scripts::MEMBER_INDEX_KEY,
    removed_index: super::scripts::REMOVED_INDEX_KEY,
    member_log: super::scripts::MEMBER_LOG_KEY,
    members_channel: super::scripts::MEMBERS_CHANNEL,
    member_prefix: "herald:{",
    member_suffix: "}:members",
    removed_suffix: "}:removed",
    revoked_prefix: "herald:{",
    revoked_suffix: "}:revoked",
};

/// Redis Cluster: everything global in the `{herald}` slot.
pub(super) const CLUSTER: Names = Names {
    cluster: true,
    boot: "herald:{herald}:boot",
    gseq: "herald:{herald}:gseq",
    member_index: "herald:{herald}:member-chats",
    removed_index: "herald:{herald}:removed-chats",
    member_log: "herald:{herald}:member-log",
    members_channel: "herald:{herald}:members",
    member_prefix: "herald:{herald}:members:",
    member_suffix: "",
    removed_suffix: ":removed",
    revoked_prefix: "herald:{herald}:revoked:",
    revoked_suffix: "",
};

/// The failover mark under Cluster (read by the scripts' boot prelude, which names
/// `herald:failover` on one server).
pub(super) const CLUSTER_FAILOVER_KEY: &str = "herald:{herald}:failover";

impl Names {
    /// The room's member set.
    pub(super) fn members_key(&self, chat: ChatId) -> String {
        format!("{}{chat}{}", self.member_prefix, self.member_suffix)
    }

    /// The room's removals: user -> Unix seconds.
    pub(super) fn removed_key(&self, chat: ChatId) -> String {
        format!("{}{chat}{}", self.member_prefix, self.removed_suffix)
    }

    /// A user's revocation.
    pub(super) fn revoked_key(&self, user: UserId) -> String {
        format!("{}{user}{}", self.revoked_prefix, self.revoked_suffix)
    }

    /// The snapshot script's ARGV: how to name a room's member set.
    pub(super) fn members_key_parts(&self) -> [&'static str; 2] {
        [self.member_prefix, self.member_suffix]
    }

    /// The snapshot script's ARGV: how to name a room's removed hash (after the member prefix).
    pub(super) fn removed_key_suffix(&self) -> &'static str {
        self.removed_suffix
    }

    /// The failover mark's name.
    pub(super) fn failover(&self) -> &'static str {
        if self.cluster {
            CLUSTER_FAILOVER_KEY
        } else {
            super::scripts::FAILOVER_KEY
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::redis::shards::slot;

    #[test]
    fn single_names_are_the_historical_ones() {
        let (chat, user) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        assert_eq!(SINGLE.members_key(chat), format!("herald:{{{chat}}}:members"));
        assert_eq!(SINGLE.removed_key(chat), format!("herald:{{{chat}}}:removed"));
        assert_eq!(SINGLE.revoked_key(user), format!("herald:{{{user}}}:revoked"));
    }

    #[test]
    fn every_cluster_global_name_shares_one_slot() {
        let (chat, user) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        let owned = [CLUSTER.members_key(chat), CLUSTER.removed_key(chat), CLUSTER.revoked_key(user)];
        let fixed = [
            CLUSTER.boot,
            CLUSTER.gseq,
            CLUSTER.member_index,
            CLUSTER.removed_index,
            CLUSTER.member_log,
            CLUSTER.members_channel,
            CLUSTER_FAILOVER_KEY,
        ];
        let herald = slot(b"herald:{herald}:boot");
        for name in owned.iter().map(String::as_str).chain(fixed) {
            assert_eq!(slot(name.as_bytes()), herald, "{name}");
        }
    }
}
