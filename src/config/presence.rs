//! The `presence` section: presence and typing (PROTOCOL.md section 3.2).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Presence and typing (PROTOCOL.md sections 2 and 4).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceConfig {
    /// `false`: the `presence` and `typing` commands get `unknown_type`, and
    /// nothing is kept.
    pub enabled: bool,
    /// Grace before `presence.leave`: a user back within it (a reconnect, a
    /// deploy) produces neither a leave nor a join.
    #[serde(with = "humantime_serde")]
    pub leave_delay: Duration,
    /// At most one typing event per user per room per interval is delivered.
    #[serde(with = "humantime_serde")]
    pub typing_interval: Duration,
    /// Users in one `presence` reply.
    pub max_list: usize,
    /// Redis bus: a node that stopped refreshing its users (it died) loses
    /// them after this.
    #[serde(with = "humantime_serde")]
    pub node_ttl: Duration,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        PresenceConfig {
            enabled: true,
            leave_delay: Duration::from_secs(5),
            typing_interval: Duration::from_secs(2),
            max_list: 1000,
            node_ttl: Duration::from_secs(30),
        }
    }
}
