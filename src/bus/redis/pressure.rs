//! Overload shared across nodes through Redis: each node writes the rooms whose readers it cannot
//! keep up with (its admission signal) for a short TTL, and reads the other nodes' words, so a
//! publish to any node is pushed back for a room whose readers on another node run far behind,
//! as that node would push back its own publishers ([`crate::node::Node::admit`]).
//!
//! # Wire
//!
//! One hash, `herald:{pressure}` (one Cluster slot), one field per node (a random id per bus):
//! `<expires, Redis ms>|<payload>`, the payload being `*` (every room) or room ids separated by
//! spaces. Every [`SYNC_EVERY`] one script call writes this node's field (or deletes it when the
//! node is not overloaded) and returns the other nodes' fields that are still live by Redis's own
//! clock, so the nodes' clocks need not agree.
//!
//! The sync runs on a thread of its own with its own (blocking) connection, not as a task: an
//! overloaded node's runtime runs its tasks late, exactly when the word must go out at once
//! (measured: a task-driven sync let two nodes' readers all fall past history before the word
//! crossed). The thread ends with the bus (it holds only a weak pointer to the signals).
//!
//! # Bounds (a remote signal is external data)
//!
//! - The script deletes a field that expired, that claims to live longer than [`MAX_TTL`], that
//!   does not parse, or that is longer than [`MAX_FIELD`] bytes: a node that died, or lies, holds
//!   publishers back for at most [`MAX_TTL`] after it stops refreshing its field.
//! - It returns [`MAX_NODES`] fields at most; this node parses room ids (bad ones are skipped) into
//!   a table replaced by each read, and trusts that table for [`TRUST`] only: while Redis is slow or
//!   unreachable the pressure lapses, so it never blocks publishing for longer.
//! - Its effect is an admission's: a publish waits at most as long as for local overload, then
//!   gets 429. Nothing is held per remote room beyond the table.
//!
//! This node also names every room (`*`) while its delivery task runs far behind Redis (pushes
//! waiting for it), which the backlog does not see yet: dropped pushes would be lost events.
//! Those pushes wait in the delivery queue, not unread in the socket, because the subscription
//! connections are read on a thread of their own ([`super::io_thread`]), however busy the node's
//! runtime is.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::delivery::Inbound;
use super::endpoint::Endpoint;
use super::{INBOUND_BYTES, INBOUND_CAPACITY};
use crate::bus::{Hot, Pressure};
use crate::protocol::ChatId;
use crate::sync::lock;

/// The hash every node's word lives in (see the module doc; listed in `scripts.rs`).
pub(super) const PRESSURE_KEY: &str = "herald:{pressure}";
/// How often a node writes its word and reads the others': the delay a remote overload takes to
/// reach publishers, about twice this (one write, one read).
const SYNC_EVERY: Duration = Duration::from_millis(10);
/// How long the sync waits before connecting again after a failure.
const RECONNECT_AFTER: Duration = Duration::from_millis(500);
/// How long a node's word lives in Redis unless refreshed (many syncs, so a busy node that misses
/// a few still counts as overloaded).
const TTL: Duration = Duration::from_millis(500);
/// A field claiming to live longer than this is a lie (or a bug), deleted at once.
const MAX_TTL: Duration = Duration::from_secs(2);
/// How long the last read is trusted without a newer one.
const TRUST: Duration = Duration::from_millis(500);
/// Rooms one node names at most; beyond it, it names every room (`*`).
const MAX_ROOMS: usize = Hot::MAX_ROOMS;
/// Bytes of one field at most (`MAX_ROOMS` ids and the expiry fit).
const MAX_FIELD: usize = 16 * 1024;
/// Other nodes' fields read at most.
const MAX_NODES: usize = 64;
/// Pushes waiting for this node's delivery task above which it names every room: events already
/// accepted that its backlog does not count yet (a few hundred ms of a busy room's events).
const INBOUND_HOT: usize = INBOUND_CAPACITY / 128;
/// The same in bytes of those pushes (a few big events are behind as much as many small ones).
const INBOUND_BYTES_HOT: usize = INBOUND_BYTES / 4;

/// Writes this node's word (ARGV[6], empty: none) and returns the other nodes' live payloads.
/// ARGV: node id, ttl ms, max ttl ms, max field bytes, max fields returned, payload.
const SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local me, ttl, max_ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local max_len, max_nodes = tonumber(ARGV[4]), tonumber(ARGV[5])
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[1], me, (now + ttl) .. '|' .. ARGV[6])
else
  redis.call('HDEL', KEYS[1], me)
end
local out = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local field, value = all[i], all[i + 1]
  local bar = string.find(value, '|', 1, true)
  local expires = bar and tonumber(string.sub(value, 1, bar - 1))
  if not expires or expires <= now or expires > now + max_ttl or #value > max_len then
    redis.call('HDEL', KEYS[1], field)
  elseif field ~= me and #out < max_nodes then
    out[#out + 1] = string.sub(value, bar + 1)
  end
end
if #all > 0 then redis.call('PEXPIRE', KEYS[1], max_ttl) end
return out
"#;

/// What the other nodes ask, as last read.
#[derive(Debug, Default)]
struct Others {
    /// Some node names every room.
    all: bool,
    rooms: HashSet<ChatId>,
    /// Nodes with a word.
    nodes: usize,
    /// Until when this read is trusted.
    until: Option<Instant>,
}

/// This node's side of the shared pressure: how to read its own, what the others ask. Held by the
/// bus handle (the node asks through [`Pressure`]); the sync thread holds a weak pointer.
pub(super) struct Signals {
    /// This node's field in the hash.
    node: String,
    /// How to read the node's overload ([`Pressure::source`]), called by the sync thread.
    source: Mutex<Option<Box<dyn Fn() -> Hot + Send + Sync>>>,
    others: Mutex<Others>,
    /// False while no other node asks anything: the check every publish makes costs a load.
    any: AtomicBool,
    /// Whether the last sync wrote a word for this node (gauge).
    reporting: AtomicBool,
    sync_failures: AtomicU64,
}

impl Signals {
    pub(super) fn new() -> Arc<Signals> {
        let mut id = [0u8; 8];
        // A clash of two random ids only merges two nodes' words; the time is a fallback.
        if getrandom::fill(&mut id).is_err() {
            let nanos =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            id = (nanos.as_nanos() as u64 ^ u64::from(std::process::id())).to_le_bytes();
        }
        Arc::new(Signals {
            node: format!("{:016x}", u64::from_le_bytes(id)),
            source: Mutex::new(None),
            others: Mutex::default(),
            any: AtomicBool::new(false),
            reporting: AtomicBool::new(false),
            sync_failures: AtomicU64::new(0),
        })
    }

    /// A successful read of the other nodes' payloads, at `now`.
    fn heard(&self, payloads: &[Vec<u8>], now: Instant) {
        let mut others = Others { nodes: payloads.len(), until: Some(now + TRUST), ..Others::default() };
        for payload in payloads {
            if payload.as_slice() == b"*" {
                others.all = true;
                continue;
            }
            let ids = payload.split(|b| *b == b' ').take(MAX_ROOMS);
            others.rooms.extend(ids.filter_map(|id| ChatId::try_parse_ascii(id).ok()));
        }
        self.any.store(others.all || !others.rooms.is_empty(), Ordering::Relaxed);
        *lock(&self.others) = others;
    }
}

/// This node's payload: `*` when it names more rooms than [`MAX_ROOMS`] or its delivery runs far
/// behind Redis (`waiting` pushes of `held` bytes), else its rooms; empty when it is not overloaded.
fn payload(hot: &Hot, waiting: usize, held: usize) -> String {
    if hot.all || hot.rooms.len() > MAX_ROOMS || waiting > INBOUND_HOT || held > INBOUND_BYTES_HOT {
        return "*".into();
    }
    let mut out = String::with_capacity(hot.rooms.len() * 37);
    for (i, room) in hot.rooms.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(&room.to_string());
    }
    out
}

impl Pressure for Signals {
    fn source(&self, hot: Box<dyn Fn() -> Hot + Send + Sync>) {
        *lock(&self.source) = Some(hot);
    }

    fn pressed(&self, chat: ChatId) -> bool {
        if !self.any.load(Ordering::Relaxed) {
            return false;
        }
        let others = lock(&self.others);
        others.until.is_some_and(|until| Instant::now() < until)
            && (others.all || others.rooms.contains(&chat))
    }

    fn metrics(&self) -> Vec<(&'static str, &'static str, &'static str, u64)> {
        let (nodes, rooms, all) = {
            let others = lock(&self.others);
            let live = others.until.is_some_and(|until| Instant::now() < until);
            if live {
                (others.nodes, others.rooms.len(), others.all)
            } else {
                (0, 0, false)
            }
        };
        vec![
            (
                "redis_pressure_nodes",
                "gauge",
                "Other nodes reporting overload: their readers push back on publishers here.",
                nodes as u64,
            ),
            (
                "redis_pressure_rooms",
                "gauge",
                "Rooms other nodes report overloaded (publishes to them wait, then get 429).",
                rooms as u64,
            ),
            (
                "redis_pressure_all",
                "gauge",
                "1 while another node reports every room overloaded.",
                all.into(),
            ),
            (
                "redis_pressure_reporting",
                "gauge",
                "1 while this node reports itself overloaded to the other nodes.",
                self.reporting.load(Ordering::Relaxed).into(),
            ),
            (
                "redis_pressure_sync_failures_total",
                "counter",
                "Pressure syncs with Redis that failed or timed out (the other nodes' word lapses).",
                self.sync_failures.load(Ordering::Relaxed),
            ),
        ]
    }
}

/// Starts the sync thread for a bus on `endpoint`; `inbound` is the delivery task's queue and
/// `held` the bytes waiting in it, watched for how far delivery runs behind Redis. The thread ends
/// once the returned signals are dropped.
/// Must be called inside the runtime: resolving a Sentinel master runs on it.
pub(super) fn start(
    endpoint: Endpoint,
    inbound: mpsc::WeakSender<Inbound>,
    held: Arc<AtomicUsize>,
) -> Arc<Signals> {
    let signals = Signals::new();
    let weak = Arc::downgrade(&signals);
    let runtime = tokio::runtime::Handle::current();
    let spawned = std::thread::Builder::new()
        .name("herald-pressure".into())
        .spawn(move || sync(&endpoint, &runtime, &weak, &inbound, &held));
    if let Err(e) = spawned {
        // The node still admits on its own backlog; only the sharing is missing.
        tracing::error!(error = %e, "could not start the pressure thread; overload is not shared");
    }
    signals
}

/// The sync thread: writes this node's word and reads the others' every [`SYNC_EVERY`].
fn sync(
    endpoint: &Endpoint,
    runtime: &tokio::runtime::Handle,
    weak: &Weak<Signals>,
    inbound: &mpsc::WeakSender<Inbound>,
    held: &AtomicUsize,
) {
    let script = redis::Script::new(SCRIPT);
    let mut conn: Option<redis::Connection> = None;
    let mut connect_at = Instant::now();
    loop {
        std::thread::sleep(SYNC_EVERY);
        let Some(signals) = weak.upgrade() else { return };
        let waiting = inbound.upgrade().map_or(0, |tx| tx.max_capacity() - tx.capacity());
        let hot = lock(&signals.source).as_ref().map(|hot| hot()).unwrap_or_default();
        let payload = payload(&hot, waiting, held.load(Ordering::Relaxed));
        if conn.is_none() && Instant::now() >= connect_at {
            conn = connect(endpoint, runtime);
            connect_at = Instant::now() + RECONNECT_AFTER;
        }
        // No connection: nothing to write or read; the others' word lapses after `TRUST`.
        let Some(c) = conn.as_mut() else { continue };
        let mut call = script.key(PRESSURE_KEY);
        call.arg(&signals.node)
            .arg(TTL.as_millis() as u64)
            .arg(MAX_TTL.as_millis() as u64)
            .arg(MAX_FIELD)
            .arg(MAX_NODES)
            .arg(&payload);
        match call.invoke::<Vec<Vec<u8>>>(c) {
            Ok(payloads) => {
                signals.reporting.store(!payload.is_empty(), Ordering::Relaxed);
                signals.heard(&payloads, Instant::now());
            }
            Err(e) => {
                signals.sync_failures.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "redis pressure sync failed");
                conn = None;
            }
        }
    }
}

/// A blocking connection to the master (found anew under Sentinel: after a failover the old one
/// refuses the script's writes, which drops the connection) whose every command gives up after
/// [`TRUST`].
fn connect(endpoint: &Endpoint, runtime: &tokio::runtime::Handle) -> Option<redis::Connection> {
    let master = runtime.block_on(endpoint.resolve(TRUST)).ok()?;
    let conn = master.client.get_connection_with_timeout(TRUST).ok()?;
    conn.set_read_timeout(Some(TRUST)).ok()?;
    conn.set_write_timeout(Some(TRUST)).ok()?;
    Some(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_names_rooms_or_every_room() {
        let a = ChatId::from_u128(1);
        let b = ChatId::from_u128(2);
        assert_eq!(payload(&Hot::default(), 0, 0), "");
        assert_eq!(payload(&Hot { all: false, rooms: vec![a, b] }, 0, 0), format!("{a} {b}"));
        assert_eq!(payload(&Hot { all: true, rooms: vec![] }, 0, 0), "*");
        let many = Hot { all: false, rooms: (0..=MAX_ROOMS as u128).map(ChatId::from_u128).collect() };
        assert_eq!(payload(&many, 0, 0), "*");
        assert_eq!(payload(&Hot::default(), INBOUND_HOT + 1, 0), "*", "delivery far behind Redis");
        assert_eq!(payload(&Hot::default(), 1, INBOUND_BYTES_HOT + 1), "*", "in bytes too");
    }

    #[test]
    fn what_other_nodes_ask_is_read_strictly_and_lapses() {
        let signals = Signals::new();
        let a = ChatId::from_u128(1);
        let b = ChatId::from_u128(2);
        assert!(!signals.pressed(a), "nobody asked");
        let now = Instant::now();
        let garbage = format!("not-a-uuid {a} \u{0}\u{ff} {}", "x".repeat(100));
        signals.heard(&[garbage.into_bytes()], now);
        assert!(signals.pressed(a) && !signals.pressed(b), "good ids count, bad ones are skipped");
        signals.heard(&[b"*".to_vec()], now);
        assert!(signals.pressed(b), "every room");
        signals.heard(&[], now);
        assert!(!signals.pressed(a), "an empty read ends it");
        // A read that is not renewed lapses.
        signals.heard(&[b"*".to_vec()], now - TRUST);
        assert!(!signals.pressed(a));
        let metrics = signals.metrics();
        assert!(metrics.iter().all(|(name, ..)| name.starts_with("redis_pressure_")));
        assert_eq!(metrics.iter().find(|m| m.0 == "redis_pressure_nodes").map(|m| m.3), Some(0));
    }
}
