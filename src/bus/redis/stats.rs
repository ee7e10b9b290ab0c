//! The Redis bus's own counters and how `/metrics` names them: one table, one line per counter.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use crate::sync::lock;

/// Endpoints counted one by one; beyond it (a sentinel naming ever new masters) they are
/// counted together under [`OTHER_ENDPOINT`], so the label's values stay bounded.
const MAX_ENDPOINTS: usize = 32;
/// The label value of endpoints beyond [`MAX_ENDPOINTS`] (and of failures before any server
/// was named).
const OTHER_ENDPOINT: &str = "other";

/// One Redis endpoint's counters (`host:port`: never a URL, so never a password).
#[derive(Debug, Default, Clone, Copy)]
pub struct EndpointCounts {
    /// Bus connections opened on it (`herald_redis_endpoint_sessions_total`).
    pub sessions: u64,
    /// Connect attempts to it that failed (`herald_redis_endpoint_connect_failures_total`).
    pub connect_failures: u64,
    /// Sessions opened on it after one on another master: failovers followed to it
    /// (`herald_redis_endpoint_failovers_total`).
    pub failovers_to: u64,
    /// Redis Cluster `MOVED` / `ASK` replies redirecting to this endpoint.
    pub redirects: u64,
}

/// The bus's own counters. `/metrics` exports them through [`crate::bus::Bus::counters`] under the names in
/// brackets (the `COUNTERS` table); [`super::RedisBus::stats`] reads them directly (tests, tools holding
/// the concrete bus).
#[derive(Debug, Default)]
pub struct RedisStats {
    /// Connections re-established after one was lost (`herald_redis_reconnects_total`).
    pub reconnects: AtomicU64,
    /// Connect attempts that failed; each is followed by a backoff wait
    /// (`herald_redis_connect_failures_total`).
    pub connect_failures: AtomicU64,
    /// Publish calls refused with a [`crate::bus::BusError`] (`herald_redis_publish_failures_total`).
    pub publish_failures: AtomicU64,
    /// Pushes dropped because the delivery task fell behind (`herald_redis_inbound_dropped_total`).
    pub inbound_dropped: AtomicU64,
    /// Room events whose `seq` went backwards, dropped (`herald_redis_seq_regressions_total`).
    pub seq_regressions: AtomicU64,
    /// Copies of an event received on several channels, dropped (`herald_redis_duplicates_total`).
    pub duplicates_dropped: AtomicU64,
    /// Reads of a room's Redis history for a recovery this node's history could not serve
    /// (`herald_redis_history_reads_total`).
    pub history_reads: AtomicU64,
    /// Reconnects after which this node could not replay every membership change it missed: the
    /// member log no longer reached back to its position, or Redis lost its state
    /// (`herald_redis_membership_log_gaps_total`).
    pub membership_log_gaps: AtomicU64,
    /// Sessions opened on another master than the previous one: Sentinel failovers followed
    /// (`herald_redis_failovers_total`).
    pub failovers: AtomicU64,
    /// Redis Cluster `MOVED` / `ASK` replies (a slot moved or migrating).
    pub redirects: AtomicU64,
    /// Shard subscriptions the server ended (their slot moved), each ending the session.
    pub shard_unsubscribed: AtomicU64,
    /// Per endpoint (`host:port`), at most [`MAX_ENDPOINTS`] of them; only the supervisor writes.
    pub(super) endpoints: Mutex<BTreeMap<String, EndpointCounts>>,
}

impl RedisStats {
    /// Counts something about the endpoint `addr` (empty: none was named).
    pub(super) fn note_endpoint(&self, addr: &str, count: impl FnOnce(&mut EndpointCounts)) {
        let mut endpoints = lock(&self.endpoints);
        let key = if addr.is_empty() || (endpoints.len() >= MAX_ENDPOINTS && !endpoints.contains_key(addr)) {
            OTHER_ENDPOINT
        } else {
            addr
        };
        count(endpoints.entry(key.to_string()).or_default());
    }

    /// The per-endpoint counters as `/metrics` exports them ([`ENDPOINT_COUNTERS`]).
    pub(super) fn labelled(&self) -> Vec<crate::bus::LabelledCounter> {
        let endpoints = self.endpoints();
        ENDPOINT_COUNTERS
            .iter()
            .map(|(name, help, field)| {
                let samples = endpoints.iter().map(|(addr, counts)| (addr.clone(), field(counts))).collect();
                (*name, *help, "endpoint", samples)
            })
            .collect()
    }

    /// The per-endpoint counters, by endpoint.
    pub fn endpoints(&self) -> Vec<(String, EndpointCounts)> {
        lock(&self.endpoints).iter().map(|(addr, counts)| (addr.clone(), *counts)).collect()
    }
}

/// Picks one per-endpoint counter out of [`EndpointCounts`].
pub(super) type EndpointCounter = fn(&EndpointCounts) -> u64;

/// How `/metrics` exports the per-endpoint counters: (name without the `herald_` prefix, help,
/// the counter), each with the label `endpoint="host:port"`.
#[rustfmt::skip]
pub(super) const ENDPOINT_COUNTERS: &[(&str, &str, EndpointCounter)] = &[
    ("redis_endpoint_sessions_total", "Redis bus connections opened, per Redis endpoint.", |c| c.sessions),
    ("redis_endpoint_connect_failures_total", "Redis connect attempts that failed, per Redis endpoint (a sentinel or server).", |c| c.connect_failures),
    ("redis_endpoint_failovers_total", "Failovers followed to this Redis endpoint (the new master).", |c| c.failovers_to),
    ("redis_endpoint_redirects_total", "Redis Cluster MOVED/ASK replies redirecting to this endpoint.", |c| c.redirects),
];

/// Picks one counter out of [`RedisStats`].
pub(super) type Counter = fn(&RedisStats) -> &AtomicU64;

/// How `/metrics` exports [`RedisStats`]: (name without the `herald_` prefix, help, the counter).
/// One line per counter; `rustfmt` would spread the longer ones over five.
#[rustfmt::skip]
pub(super) const COUNTERS: &[(&str, &str, Counter)] = &[
    ("redis_reconnects_total", "Redis connections re-established.", |s| &s.reconnects),
    ("redis_connect_failures_total", "Redis connect attempts that failed (each followed by a backoff wait).", |s| &s.connect_failures),
    ("redis_publish_failures_total", "Publishes refused while Redis was unavailable.", |s| &s.publish_failures),
    ("redis_inbound_dropped_total", "Redis pushes dropped because delivery fell behind (65,536 pushes or 32 MiB).", |s| &s.inbound_dropped),
    ("redis_seq_regressions_total", "Room events whose seq went backwards, dropped.", |s| &s.seq_regressions),
    ("redis_duplicates_total", "Duplicate copies of an event dropped.", |s| &s.duplicates_dropped),
    ("redis_history_reads_total", "Reads of a room's Redis history for recoveries this node's history could not serve.", |s| &s.history_reads),
    ("redis_membership_log_gaps_total", "Reconnects after which missed membership changes could not all be replayed.", |s| &s.membership_log_gaps),
    ("redis_failovers_total", "Reconnects that followed a failover to another master (Sentinel, or a Cluster shard).", |s| &s.failovers),
    ("redis_redirects_total", "Redis Cluster MOVED/ASK replies (a slot moved or migrating).", |s| &s.redirects),
    ("redis_shard_unsubscribed_total", "Redis Cluster shard subscriptions the server ended (slot moved); each ends the session.", |s| &s.shard_unsubscribed),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_is_exported_once_under_its_own_name() {
        let stats = RedisStats::default();
        let mut names: Vec<&str> = COUNTERS.iter().map(|(name, _, _)| *name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), COUNTERS.len(), "a name is listed twice");
        let mut fields: Vec<*const AtomicU64> =
            COUNTERS.iter().map(|(_, _, field)| field(&stats) as *const _).collect();
        fields.sort_unstable();
        fields.dedup();
        assert_eq!(fields.len(), COUNTERS.len(), "a counter is listed twice");
        assert!(COUNTERS.iter().all(|(name, help, _)| name.starts_with("redis_")
            && name.ends_with("_total")
            && !help.is_empty()));
    }

    #[test]
    fn endpoints_are_counted_apart_up_to_a_bound() {
        let stats = RedisStats::default();
        for n in 0..100 {
            stats.note_endpoint(&format!("10.0.0.{n}:6379"), |e| e.sessions += 1);
        }
        stats.note_endpoint("10.0.0.1:6379", |e| e.connect_failures += 1);
        let endpoints = stats.endpoints();
        assert_eq!(endpoints.len(), MAX_ENDPOINTS + 1, "bounded, plus `other`");
        let other = endpoints.iter().find(|(a, _)| a == OTHER_ENDPOINT).map(|(_, c)| c.sessions);
        assert_eq!(other, Some(100 - MAX_ENDPOINTS as u64));
        let one = endpoints
            .iter()
            .find(|(a, _)| a == "10.0.0.1:6379")
            .map(|(_, c)| (c.sessions, c.connect_failures));
        assert_eq!(one, Some((1, 1)));
    }
}
