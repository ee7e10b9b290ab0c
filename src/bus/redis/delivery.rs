//! The delivery task: hands what Redis pushes to the broadcaster. One task, so every event reaches
//! it once and in Redis's order: room events by `seq`, copies received on several channels
//! dropped, membership events ordered against the connection's membership snapshot. The
//! supervisor hands it the snapshot (with the membership changes the node missed) before it
//! subscribes any room or user, so membership is applied before any room event of a connection.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use redis::{PushInfo, Value};
use tokio::sync::mpsc;

use super::{MemberMark, Shared};
use crate::bus::{Control, Ephemeral};
use crate::protocol::event::{DomainEvent, EventKind};
use crate::protocol::{ChatId, UserId};
use crate::sync::lock;

/// Membership events held back while the snapshot loads; beyond it they are applied directly.
const MAX_HELD_MEMBER_EVENTS: usize = 65_536;

/// What the connection's push sender and the supervisor hand to the delivery task, in order.
pub(super) enum Inbound {
    /// A new connection (generation `gen`) is about to be opened: pushes of older ones are stale.
    Reset { gen: u64 },
    /// The membership snapshot of generation `gen`, sent before any room or user is subscribed.
    Snapshot { gen: u64, snapshot: MemberSnapshot },
    /// A message on one of generation `gen`'s subscribed channels, `bytes` long (counted in
    /// [`Shared::inbound_bytes`] while it waits).
    Push { gen: u64, info: PushInfo, bytes: usize },
}

impl Inbound {
    /// What a push holds while it waits: its strings, and a little for the rest.
    pub(super) fn push_bytes(info: &PushInfo) -> usize {
        let strings: usize =
            info.data.iter().map(|v| if let Value::BulkString(s) = v { s.len() } else { 0 }).sum();
        strings + 64
    }
}

/// What the snapshot script read, in one atomic step: the membership, and the membership events
/// the node missed since the last one it applied.
pub(super) struct MemberSnapshot {
    /// `herald:boot`: which Redis state `ver` counts in.
    pub(super) boot: String,
    /// The global counter the snapshot was taken at.
    pub(super) ver: u64,
    pub(super) pairs: Vec<(ChatId, UserId)>,
    /// Every removal Redis remembers: (chat, user, Unix seconds).
    pub(super) removals: Vec<(ChatId, UserId, u64)>,
    /// `None` on the node's first connect, which starts from the snapshot (nothing to replay).
    pub(super) missed: Option<Missed>,
}

/// The member log's entries after the position the supervisor read from [`Shared::member_mark`]
/// (the delivery task may have applied a few more since: it skips those).
pub(super) struct Missed {
    /// The log holds every membership event whose counter is above this.
    pub(super) reach: u64,
    /// (global counter, event), oldest first, all at or below the snapshot's `ver`.
    pub(super) events: Vec<(u64, DomainEvent)>,
}

/// Per-connection delivery state; reset with each new connection.
struct Receiving {
    gen: u64,
    /// Highest global counter delivered: copies of a non-room event (several channels of one
    /// server, which sends them in order) are dropped. Under Cluster only the members channel
    /// comes this way (users' copies are delivered per user, see [`deliver_one`]).
    last_gseq: u64,
    /// Membership events held until the snapshot of this connection is applied.
    held: Option<Vec<(DomainEvent, u64)>>,
}

/// Delivers in arrival order until the bus handle is dropped (which aborts this task).
pub(super) async fn deliver_task(shared: Arc<Shared>, mut rx: mpsc::Receiver<Inbound>) {
    let mut state = Receiving { gen: 0, last_gseq: 0, held: None };
    while let Some(msg) = next(&mut rx, shared.names.cluster).await {
        match msg {
            Inbound::Reset { gen } => state = Receiving { gen, last_gseq: 0, held: Some(Vec::new()) },
            Inbound::Snapshot { gen, snapshot } if gen == state.gen => {
                let ver = snapshot.ver;
                // A membership event the snapshot holds may still come on the subscription
                // connection after it (the snapshot is read on the other one): not twice.
                state.last_gseq = state.last_gseq.max(ver);
                // First what the node missed while it was cut off, in order, as if live (a
                // removal ends the user's subscriptions here, under every membership source).
                if let Some(missed) = snapshot.missed {
                    replay(&shared, snapshot.boot, ver, missed);
                }
                // Then the snapshot, the whole truth as of `ver` where the sink keeps membership
                // (`membership: events`): it adds what it lacks and drops what it no longer holds,
                // which after the replay is only what the log could not tell.
                shared.sink.membership_snapshot(snapshot.pairs);
                // And the removals as Redis holds them, with Redis's times (a replayed removal
                // was stamped with this node's clock at replay).
                shared.sink.removals_snapshot(snapshot.removals);
                for (event, gseq) in state.held.take().unwrap_or_default() {
                    if gseq > ver {
                        shared.sink.deliver(&event, None);
                        shared.note_member(gseq);
                    }
                }
            }
            Inbound::Snapshot { .. } => {}
            Inbound::Push { gen, info, bytes } if gen == state.gen => {
                shared.inbound_bytes.fetch_sub(bytes, Ordering::Relaxed);
                let Some(Value::BulkString(payload)) = info.data.get(1) else { continue };
                // Under Cluster each user's copy comes from the user's own shard (see
                // `deliver_one`).
                let to_user = if shared.names.cluster { user_channel(info.data.first()) } else { None };
                receive(&shared, &mut state, payload, to_user);
            }
            // A push from a connection already replaced: the new one restores what is needed.
            Inbound::Push { bytes, .. } => {
                shared.inbound_bytes.fetch_sub(bytes, Ordering::Relaxed);
            }
        }
    }
}

/// The next message in order. Under Cluster (`coalesce`) the task steps aside once after waiting
/// for one: pushes come from one socket per shard, each read carrying a few events (one server's
/// single socket brings many per read), so delivering each read at once hands a room's events to
/// its connections a few at a time and wakes them for fewer frames per write (measured: 2.1
/// frames per write against 2.6-2.8 on one Redis at saturation, BENCHMARKS.md). Stepping aside
/// gives the I/O thread, which reads every shard's socket, time to queue the other shards' pushes,
/// so they join this run. Order is
/// untouched (one queue, one reader); on an idle runtime the step costs one scheduler pass.
async fn next(rx: &mut mpsc::Receiver<Inbound>, coalesce: bool) -> Option<Inbound> {
    if let Ok(msg) = rx.try_recv() {
        return Some(msg);
    }
    let msg = rx.recv().await?;
    if coalesce {
        tokio::task::yield_now().await;
    }
    Some(msg)
}

/// Applies the membership events this node missed (those after its mark), and moves the mark to
/// the snapshot's position. Counts a gap when the log no longer reaches back to the mark.
fn replay(shared: &Shared, boot: String, ver: u64, missed: Missed) {
    let after = match &*lock(&shared.member_mark) {
        Some(mark) if mark.boot == boot => Some(mark.gseq),
        _ => None,
    };
    match after {
        Some(after) if missed.reach > after => {
            shared.stats.membership_log_gaps.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                after,
                reach = missed.reach,
                "redis member log no longer reaches back to this node's last membership event; \
                 membership changes older than the log are not applied here"
            );
        }
        Some(_) => {}
        None => {
            shared.stats.membership_log_gaps.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                "redis lost its state while this node was cut off; membership changes published \
                 before that are not applied here"
            );
        }
    }
    let after = after.unwrap_or(0);
    for (gseq, event) in missed.events {
        if gseq > after {
            shared.sink.deliver(&event, None);
        }
    }
    *lock(&shared.member_mark) = Some(MemberMark { boot, gseq: ver });
}

/// A presence message on a room channel (a join or leave a script announced, or a node's
/// typing event): ephemeral, never ordered against the room's events or deduplicated.
fn presence(shared: &Shared, payload: &[u8]) {
    let wire: super::presence::PresenceWire = match serde_json::from_slice(payload) {
        Ok(wire) => wire,
        Err(e) => {
            tracing::warn!(error = %e, "unreadable presence message on a redis channel; dropped");
            return;
        }
    };
    let (chat, user) = (wire.chat_id, wire.user_id);
    let (event, skip) = match wire.presence.as_str() {
        "join" => (Ephemeral::Join { chat, user }, 0),
        "leave" => (Ephemeral::Leave { chat, user }, 0),
        "typing" => {
            let from = wire.conn.unwrap_or(0);
            // The sender's own connection is skipped only on the node that holds it.
            let skip = if wire.node == Some(shared.node_id) { from } else { 0 };
            (Ephemeral::Typing { chat, user, from }, skip)
        }
        other => {
            tracing::debug!(kind = other, "presence message of a newer kind; dropped");
            return;
        }
    };
    shared.sink.ephemeral(event, skip);
}

/// One event as a node published it on a channel: this node's only ingress for events from Redis,
/// where what cannot be delivered is decided.
fn receive(shared: &Shared, state: &mut Receiving, payload: &[u8], to_user: Option<UserId>) {
    if payload.starts_with(super::presence::PRESENCE_PREFIX) {
        presence(shared, payload);
        return;
    }
    if let Some(control) = Control::from_json(payload) {
        match control {
            Ok(msg) => {
                if let Control::Revoke { user, .. } = msg {
                    // Before the sink learns it: an upgrade asking Redis meanwhile must not
                    // cache the answer it had before this.
                    shared.forget_checked(Some(user));
                }
                shared.sink.control(msg);
            }
            Err(e) => tracing::warn!(error = %e, "unreadable control message on a redis channel; dropped"),
        }
        return;
    }
    let (event, seq) = match DomainEvent::from_json(payload) {
        Ok(parsed) => parsed,
        Err(e) => {
            tracing::warn!(error = %e, "undecodable event on a redis channel; dropped");
            return;
        }
    };
    let Some(seq) = seq else {
        tracing::warn!("event without seq on a redis channel; dropped");
        return;
    };
    if event.kind == EventKind::Unknown {
        // A type only the publishing node knows (it runs a newer version). Its `seq` may be a
        // room's or the global counter's, so it must not move either dedupe mark: it goes
        // straight to the sink, which counts and ignores unknown types.
        shared.sink.deliver(&event, None);
        return;
    }
    deliver_one(shared, state, event, seq, to_user);
}

/// The user whose channel (`herald:{<user>}:user`) a push came on, if it came on one.
fn user_channel(channel: Option<&Value>) -> Option<UserId> {
    let Some(Value::BulkString(name)) = channel else { return None };
    let id = name.strip_prefix(b"herald:{")?.strip_suffix(b"}:user")?;
    std::str::from_utf8(id).ok()?.parse().ok()
}

/// Delivers one sequenced event of a known type, checked against its room's `seq` or, for any
/// other event, the global counter: a copy is dropped, a room `seq` that went backwards is
/// dropped and the room re-seeded. Membership events wait while this connection's snapshot loads.
///
/// Under Redis Cluster a copy on a user's channel (`to_user`) goes to that user alone, unchecked:
/// each (event, user) pair is published once, on the user's one channel, so it cannot come twice;
/// copies of one event (and of consecutive events) come from several shards in any order, so any
/// ordering check or window across them would drop events no copy delivered. The room's channel
/// then carries only the room's frame.
fn deliver_one(
    shared: &Shared,
    state: &mut Receiving,
    event: DomainEvent,
    seq: u64,
    to_user: Option<UserId>,
) {
    if let Some(user) = to_user {
        let room = event.room();
        if let Some(room) = room {
            shared.note_seq(room, seq);
        }
        shared.sink.deliver_to_user(&event, room.map(|_| seq), user);
        return;
    }
    if let Some(room) = event.room() {
        let mut delivered = lock(&shared.delivered);
        let last = delivered.entry(room).or_insert(0);
        if seq <= *last {
            if seq < *last {
                // Redis's counter went backwards (state lost before every node re-seeded): refuse to
                // show clients an old seq, and push the counter back above what we delivered.
                shared.stats.seq_regressions.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%room, seq, last = *last, "room seq went backwards in redis; event dropped, re-seeding");
                shared.topics.reseed(room);
            } else {
                // The same event again on another channel (a room event also addressed to users).
                shared.stats.duplicates_dropped.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        *last = seq;
        drop(delivered);
        shared.note_seq(room, seq);
        if shared.names.cluster && !event.user_ids.is_empty() {
            // Its users' frames come on their own channels.
            shared.sink.deliver(&DomainEvent { user_ids: Vec::new(), ..event }, Some(seq));
        } else {
            shared.sink.deliver(&event, Some(seq));
        }
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
    if is_member {
        shared.note_member(seq);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::bus::redis::RedisOptions;
    use crate::bus::Deliver;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(EventKind, Option<u64>)>>);

    impl Deliver for Recorder {
        fn deliver(&self, event: &DomainEvent, seq: Option<u64>) {
            lock(&self.0).push((event.kind, seq));
        }
    }

    /// Waits in `next` for a first message, then sends `a` and returns, as soon as the task has
    /// taken it, whether `next` had already returned (and the queue for a second message `b`).
    async fn woken_with(coalesce: bool) -> (bool, Option<u64>, Option<u64>) {
        let (tx, mut rx) = mpsc::channel(4);
        let waiter = tokio::spawn(async move {
            let first = next(&mut rx, coalesce).await;
            (first, rx)
        });
        // The waiter runs until it waits for a message.
        tokio::task::yield_now().await;
        tx.send(Inbound::Reset { gen: 1 }).await.expect("waiter alive");
        while tx.capacity() < tx.max_capacity() {
            tokio::task::yield_now().await;
        }
        let done_when_taken = waiter.is_finished();
        tx.send(Inbound::Reset { gen: 2 }).await.expect("queue open");
        let (first, mut rx) = waiter.await.expect("waiter ran");
        let gen = |m: Option<Inbound>| match m {
            Some(Inbound::Reset { gen }) => Some(gen),
            _ => None,
        };
        (done_when_taken, gen(first), gen(rx.try_recv().ok()))
    }

    #[tokio::test(flavor = "current_thread")]
    async fn under_cluster_a_woken_delivery_run_steps_aside_before_delivering() {
        // One server: the message is handed on the moment it is taken.
        assert_eq!(woken_with(false).await, (true, Some(1), Some(2)));
        // Cluster: taken, then the task steps aside (other shards' pushes may join the run)
        // before handing it on; nothing is lost or reordered.
        assert_eq!(woken_with(true).await, (false, Some(1), Some(2)));
    }

    #[test]
    fn an_unknown_type_from_a_newer_node_moves_no_dedupe_mark() {
        let sink = Arc::new(Recorder::default());
        let (shared, _phase) = Shared::new(sink.clone(), RedisOptions::default(), false);
        let mut state = Receiving { gen: 1, last_gseq: 0, held: None };
        let (chat, user) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        // A room event of a type this node does not know, with a room `seq` (microseconds)...
        let unknown = format!(r#"{{"type":"chat.typing","chat_id":"{chat}","seq":1700000000000000}}"#);
        receive(&shared, &mut state, unknown.as_bytes(), None);
        // ...must not make the next global counter look like a copy already delivered.
        let notification =
            format!(r#"{{"type":"notification.created","user_id":"{user}","data":{{}},"seq":5}}"#);
        receive(&shared, &mut state, notification.as_bytes(), None);
        assert_eq!(*lock(&sink.0), vec![(EventKind::Unknown, None), (EventKind::NotificationCreated, None)]);
        assert_eq!(shared.stats.duplicates_dropped.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_user_channel_names_its_user() {
        let user = uuid::Uuid::new_v4();
        let on = |name: String| user_channel(Some(&Value::BulkString(name.into_bytes())));
        assert_eq!(on(format!("herald:{{{user}}}:user")), Some(user));
        assert_eq!(on(format!("herald:{{{user}}}:room")), None);
        assert_eq!(on("herald:{not-a-uuid}:user".into()), None);
        assert_eq!(user_channel(None), None);
    }
}
