//! The set of Lua scripts one bus runs, hashed once for `EVALSHA` and loaded on every connect,
//! in the variant of its bus kind (`scripts.rs` holds their sources).

use super::scripts::*;

/// The scripts, hashed once; calls go by `EVALSHA` (loaded on every connect, from
/// [`Scripts::sources`]). Under Redis Cluster the same scripts publish with `SPUBLISH` (to the
/// shard of the slot they run in) and read the failover mark under its `{herald}` name.
pub(super) struct Scripts {
    pub(super) publish: redis::Script,
    pub(super) reseed: redis::Script,
    pub(super) snapshot: redis::Script,
    pub(super) head: redis::Script,
    pub(super) kept: redis::Script,
    pub(super) touch: redis::Script,
    pub(super) revoke: redis::Script,
    pub(super) presence_join: redis::Script,
    pub(super) presence_leave: redis::Script,
    pub(super) presence_list: redis::Script,
    pub(super) typing: redis::Script,
    pub(super) presence_depart: redis::Script,
    /// Cluster only: a batch's events of one room (see [`ROOM_PUBLISH_LUA`]).
    pub(super) room: redis::Script,
    /// Cluster only: one room counter's re-seed.
    pub(super) reseed_room: redis::Script,
    /// Every script's source as loaded (`SCRIPT LOAD`), the publish script's first.
    pub(super) sources: Vec<String>,
}

/// Every script's source, for `SCRIPT LOAD`.
const ALL: [&str; 14] = [
    PUBLISH_LUA,
    RESEED_LUA,
    SNAPSHOT_LUA,
    HEAD_LUA,
    KEPT_LUA,
    TOUCH_LUA,
    REVOKE_LUA,
    PRESENCE_JOIN_LUA,
    PRESENCE_LEAVE_LUA,
    PRESENCE_LIST_LUA,
    TYPING_LUA,
    PRESENCE_DEPART_LUA,
    ROOM_PUBLISH_LUA,
    RESEED_ROOM_LUA,
];

impl Scripts {
    pub(super) fn new(cluster: bool) -> Scripts {
        let sources: Vec<String> = ALL
            .iter()
            .map(|code| {
                if cluster {
                    code.replace("'PUBLISH'", "'SPUBLISH'")
                        .replace("'herald:failover'", &format!("'{}'", super::names::CLUSTER_FAILOVER_KEY))
                } else {
                    (*code).to_string()
                }
            })
            .collect();
        let s = |i: usize| redis::Script::new(&sources[i]);
        Scripts {
            publish: s(0),
            reseed: s(1),
            snapshot: s(2),
            head: s(3),
            kept: s(4),
            touch: s(5),
            revoke: s(6),
            presence_join: s(7),
            presence_leave: s(8),
            presence_list: s(9),
            typing: s(10),
            presence_depart: s(11),
            room: s(12),
            reseed_room: s(13),
            sources,
        }
    }
}
