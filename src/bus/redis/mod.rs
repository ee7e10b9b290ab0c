//! The Redis pub/sub bus (multi-node): every accepted event goes through Redis, which assigns room
//! `seq`, and each node delivers what Redis sends it to its own broadcaster.
//!
//! # Design
//!
//! - **Where Redis is** (`endpoint.rs`): one server (`bus.redis_url`) or the master Redis Sentinel
//!   names, resolved again on every connect (that is how a failover is followed), over
//!   `rediss://` with certificate verification and as an ACL user. A wrong password or an
//!   untrusted certificate stops startup naming the key; an unreachable server does not.
//! - **Two connections per node** (under Cluster, two per primary: `cluster.rs`), RESP3, owned by
//!   a supervisor task: one carries publishes (Lua script calls) and other commands and is read
//!   on the node's runtime; the other carries the node's subscriptions (pushes) and is read on a
//!   thread of its own (`io_thread.rs`), so what Redis pushes reaches the delivery queue however
//!   busy the runtime is. The supervisor alone issues `SUBSCRIBE` /
//!   `UNSUBSCRIBE`, so subscription changes never race each other; it reconnects with capped
//!   exponential backoff and restores every needed subscription itself (we do not use
//!   `ConnectionManager`'s automatic resubscription: we need a hook at reconnect to re-seed room
//!   counters and to gate publishing, and exact control of the subscription set).
//! - **Channels**: `herald:{<chat>}:room` while a local subscriber watches the room,
//!   `herald:{<user>}:user` while the user is connected here, and `herald:members`, which every node
//!   subscribes to for its whole life (membership events must reach every node). Every name and
//!   the Redis Cluster names are in `scripts.rs` and `names.rs`.
//! - **Sequencing**: one Lua script call per `publish` batch INCRs each room's counter
//!   (`herald:{<chat>}:seq`) and PUBLISHes the event with that `seq` in one atomic step, so every node
//!   sees the same `seq` in the same order. Non-room events get a global counter (`herald:gseq`)
//!   used to drop the copies a node receives on several channels (a task event for two local
//!   users), to order membership against the membership snapshot, and to mark a node's place in
//!   the member log.
//! - **Seq never goes back after a Redis restart** (Redis may keep nothing): every node remembers
//!   the highest `seq` it saw per room (delivered or assigned to its own publishes) and re-seeds the
//!   counters (`SET max(current, known)`) on every reconnect before it publishes again; the publish
//!   script also takes that floor per event. Because the publishing node may know nothing about a
//!   room only another node watched, the script refuses room events for `settle` after Redis lost
//!   its state (detected by the missing `herald:boot` key), or after a node followed a Sentinel
//!   failover (`herald:failover`: the promoted replica may lack the last increments), which gives
//!   every node time to reconnect and re-seed. A node that still sees a room's `seq` go backwards drops the event,
//!   counts it, and re-seeds that room.
//! - **Membership** is also stored in Redis sets (`herald:{<chat>}:members` plus the index
//!   `herald:member-chats`) by the same script, and each (re)connecting node loads a snapshot, so a
//!   node started later knows who may subscribe. Live membership events are held back until the
//!   snapshot is applied and those already in it are skipped, so a stale snapshot never re-adds a
//!   member removed after it.
//! - **Membership first after a reconnect.** The script also appends every membership event to a
//!   bounded log (`herald:member-log`), and each node remembers the last membership event it
//!   applied (across reconnects). A reconnecting node subscribes the members channel, then reads
//!   the snapshot together with the log entries it missed, hands both to the delivery task (which
//!   replays the missed changes in order, under every membership source, then applies the
//!   snapshot), and only then resubscribes its rooms and users: no room event of the new connection
//!   is delivered before the removals published while the node was cut off. A log that no longer
//!   reaches back that far (or a Redis that lost its state) is logged and counted.
//! - **Failure**: while Redis is unreachable `publish` and `watch` return
//!   [`BusError::Unreachable`] and [`Bus::health`] is degraded. Events published during an outage
//!   are refused, never half-claimed; events another node published while this node was
//!   reconnecting are lost to it, which its clients see as a `seq` gap, except membership events,
//!   which it replays from the member log.
//!
//! # Layout
//!
//! - this file: the [`RedisBus`] handle, its [`Bus`] impl, the state its tasks share;
//! - `options.rs`: [`RedisOptions`]; `presence.rs`: presence calls and their wire form;
//! - `endpoint.rs`: where the node's Redis is (one server or Sentinel's master), TLS roots, what
//!   a failed connect means;
//! - `scripts.rs`: key and channel names, the Lua scripts;
//! - `topics.rs`: local interest per topic and where its subscription stands (the state machine
//!   whose commands the supervisor issues);
//! - `supervisor.rs`: the connection, its subscriptions, reconnects;
//! - `publisher.rs`: batches publish calls into script calls;
//! - `delivery.rs`: hands what Redis pushes to the broadcaster, once each and in order;
//! - `pressure.rs`: overload shared across nodes; `io_thread.rs`: the thread subscription
//!   connections are read on (what Redis pushes waits where `pressure.rs` counts it); `stats.rs`:
//!   the bus's counters;
//!   `checked.rs`: the cache of "no revocation" answers;
//! - Redis Cluster: `shards.rs` (slot map, connections per primary, [`Link`]), `names.rs` (the
//!   global names per kind), `cluster.rs` (the cluster session: one session spans every primary,
//!   and any topology change ends it), `cluster_publish.rs` (batches split by slot).

mod checked;
mod cluster;
mod cluster_publish;
mod delivery;
pub(crate) mod endpoint;
mod io_thread;
mod names;
mod options;
mod presence;
mod pressure;
mod publisher;
mod script_set;
mod scripts;
pub(crate) mod shards;
mod stats;
mod supervisor;
mod topics;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinHandle;

use super::{
    BoxFuture, Bus, BusError, Control, Deliver, Ephemeral, Health, Kept, KeptEvent, LabelledCounter,
    Pressure, Topic,
};
use crate::config::BusConfig;
use crate::protocol::event::{DomainEvent, EventKind};
use crate::protocol::{ChatId, UserId};
use crate::sync::lock;
use checked::Checked;
use endpoint::Endpoint;
use names::Names;
pub use options::RedisOptions;
use publisher::PublishReq;
use scripts::Scripts;
pub use scripts::{channel, MEMBERS_CHANNEL};
use shards::Link;
pub use stats::RedisStats;
use stats::COUNTERS;
use topics::{Topics, WatchGuard};

/// Pushes that may wait for the delivery task; beyond it they are dropped and counted (the clients
/// see a `seq` gap) rather than growing memory without bound, and the session ends
/// (`supervisor::dropped`).
const INBOUND_CAPACITY: usize = 65_536;
/// Bytes of pushes that may wait for the delivery task (what Redis itself holds for a subscriber
/// by default before it cuts it off); beyond it they are dropped in the same way. Subscriptions are
/// read at once ([`io_thread`]), so a stalled runtime leaves them here.
const INBOUND_BYTES: usize = 32 << 20;
/// Publish calls that may wait for the publisher task; callers beyond it wait (backpressure).
const PUBLISH_QUEUE: usize = 1024;

/// Where this node's membership stands in Redis's stream of membership events: the last one it
/// applied (or the snapshot it started from), within one Redis state (`herald:boot`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct MemberMark {
    /// The `herald:boot` value of the Redis state `gseq` counts in.
    boot: String,
    gseq: u64,
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

/// State shared by the bus handle and its three tasks.
struct Shared {
    /// The broadcaster: the delivery task hands it what Redis pushes, `publish` unknown types.
    sink: Arc<dyn Deliver>,
    options: RedisOptions,
    /// Local interest and the subscriptions that serve it.
    topics: Topics,
    /// The live connection (under Cluster: one per primary), present only once its
    /// subscriptions, re-seed and scripts are in place. The handle and the publisher read it;
    /// only the supervisor sets and clears it.
    conn: Mutex<Option<Link>>,
    /// The global keys' names for this bus kind.
    names: Names,
    /// The generation of the session in place (a `MOVED` reply ends it: the slot map changed).
    session_gen: AtomicU64,
    /// Where the connection stands. The supervisor sends; `connect_with` waits on a receiver for
    /// the first attempt's outcome, and `health` reads it.
    phase: watch::Sender<Phase>,
    /// Highest room `seq` this node knows (delivered, assigned to its publishes, or handed out as
    /// a head): the floor for re-seeding. Kept while the node holds the room
    /// ([`Bus::forget_idle`]), a few dozen bytes each.
    floors: Mutex<HashMap<ChatId, u64>>,
    /// Highest room `seq` delivered per room, so nothing is delivered twice (survives reconnects).
    /// Only the delivery task and the idle sweep touch it.
    delivered: Mutex<HashMap<ChatId, u64>>,
    /// The last membership event applied (survives reconnects): on a reconnect the node replays
    /// the member log after it. Set by the first snapshot, then moved only by the delivery task:
    /// past each membership event it applies, and to each reconnect's snapshot.
    member_mark: Mutex<Option<MemberMark>>,
    /// Generation whose connection reported a disconnection, and the wake-up for the supervisor.
    lost_gen: AtomicU64,
    /// Generation that dropped a membership or revocation push: the rest of its pushes are dropped
    /// too, so no later membership event moves the node's mark past the one dropped.
    dropped_gen: AtomicU64,
    lost: Notify,
    stats: Arc<RedisStats>,
    scripts: Scripts,
    /// Users Redis recently said it holds no revocation for, so an upgrade storm is not a Redis
    /// storm. Trusted only while every revocation reaches this node on the members channel: a
    /// revocation received forgets its user, a lost connection or a dropped push forgets all.
    checked: Mutex<Checked>,
    /// This node's name in presence members and typing messages: random per process.
    node_id: u64,
    /// Bytes of the pushes waiting for the delivery task (at most [`INBOUND_BYTES`]).
    inbound_bytes: Arc<AtomicUsize>,
}

/// What a Redis error means to a publisher or a subscriber: the one place a Redis failure becomes
/// a [`BusError`]. The caller logs the error itself: its text never reaches a client.
fn classify(e: &redis::RedisError) -> BusError {
    if e.code() == Some(scripts::SETTLING) {
        // The publish script's refusal while Redis's state is new (see `PUBLISH_LUA`).
        BusError::Settling
    } else if matches!(e.code(), Some("MOVED" | "ASK" | "TRYAGAIN" | "CLUSTERDOWN")) {
        // Redis Cluster is moving a slot or failing over: worth a retry once the node follows.
        BusError::Unreachable
    } else if e.is_timeout() {
        BusError::Timeout
    } else if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
        BusError::Unreachable
    } else {
        BusError::Rejected
    }
}

/// The Redis bus handle. Dropping it stops its tasks and closes the connection.
pub struct RedisBus {
    shared: Arc<Shared>,
    /// The publisher task holds the receiver; a closed queue means the task is gone.
    publish_tx: mpsc::Sender<PublishReq>,
    /// The delivery, publisher and supervisor tasks (aborted when the handle is dropped), and the
    /// overload shared with other nodes, synced by a thread that ends when this is dropped.
    tasks: Vec<JoinHandle<()>>,
    pressure: Arc<pressure::Signals>,
}

impl Drop for RedisBus {
    fn drop(&mut self) {
        self.tasks.iter().for_each(JoinHandle::abort);
    }
}

impl RedisBus {
    /// Connects with default [`RedisOptions`]. See [`RedisBus::connect_with`].
    pub async fn connect(config: &BusConfig, sink: Arc<dyn Deliver>) -> Result<RedisBus, BusError> {
        RedisBus::connect_with(config, sink, RedisOptions::default()).await
    }

    /// Starts the bus. Fails only for an unusable `bus.redis_url`. When Redis is unreachable it
    /// starts degraded (publishes answer [`BusError::Unreachable`], logged as an error) and keeps
    /// retrying. When Redis is reachable it returns once publishing works, which after a fresh
    /// Redis takes up to `options.settle`.
    pub async fn connect_with(
        config: &BusConfig,
        sink: Arc<dyn Deliver>,
        options: RedisOptions,
    ) -> Result<RedisBus, BusError> {
        let endpoint = Endpoint::from_config(config)?;
        let (target, key) = (endpoint.describe(), endpoint.key());
        endpoint.refuse_misconfigured(options.connect_timeout * 3).await?;
        let (shared, mut phase_rx) = Shared::new(sink, options, endpoint.is_cluster());
        let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_CAPACITY);
        let (publish_tx, publish_rx) = mpsc::channel(PUBLISH_QUEUE);
        let pressure =
            pressure::start(endpoint.clone(), inbound_tx.downgrade(), shared.inbound_bytes.clone());
        let tasks = vec![
            tokio::spawn(delivery::deliver_task(shared.clone(), inbound_rx)),
            tokio::spawn(publisher::publisher_task(shared.clone(), publish_rx)),
            if endpoint.is_cluster() {
                tokio::spawn(cluster::supervise(shared.clone(), endpoint, inbound_tx))
            } else {
                tokio::spawn(supervisor::supervise(shared.clone(), endpoint, inbound_tx))
            },
        ];
        let bus = RedisBus { shared, publish_tx, tasks, pressure };
        // Wait for the first attempt's outcome; once connected, also for a fresh Redis to settle.
        let wait = bus.shared.options.settle + bus.shared.options.connect_timeout * 2;
        let settled =
            tokio::time::timeout(wait, phase_rx.wait_for(|p| matches!(p, Phase::Up | Phase::Down))).await;
        match settled.ok().and_then(Result::ok).map(|p| *p) {
            Some(Phase::Up) => tracing::info!(redis = %target, "redis bus connected"),
            _ => tracing::error!(
                redis = %target, key = key,
                "Redis is unreachable; starting degraded (publishes answer 503) and retrying"
            ),
        }
        Ok(bus)
    }

    /// The bus's counters, live. `/metrics` reads the same values through [`Bus::counters`].
    pub fn stats(&self) -> Arc<RedisStats> {
        self.shared.stats.clone()
    }
}

impl Bus for RedisBus {
    fn pressure(&self) -> Option<&dyn Pressure> {
        Some(&*self.pressure)
    }

    fn publish(&self, events: Vec<DomainEvent>) -> BoxFuture<'_, Result<(), BusError>> {
        Box::pin(async move {
            // Unknown types never go to Redis (they have no channel, and every node would count
            // them): this node's sink counts and ignores them, as under the memory bus.
            // `POST /api/events` drops them before the bus; the library's `Publisher` does not.
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
            self.shared.connected()?;
            let Some(rx) = self.shared.topics.watch(topic) else { return Ok(()) };
            // Until confirmed, this watch is counted only by the guard.
            let guard = WatchGuard::new(&self.shared.topics, topic);
            match tokio::time::timeout(self.shared.options.watch_timeout, rx).await {
                Ok(Ok(Ok(()))) => {
                    guard.keep();
                    Ok(())
                }
                Ok(Ok(Err(e))) => Err(e),
                Ok(Err(_)) => Err(BusError::Stopped),
                Err(_) => Err(BusError::Timeout),
            }
        })
    }

    fn unwatch(&self, topic: Topic) {
        self.shared.topics.unwatch(topic);
    }

    fn forget_idle(&self, active: &dyn Fn(ChatId) -> bool) {
        // A room this node no longer holds needs no floor (its seq survives a Redis restart
        // through the nodes that hold it) and no dedupe mark (it is not watched here).
        lock(&self.shared.floors).retain(|chat, _| active(*chat));
        lock(&self.shared.delivered).retain(|chat, _| active(*chat));
    }

    fn gauges(&self) -> Vec<(&'static str, &'static str, u64)> {
        vec![(
            "redis_room_marks",
            "Rooms whose seq this node remembers for re-seeding and dedupe.",
            lock(&self.shared.floors).len() as u64,
        )]
    }

    fn head(&self, chat: ChatId) -> BoxFuture<'_, Result<u64, BusError>> {
        Box::pin(async move {
            let mut conn = self.shared.connection_for(&scripts::seq_key(chat))?;
            let floor = lock(&self.shared.floors).get(&chat).map_or(0, |f| f.saturating_add(1));
            let mut cmd = redis::cmd("EVALSHA");
            let ttl = self.shared.options.history_ttl.as_millis().to_string();
            cmd.arg(self.shared.scripts.head.get_hash())
                .arg(1)
                .arg(scripts::seq_key(chat))
                .arg(floor)
                .arg(ttl);
            let head: u64 = cmd.query_async(&mut conn).await.map_err(|e| {
                tracing::warn!(%chat, error = %e, "redis head read failed");
                self.shared.fail(&e)
            })?;
            // Remembered like a delivered seq: if Redis loses its state before the room's first
            // event, the re-seed restores this position, and its subscribers see no gap.
            self.shared.note_seq(chat, head);
            Ok(head)
        })
    }

    fn kept(&self, chat: ChatId, since: u64) -> BoxFuture<'_, Result<Option<Kept>, BusError>> {
        Box::pin(async move {
            let mut conn = self.shared.connection_for(&scripts::seq_key(chat))?;
            self.shared.stats.history_reads.fetch_add(1, Ordering::Relaxed);
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(self.shared.scripts.kept.get_hash())
                .arg(2)
                .arg(scripts::seq_key(chat))
                .arg(scripts::history_key(chat))
                .arg(self.shared.options.history_ttl.as_millis().to_string())
                .arg(since);
            let reply: Vec<Vec<u8>> = cmd.query_async(&mut conn).await.map_err(|e| {
                tracing::warn!(%chat, error = %e, "redis history read failed");
                self.shared.fail(&e)
            })?;
            let number =
                |v: Option<Vec<u8>>| v.and_then(|v| std::str::from_utf8(&v).ok()?.parse::<u64>().ok());
            let mut entries = reply.into_iter();
            let head = number(entries.next()).unwrap_or(0);
            let now_ms = number(entries.next()).unwrap_or(0);
            let mut events = Vec::new();
            for entry in entries {
                let Some(bar) = entry.iter().position(|b| *b == b'|') else { continue };
                let at_ms = std::str::from_utf8(&entry[..bar]).ok().and_then(|ms| ms.parse::<u64>().ok());
                match DomainEvent::from_json(&entry[bar + 1..]) {
                    Ok((event, Some(seq))) if seq > since && seq <= head => {
                        let age = Duration::from_millis(now_ms.saturating_sub(at_ms.unwrap_or(now_ms)));
                        events.push(KeptEvent { seq, age, event });
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(%chat, error = %e, "undecodable history entry in redis; skipped")
                    }
                }
            }
            Ok(Some(Kept { head, events }))
        })
    }

    fn control(&self, msg: Control) -> BoxFuture<'_, Result<(), BusError>> {
        Box::pin(async move {
            let names = self.shared.names;
            let reply = match msg {
                // Only the nodes where the user is connected subscribe its channel.
                Control::Disconnect(user) => {
                    let user_channel = channel(Topic::User(user));
                    let mut conn = self.shared.connection_for(&user_channel)?;
                    redis::cmd(if names.cluster { "SPUBLISH" } else { "PUBLISH" })
                        .arg(user_channel)
                        .arg(msg.to_json())
                        .query_async::<i64>(&mut conn)
                        .await
                }
                // Every node subscribes the members channel for life.
                Control::Revoke { user, before } => {
                    let mut conn = self.shared.connection()?;
                    redis::cmd("EVALSHA")
                        .arg(self.shared.scripts.revoke.get_hash())
                        .arg(1)
                        .arg(names.revoked_key(user))
                        .arg(before)
                        .arg(self.shared.options.token_ttl.as_millis().to_string())
                        .arg(names.members_channel)
                        .arg(user.to_string())
                        .query_async::<i64>(&mut conn)
                        .await
                }
            };
            reply.map(|_| ()).map_err(|e| {
                tracing::warn!(user = %msg.user(), error = %e, "redis control message failed");
                self.shared.fail(&e)
            })
        })
    }

    fn presence(&self, event: Ephemeral) -> BoxFuture<'_, Result<bool, BusError>> {
        Box::pin(self.presence_call(event))
    }

    fn present(&self, chat: ChatId) -> BoxFuture<'_, Result<Option<Vec<UserId>>, BusError>> {
        Box::pin(self.present_users(chat))
    }

    fn refresh_presence(&self, rooms: Vec<(ChatId, Vec<UserId>)>) -> BoxFuture<'_, Result<(), BusError>> {
        Box::pin(self.refresh_rooms(rooms))
    }

    fn depart_presence(
        &self,
        rooms: Vec<(ChatId, Vec<UserId>)>,
        within: Duration,
    ) -> BoxFuture<'_, Result<(), BusError>> {
        Box::pin(self.depart_rooms(rooms, within))
    }

    fn revoked(&self, user: UserId) -> BoxFuture<'_, Result<Option<u64>, BusError>> {
        Box::pin(async move {
            let Err(epoch) = self.shared.checked_recently(user) else { return Ok(None) };
            let key = self.shared.names.revoked_key(user);
            let mut conn = self.shared.connection_for(&key)?;
            let before: Option<u64> =
                redis::cmd("GET").arg(key).query_async(&mut conn).await.map_err(|e| {
                    tracing::warn!(%user, error = %e, "redis revocation read failed");
                    self.shared.fail(&e)
                })?;
            if before.is_none() {
                self.shared.checked_none(user, epoch);
            }
            Ok(before)
        })
    }

    fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        let stats = &*self.shared.stats;
        COUNTERS
            .iter()
            .map(|(name, help, field)| (*name, *help, field(stats).load(Ordering::Relaxed)))
            .collect()
    }

    fn labelled_counters(&self) -> Vec<LabelledCounter> {
        self.shared.stats.labelled()
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
        self.shared.connected()?;
        let (reply, rx) = oneshot::channel();
        self.publish_tx.send(PublishReq { events, reply }).await.map_err(|_| BusError::Stopped)?;
        rx.await.unwrap_or(Err(BusError::Stopped))
    }
}

impl Shared {
    /// The state of a bus that has no connection yet, and a receiver of its phase.
    fn new(
        sink: Arc<dyn Deliver>,
        options: RedisOptions,
        cluster: bool,
    ) -> (Arc<Shared>, watch::Receiver<Phase>) {
        let (phase, phase_rx) = watch::channel(Phase::Connecting);
        let shared = Arc::new(Shared {
            sink,
            options,
            topics: Topics::default(),
            conn: Mutex::new(None),
            names: if cluster { names::CLUSTER } else { names::SINGLE },
            session_gen: AtomicU64::new(0),
            phase,
            floors: Mutex::default(),
            delivered: Mutex::default(),
            member_mark: Mutex::default(),
            lost_gen: AtomicU64::new(0),
            dropped_gen: AtomicU64::new(0),
            lost: Notify::new(),
            stats: Arc::default(),
            scripts: Scripts::new(cluster),
            checked: Mutex::default(),
            node_id: presence::random_id(),
            inbound_bytes: Arc::default(),
        });
        (shared, phase_rx)
    }

    /// `Ok` while the live connection is in place, [`BusError::Unreachable`] while the node is
    /// down or reconnecting.
    fn connected(&self) -> Result<(), BusError> {
        match *lock(&self.conn) {
            Some(_) => Ok(()),
            None => Err(BusError::Unreachable),
        }
    }

    /// A membership event with global counter `gseq` was applied.
    fn note_member(&self, gseq: u64) {
        if let Some(mark) = lock(&self.member_mark).as_mut() {
            mark.gseq = mark.gseq.max(gseq);
        }
    }

    /// Raises this node's known floor for a room.
    fn note_seq(&self, chat: ChatId, seq: u64) {
        let mut floors = lock(&self.floors);
        let floor = floors.entry(chat).or_insert(0);
        *floor = (*floor).max(seq);
    }

    /// The connection is gone: refuse publishes and watches, forget confirmations, fail waiters.
    fn go_down(&self) {
        // Revocations published while this node is cut off do not reach it.
        self.forget_checked(None);
        *lock(&self.conn) = None;
        self.phase.send_replace(Phase::Down);
        self.topics.connection_lost();
    }
}
