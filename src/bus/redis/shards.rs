//! Redis Cluster's layout as one session sees it: which primary serves each hash slot (read once
//! per session with `CLUSTER SLOTS` from the first seed that answers), and the session's
//! connections, two per primary (commands, and shard subscriptions), never one per room. A
//! [`Link`] is what the rest of the bus holds: the one server's connection, or the cluster's,
//! and it picks the connection that serves a key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use redis::aio::MultiplexedConnection;
use redis::Value;

use super::{classify, Shared};
use crate::bus::BusError;
use crate::sync::lock;
use std::sync::atomic::Ordering;

/// Redis Cluster's hash slots.
pub(super) const SLOTS: usize = 16_384;
/// Marks a slot no primary serves in [`Topology::owner`].
const NONE: u16 = u16::MAX;

/// The hash slot of a key or shard channel (CRC16/XMODEM of its hash tag, or of the whole name
/// when it has none), as Redis Cluster computes it.
pub(crate) fn slot(key: &[u8]) -> u16 {
    let tag = key
        .iter()
        .position(|b| *b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|b| *b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    let mut crc: u16 = 0;
    for byte in tag {
        crc ^= u16::from(*byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc % SLOTS as u16
}

/// One primary as `CLUSTER SLOTS` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Primary {
    pub(crate) host: String,
    pub(crate) port: u16,
    /// The node's cluster id: a promoted replica has another one than the primary it replaces.
    pub(crate) id: String,
}

impl Primary {
    /// `host:port`, the per-endpoint metrics' label.
    pub(crate) fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// The slot map read from one seed.
#[derive(Debug, Clone)]
pub(crate) struct Topology {
    pub(crate) primaries: Vec<Primary>,
    /// Index into `primaries` per slot ([`NONE`]: not served).
    owner: Vec<u16>,
}

impl Topology {
    /// Parses a `CLUSTER SLOTS` reply; `None` when it is not one. A primary announced with no
    /// endpoint (`NULL` under `cluster-preferred-endpoint-type unknown-endpoint`, or an empty
    /// one) is at the seed's host (`seed_host`), as Redis documents; one announced as `?` (a
    /// hostname preferred but none set) cannot be reached, so the map is unusable.
    pub(crate) fn parse(reply: &Value, seed_host: &str) -> Option<Topology> {
        let Value::Array(ranges) = reply else { return None };
        let mut topology = Topology { primaries: Vec::new(), owner: vec![NONE; SLOTS] };
        for range in ranges {
            let Value::Array(parts) = range else { return None };
            let (start, end) = (int(parts.first()?)?, int(parts.get(1)?)?);
            let Value::Array(node) = parts.get(2)? else { return None };
            let host = match node.first()? {
                Value::Nil => String::new(),
                other => text(other)?,
            };
            if host == "?" {
                return None;
            }
            let host = if host.is_empty() { seed_host.to_string() } else { host };
            let port = u16::try_from(int(node.get(1)?)?).ok()?;
            let id = node.get(2).and_then(text).unwrap_or_default();
            let primary = Primary { host, port, id };
            let index = match topology.primaries.iter().position(|p| *p == primary) {
                Some(index) => index,
                None => {
                    topology.primaries.push(primary);
                    topology.primaries.len() - 1
                }
            };
            let index = u16::try_from(index).ok()?;
            let (start, end) = (usize::try_from(start).ok()?, usize::try_from(end).ok()?);
            if start > end || end >= SLOTS {
                return None;
            }
            topology.owner[start..=end].iter_mut().for_each(|o| *o = index);
        }
        Some(topology)
    }

    /// How many slots no primary serves (the cluster is not fully up).
    pub(crate) fn uncovered(&self) -> usize {
        self.owner.iter().filter(|o| **o == NONE).count()
    }

    /// The primary serving `key`'s slot (every slot is served once [`Topology::uncovered`] is 0).
    pub(crate) fn owner_of(&self, key: &[u8]) -> Option<&Primary> {
        self.primaries.get(usize::from(self.owner[usize::from(slot(key))]))
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        other => text(other)?.parse().ok(),
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

/// Channels asked to `SUNSUBSCRIBE` and not yet confirmed (see [`Shards::leaving`]).
pub(super) type Leaving = Arc<Mutex<HashMap<Vec<u8>, usize>>>;

/// One session's connections to the cluster: per primary, one connection for commands and one
/// for its shard subscriptions (so a server-sent `SUNSUBSCRIBE` never lands among replies).
pub(super) struct Shards {
    pub(super) topology: Topology,
    pub(super) commands: Vec<MultiplexedConnection>,
    pub(super) subscriptions: Vec<MultiplexedConnection>,
    /// Channels this node asked to `SUNSUBSCRIBE` and whose confirmation has not been seen: any
    /// other `SUNSUBSCRIBE` was the server's (its slot moved away), which ends the session.
    pub(super) leaving: Leaving,
}

impl Shards {
    /// The index of the primary serving `key`.
    pub(super) fn shard_of(&self, key: &[u8]) -> usize {
        usize::from(self.topology.owner[usize::from(slot(key))]).min(self.commands.len().saturating_sub(1))
    }

    /// Groups `keys` by the primary that serves them: (its connection, indexes into `keys`).
    pub(super) fn group<S: AsRef<str>>(&self, keys: &[S]) -> Vec<(MultiplexedConnection, Vec<usize>)> {
        let mut groups: Vec<Vec<usize>> = vec![Vec::new(); self.commands.len()];
        for (i, key) in keys.iter().enumerate() {
            groups[self.shard_of(key.as_ref().as_bytes())].push(i);
        }
        groups
            .into_iter()
            .enumerate()
            .filter(|(_, g)| !g.is_empty())
            .map(|(shard, g)| (self.commands[shard].clone(), g))
            .collect()
    }

    /// Notes that a `SUNSUBSCRIBE` of these channels is about to be sent.
    pub(super) fn expect_leaving(&self, channels: &[String]) {
        let mut leaving = lock(&self.leaving);
        for channel in channels {
            *leaving.entry(channel.as_bytes().to_vec()).or_insert(0) += 1;
        }
    }
}

/// Takes a `SUNSUBSCRIBE` push for `channel` off the expected ones; false when none was expected
/// (the server dropped the subscription: its slot moved).
pub(super) fn was_requested(leaving: &Mutex<HashMap<Vec<u8>, usize>>, channel: &[u8]) -> bool {
    let mut leaving = lock(leaving);
    match leaving.get_mut(channel) {
        Some(n) if *n > 1 => {
            *n -= 1;
            true
        }
        Some(_) => {
            leaving.remove(channel);
            true
        }
        None => false,
    }
}

/// The live connection(s) of a session.
#[derive(Clone)]
pub(super) enum Link {
    One(MultiplexedConnection),
    Cluster(Arc<Shards>),
}

impl Link {
    /// The connection that serves `key` (a key or a shard channel).
    pub(super) fn for_key(&self, key: &str) -> MultiplexedConnection {
        match self {
            Link::One(conn) => conn.clone(),
            Link::Cluster(shards) => shards.commands[shards.shard_of(key.as_bytes())].clone(),
        }
    }

    /// Groups `keys` by the connection that serves them: (connection, indexes into `keys`).
    pub(super) fn group<S: AsRef<str>>(&self, keys: &[S]) -> Vec<(MultiplexedConnection, Vec<usize>)> {
        match self {
            Link::One(conn) => vec![(conn.clone(), (0..keys.len()).collect())],
            Link::Cluster(shards) => shards.group(keys),
        }
    }
}

impl Shared {
    /// The live session's connections, or what [`Shared::connected`] answers without them.
    pub(super) fn link(&self) -> Result<Link, BusError> {
        lock(&self.conn).clone().ok_or(BusError::Unreachable)
    }

    /// The connection for the global keys (under Cluster: the `{herald}` slot's primary).
    pub(super) fn connection(&self) -> Result<MultiplexedConnection, BusError> {
        Ok(self.link()?.for_key(self.names.boot))
    }

    /// The connection that serves `key` (a key or a shard channel).
    pub(super) fn connection_for(&self, key: &str) -> Result<MultiplexedConnection, BusError> {
        Ok(self.link()?.for_key(key))
    }

    /// What a Redis error means (see [`classify`]), noting Cluster redirects: `MOVED` means the
    /// slot map this session was opened with is stale, so the session ends and the next one reads
    /// the map again (its subscriptions follow their slots); `ASK` (a slot migrating) is answered
    /// 503 until the migration completes.
    pub(super) fn fail(&self, e: &redis::RedisError) -> BusError {
        if self.note_redirect(e) == Some("MOVED") {
            self.end_session();
        }
        classify(e)
    }

    /// Counts a `MOVED` / `ASK` reply (for the endpoint it redirects to); returns its code.
    pub(super) fn note_redirect(&self, e: &redis::RedisError) -> Option<&'static str> {
        let code = match e.code() {
            Some("MOVED") => "MOVED",
            Some("ASK") => "ASK",
            _ => return None,
        };
        self.stats.redirects.fetch_add(1, Ordering::Relaxed);
        // `MOVED <slot> <host:port>`: counted for the endpoint the slot moved to.
        let text = e.to_string();
        let target =
            text.split_whitespace().find(|w| w.contains(':') && w.chars().any(|c| c.is_ascii_digit()));
        self.stats.note_endpoint(target.unwrap_or(""), |c| c.redirects += 1);
        Some(code)
    }

    /// Ends the session in place (the supervisor opens the next one).
    pub(super) fn end_session(&self) {
        self.lost_gen.fetch_max(self.session_gen.load(Ordering::SeqCst), Ordering::SeqCst);
        self.lost.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis_cluster() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"123456789"), 0x31C3);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"), "an empty tag hashes the whole name");
        assert_ne!(slot(b"foo{}{bar}"), slot(b"bar"));
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
    }

    #[test]
    fn a_cluster_slots_reply_maps_every_slot_to_its_primary() {
        let node = |port: i64, id: &str| {
            Value::Array(vec![
                Value::BulkString(b"127.0.0.1".to_vec()),
                Value::Int(port),
                Value::BulkString(id.as_bytes().to_vec()),
            ])
        };
        let range = |a: i64, b: i64, port: i64, id: &str| {
            Value::Array(vec![Value::Int(a), Value::Int(b), node(port, id), node(port + 1, "r")])
        };
        let reply = Value::Array(vec![range(0, 8000, 7000, "a"), range(8001, 16383, 7002, "b")]);
        let topology = Topology::parse(&reply, "seed").expect("parsed");
        assert_eq!(topology.uncovered(), 0);
        assert_eq!(topology.primaries.len(), 2);
        assert_eq!(topology.owner_of(b"foo").map(|p| p.port), Some(7002));
        let partial = Value::Array(vec![range(0, 8000, 7000, "a")]);
        assert_eq!(Topology::parse(&partial, "seed").map(|t| t.uncovered()), Some(SLOTS - 8001));
        assert!(Topology::parse(&Value::Int(1), "seed").is_none());
        let announced = |host: Value| {
            let node = Value::Array(vec![host, Value::Int(7000), Value::BulkString(b"a".to_vec())]);
            Value::Array(vec![Value::Array(vec![Value::Int(0), Value::Int(16383), node])])
        };
        let at_seed = Topology::parse(&announced(Value::Nil), "10.0.0.9").expect("NULL: the seed's host");
        assert_eq!(at_seed.primaries[0].addr(), "10.0.0.9:7000");
        assert!(Topology::parse(&announced(Value::BulkString(b"?".to_vec())), "seed").is_none(), "unknown");
    }
}
