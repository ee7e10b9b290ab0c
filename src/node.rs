//! The node's shared state: registries, membership, bus, metrics, shutdown
//! and task tracking, plus the load sensor. Built once from a [`Config`] by
//! [`crate::server`], then shared by the HTTP edge and every connection.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broadcast::Broadcaster;
use crate::bus::memory::MemoryBus;
use crate::bus::redis::{RedisBus, RedisOptions};
use crate::bus::{Bus, BusError, Deliver};
use crate::config::{BusKind, Config, WebSocketConfig};
use crate::membership;
use crate::metrics::Metrics;
use crate::rooms::{HistoryLimits, Rooms, Users};

/// Everything a connection and the HTTP routes need from their node.
pub struct Node {
    pub rooms: Arc<Rooms>,
    pub users: Arc<Users>,
    pub membership: Arc<membership::Table>,
    pub source: membership::Source,
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
}

impl Node {
    /// Builds the registries, the broadcaster and the configured bus.
    /// Connecting to Redis is the only step that can fail.
    pub async fn build(config: &Config) -> Result<Node, BusError> {
        let metrics = Arc::new(Metrics::default());
        let rooms = Arc::new(Rooms::new(config.rooms.buffer, HistoryLimits::from(&config.rooms)));
        let users = Arc::new(Users::new());
        let membership = Arc::new(membership::Table::default());
        let sink: Arc<dyn Deliver> = Arc::new(Broadcaster {
            rooms: rooms.clone(),
            users: users.clone(),
            membership: membership.clone(),
            source: config.auth.membership,
            metrics: metrics.clone(),
        });
        let bus: Arc<dyn Bus> = match config.bus.kind {
            BusKind::Memory => Arc::new(MemoryBus::new(sink)),
            BusKind::Redis => {
                let options = RedisOptions {
                    history_size: config.rooms.history_size,
                    history_ttl: config.rooms.history_ttl,
                    ..RedisOptions::default()
                };
                Arc::new(RedisBus::connect_with(&config.bus, sink, options).await?)
            }
        };
        Ok(Node {
            rooms,
            users,
            membership,
            source: config.auth.membership,
            bus,
            metrics,
            ws: config.websocket.clone(),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            busy: AtomicBool::new(false),
        })
    }
}

/// Frames written per second above which the node counts as busy.
pub const BUSY_FRAMES_PER_SEC: u64 = 100_000;
const LOAD_SAMPLE: Duration = Duration::from_millis(10);
/// How often expired history is swept and the node-wide byte budget rebalanced.
const HISTORY_SWEEP: Duration = Duration::from_millis(500);

/// Keeps `node.busy` current from the frames-written counter until `stop`.
/// Batching pays off only under load: on a quiet node, stepping aside before
/// each write costs a poll per delivery and gains nothing.
pub async fn sense_load(node: Arc<Node>, stop: CancellationToken) {
    let threshold = BUSY_FRAMES_PER_SEC * LOAD_SAMPLE.as_millis() as u64 / 1000;
    let mut last = node.metrics.frames_out.load(Ordering::Relaxed);
    let mut tick = tokio::time::interval(LOAD_SAMPLE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = node.metrics.frames_out.load(Ordering::Relaxed);
        node.busy.store(now.wrapping_sub(last) > threshold, Ordering::Relaxed);
        last = now;
    }
}

/// Drops history older than `rooms.history_ttl`, keeps the node-wide byte
/// budget fair across rooms, removes rooms left with neither history nor
/// subscribers, and lets the bus forget its state for them, until `stop`.
pub async fn sweep_history(node: Arc<Node>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(HISTORY_SWEEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        node.rooms.sweep(tokio::time::Instant::now());
        let rooms = &node.rooms;
        node.bus.forget_idle(&|chat| rooms.get(chat).is_some());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// Batching is switched on by load and off again when it passes.
    #[tokio::test(start_paused = true)]
    async fn the_node_counts_as_busy_only_while_it_writes_fast() -> TestResult {
        let node = Arc::new(Node::build(&Config::default()).await?);
        let stop = CancellationToken::new();
        let sensor = tokio::spawn(sense_load(node.clone(), stop.clone()));
        let per_sample = BUSY_FRAMES_PER_SEC * LOAD_SAMPLE.as_millis() as u64 / 1000;
        for _ in 0..3 {
            node.metrics.frames_out.fetch_add(per_sample * 2, Ordering::Relaxed);
            tokio::time::sleep(LOAD_SAMPLE).await;
        }
        assert!(node.busy.load(Ordering::Relaxed), "fast writing marks the node busy");
        for _ in 0..3 {
            node.metrics.frames_out.fetch_add(per_sample / 2, Ordering::Relaxed);
            tokio::time::sleep(LOAD_SAMPLE).await;
        }
        assert!(!node.busy.load(Ordering::Relaxed), "slow writing clears it");
        stop.cancel();
        sensor.await?;
        Ok(())
    }
}
