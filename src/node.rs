//! The node's shared state: registries, membership, bus, metrics, shutdown
//! and task tracking, plus the load sensor. Built once from a [`Config`] by
//! [`crate::server`], then shared by the HTTP edge and every connection.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::alarms::Alarms;
use crate::backlog::Backlog;
use crate::bans::Bans;
use crate::broadcast::Broadcaster;
use crate::bus::memory::MemoryBus;
use crate::bus::redis::{RedisBus, RedisOptions};
use crate::bus::{Bus, BusError, Deliver, Hot};
use crate::config::{BusKind, Config, WebSocketConfig};
use crate::membership;
use crate::metrics::Metrics;
use crate::protocol::event::{DomainEvent, Passthrough};
use crate::protocol::{server, ChatId};
use crate::rooms::{HistoryLimits, Room, Rooms};
use crate::striped::{Buckets, Histogram, Striped};
use crate::users::Users;

/// Room frames one connection holds queued at most: past it, it stops taking
/// from its rooms until its socket drains, and reads the rest from history
/// later (rooms never wait for it). The connection's pump budget, and the
/// floor of the node's backlog limit (one connection's worth owed is never
/// overload).
pub(crate) const MAX_QUEUED: usize = 512;

/// Everything a connection and the HTTP routes need from their node.
pub struct Node {
    pub rooms: Arc<Rooms>,
    pub users: Arc<Users>,
    pub membership: Arc<membership::Table>,
    pub source: membership::Source,
    /// Revocations and removals (`auth.max_token_ttl`), shared with the broadcaster.
    pub bans: Arc<Bans>,
    pub bus: Arc<dyn Bus>,
    pub metrics: Arc<Metrics>,
    pub ws: WebSocketConfig,
    /// Cancelled at shutdown, before every registered mailbox is told to
    /// close with 1001; a connection registering later checks it.
    pub shutdown: CancellationToken,
    /// Tracks connection tasks so shutdown can wait for them to drain.
    pub tasks: TaskTracker,
    /// Set by [`sense_load`] while the node writes more than
    /// [`BUSY_FRAMES_PER_SEC`]: connections then wait a moment to batch.
    pub busy: AtomicBool,
    /// How far behind connections run: how long the oldest room frame of
    /// each write had waited, sampled once per write (a gauge and a
    /// histogram for operators, and the latency admission's signal).
    pub lag: Lag,
    /// Set by [`sense_load`] while most writes have sent frames older than
    /// `api.overload_latency` for a whole [`LATE_INTERVAL`]: publishes are
    /// then pushed back as under a backlog overload.
    pub late: Arc<AtomicBool>,
    /// `api.overload_latency`.
    pub overload_latency: Duration,
    /// Connection deadlines (pings, silence, expiry, stalled writes).
    pub alarms: Arc<Alarms>,
    /// `auth.leeway`: a connection lives until its token's `exp` plus this,
    /// the same leeway its upgrade was judged with.
    pub token_leeway: Duration,
    /// One recovery from the bus's own history at a time per room (striped):
    /// recoveries of a room that arrive together wait for the first, find
    /// its frames in the room's history, and do not read the bus again.
    pub recovering: Box<[tokio::sync::Mutex<()>]>,
    /// `events.passthrough`, compiled once: what every ingress of this node
    /// passes through (`protocol::event::known`).
    pub passthrough: Arc<Passthrough>,
    /// `api.reject_unknown`.
    pub reject_unknown: bool,
    /// Presence and typing; `None` when `presence.enabled` is false.
    pub presence: Option<Arc<crate::presence::Registry>>,
}

/// Stripes of [`Node::recovering`].
const RECOVERY_STRIPES: usize = 64;

impl Node {
    /// The recovery stripe of `chat`, held while its history is read from the bus.
    pub async fn recovering(&self, chat: crate::protocol::ChatId) -> tokio::sync::MutexGuard<'_, ()> {
        let index = (chat.as_u64_pair().1 as usize) % self.recovering.len();
        self.recovering[index].lock().await
    }

    /// Brings the events after `since` that the bus keeps of its own (Redis)
    /// into the room's history, when this node's history does not hold them;
    /// returns the room's head. One read per room at a time: a reader that
    /// waited for another finds the frames already held. Used by recovery
    /// (`subscribe` with `since`) and by `GET /api/rooms/{id}/history`.
    pub async fn fill_from_bus(
        &self,
        room: &Room,
        chat: ChatId,
        since: u64,
        head: u64,
    ) -> Result<u64, BusError> {
        let _one_at_a_time = self.recovering(chat).await;
        if room.covers(since, head) {
            return Ok(head);
        }
        // From where this node's history ends when the reader is ahead of it
        // (this node lags the bus), so what is read joins what it holds.
        let from = room.newest().map_or(since, |newest| newest.min(since));
        let Some(kept) = self.bus.kept(chat, from).await? else { return Ok(head) };
        let now = tokio::time::Instant::now();
        let frames = kept
            .events
            .iter()
            .filter_map(|e| {
                let at = now.checked_sub(e.age).unwrap_or(now);
                Some((e.seq, at, server::room_frame(&e.event, e.seq)?))
            })
            .collect();
        self.rooms.fill(room, frames);
        Ok(head.max(kept.head))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.alarms.close();
    }
}

/// Lag buckets: bucket `b` counts lags of `[2^(b-1), 2^b)` ms (bucket 0: under 1 ms).
const LAG_BUCKETS: usize = 16;
/// Samples needed in a window to judge it.
const MIN_SAMPLES: u64 = 16;
/// How long a publish waits for an overloaded node before it gets 429.
const ADMIT_WAIT: Duration = Duration::from_millis(250);
/// How soon a waiting publish looks again: at first, then at most (the gap
/// doubles in between), so a publish waits little past the moment it may
/// go on, and a thousand waiting publishers do not spin the node they wait
/// for.
const ADMIT_POLL_FIRST: Duration = Duration::from_millis(1);
const ADMIT_POLL_MAX: Duration = Duration::from_millis(8);

/// Delivery lag, fed once per write that sends room frames with how long
/// the oldest of them had waited (from the event reaching this node's rooms
/// to the write: the room, the connection's queue and the runtime's turn):
/// log2 milliseconds for the load sensor's median, and the operators'
/// histogram. Cheap enough for every write (striped, so workers never share
/// a line).
#[derive(Default)]
pub struct Lag {
    buckets: [Striped; LAG_BUCKETS],
    /// `herald_delivery_latency_seconds`, shared with [`Metrics`] (which renders it).
    latency: Arc<Histogram>,
}

impl Lag {
    pub fn record(&self, lag: Duration) {
        let ms = u64::try_from(lag.as_millis()).unwrap_or(u64::MAX);
        let bucket = (u64::BITS - ms.leading_zeros()) as usize;
        self.buckets[bucket.min(LAG_BUCKETS - 1)].add(1);
        self.latency.observe(lag);
    }

    fn snapshot(&self) -> [u64; LAG_BUCKETS] {
        std::array::from_fn(|b| self.buckets[b].get())
    }
}

/// The median bucket of the samples between two snapshots, if there were enough.
fn median_bucket(before: &[u64; LAG_BUCKETS], now: &[u64; LAG_BUCKETS]) -> Option<usize> {
    let window: Vec<u64> = now.iter().zip(before).map(|(n, b)| n.wrapping_sub(*b)).collect();
    let total: u64 = window.iter().sum();
    if total < MIN_SAMPLES {
        return None;
    }
    let mut seen = 0;
    window.iter().position(|n| {
        seen += n;
        seen * 2 >= total
    })
}

/// A publish refused because the node is overloaded.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("overloaded")]
pub struct Overloaded;

impl Node {
    /// Admission control for publishers: while the node owes its readers
    /// more frames than they can catch up with (the backlog, checked on every
    /// publish), delivers late (most writes sent frames older than
    /// `api.overload_latency`, when set, for a whole interval: a standing
    /// queue in CoDel's terms), or another node reports one of the batch's
    /// rooms overloaded (its readers, fed through the bus, would fall behind
    /// the same way), a publish waits a moment for that to pass, then is
    /// refused. Waiting rather than refusing at once keeps the pushback
    /// inside the latency a publisher sees (a 429 sends it away for a whole
    /// `Retry-After`), and the waiting publishes are bounded by the
    /// publishers' own concurrency. One slow reader never triggers it (it is
    /// one reader among many, and the backlog has a floor); the whole node
    /// running behind does.
    pub async fn admit(&self, events: &[DomainEvent]) -> Result<(), Overloaded> {
        let backlog = self.rooms.backlog();
        let pressed = || {
            let Some(pressure) = self.bus.pressure() else { return false };
            events.iter().any(|e| e.chat_id.is_some_and(|chat| pressure.pressed(chat)))
        };
        let over = || backlog.over() || self.late.load(Ordering::Relaxed);
        if !over() && !pressed() {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + ADMIT_WAIT;
        let mut gap = ADMIT_POLL_FIRST;
        loop {
            let local = over();
            if !local && !pressed() {
                return Ok(());
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                self.metrics.publish_overloaded.fetch_add(1, Ordering::Relaxed);
                if !local {
                    self.metrics.publish_overloaded_remote.fetch_add(1, Ordering::Relaxed);
                }
                return Err(Overloaded);
            }
            tokio::time::sleep_until((now + gap).min(deadline)).await;
            gap = (gap * 2).min(ADMIT_POLL_MAX);
        }
    }
}

impl Node {
    /// Builds the registries, the broadcaster and the configured bus.
    /// Connecting to Redis is the only step that can fail.
    pub async fn build(config: &Config) -> Result<Node, BusError> {
        let metrics = Arc::new(Metrics::default());
        let lag = Lag { latency: metrics.delivery_latency.clone(), ..Lag::default() };
        let late = Arc::new(AtomicBool::new(false));
        let limits = HistoryLimits::from(&config.rooms);
        // The backlog's floor counts the connections' write-queue bound,
        // which the rooms know nothing of.
        let reach = Rooms::reach(config.rooms.buffer, limits);
        let backlog = Arc::new(Backlog::for_reach(reach, MAX_QUEUED));
        let rooms = Arc::new(Rooms::with_backlog(config.rooms.buffer, limits, backlog));
        let users = Arc::new(Users::new());
        let membership = Arc::new(membership::Table::default());
        let bans = Arc::new(Bans::new(config.auth.max_token_ttl.as_secs()));
        let presence =
            config.presence.enabled.then(|| Arc::new(crate::presence::Registry::new(&config.presence)));
        let sink: Arc<dyn Deliver> = Arc::new(Broadcaster {
            presence: presence.clone(),
            rooms: rooms.clone(),
            users: users.clone(),
            membership: membership.clone(),
            bans: bans.clone(),
            source: config.auth.membership,
            metrics: metrics.clone(),
        });
        let bus: Arc<dyn Bus> = match config.bus.kind {
            BusKind::Memory => Arc::new(MemoryBus::new(sink)),
            BusKind::Redis | BusKind::RedisSentinel | BusKind::RedisCluster => {
                let options = RedisOptions {
                    history_size: config.rooms.history_size,
                    history_ttl: config.rooms.history_ttl,
                    token_ttl: config.auth.max_token_ttl,
                    presence_ttl: config.presence.node_ttl,
                    typing_interval: config.presence.typing_interval,
                    ..RedisOptions::default()
                };
                Arc::new(RedisBus::connect_with(&config.bus, sink, options).await?)
            }
        };
        if let Some(pressure) = bus.pressure() {
            let (rooms, late, warned) = (rooms.clone(), late.clone(), AtomicBool::new(false));
            pressure.source(Box::new(move || hot(&rooms, &late, &warned)));
        }
        Ok(Node {
            rooms,
            users,
            membership,
            bans,
            source: config.auth.membership,
            bus,
            metrics,
            ws: config.websocket.clone(),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            busy: AtomicBool::new(false),
            lag,
            late,
            overload_latency: config.api.overload_latency,
            alarms: Alarms::start(),
            token_leeway: config.auth.leeway,
            recovering: (0..RECOVERY_STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            // A config that passed `Config::validate` compiles; one built by hand that does not
            // passes nothing through.
            passthrough: Arc::new(Passthrough::compile(&config.events.passthrough).unwrap_or_else(|e| {
                tracing::error!(error = %e, "events.passthrough refused; no type is passed through");
                Passthrough::default()
            })),
            reject_unknown: config.api.reject_unknown,
            presence,
        })
    }
}

/// This node's overload as the other nodes hear of it (Redis bus): the rooms
/// whose readers it owes frames, from half its backlog limit (they hear tens
/// of ms late) down to a quarter (`warned` holds which side it is on: a word
/// that flickers lets a flood through each time it lapses), or while it
/// delivers late.
fn hot(rooms: &Rooms, late: &AtomicBool, warned: &AtomicBool) -> Hot {
    let backlog = rooms.backlog();
    let owed = backlog.owed();
    let warn = if warned.load(Ordering::Relaxed) { owed > backlog.limit() / 4 } else { backlog.near() };
    warned.store(warn, Ordering::Relaxed);
    if !warn && !late.load(Ordering::Relaxed) {
        return Hot::default();
    }
    let hot = rooms.hot(Hot::MAX_ROOMS);
    Hot { all: hot.is_none(), rooms: hot.unwrap_or_default() }
}

/// Frames written per second above which the node counts as busy.
pub const BUSY_FRAMES_PER_SEC: u64 = 100_000;
const LOAD_SAMPLE: Duration = Duration::from_millis(10);
/// How often expired history is swept and the node-wide byte budget rebalanced.
const HISTORY_SWEEP: Duration = Duration::from_millis(500);
/// History sweeps per sweep of expired revocations and removals (a minute).
const BANS_SWEEP_TICKS: u64 = 120;

/// Keeps `node.busy` current from the frames-written counter and the lag
/// gauge from the connections' samples, and logs when the node becomes
/// overloaded or recovers, until `stop`. Batching pays off only under load:
/// on a quiet node, stepping aside before each write costs a poll per
/// delivery and gains nothing.
pub async fn sense_load(node: Arc<Node>, stop: CancellationToken) {
    let threshold = BUSY_FRAMES_PER_SEC * LOAD_SAMPLE.as_millis() as u64 / 1000;
    let mut last = node.metrics.frames_out.get();
    let mut lag_before = node.lag.snapshot();
    let mut overloaded = false;
    let mut latency_before: Buckets = node.lag.latency.counts();
    let mut late_windows = 0u32;
    let mut tick = tokio::time::interval(LOAD_SAMPLE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 0u64.. {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = node.metrics.frames_out.get();
        node.busy.store(now.wrapping_sub(last) > threshold, Ordering::Relaxed);
        last = now;
        if n % LAG_WINDOW_TICKS == 0 {
            // CoDel-style: late once most writes of every window for a whole
            // interval sent frames older than the target; on time again as
            // soon as one window is (or too few writes to judge: little load).
            let now = node.lag.latency.counts();
            let (all, within) = Histogram::within(&latency_before, &now, node.overload_latency);
            latency_before = now;
            let judged = !node.overload_latency.is_zero() && all >= MIN_SAMPLES;
            late_windows = if judged && within * 2 < all { late_windows + 1 } else { 0 };
            node.late.store(late_windows >= LATE_WINDOWS, Ordering::Relaxed);
        }
        let backlog = node.rooms.backlog();
        let late = node.late.load(Ordering::Relaxed);
        if (backlog.over() || late) != overloaded {
            overloaded = !overloaded;
            tracing::info!(
                overloaded,
                late,
                backlog = backlog.owed(),
                limit = backlog.limit(),
                "delivery load changed"
            );
        }
        if n % LAG_WINDOW_TICKS == 0 {
            let lag_now = node.lag.snapshot();
            let median = median_bucket(&lag_before, &lag_now);
            lag_before = lag_now;
            node.metrics.lag_median_ms.store(median.map_or(0, |b| (1u64 << b) >> 1), Ordering::Relaxed);
        }
    }
}

/// Load-sensor ticks per lag window (50 ms).
const LAG_WINDOW_TICKS: u64 = 5;
/// How long most writes must send late frames before publishes are pushed
/// back (CoDel's interval), and the same in lag windows.
pub const LATE_INTERVAL: Duration = Duration::from_millis(100);
const LATE_WINDOWS: u32 =
    (LATE_INTERVAL.as_millis() / (LOAD_SAMPLE.as_millis() * LAG_WINDOW_TICKS as u128)) as u32;

/// Drops history older than `rooms.history_ttl`, keeps the node-wide byte
/// budget fair across rooms, removes rooms left with neither history nor
/// subscribers, and lets the bus forget its state for them, until `stop`.
pub async fn sweep_history(node: Arc<Node>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(HISTORY_SWEEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 0u64.. {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = tokio::time::Instant::now();
        node.rooms.sweep(now);
        if n % BANS_SWEEP_TICKS == 0 {
            // Entries live for hours: a sweep a minute keeps the tables near their live size.
            node.bans.sweep(crate::auth::now_secs());
        }
        let rooms = &node.rooms;
        node.bus.forget_idle(&|chat| rooms.get(chat).is_some());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// The load sensor of a test node, running until `stop`.
    struct Sensor {
        stop: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    impl Sensor {
        /// A node built from `config`, with its load sensor started.
        async fn start(config: &Config) -> Result<(Arc<Node>, Sensor), Box<dyn std::error::Error>> {
            let node = Arc::new(Node::build(config).await?);
            let stop = CancellationToken::new();
            let task = tokio::spawn(sense_load(node.clone(), stop.clone()));
            Ok((node, Sensor { stop, task }))
        }

        /// Stops the sensor and waits for it, so a panic inside it fails the test.
        async fn stop(self) -> TestResult {
            self.stop.cancel();
            self.task.await?;
            Ok(())
        }
    }

    /// Batching is switched on by load and off again when it passes.
    #[tokio::test(start_paused = true)]
    async fn the_node_counts_as_busy_only_while_it_writes_fast() -> TestResult {
        let (node, sensor) = Sensor::start(&Config::default()).await?;
        let per_sample = BUSY_FRAMES_PER_SEC * LOAD_SAMPLE.as_millis() as u64 / 1000;
        for _ in 0..3 {
            node.metrics.frames_out.add(per_sample as i64 * 2);
            tokio::time::sleep(LOAD_SAMPLE).await;
        }
        assert!(node.busy.load(Ordering::Relaxed), "fast writing marks the node busy");
        for _ in 0..3 {
            node.metrics.frames_out.add(per_sample as i64 / 2);
            tokio::time::sleep(LOAD_SAMPLE).await;
        }
        assert!(!node.busy.load(Ordering::Relaxed), "slow writing clears it");
        sensor.stop().await
    }

    /// CoDel-style admission: publishes are pushed back once most writes sent
    /// frames older than `api.overload_latency` for a whole interval, not for
    /// one late window, and admitted again once a window is on time.
    #[tokio::test(start_paused = true)]
    async fn a_node_delivering_late_for_a_whole_interval_pushes_back() -> TestResult {
        let mut config = Config::default();
        config.api.overload_latency = Duration::from_millis(50);
        let (node, sensor) = Sensor::start(&config).await?;
        let window = LOAD_SAMPLE * LAG_WINDOW_TICKS as u32;
        let feed = |ms: u64, n: usize| (0..n).for_each(|_| node.lag.record(Duration::from_millis(ms)));
        tokio::time::sleep(window / 2).await;
        // One late window, then one on time: a burst, not a standing queue.
        feed(80, 40);
        tokio::time::sleep(window).await;
        feed(80, 10);
        feed(20, 30);
        tokio::time::sleep(window).await;
        assert!(!node.late.load(Ordering::Relaxed));
        assert!(node.admit(&[]).await.is_ok());
        // Late for a whole interval (a minority on time does not help).
        for _ in 0..LATE_WINDOWS {
            feed(80, 30);
            feed(20, 10);
            tokio::time::sleep(window).await;
        }
        assert!(node.late.load(Ordering::Relaxed), "standing late for {LATE_INTERVAL:?}");
        let (late, stay) = (node.clone(), CancellationToken::new());
        let staying = stay.clone();
        let feeder = tokio::spawn(async move {
            while !staying.is_cancelled() {
                (0..40).for_each(|_| late.lag.record(Duration::from_millis(80)));
                tokio::time::sleep(window).await;
            }
        });
        assert!(node.admit(&[]).await.is_err(), "pushed back while it stays late");
        assert_eq!(node.metrics.publish_overloaded.load(Ordering::Relaxed), 1);
        stay.cancel();
        feeder.await?;
        // On time again: admitted within a window.
        feed(20, 40);
        tokio::time::sleep(window).await;
        assert!(!node.late.load(Ordering::Relaxed));
        assert!(node.admit(&[]).await.is_ok());
        sensor.stop().await
    }

    /// Off by default: late deliveries alone never push back.
    #[tokio::test(start_paused = true)]
    async fn latency_admission_is_off_by_default() -> TestResult {
        let (node, sensor) = Sensor::start(&Config::default()).await?;
        for _ in 0..2 * LATE_WINDOWS {
            (0..40).for_each(|_| node.lag.record(Duration::from_secs(5)));
            tokio::time::sleep(LOAD_SAMPLE * LAG_WINDOW_TICKS as u32).await;
        }
        assert!(!node.late.load(Ordering::Relaxed));
        assert!(node.admit(&[]).await.is_ok());
        sensor.stop().await
    }

    /// The lag gauge reports the median of the last window's samples (the
    /// lower bound of its power-of-two bucket), and 0 when too few came.
    #[tokio::test(start_paused = true)]
    async fn the_lag_gauge_is_the_median_of_the_last_window() -> TestResult {
        let (node, sensor) = Sensor::start(&Config::default()).await?;
        let window = LOAD_SAMPLE * LAG_WINDOW_TICKS as u32;
        tokio::time::sleep(window).await;
        for ms in [1, 3, 300, 300, 300] {
            for _ in 0..10 {
                node.lag.record(Duration::from_millis(ms));
            }
        }
        tokio::time::sleep(window).await;
        assert_eq!(node.metrics.lag_median_ms.load(Ordering::Relaxed), 256, "300 ms lies in [256, 512)");
        node.lag.record(Duration::from_millis(300));
        tokio::time::sleep(window).await;
        assert_eq!(node.metrics.lag_median_ms.load(Ordering::Relaxed), 0, "one sample is too few to judge");
        sensor.stop().await
    }

    /// Publishes wait while the node owes its readers more than the limit,
    /// are refused once the wait runs out, and pass again once readers pay.
    #[tokio::test(start_paused = true)]
    async fn publishes_wait_then_are_refused_while_the_backlog_is_over_its_limit() -> TestResult {
        let node = Arc::new(Node::build(&Config::default()).await?);
        let backlog = node.rooms.backlog();
        for _ in 0..1_000 {
            backlog.joined(0);
        }
        assert!(node.admit(&[]).await.is_ok());
        backlog.add(backlog.limit() + 1);
        assert!(node.admit(&[]).await.is_err(), "over the limit for the whole wait");
        assert_eq!(node.metrics.publish_overloaded.load(Ordering::Relaxed), 1);
        let payer = node.clone();
        let pays = tokio::spawn(async move {
            tokio::time::sleep(ADMIT_WAIT / 2).await;
            payer.rooms.backlog().pay(2);
        });
        let started = tokio::time::Instant::now();
        assert!(node.admit(&[]).await.is_ok(), "admitted once readers caught up");
        let waited = started.elapsed();
        assert!(waited >= ADMIT_WAIT / 2 && waited <= ADMIT_WAIT / 2 + ADMIT_POLL_MAX, "{waited:?}");
        pays.await?;
        assert_eq!(node.metrics.publish_overloaded.load(Ordering::Relaxed), 1);
        Ok(())
    }
}
