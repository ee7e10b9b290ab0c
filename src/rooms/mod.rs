//! The room registry: which rooms this node holds, and the frames each
//! receives. Rooms are a `DashMap` of [`Room`]s (a live ring of pre-encoded
//! frames and a history of the same frames, which serves recovery (`since`)
//! and readers that fell behind the ring), made on first use and removed
//! once they have neither subscribers nor history. Here are the node-wide
//! parts: joining and leaving, publishing (history first, then the ring),
//! filling history with frames the bus kept (handed in by a recovery), and
//! keeping every history within its limits (count, age, node-wide bytes). Plain methods callable from any
//! task: there is no hub loop. This module never awaits on a socket and
//! never sees the bus.
//!
//! [`room`] is one room; [`waiting`] its subscribers waiting for a ring;
//! [`history`] what it holds for recovery.

mod history;
mod room;
mod waiting;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use dashmap::DashMap;
use tokio::time::Instant;

use crate::backlog::Backlog;
use crate::mailbox::Mailbox;
use crate::protocol::deflate::Wire;
use crate::protocol::{ChatId, UserId};
pub use history::{Evicted, HistoryLimits, Read};
use history::{Held, Lazy};
pub use room::{Frame, Joined, Room};

/// Room channels and histories, keyed by chat. A room exists while it has a
/// subscriber or holds history.
pub struct Rooms {
    rooms: DashMap<ChatId, Arc<Room>>,
    /// Frames a room's live ring holds (`rooms.buffer`).
    ring: usize,
    limits: HistoryLimits,
    /// Frames and frame bytes held in every room's history (gauges).
    held_frames: AtomicUsize,
    held_bytes: AtomicUsize,
    /// Frames owed to this node's readers, shared with every room.
    backlog: Arc<Backlog>,
}

impl Rooms {
    /// Rooms whose readers count in `backlog`, the node's: the node builds
    /// it for [`Rooms::reach`] and its connections' write-queue bound.
    pub fn with_backlog(ring: usize, limits: HistoryLimits, backlog: Arc<Backlog>) -> Rooms {
        Rooms {
            rooms: DashMap::new(),
            // `rooms.buffer` is at most 65,536 (validated).
            ring: ring.clamp(1, 1 << 16),
            limits,
            held_frames: AtomicUsize::new(0),
            held_bytes: AtomicUsize::new(0),
            backlog,
        }
    }

    /// Rooms with a backlog of their own, for tests and benches that build
    /// no node: its floor counts no connection's write queue.
    pub fn new(ring: usize, limits: HistoryLimits) -> Rooms {
        let backlog = Backlog::for_reach(Rooms::reach(ring, limits), 0);
        Rooms::with_backlog(ring, limits, Arc::new(backlog))
    }

    /// How far behind its room's head a reader can fall before it is
    /// dropped: the history, or the live ring (`ring` frames) when there is
    /// less history.
    pub fn reach(ring: usize, limits: HistoryLimits) -> usize {
        limits.size.max(ring.max(1))
    }

    /// Frames owed to this node's readers: the admission control's signal.
    pub fn backlog(&self) -> &Backlog {
        &self.backlog
    }

    fn new_room(&self) -> Arc<Room> {
        Arc::new(Room::new(self.backlog.clone(), self.ring))
    }

    /// Joins a room, creating it on first use; the subscriber receives
    /// every frame published after this call (through its receiver, or the
    /// one the first publish makes for it, nudging `mailbox`). Done under
    /// the map entry's lock, so it cannot interleave with [`Rooms::leave`]
    /// removing the same room. A user joining again (a member re-added)
    /// lifts an earlier removal.
    pub fn join(&self, chat: ChatId, user: UserId, mailbox: &Arc<Mailbox>) -> (Arc<Room>, Joined) {
        let entry = self.rooms.entry(chat).or_insert_with(|| self.new_room());
        let joined = entry.join(mailbox);
        if entry.any_revoked.load(Ordering::Acquire) {
            entry.set_revoked(user, None);
        }
        (entry.clone(), joined)
    }

    /// The room of `chat`, made now (empty) if the node holds none: a reader
    /// of its history (`GET /api/rooms/{id}/history`) that may fill it from
    /// the bus. An empty room is dropped by [`Rooms::leave`] or the sweep.
    pub fn holder(&self, chat: ChatId) -> Arc<Room> {
        self.rooms.entry(chat).or_insert_with(|| self.new_room()).clone()
    }

    /// Events each room's history keeps at most (`rooms.history_size`).
    pub fn history_size(&self) -> usize {
        self.limits.size
    }

    /// `user` was removed from `chat`: its readers of the room on this node
    /// take nothing published after this moment. Call it before later
    /// frames of the room are published.
    pub fn revoke(&self, chat: ChatId, user: UserId) {
        if let Some(room) = self.get(chat) {
            room.set_revoked(user, Some(room.head.load(Ordering::Acquire)));
        }
    }

    /// Called after a subscriber dropped its receiver: removes the room if it
    /// has neither subscribers nor history. The check runs under the entry's
    /// write lock, so a concurrent `join` or `publish` keeps or recreates it.
    pub fn leave(&self, chat: ChatId) {
        self.rooms.remove_if(&chat, |_, room| room.subscribers() == 0 && room.held().is_empty());
    }

    /// Keeps one pre-encoded frame in the room's history and sends it to every
    /// subscriber; returns how many receivers it was queued for. Per event,
    /// not per recipient: one lookup, one history push and one channel send
    /// whatever the room's size.
    ///
    /// Callers publish each room's frames from one place at a time, in `seq`
    /// order (the bus guarantees it): the frame enters history before the
    /// ring, so a reader that sees a gap in the ring finds it in history.
    pub fn publish(&self, chat: ChatId, seq: u64, bytes: Bytes) -> usize {
        let room = match self.rooms.get(&chat) {
            Some(room) => room.clone(),
            None if self.limits.size == 0 => return 0,
            None => self.rooms.entry(chat).or_insert_with(|| self.new_room()).clone(),
        };
        let now = Instant::now();
        let len = bytes.len();
        let keep = self.limits.size > 0 && len <= self.limits.bytes;
        if keep && self.held_bytes.load(Ordering::Relaxed) + len > self.limits.bytes {
            // Over the node-wide budget: the globally oldest frames go, down
            // to 90% so the next publishes do not pay for this again. The
            // room's own lock is not held meanwhile (shedding locks others).
            self.shed((self.limits.bytes / 10 * 9).saturating_sub(len));
        }
        // Made (if the room needs one) before the head moves: see `ring_for_send`.
        // A history shorter than the ring would evict a small room's frames
        // before its readers took what a ring still held: such a node gives
        // every room its ring.
        let ring = room.ring_for_send(keep && self.limits.size >= self.ring);
        let wire;
        {
            let mut held = room.held();
            // One per event: the ring and the history share it (and with it
            // the frame's compressed twins, each made at most once). Made
            // under the room's lock, after the room's previous frame when
            // history holds it: no compression here, only its id and tail.
            wire = history::chained(held.back(), seq, bytes);
            let before = room.head.fetch_max(seq, Ordering::AcqRel);
            let readers = room.readers.load(Ordering::Relaxed);
            if seq > before && readers > 0 {
                // Under the room's lock: no reader joins or leaves between
                // the head moving and its readers being charged for it.
                let owed = (seq - before).saturating_mul(u64::from(readers));
                room.backlog.add(i64::try_from(owed).unwrap_or(i64::MAX));
            }
            if keep {
                self.keep(&mut held, seq, &wire, now);
            }
        }
        match ring {
            Some(ring) if ring.receiver_count() > 0 => ring.send(Frame::new(seq, wire, now)).unwrap_or(0),
            Some(_) => 0,
            // A small room: its subscribers read the frame from history.
            None => room.nudge_waiting(),
        }
    }

    /// Adds frames the bus kept of its own (a room's Redis history, read
    /// for a recovery this node's history could not serve) to the room's
    /// history, so the connection replays them at its own pace, like any
    /// catch-up, instead of queueing them all at once. `frames` are
    /// `(seq, published at, frame)`, oldest first. What the room holds
    /// wins where both have a `seq`; the result is the longest run of
    /// consecutive `seq`s that ends with the newest frame of either,
    /// bounded like any history, and never one that drops the node's own
    /// newest frame (readers may be reading that run, and frames still in
    /// flight extend it). The room's head is not moved: it stays the last
    /// `seq` this node delivered, which is where a removal cuts a user off.
    pub fn fill(&self, room: &Room, frames: Vec<(u64, Instant, Bytes)>) {
        let bytes: usize = frames.iter().map(|(_, _, b)| b.len()).sum();
        if self.held_bytes.load(Ordering::Relaxed) + bytes > self.limits.bytes {
            self.shed((self.limits.bytes / 10 * 9).saturating_sub(bytes));
        }
        let mut lazy = room.held();
        let mine = lazy.take_held();
        self.held_frames.fetch_sub(mine.len(), Ordering::Relaxed);
        self.held_bytes.fetch_sub(mine.iter().map(|h| h.bytes.len()).sum::<usize>(), Ordering::Relaxed);
        let mut merged: Vec<Held> = Vec::with_capacity(mine.len() + frames.len());
        let mine_newest = mine.back().map(|h| h.seq);
        let saved: Vec<Held> =
            mine.iter().map(|h| Held { seq: h.seq, at: h.at, bytes: h.bytes.clone() }).collect();
        let mut mine = mine.into_iter().peekable();
        let mut kept = frames.into_iter().filter(|(_, _, b)| b.len() <= self.limits.bytes).peekable();
        loop {
            let take_mine = match (mine.peek(), kept.peek()) {
                (Some(m), Some(k)) => m.seq <= k.0,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            let next = if take_mine {
                mine.next()
            } else {
                kept.next().map(|(seq, at, bytes)| Held {
                    seq,
                    at,
                    bytes: history::chained(merged.last(), seq, bytes),
                })
            };
            let Some(next) = next else { break };
            match merged.last() {
                Some(last) if last.seq == next.seq => continue,
                Some(last) if last.seq + 1 != next.seq => merged.clear(),
                _ => {}
            }
            merged.push(next);
        }
        if mine_newest.is_some_and(|newest| !merged.iter().any(|h| h.seq == newest)) {
            merged = saved;
        }
        let over = merged.len().saturating_sub(self.limits.size);
        merged.drain(..over);
        self.held_frames.fetch_add(merged.len(), Ordering::Relaxed);
        self.held_bytes.fetch_add(merged.iter().map(|h| h.bytes.len()).sum::<usize>(), Ordering::Relaxed);
        lazy.state().held = merged.into();
        lazy.trim();
    }

    /// Appends a frame to a room's history (its lock held).
    fn keep(&self, held: &mut Lazy, seq: u64, bytes: &Wire, now: Instant) {
        if held.back().is_some_and(|h| h.seq >= seq) {
            // An older or repeated seq: history holds each seq once, in order.
            return;
        }
        if held.back().is_some_and(|h| h.seq + 1 != seq) {
            // This node missed events of the room: what it holds is no longer
            // a contiguous run, so start again from this one.
            self.evict(held, usize::MAX);
        }
        let over = held.len() + 1 > self.limits.size;
        self.evict(held, usize::from(over));
        held.push_back(Held { seq, at: now, bytes: bytes.clone() });
        self.held_frames.fetch_add(1, Ordering::Relaxed);
        self.held_bytes.fetch_add(bytes.len(), Ordering::Relaxed);
    }

    /// Drops up to `n` of the oldest frames of one room's history.
    fn evict(&self, lazy: &mut Lazy, n: usize) {
        for _ in 0..n {
            let Some(h) = lazy.pop_front() else { break };
            self.held_frames.fetch_sub(1, Ordering::Relaxed);
            self.held_bytes.fetch_sub(h.bytes.len(), Ordering::Relaxed);
        }
        lazy.trim();
    }

    /// Drops history older than the TTL, keeps the byte budget at most 90%
    /// used, and removes rooms left with neither history nor subscribers.
    pub fn sweep(&self, now: Instant) {
        for entry in self.rooms.iter() {
            let mut held = entry.value().held();
            let expired = held.iter().take_while(|h| now.duration_since(h.at) >= self.limits.ttl).count();
            if expired > 0 {
                self.evict(&mut held, expired);
            }
        }
        self.shed(self.limits.bytes / 10 * 9);
        self.rooms.retain(|_, room| room.subscribers() > 0 || !room.held().is_empty());
    }

    /// Evicts the node's oldest frames, whatever their room, until at most
    /// `target` bytes are held: all but the frames a room without a ring
    /// still carries to its subscribers ([`Room::sheddable`]), which a ring
    /// would hold outside the budget too (at most `rooms.buffer` a room).
    fn shed(&self, target: usize) {
        if self.held_bytes.load(Ordering::Relaxed) <= target {
            return;
        }
        let mut oldest: BinaryHeap<Reverse<(Instant, ChatId)>> = BinaryHeap::new();
        for entry in self.rooms.iter() {
            let floor = entry.value().sheddable();
            if let Some(front) = entry.value().held().front().filter(|h| h.seq <= floor) {
                oldest.push(Reverse((front.at, *entry.key())));
            }
        }
        while self.held_bytes.load(Ordering::Relaxed) > target {
            let Some(Reverse((_, chat))) = oldest.pop() else { break };
            let Some(room) = self.get(chat) else { continue };
            let floor = room.sheddable();
            let mut held = room.held();
            if held.front().is_some_and(|h| h.seq <= floor) {
                self.evict(&mut held, 1);
            }
            if let Some(front) = held.front().filter(|h| h.seq <= floor) {
                oldest.push(Reverse((front.at, chat)));
            }
        }
    }

    /// The room, if this node has it.
    pub fn get(&self, chat: ChatId) -> Option<Arc<Room>> {
        self.rooms.get(&chat).map(|r| r.clone())
    }

    /// Rooms held (with subscribers or history).
    pub fn len(&self) -> usize {
        self.rooms.len()
    }

    /// True when no room is held.
    pub fn is_empty(&self) -> bool {
        self.rooms.is_empty()
    }

    /// The rooms that owe this node's readers frames, for an overloaded node
    /// to name to the others (their publishers then hold back too): rooms
    /// with readers counted in the backlog that carried an event here (a
    /// live ring is made, or history held). `None` when there are more than
    /// `max`: the node then names every room. Scans every room: called only
    /// while the node is overloaded, a few dozen times a second.
    pub fn hot(&self, max: usize) -> Option<Vec<ChatId>> {
        let mut hot = Vec::new();
        for entry in self.rooms.iter() {
            let room = entry.value();
            let counted = room.readers.load(Ordering::Relaxed) > 0;
            if counted && (room.ring.get().is_some() || !room.held().is_empty()) {
                if hot.len() == max {
                    return None;
                }
                hot.push(*entry.key());
            }
        }
        Some(hot)
    }

    /// Subscribers of one room on this node.
    pub fn subscribers(&self, chat: ChatId) -> usize {
        self.rooms.get(&chat).map_or(0, |room| room.subscribers())
    }

    /// Frames held in history, all rooms together.
    pub fn held_frames(&self) -> usize {
        self.held_frames.load(Ordering::Relaxed)
    }

    /// Frame bytes held in history, all rooms together.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests;
