//! The Redis bus's timing knobs and the limits it takes from the config.

use std::time::Duration;

/// Timing knobs. [`RedisBus::connect`] uses the defaults; tests shorten them.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// How long after Redis lost its state room events are refused, so every node can reconnect
    /// and re-seed the room counters first. Must exceed the longest reconnect wait
    /// (`backoff_max` plus up to 50% jitter) plus a connect.
    pub settle: Duration,
    /// Longest wait between reconnect attempts.
    pub backoff_max: Duration,
    /// How often the supervisor PINGs.
    pub ping_interval: Duration,
    /// A PING slower than this counts as a lost connection.
    pub ping_timeout: Duration,
    /// How long one connect attempt may take.
    pub connect_timeout: Duration,
    /// How long any command may wait for its reply.
    pub response_timeout: Duration,
    /// How long `watch` waits for its `SUBSCRIBE` to be confirmed.
    pub watch_timeout: Duration,
    /// Events each room's Redis history keeps (`rooms.history_size`).
    pub history_size: usize,
    /// How long they are kept (`rooms.history_ttl`).
    pub history_ttl: Duration,
    /// How long revocations and removals are kept (`auth.max_token_ttl`).
    pub token_ttl: Duration,
    /// How long Redis trusts a node's presence without a refresh (`presence.node_ttl`).
    pub presence_ttl: Duration,
    /// One typing event per user per room per this (`presence.typing_interval`).
    pub typing_interval: Duration,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            settle: Duration::from_secs(3),
            backoff_max: Duration::from_secs(1),
            ping_interval: Duration::from_millis(500),
            ping_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(5),
            watch_timeout: Duration::from_secs(5),
            history_size: 100,
            history_ttl: Duration::from_secs(300),
            token_ttl: Duration::from_secs(86_400),
            presence_ttl: Duration::from_secs(30),
            typing_interval: Duration::from_secs(2),
        }
    }
}
