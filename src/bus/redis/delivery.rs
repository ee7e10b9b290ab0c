//! The delivery task: hands what Redis pushes to the broadcaster. One task, so every event reaches
//! it once and in Redis's order: room events by `seq`, copies received on several channels
//! dropped, membership events ordered against the connection's membership snapshot.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use redis::{PushInfo, Value};
use tokio::sync::mpsc;

use super::{lock, Shared};
use crate::protocol::event::{DomainEvent, EventKind};
use crate::protocol::{ChatId, UserId};

/// Membership events held back while the snapshot loads; beyond it they are applied directly.
const MAX_HELD_MEMBER_EVENTS: usize = 65_536;

/// What the connection's push sender and the supervisor hand to the delivery task, in order.
pub(super) enum Inbound {
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

/// Per-connection delivery state; reset with each new connection.
struct Receiving {
    gen: u64,
    /// Highest global counter delivered: copies of a non-room event (several channels) are dropped.
    last_gseq: u64,
    /// Membership events held until the snapshot of this connection is applied.
    held: Option<Vec<(DomainEvent, u64)>>,
}

/// Delivers in arrival order until the bus handle is dropped (which aborts this task).
pub(super) async fn deliver_task(shared: Arc<Shared>, mut rx: mpsc::Receiver<Inbound>) {
    let mut state = Receiving { gen: 0, last_gseq: 0, held: None };
    while let Some(msg) = rx.recv().await {
        match msg {
            Inbound::Reset { gen } => state = Receiving { gen, last_gseq: 0, held: Some(Vec::new()) },
            Inbound::Snapshot { gen, ver, pairs } if gen == state.gen => {
                // The snapshot is the whole truth as of `ver`: the sink adds
                // what it lacks and drops what it no longer holds (a removal
                // this node missed while it was cut off).
                shared.sink.membership_snapshot(pairs);
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
                deliver_one(&shared, &mut state, event, seq);
            }
            // A push from a connection already replaced: the new one restores what is needed.
            Inbound::Push { .. } => {}
        }
    }
}

fn deliver_one(shared: &Shared, state: &mut Receiving, event: DomainEvent, seq: u64) {
    if let Some(room) = event.room() {
        let mut delivered = lock(&shared.delivered);
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
        drop(delivered);
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
