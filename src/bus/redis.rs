//! The Redis pub/sub bus (multi-node): every accepted event goes through Redis, which assigns room
//! `seq`, and each node delivers what Redis sends it to its own broadcaster.
//!
//! # Design
//!
//! - **One connection per node**, RESP3, owned by a supervisor task. It carries publishes (Lua
//!   script calls) and the node's subscriptions (pushes). The supervisor alone issues `SUBSCRIBE` /
//!   `UNSUBSCRIBE`, so subscription changes never race each other; it reconnects with capped
//!   exponential backoff and restores every needed subscription itself (we do not use
//!   `ConnectionManager`'s automatic resubscription: we need a hook at reconnect to re-seed room
//!   counters and to gate publishing, and exact control of the subscription set).
//! - **Channels**: `herald:room:<chat>` while a local subscriber watches the room,
//!   `herald:user:<user>` while the user is connected here, and `herald:members`, which every node
//!   subscribes to for its whole life (membership events must reach every node).
//! - **Sequencing**: one Lua script call per `publish` batch INCRs each room's counter
//!   (`herald:seq:<chat>`) and PUBLISHes the event with that `seq` in one atomic step, so every node
//!   sees the same `seq` in the same order. Non-room events get a global counter (`herald:gseq`)
//!   used only to drop the copies a node receives on several channels (a task event for two local
//!   users) and to order membership against the membership snapshot.
//! - **Seq never goes back after a Redis restart** (Redis may keep nothing): every node remembers
//!   the highest `seq` it saw per room (delivered or assigned to its own publishes) and re-seeds the
//!   counters (`SET max(current, known)`) on every reconnect before it publishes again; the publish
//!   script also takes that floor per event. Because the publishing node may know nothing about a
//!   room only another node watched, the script refuses room events for `settle` after Redis lost
//!   its state (detected by the missing `herald:boot` key), which gives every node time to
//!   reconnect and re-seed. A node that still sees a room's `seq` go backwards drops the event,
//!   counts it, and re-seeds that room.
//! - **Membership** is also stored in Redis sets (`herald:members:<chat>` plus the index
//!   `herald:member-chats`) by the same script, and each (re)connecting node loads a snapshot, so a
//!   node started later knows who may subscribe. Live membership events are held back until the
//!   snapshot is applied and those already in it are skipped, so a stale snapshot never re-adds a
//!   member removed after it.
//! - **Failure**: while Redis is unreachable `publish` and `watch` return
//!   [`BusError::Unavailable`] and [`Bus::health`] is degraded. Events published during an outage
//!   are refused, never half-claimed; events another node published while this node was
//!   reconnecting are lost to it, which its clients see as a `seq` gap.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, IntoConnectionInfo, ProtocolVersion, PushInfo, PushKind, Value};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{BoxFuture, Bus, BusError, Deliver, Health, Topic};
use crate::config::BusConfig;
use crate::protocol::event::{DomainEvent, EventKind};
use crate::protocol::{ChatId, UserId};

/// The channel every node subscribes to for its whole life: membership events.
pub const MEMBERS_CHANNEL: &str = "herald:members";
const BOOT_KEY: &str = "herald:boot";
const GSEQ_KEY: &str = "herald:gseq";
const MEMBER_INDEX_KEY: &str = "herald:member-chats";
const MEMBER_SET_PREFIX: &str = "herald:members:";

/// Pushes that may wait for the delivery task; beyond it they are dropped and counted (the clients
/// see a `seq` gap) rather than growing memory without bound.
const INBOUND_CAPACITY: usize = 65_536;
/// Publish calls that may wait for the publisher task; callers beyond it wait (backpressure).
const PUBLISH_QUEUE: usize = 1024;
/// Events one pipeline carries at most, so one write stays a reasonable size.
const MAX_BATCH_EVENTS: usize = 4096;
/// Channels per `SUBSCRIBE` / `UNSUBSCRIBE` command and rooms per re-seed call.
const CHUNK: usize = 512;
/// Membership events held back while the snapshot loads; beyond it they are applied directly.
const MAX_HELD_MEMBER_EVENTS: usize = 65_536;

/// The Redis channel for a topic (public so tests and tools can inspect `PUBSUB CHANNELS`).
pub fn channel(topic: Topic) -> String {
    match topic {
        Topic::Room(chat) => format!("herald:room:{chat}"),
        Topic::User(user) => format!("herald:user:{user}"),
    }
}

fn seq_key(chat: ChatId) -> String {
    format!("herald:seq:{chat}")
}

/// Timing knobs. [`RedisBus::connect`] uses the defaults; tests shorten them.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// How long after Redis lost its state room events are refused, so every node can reconnect
    /// and re-seed the room counters first. Must exceed the longest reconnect wait
    /// (`backoff_max` plus up to 50% jitter) plus a connect.
    pub settle: Duration,
    /// Longest wait between reconnect attempts.
    pub backoff_max: Duration,
    /// How often the supervisor PINGs; a PING slower than `ping_timeout` counts as a lost connection.
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    /// Connect timeout of one attempt, and the reply timeout of every command.
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    /// How long `watch` waits for its `SUBSCRIBE` to be confirmed.
    pub watch_timeout: Duration,
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
        }
    }
}

/// Counters for `/metrics` (suggested names in brackets). Shared with the server through
/// [`RedisBus::stats`] before the bus is boxed as `dyn Bus`.
#[derive(Debug, Default)]
pub struct RedisStats {
    /// Connections re-established after one was lost (`herald_redis_reconnects_total`).
    pub reconnects: AtomicU64,
    /// Publish calls answered with `Unavailable` (`herald_redis_publish_failures_total`).
    pub publish_failures: AtomicU64,
    /// Pushes dropped because the delivery task fell behind (`herald_redis_inbound_dropped_total`).
    pub inbound_dropped: AtomicU64,
    /// Room events whose `seq` went backwards, dropped (`herald_redis_seq_regressions_total`).
    pub seq_regressions: AtomicU64,
    /// Copies of an event received on several channels, dropped (`herald_redis_duplicates_total`).
    pub duplicates_dropped: AtomicU64,
}

/// Where the connection stands; `health()` is derived from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No attempt has finished yet (startup).
    Connecting,
    Down,
    /// Connected, but Redis lost its state recently: room events are refused until the deadline.
    Settling,
    Up,
}

/// Local interest in one topic.
#[derive(Default)]
struct TopicState {
    /// Local subscribers (`watch` minus `unwatch`).
    count: usize,
    /// Whether the current connection's `SUBSCRIBE` for it is confirmed.
    subscribed: bool,
    /// `watch` calls waiting for the confirmation; the supervisor answers them.
    waiters: Vec<oneshot::Sender<Result<(), BusError>>>,
}

#[derive(Default)]
struct Topics {
    map: HashMap<Topic, TopicState>,
    /// Topics whose wanted and confirmed state may differ; only the supervisor drains it.
    dirty: HashSet<Topic>,
    /// Rooms whose Redis counter must be re-seeded from `floors` (a regression was seen).
    reseed: HashSet<ChatId>,
}

/// What the connection's push sender and the supervisor hand to the delivery task, in order.
enum Inbound {
    /// A new connection (generation `gen`) is about to be opened: pushes of older ones are stale.
    Reset {
        gen: u64,
    },
    /// The membership snapshot of generation `gen`, taken at global counter `ver`.
    Snapshot {
        gen: u64,
        ver: u64,
        pairs: Vec<(ChatId, UserId)>,
    },
    Push {
        gen: u64,
        info: PushInfo,
    },
}

/// One `publish` call waiting for the publisher task.
struct PublishReq {
    events: Vec<DomainEvent>,
    /// The caller's `publish` future holds the receiver; dropping it just discards the answer.
    reply: oneshot::Sender<Result<(), BusError>>,
}

/// State shared by the bus handle and its three tasks.
struct Shared {
    sink: Arc<dyn Deliver>,
    options: RedisOptions,
    topics: Mutex<Topics>,
    /// Wakes the supervisor to reconcile `topics.dirty` / `topics.reseed`.
    kick: Notify,
    /// The live connection, present only once its subscriptions, re-seed and scripts are in place.
    /// The publisher and `watch` read it; only the supervisor sets it.
    conn: Mutex<Option<MultiplexedConnection>>,
    phase: watch::Sender<Phase>,
    /// Highest room `seq` this node knows (delivered or assigned to its publishes): the floor for
    /// re-seeding. Kept for every room seen while the process lives (a few dozen bytes each).
    floors: Mutex<HashMap<ChatId, u64>>,
    /// Generation whose connection reported a disconnection, and the wake-up for the supervisor.
    lost_gen: AtomicU64,
    lost: Notify,
    stats: Arc<RedisStats>,
    scripts: Scripts,
}

struct Scripts {
    publish: redis::Script,
    reseed: redis::Script,
    snapshot: redis::Script,
}

/// Lua shared by the scripts that need Redis's clock and boot mark: sets `now` (ms) and `boot`
/// (when Redis's state began, recorded under KEYS[1] on first sight).
macro_rules! boot_prelude {
    () => {
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local boot = redis.call('GET', KEYS[1])
if not boot then
  redis.call('SET', KEYS[1], now)
  boot = now
end
"#
    };
}

/// Publishes one batch atomically. KEYS: boot, gseq, member index, then one key per event (room
/// counter, member set, or gseq). ARGV: settle ms, has-room flag, then per event: op, floor, chat,
/// user, payload (event JSON without seq), channel count, channels. Returns the seqs.
const PUBLISH_LUA: &str = concat!(
    boot_prelude!(),
    r#"if ARGV[2] == '1' and now - tonumber(boot) < tonumber(ARGV[1]) then
  return redis.error_reply('SETTLING redis lost its state recently; nodes are re-seeding room seq')
end
local seqs = {}
local i = 3
for k = 4, #KEYS do
  local key = KEYS[k]
  local op, floor, chat, user, payload = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local nch = tonumber(ARGV[i + 5])
  i = i + 6
  local seq
  if op == 'r' then
    local cur = tonumber(redis.call('GET', key) or '0')
    if cur < floor then redis.call('SET', key, floor) end
    seq = redis.call('INCR', key)
  else
    if op == 'a' then
      redis.call('SADD', key, user)
      redis.call('SADD', KEYS[3], chat)
    elseif op == 'x' then
      redis.call('SREM', key, user)
      if redis.call('SCARD', key) == 0 then redis.call('SREM', KEYS[3], chat) end
    end
    seq = redis.call('INCR', KEYS[2])
  end
  local msg = string.sub(payload, 1, -2) .. ',"seq":' .. string.format('%d', seq) .. '}'
  for c = 0, nch - 1 do
    redis.call('PUBLISH', ARGV[i + c], msg)
  end
  i = i + nch
  seqs[#seqs + 1] = seq
end
return seqs
"#
);

/// Marks Redis's state as seen (boot key) and raises room counters to the floors this node knows.
/// KEYS: boot, then room counters; ARGV: the floors. Returns ms since Redis's state began.
const RESEED_LUA: &str = concat!(
    boot_prelude!(),
    r#"for k = 2, #KEYS do
  local floor = tonumber(ARGV[k - 1])
  local cur = tonumber(redis.call('GET', KEYS[k]) or '0')
  if cur < floor then redis.call('SET', KEYS[k], floor) end
end
return now - tonumber(boot)
"#
);

/// The membership snapshot: the global counter, then (chat, user) pairs, flattened.
/// KEYS: member index, gseq; ARGV: member set prefix.
const SNAPSHOT_LUA: &str = r#"
local out = { redis.call('GET', KEYS[2]) or '0' }
for _, chat in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  for _, user in ipairs(redis.call('SMEMBERS', ARGV[1] .. chat)) do
    out[#out + 1] = chat
    out[#out + 1] = user
  end
end
return out
"#;

fn unavailable(why: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(why.to_string())
}

/// Locks a std mutex; a panic elsewhere while holding it leaves plain data we can keep using.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The Redis bus handle. Dropping it stops its tasks and closes the connection.
pub struct RedisBus {
    shared: Arc<Shared>,
    /// The publisher task holds the receiver; a closed queue means the task is gone.
    publish_tx: mpsc::Sender<PublishReq>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for RedisBus {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl RedisBus {
    /// Connects with default [`RedisOptions`]. See [`RedisBus::connect_with`].
    pub async fn connect(config: &BusConfig, sink: Arc<dyn Deliver>) -> Result<RedisBus, BusError> {
        RedisBus::connect_with(config, sink, RedisOptions::default()).await
    }

    /// Starts the bus. Fails only for an unusable `bus.redis_url`. When Redis is unreachable it
    /// starts degraded (publishes answer `Unavailable`, logged as an error) and keeps retrying.
    /// When Redis is reachable it returns once publishing works, which after a fresh Redis takes
    /// up to `options.settle`.
    pub async fn connect_with(
        config: &BusConfig,
        sink: Arc<dyn Deliver>,
        options: RedisOptions,
    ) -> Result<RedisBus, BusError> {
        let client = open_client(&config.redis_url)?;
        let target = redacted(&config.redis_url);
        let (phase, mut phase_rx) = watch::channel(Phase::Connecting);
        let shared = Arc::new(Shared {
            sink,
            options,
            topics: Mutex::default(),
            kick: Notify::new(),
            conn: Mutex::new(None),
            phase,
            floors: Mutex::default(),
            lost_gen: AtomicU64::new(0),
            lost: Notify::new(),
            stats: Arc::default(),
            scripts: Scripts {
                publish: redis::Script::new(PUBLISH_LUA),
                reseed: redis::Script::new(RESEED_LUA),
                snapshot: redis::Script::new(SNAPSHOT_LUA),
            },
        });
        let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_CAPACITY);
        let (publish_tx, publish_rx) = mpsc::channel(PUBLISH_QUEUE);
        let tasks = vec![
            tokio::spawn(deliver_task(shared.clone(), inbound_rx)),
            tokio::spawn(publisher_task(shared.clone(), publish_rx)),
            tokio::spawn(supervise(shared.clone(), client, inbound_tx, target.clone())),
        ];
        let bus = RedisBus { shared, publish_tx, tasks };

        // Wait for the first attempt's outcome; once connected, also for a fresh Redis to settle.
        let wait = bus.shared.options.settle + bus.shared.options.connect_timeout * 2;
        let settled =
            tokio::time::timeout(wait, phase_rx.wait_for(|p| matches!(p, Phase::Up | Phase::Down))).await;
        match settled.ok().and_then(Result::ok).map(|p| *p) {
            Some(Phase::Up) => tracing::info!(redis = %target, "redis bus connected"),
            _ => tracing::error!(
                redis = %target,
                "bus.redis_url: Redis is unreachable; starting degraded (publishes answer 503) and retrying"
            ),
        }
        Ok(bus)
    }

    /// The bus's counters, to be exported by `/metrics`.
    pub fn stats(&self) -> Arc<RedisStats> {
        self.shared.stats.clone()
    }
}

/// Builds a RESP3 client (pushes need it) from `bus.redis_url`.
fn open_client(url: &str) -> Result<redis::Client, BusError> {
    let bad = |e: redis::RedisError| unavailable(format!("bus.redis_url {}: {e}", redacted(url)));
    let info = url.into_connection_info().map_err(bad)?;
    let settings = info.redis_settings().clone().set_protocol(ProtocolVersion::RESP3);
    redis::Client::open(info.set_redis_settings(settings)).map_err(bad)
}

/// The URL without its password, for logs.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://***@{}", &url[..scheme], &url[at + 1..]),
        _ => url.to_string(),
    }
}

impl Bus for RedisBus {
    fn publish(&self, events: Vec<DomainEvent>) -> BoxFuture<'_, Result<(), BusError>> {
        Box::pin(async move {
            // Unknown types are only counted by the broadcaster: keep them local so the count is
            // per node, not multiplied by the number of nodes.
            let (unknown, events): (Vec<_>, Vec<_>) =
                events.into_iter().partition(|e| e.kind == EventKind::Unknown);
            if !events.is_empty() {
                let result = self.send_to_publisher(events).await;
                if result.is_err() {
                    self.shared.stats.publish_failures.fetch_add(1, Ordering::Relaxed);
                }
                result?;
            }
            for event in &unknown {
                self.shared.sink.deliver(event, None);
            }
            Ok(())
        })
    }

    fn watch(&self, topic: Topic) -> BoxFuture<'_, Result<(), BusError>> {
        Box::pin(async move {
            if lock(&self.shared.conn).is_none() {
                return Err(unavailable("redis unreachable"));
            }
            let rx = {
                let mut topics = lock(&self.shared.topics);
                let state = topics.map.entry(topic).or_default();
                state.count += 1;
                if state.subscribed {
                    return Ok(());
                }
                let (tx, rx) = oneshot::channel();
                state.waiters.push(tx);
                topics.dirty.insert(topic);
                rx
            };
            self.shared.kick.notify_one();
            // Until confirmed, this watch is counted only by the guard: an error, a timeout or a
            // cancelled caller takes the count back, so the caller never calls `unwatch` for it.
            let guard = WatchGuard { shared: &self.shared, topic: Some(topic) };
            match tokio::time::timeout(self.shared.options.watch_timeout, rx).await {
                Ok(Ok(Ok(()))) => {
                    guard.keep();
                    Ok(())
                }
                Ok(Ok(Err(e))) => Err(e),
                Ok(Err(_)) => Err(unavailable("redis bus stopped")),
                Err(_) => Err(unavailable("redis did not confirm the subscription in time")),
            }
        })
    }

    fn unwatch(&self, topic: Topic) {
        self.shared.unwatch(topic);
    }

    fn recover(&self, chat: ChatId, _since: Option<u64>) -> BoxFuture<'_, Result<super::Recovery, BusError>> {
        Box::pin(async move {
            let mut conn = self.shared.current_conn().ok_or_else(|| unavailable("redis unreachable"))?;
            let head: Option<u64> = redis::cmd("GET")
                .arg(seq_key(chat))
                .query_async(&mut conn)
                .await
                .map_err(|e| unavailable(format!("redis: {e}")))?;
            Ok(super::Recovery { head: head.unwrap_or(0), events: None })
        })
    }

    fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        let stats = &self.shared.stats;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("redis_reconnects_total", "Redis connections re-established.", get(&stats.reconnects)),
            (
                "redis_publish_failures_total",
                "Publishes refused while Redis was unavailable.",
                get(&stats.publish_failures),
            ),
            (
                "redis_inbound_dropped_total",
                "Redis pushes dropped because delivery fell behind.",
                get(&stats.inbound_dropped),
            ),
            (
                "redis_seq_regressions_total",
                "Room events whose seq went backwards, dropped.",
                get(&stats.seq_regressions),
            ),
            (
                "redis_duplicates_total",
                "Duplicate copies of an event dropped.",
                get(&stats.duplicates_dropped),
            ),
        ]
    }

    fn health(&self) -> Health {
        match *self.shared.phase.borrow() {
            Phase::Up => Health::Ok,
            Phase::Settling => Health::Degraded("redis lost its state; re-seeding room seq"),
            Phase::Connecting | Phase::Down => Health::Degraded("redis unreachable"),
        }
    }
}

impl RedisBus {
    async fn send_to_publisher(&self, events: Vec<DomainEvent>) -> Result<(), BusError> {
        // Refuse fast while down instead of queueing behind a dead connection.
        if lock(&self.shared.conn).is_none() {
            return Err(unavailable("redis unreachable"));
        }
        let (reply, rx) = oneshot::channel();
        self.publish_tx
            .send(PublishReq { events, reply })
            .await
            .map_err(|_| unavailable("redis publisher stopped"))?;
        rx.await.unwrap_or_else(|_| Err(unavailable("redis publisher stopped")))
    }
}

/// Takes back an unconfirmed watch's count when dropped.
struct WatchGuard<'a> {
    shared: &'a Shared,
    topic: Option<Topic>,
}

impl WatchGuard<'_> {
    fn keep(mut self) {
        self.topic = None;
    }
}

impl Drop for WatchGuard<'_> {
    fn drop(&mut self) {
        if let Some(topic) = self.topic {
            self.shared.unwatch(topic);
        }
    }
}

impl Shared {
    fn unwatch(&self, topic: Topic) {
        let mut topics = lock(&self.topics);
        let Some(state) = topics.map.get_mut(&topic) else {
            tracing::warn!(?topic, "unwatch without a matching watch; ignored");
            return;
        };
        state.count = state.count.saturating_sub(1);
        if state.count == 0 {
            topics.dirty.insert(topic);
            drop(topics);
            self.kick.notify_one();
        }
    }

    fn current_conn(&self) -> Option<MultiplexedConnection> {
        lock(&self.conn).clone()
    }

    /// Raises this node's known floor for a room.
    fn note_seq(&self, chat: ChatId, seq: u64) {
        let mut floors = lock(&self.floors);
        let floor = floors.entry(chat).or_insert(0);
        *floor = (*floor).max(seq);
    }

    /// The connection is gone: refuse publishes and watches, forget confirmations, fail waiters.
    fn go_down(&self) {
        *lock(&self.conn) = None;
        self.phase.send_replace(Phase::Down);
        let mut topics = lock(&self.topics);
        let Topics { map, dirty, .. } = &mut *topics;
        map.retain(|topic, state| {
            state.subscribed = false;
            for waiter in state.waiters.drain(..) {
                let _ = waiter.send(Err(unavailable("redis connection lost")));
            }
            if state.count > 0 {
                // Resubscribed by the next connection's first reconcile.
                dirty.insert(*topic);
            }
            state.count > 0
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Supervisor: connects, restores state, reconciles subscriptions, detects loss, backs off.

async fn supervise(
    shared: Arc<Shared>,
    client: redis::Client,
    inbound: mpsc::Sender<Inbound>,
    target: String,
) {
    let mut gen = 0u64;
    let mut delay = Duration::from_millis(50);
    let mut was_up = false;
    let mut failures = 0u64;
    loop {
        gen += 1;
        // Sent before the connection exists, so it precedes every push of that connection.
        if inbound.send(Inbound::Reset { gen }).await.is_err() {
            return;
        }
        match open_session(&shared, &client, &inbound, gen).await {
            Ok((conn, settle_until)) => {
                if was_up {
                    shared.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                if was_up || failures > 0 {
                    tracing::warn!(redis = %target, "redis bus reconnected; subscriptions restored");
                }
                was_up = true;
                failures = 0;
                delay = Duration::from_millis(50);
                let err = run_session(&shared, conn, gen, settle_until).await;
                shared.go_down();
                tracing::error!(
                    redis = %target, error = %err,
                    "redis bus lost its connection; publishes answer 503 until it is back"
                );
            }
            Err(e) => {
                shared.go_down();
                failures += 1;
                // Loud on the first failure and then every ~30 attempts, not on every retry.
                if failures == 1 || failures % 30 == 0 {
                    tracing::error!(redis = %target, error = %e, attempts = failures, "redis bus cannot connect; retrying");
                }
            }
        }
        let jitter = delay.mul_f64(f64::from(getrandom::u32().unwrap_or(0) % 1000) / 2000.0);
        tokio::time::sleep(delay + jitter).await;
        delay = (delay * 2).min(shared.options.backoff_max);
    }
}

/// Opens a connection and restores everything the node needs before it is used: scripts, room
/// counter floors, the global and watched subscriptions, the membership snapshot.
async fn open_session(
    shared: &Arc<Shared>,
    client: &redis::Client,
    inbound: &mpsc::Sender<Inbound>,
    gen: u64,
) -> Result<(MultiplexedConnection, Option<Instant>), redis::RedisError> {
    let push_tx = inbound.clone();
    let weak = Arc::downgrade(shared);
    // Runs on the connection's reader: must not block, so it only forwards or counts.
    let push_sender = move |info: PushInfo| -> Result<(), ()> {
        let Some(shared) = weak.upgrade() else { return Err(()) };
        match info.kind {
            PushKind::Disconnection => {
                shared.lost_gen.store(gen, Ordering::SeqCst);
                shared.lost.notify_one();
                Ok(())
            }
            PushKind::Message => match push_tx.try_send(Inbound::Push { gen, info }) {
                Ok(()) => Ok(()),
                Err(mpsc::error::TrySendError::Full(_)) => {
                    if shared.stats.inbound_dropped.fetch_add(1, Ordering::Relaxed) % 10_000 == 0 {
                        tracing::error!("redis bus delivery task is behind; dropping events (seq gaps)");
                    }
                    Ok(())
                }
                Err(mpsc::error::TrySendError::Closed(_)) => Err(()),
            },
            // Subscribe confirmations are awaited as replies; other kinds do not concern us.
            _ => Ok(()),
        }
    };
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(shared.options.connect_timeout))
        .set_response_timeout(Some(shared.options.response_timeout))
        .set_push_sender(push_sender);
    let mut conn = client.get_multiplexed_async_connection_with_config(&config).await?;

    for code in [PUBLISH_LUA, RESEED_LUA, SNAPSHOT_LUA] {
        redis::cmd("SCRIPT").arg("LOAD").arg(code).query_async::<String>(&mut conn).await?;
    }

    // Re-seed every room this node knows before it publishes again (a restarted Redis starts empty).
    let floors: Vec<(ChatId, u64)> = lock(&shared.floors).iter().map(|(c, s)| (*c, *s)).collect();
    let age_ms = reseed(shared, &mut conn, &floors).await?;
    let settle_ms = u64::try_from(shared.options.settle.as_millis()).unwrap_or(u64::MAX);
    let settle_until =
        (age_ms < settle_ms).then(|| Instant::now() + Duration::from_millis(settle_ms - age_ms));

    conn.subscribe(MEMBERS_CHANNEL).await?;
    {
        // Everything watched is resubscribed by the first reconcile.
        let mut topics = lock(&shared.topics);
        let Topics { map, dirty, .. } = &mut *topics;
        dirty.extend(map.keys().copied());
    }
    reconcile(shared, &mut conn).await?;

    // Snapshot after subscribing to the members channel, so nothing falls between the two.
    let flat: Vec<String> = redis::cmd("EVALSHA")
        .arg(shared.scripts.snapshot.get_hash())
        .arg(2)
        .arg(MEMBER_INDEX_KEY)
        .arg(GSEQ_KEY)
        .arg(MEMBER_SET_PREFIX)
        .query_async(&mut conn)
        .await?;
    let ver = flat.first().and_then(|v| v.parse().ok()).unwrap_or(0);
    let pairs = flat
        .get(1..)
        .unwrap_or_default()
        .chunks_exact(2)
        .filter_map(|p| Some((p[0].parse().ok()?, p[1].parse().ok()?)))
        .collect();
    if inbound.send(Inbound::Snapshot { gen, ver, pairs }).await.is_err() {
        return Err(redis::RedisError::from((redis::ErrorKind::Client, "redis bus stopped")));
    }

    *lock(&shared.conn) = Some(conn.clone());
    shared.phase.send_replace(if settle_until.is_some() { Phase::Settling } else { Phase::Up });
    Ok((conn, settle_until))
}

/// Raises room counters to the given floors (in chunks); returns ms since Redis's state began.
async fn reseed(
    shared: &Shared,
    conn: &mut MultiplexedConnection,
    floors: &[(ChatId, u64)],
) -> Result<u64, redis::RedisError> {
    let mut age = u64::MAX;
    let mut chunks: Vec<&[(ChatId, u64)]> = floors.chunks(CHUNK).collect();
    if chunks.is_empty() {
        chunks.push(&[]);
    }
    for chunk in chunks {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(shared.scripts.reseed.get_hash()).arg(1 + chunk.len()).arg(BOOT_KEY);
        for (chat, _) in chunk {
            cmd.arg(seq_key(*chat));
        }
        for (_, floor) in chunk {
            cmd.arg(*floor);
        }
        let a: i64 = cmd.query_async(conn).await?;
        age = age.min(u64::try_from(a).unwrap_or(0));
    }
    Ok(age)
}

/// Serves one connection until it fails; returns why.
async fn run_session(
    shared: &Shared,
    mut conn: MultiplexedConnection,
    gen: u64,
    mut settle_until: Option<Instant>,
) -> redis::RedisError {
    let mut ping = tokio::time::interval(shared.options.ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let settle_at = settle_until.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            _ = shared.kick.notified() => {
                if let Err(e) = reconcile(shared, &mut conn).await {
                    return e;
                }
            }
            _ = ping.tick() => {
                let pong = tokio::time::timeout(
                    shared.options.ping_timeout,
                    redis::cmd("PING").query_async::<String>(&mut conn),
                ).await;
                match pong {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return e,
                    Err(_) => return redis::RedisError::from((redis::ErrorKind::Io, "PING timed out")),
                }
            }
            _ = shared.lost.notified() => {
                if shared.lost_gen.load(Ordering::SeqCst) == gen {
                    return redis::RedisError::from((redis::ErrorKind::Io, "connection closed"));
                }
            }
            _ = tokio::time::sleep_until(settle_at), if settle_until.is_some() => {
                settle_until = None;
                shared.phase.send_replace(Phase::Up);
            }
        }
    }
}

/// Brings Redis subscriptions in line with local interest, and re-seeds regressed rooms. Only the
/// supervisor calls it, so SUBSCRIBE/UNSUBSCRIBE for a topic are never in flight twice; watches
/// and unwatches that happen meanwhile mark the topic dirty again and are handled next round.
async fn reconcile(shared: &Shared, conn: &mut MultiplexedConnection) -> Result<(), redis::RedisError> {
    loop {
        let mut subs = Vec::new();
        let mut unsubs = Vec::new();
        let reseed_rooms: Vec<ChatId>;
        {
            let mut topics = lock(&shared.topics);
            let Topics { map, dirty, reseed } = &mut *topics;
            reseed_rooms = reseed.drain().collect();
            for topic in dirty.drain() {
                let Some(state) = map.get_mut(&topic) else { continue };
                match (state.count > 0, state.subscribed) {
                    (true, false) => subs.push(topic),
                    (false, true) => unsubs.push(topic),
                    (false, false) => {
                        map.remove(&topic);
                    }
                    (true, true) => {
                        for waiter in state.waiters.drain(..) {
                            let _ = waiter.send(Ok(()));
                        }
                    }
                }
            }
        }
        if !reseed_rooms.is_empty() {
            let floors: Vec<(ChatId, u64)> = {
                let known = lock(&shared.floors);
                reseed_rooms.iter().filter_map(|c| known.get(c).map(|f| (*c, *f))).collect()
            };
            reseed(shared, conn, &floors).await?;
        }
        if subs.is_empty() && unsubs.is_empty() {
            return Ok(());
        }
        for chunk in unsubs.chunks(CHUNK) {
            let channels: Vec<String> = chunk.iter().map(|t| channel(*t)).collect();
            conn.unsubscribe(&channels).await?;
            let mut topics = lock(&shared.topics);
            let Topics { map, dirty, .. } = &mut *topics;
            for topic in chunk {
                if let Some(state) = map.get_mut(topic) {
                    state.subscribed = false;
                    if state.count == 0 {
                        map.remove(topic);
                    } else {
                        // Watched again while the UNSUBSCRIBE was in flight.
                        dirty.insert(*topic);
                    }
                }
            }
        }
        for chunk in subs.chunks(CHUNK) {
            let channels: Vec<String> = chunk.iter().map(|t| channel(*t)).collect();
            conn.subscribe(&channels).await?;
            let mut topics = lock(&shared.topics);
            let Topics { map, dirty, .. } = &mut *topics;
            for topic in chunk {
                if let Some(state) = map.get_mut(topic) {
                    state.subscribed = true;
                    for waiter in state.waiters.drain(..) {
                        let _ = waiter.send(Ok(()));
                    }
                    if state.count == 0 {
                        // Unwatched while the SUBSCRIBE was in flight.
                        dirty.insert(*topic);
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Publisher: batches concurrent publish calls into one pipeline of script calls.

async fn publisher_task(shared: Arc<Shared>, mut rx: mpsc::Receiver<PublishReq>) {
    while let Some(first) = rx.recv().await {
        // Everything queued while the previous pipeline was in flight goes out together.
        let mut n = first.events.len();
        let mut batch = vec![first];
        while n < MAX_BATCH_EVENTS {
            match rx.try_recv() {
                Ok(req) => {
                    n += req.events.len();
                    batch.push(req);
                }
                Err(_) => break,
            }
        }
        let Some(mut conn) = shared.current_conn() else {
            for req in batch {
                let _ = req.reply.send(Err(unavailable("redis unreachable")));
            }
            continue;
        };
        let results = publish_batch(&shared, &mut conn, &batch).await;
        for (req, result) in batch.into_iter().zip(results) {
            let _ = req.reply.send(result);
        }
    }
}

/// Runs one script call per request in a single pipeline; one result per request.
async fn publish_batch(
    shared: &Shared,
    conn: &mut MultiplexedConnection,
    batch: &[PublishReq],
) -> Vec<Result<(), BusError>> {
    let calls: Vec<Option<ScriptCall>> = batch.iter().map(|req| script_call(shared, &req.events)).collect();
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for call in calls.iter().flatten() {
        pipe.add_command(call.cmd.clone());
    }
    let mut replies = if pipe.is_empty() {
        Ok(Vec::new())
    } else {
        pipe.query_async::<Vec<redis::RedisResult<Value>>>(conn).await
    };
    // Someone flushed the script cache: load it again and retry those calls once.
    if let Ok(results) = &replies {
        if results.iter().any(|r| r.as_ref().err().and_then(|e| e.code()) == Some("NOSCRIPT")) {
            let loaded = redis::cmd("SCRIPT").arg("LOAD").arg(PUBLISH_LUA).query_async::<String>(conn).await;
            if loaded.is_ok() {
                replies = pipe.query_async::<Vec<redis::RedisResult<Value>>>(conn).await;
            }
        }
    }
    let mut replies = match replies {
        Ok(replies) => replies.into_iter(),
        Err(e) => {
            // The connection failed mid-pipeline: some calls may have run, but none is claimed.
            // The supervisor's PING or the disconnection push notices a dead connection.
            tracing::warn!(error = %e, "redis publish failed");
            return batch.iter().map(|_| Err(unavailable(format!("redis: {e}")))).collect();
        }
    };
    calls
        .iter()
        .map(|call| {
            let Some(call) = call else { return Ok(()) };
            match replies.next() {
                Some(Ok(Value::Array(seqs))) => {
                    for (room, seq) in call.rooms.iter().zip(seqs) {
                        if let (Some(chat), Value::Int(seq)) = (room, seq) {
                            shared.note_seq(*chat, u64::try_from(seq).unwrap_or(0));
                        }
                    }
                    Ok(())
                }
                Some(Ok(other)) => Err(unavailable(format!("redis: unexpected reply {other:?}"))),
                Some(Err(e)) if e.code() == Some("SETTLING") => Err(unavailable(
                    "redis lost its state recently; room seq is being re-seeded, retry shortly",
                )),
                Some(Err(e)) => Err(unavailable(format!("redis: {e}"))),
                None => Err(unavailable("redis: missing reply")),
            }
        })
        .collect()
}

/// The channels an event is published to; `None` for events that go nowhere.
fn channels_of(event: &DomainEvent) -> Option<Vec<String>> {
    let users = |ids: &[UserId]| ids.iter().map(|u| channel(Topic::User(*u))).collect::<Vec<_>>();
    let channels = match event.kind {
        EventKind::MessageSent | EventKind::ChatUpdated | EventKind::TaskStatusChanged => {
            let mut channels: Vec<String> =
                event.room().map(|c| channel(Topic::Room(c))).into_iter().collect();
            channels.extend(users(&event.user_ids));
            channels
        }
        EventKind::NotificationCreated => users(event.user_id.as_slice()),
        EventKind::MemberAdded | EventKind::MemberRemoved => {
            if event.chat_id.is_some() && event.user_id.is_some() {
                vec![MEMBERS_CHANNEL.to_string()]
            } else {
                Vec::new()
            }
        }
        EventKind::Unknown => Vec::new(),
    };
    (!channels.is_empty()).then_some(channels)
}

/// One publish script call and, per event it carries, the room whose seq the reply holds.
struct ScriptCall {
    cmd: redis::Cmd,
    rooms: Vec<Option<ChatId>>,
}

/// Builds the publish script call for one batch; `None` when no event needs Redis.
fn script_call(shared: &Shared, events: &[DomainEvent]) -> Option<ScriptCall> {
    let mut keys: Vec<String> = vec![BOOT_KEY.into(), GSEQ_KEY.into(), MEMBER_INDEX_KEY.into()];
    let mut rooms = Vec::with_capacity(events.len());
    let mut args: Vec<String> = Vec::new();
    let mut has_room = false;
    // Look the floors up in one short lock; the JSON encoding below runs without it.
    let floors: Vec<u64> = {
        let known = lock(&shared.floors);
        events.iter().map(|e| e.room().and_then(|room| known.get(&room).copied()).unwrap_or(0)).collect()
    };
    for (event, floor) in events.iter().zip(floors) {
        let Some(channels) = channels_of(event) else { continue };
        let chat = event.chat_id.map(|c| c.to_string()).unwrap_or_default();
        let user = event.user_id.map(|u| u.to_string()).unwrap_or_default();
        let (op, key, floor) = match (event.kind, event.room()) {
            (_, Some(room)) => {
                has_room = true;
                ("r", seq_key(room), floor)
            }
            (EventKind::MemberAdded, None) => ("a", format!("{MEMBER_SET_PREFIX}{chat}"), 0),
            (EventKind::MemberRemoved, None) => ("x", format!("{MEMBER_SET_PREFIX}{chat}"), 0),
            _ => ("u", GSEQ_KEY.into(), 0),
        };
        keys.push(key);
        rooms.push(event.room());
        args.extend([op.to_string(), floor.to_string(), chat, user, event.to_json(None)]);
        args.push(channels.len().to_string());
        args.extend(channels);
    }
    if keys.len() == 3 {
        return None;
    }
    let settle_ms = shared.options.settle.as_millis().to_string();
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(shared.scripts.publish.get_hash())
        .arg(keys.len())
        .arg(&keys)
        .arg(settle_ms)
        .arg(if has_room { "1" } else { "0" })
        .arg(&args);
    Some(ScriptCall { cmd, rooms })
}

// ---------------------------------------------------------------------------------------------
// Delivery: one task, so every event reaches the broadcaster once and in Redis's order.

/// Per-connection delivery state; reset with each new connection.
struct Receiving {
    gen: u64,
    /// Highest global counter delivered: copies of a non-room event (several channels) are dropped.
    last_gseq: u64,
    /// Membership events held until the snapshot of this connection is applied.
    held: Option<Vec<(DomainEvent, u64)>>,
}

async fn deliver_task(shared: Arc<Shared>, mut rx: mpsc::Receiver<Inbound>) {
    // Highest room seq delivered per room; survives reconnects so nothing is delivered twice.
    let mut delivered: HashMap<ChatId, u64> = HashMap::new();
    let mut state = Receiving { gen: 0, last_gseq: 0, held: None };
    while let Some(msg) = rx.recv().await {
        match msg {
            Inbound::Reset { gen } => state = Receiving { gen, last_gseq: 0, held: Some(Vec::new()) },
            Inbound::Snapshot { gen, ver, pairs } if gen == state.gen => {
                for (chat, user) in pairs {
                    let event = DomainEvent {
                        kind: EventKind::MemberAdded,
                        chat_id: Some(chat),
                        user_id: Some(user),
                        user_ids: Vec::new(),
                        data: None,
                    };
                    shared.sink.deliver(&event, None);
                }
                for (event, gseq) in state.held.take().unwrap_or_default() {
                    if gseq > ver {
                        shared.sink.deliver(&event, None);
                    }
                }
            }
            Inbound::Snapshot { .. } => {}
            Inbound::Push { gen, info } if gen == state.gen => {
                let Some(Value::BulkString(payload)) = info.data.get(1) else { continue };
                let (event, seq) = match DomainEvent::from_json(payload) {
                    Ok(parsed) => parsed,
                    Err(e) => {
                        tracing::warn!(error = %e, "undecodable event on a redis channel; dropped");
                        continue;
                    }
                };
                let Some(seq) = seq else {
                    tracing::warn!("event without seq on a redis channel; dropped");
                    continue;
                };
                deliver_one(&shared, &mut delivered, &mut state, event, seq);
            }
            // A push from a connection already replaced: the new one restores what is needed.
            Inbound::Push { .. } => {}
        }
    }
}

fn deliver_one(
    shared: &Shared,
    delivered: &mut HashMap<ChatId, u64>,
    state: &mut Receiving,
    event: DomainEvent,
    seq: u64,
) {
    if let Some(room) = event.room() {
        let last = delivered.entry(room).or_insert(0);
        if seq <= *last {
            if seq < *last {
                // Redis's counter went backwards (state lost before every node re-seeded): refuse to
                // show clients an old seq, and push the counter back above what we delivered.
                shared.stats.seq_regressions.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%room, seq, last = *last, "room seq went backwards in redis; event dropped, re-seeding");
                lock(&shared.topics).reseed.insert(room);
                shared.kick.notify_one();
            } else {
                // The same event again on another channel (a room event also addressed to users).
                shared.stats.duplicates_dropped.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        *last = seq;
        shared.note_seq(room, seq);
        shared.sink.deliver(&event, Some(seq));
        return;
    }
    if seq <= state.last_gseq {
        shared.stats.duplicates_dropped.fetch_add(1, Ordering::Relaxed);
        return;
    }
    state.last_gseq = seq;
    let is_member = matches!(event.kind, EventKind::MemberAdded | EventKind::MemberRemoved);
    if let (true, Some(held)) = (is_member, state.held.as_mut()) {
        if held.len() < MAX_HELD_MEMBER_EVENTS {
            held.push((event, seq));
            return;
        }
        tracing::warn!("membership snapshot is slow; applying live membership events directly");
    }
    shared.sink.deliver(&event, None);
}
