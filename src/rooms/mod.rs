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
            ring: ring.max(1),
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
        Arc::new(Room::new(self.backlog.clone()))
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
        match room.ring_for_send(self.ring) {
            Some(ring) if ring.receiver_count() > 0 => ring.send(Frame::new(seq, wire, now)).unwrap_or(0),
            _ => 0,
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
        held.state().held.push_back(Held { seq, at: now, bytes: bytes.clone() });
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
    /// `target` bytes are held.
    fn shed(&self, target: usize) {
        if self.held_bytes.load(Ordering::Relaxed) <= target {
            return;
        }
        let mut oldest: BinaryHeap<Reverse<(Instant, ChatId)>> = BinaryHeap::new();
        for entry in self.rooms.iter() {
            if let Some(front) = entry.value().held().front() {
                oldest.push(Reverse((front.at, *entry.key())));
            }
        }
        while self.held_bytes.load(Ordering::Relaxed) > target {
            let Some(Reverse((_, chat))) = oldest.pop() else { break };
            let Some(room) = self.get(chat) else { continue };
            let mut held = room.held();
            self.evict(&mut held, 1);
            if let Some(front) = held.front() {
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
    /// with readers counted in the backlog whose live ring is made (they
    /// carried an event to a reader here). `None` when there are more than
    /// `max`: the node then names every room. Scans every room: called only
    /// while the node is overloaded, a few dozen times a second.
    pub fn hot(&self, max: usize) -> Option<Vec<ChatId>> {
        let mut hot = Vec::new();
        for entry in self.rooms.iter() {
            let room = entry.value();
            if room.readers.load(Ordering::Relaxed) > 0 && room.ring.get().is_some() {
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
mod tests {
    use super::*;
    use std::sync::Barrier;
    use std::time::Duration;

    const LIMITS: HistoryLimits = HistoryLimits { size: 8, ttl: Duration::from_secs(60), bytes: 1 << 20 };

    fn frame(i: u64) -> Bytes {
        Bytes::from(i.to_be_bytes().to_vec())
    }

    fn read_all(room: &Room, after: u64) -> Result<Vec<u64>, Evicted> {
        let mut got = Vec::new();
        room.read_after(after, usize::MAX, usize::MAX, |b| {
            got.push(u64::from_be_bytes(b[..8].try_into().unwrap()))
        })?;
        Ok(got)
    }

    fn mailbox() -> Arc<Mailbox> {
        Arc::new(Mailbox::new(8))
    }

    fn ticket(joined: Joined) -> u32 {
        match joined {
            Joined::Waiting(ticket) => ticket,
            Joined::Live(_) => panic!("joined a ring that should not exist yet"),
        }
    }

    #[test]
    fn rooms_live_while_they_have_subscribers_or_history() {
        let rooms = Rooms::new(4, LIMITS);
        let chat = ChatId::from_u128(1);
        let mb = mailbox();
        let (_, a) = rooms.join(chat, UserId::from_u128(99), &mb);
        let (room, b) = rooms.join(chat, UserId::from_u128(99), &mb);
        let (a, b) = (ticket(a), ticket(b));
        assert_eq!((rooms.len(), rooms.subscribers(chat)), (1, 2));
        assert_eq!(rooms.publish(chat, 1, frame(1)), 2);
        let mut b = room.take_receiver(b).expect("the ring's first publish made b's receiver");
        assert_eq!(b.try_recv().unwrap().seq(), 1);
        room.stop_waiting(a);
        drop(b);
        rooms.leave(chat);
        assert_eq!(rooms.len(), 1, "history keeps the room");
        rooms.sweep(Instant::now() + LIMITS.ttl);
        assert!(rooms.is_empty(), "expired history and no subscriber: gone");
        assert_eq!(rooms.held_frames(), 0);
    }

    /// An overloaded node names the rooms whose readers it owes frames, or
    /// every room when there are too many to name.
    #[test]
    fn hot_rooms_are_those_carrying_events_to_counted_readers() {
        let rooms = Rooms::new(4, LIMITS);
        let mb = mailbox();
        let (quiet, busy, unread) = (ChatId::from_u128(1), ChatId::from_u128(2), ChatId::from_u128(3));
        for chat in [quiet, busy] {
            let (room, _) = rooms.join(chat, UserId::from_u128(1), &mb);
            room.count_reader(0);
        }
        rooms.publish(busy, 1, frame(1));
        rooms.publish(unread, 1, frame(1));
        assert_eq!(rooms.hot(8), Some(vec![busy]), "no event yet, or no reader here: not hot");
        rooms.publish(quiet, 1, frame(1));
        assert_eq!(rooms.hot(8).map(|h| h.len()), Some(2));
        assert_eq!(rooms.hot(1), None, "more than named: every room");
        rooms.get(busy).unwrap().uncount_reader(1);
        assert_eq!(rooms.hot(1), Some(vec![quiet]));
    }

    #[test]
    fn a_room_makes_its_ring_for_the_first_frame_a_subscriber_waits_for() {
        let rooms = Rooms::new(4, LIMITS);
        let chat = ChatId::from_u128(9);
        assert_eq!(rooms.publish(chat, 1, frame(1)), 0);
        let room = rooms.get(chat).unwrap();
        assert!(room.ring.get().is_none(), "history alone makes no ring");

        let (waiter, left) = (mailbox(), mailbox());
        let (_, joined) = rooms.join(chat, UserId::from_u128(1), &waiter);
        let first = ticket(joined);
        let (_, joined) = rooms.join(chat, UserId::from_u128(2), &left);
        room.stop_waiting(ticket(joined));
        assert!(room.ring.get().is_none(), "joining makes no ring either");
        assert_eq!((room.subscribers(), room.take_receiver(first).is_none()), (1, true));
        assert!(!waiter.take_pending());

        assert_eq!(rooms.publish(chat, 2, frame(2)), 1, "sent to the one still waiting");
        assert!(waiter.take_pending(), "its mailbox was nudged");
        assert!(!left.take_pending(), "who left is not");
        let mut rx = room.take_receiver(first).expect("made with the ring");
        assert_eq!(rx.try_recv().unwrap().seq(), 2);
        assert!(room.take_receiver(first).is_none(), "taken once");
        assert!(room.waiting().is_none(), "nothing left waiting, nothing kept");

        let (_, joined) = rooms.join(chat, UserId::from_u128(3), &left);
        assert!(matches!(joined, Joined::Live(_)), "later subscribers join the ring");
    }

    #[test]
    fn joining_and_leaving_a_room_without_events_reuses_its_tickets() {
        let rooms = Rooms::new(4, LIMITS);
        let chat = ChatId::from_u128(10);
        let mb = mailbox();
        let (room, stays) = rooms.join(chat, UserId::from_u128(1), &mb);
        let stays = ticket(stays);
        for _ in 0..1_000 {
            let (_, a) = rooms.join(chat, UserId::from_u128(2), &mb);
            let (_, b) = rooms.join(chat, UserId::from_u128(3), &mb);
            room.stop_waiting(ticket(b));
            room.stop_waiting(ticket(a));
        }
        assert_eq!(room.subscribers(), 1);
        let slots = room.waiting().as_ref().map_or(0, |w| w.slots.len());
        assert!(slots <= 3, "churn grew the list to {slots}");
        room.stop_waiting(stays);
        assert_eq!(room.subscribers(), 0);
        assert!(room.waiting().is_none(), "an empty list keeps no memory");
    }

    #[test]
    fn a_removed_user_is_cut_off_at_the_head_until_it_joins_again() {
        let rooms = Rooms::new(4, LIMITS);
        let (chat, alice, bob) = (ChatId::from_u128(8), UserId::from_u128(1), UserId::from_u128(2));
        let (room, _joined) = rooms.join(chat, alice, &mailbox());
        rooms.publish(chat, 1, frame(1));
        assert_eq!(room.cutoff(alice), None);
        rooms.revoke(chat, alice);
        rooms.publish(chat, 2, frame(2));
        assert_eq!((room.cutoff(alice), room.cutoff(bob)), (Some(1), None));
        let (_, _again) = rooms.join(chat, alice, &mailbox());
        assert_eq!(room.cutoff(alice), None, "re-added and subscribed again");
    }

    #[test]
    fn a_room_without_subscribers_keeps_history() {
        let rooms = Rooms::new(4, LIMITS);
        let chat = ChatId::from_u128(2);
        for seq in 1..=3 {
            assert_eq!(rooms.publish(chat, seq, frame(seq)), 0);
        }
        let room = rooms.get(chat).unwrap();
        assert_eq!(read_all(&room, 0), Ok(vec![1, 2, 3]));
        assert_eq!(read_all(&room, 2), Ok(vec![3]));
        assert!(room.covers(1, 3) && room.covers(0, 3) && room.covers(3, 3));
        assert!(!room.covers(4, 3), "a since ahead of the room is not covered");
        assert_eq!((rooms.held_frames(), rooms.held_bytes()), (3, 24));
    }

    #[test]
    fn history_is_bounded_by_count_age_and_bytes() {
        let rooms = Rooms::new(4, HistoryLimits { size: 3, ttl: Duration::from_secs(5), bytes: 40 });
        let (a, b) = (ChatId::from_u128(3), ChatId::from_u128(4));
        for seq in 1..=5 {
            rooms.publish(a, seq, frame(seq));
        }
        let room_a = rooms.get(a).unwrap();
        assert_eq!(read_all(&room_a, 2), Ok(vec![3, 4, 5]));
        assert_eq!(read_all(&room_a, 1), Err(Evicted { oldest: 3 }), "count bound");
        assert!(!room_a.covers(1, 5));
        // 8 bytes a frame, 40 bytes node-wide: over budget, the node's
        // oldest frames (room a's) go first, down to 90% of the budget.
        for seq in 1..=3 {
            rooms.publish(b, seq, frame(seq));
        }
        assert_eq!(rooms.held_bytes(), 32);
        assert_eq!(read_all(&rooms.get(b).unwrap(), 0), Ok(vec![1, 2, 3]));
        assert_eq!(read_all(&room_a, 4), Ok(vec![5]));
        assert_eq!(read_all(&room_a, 2), Err(Evicted { oldest: 5 }));
        rooms.sweep(Instant::now() + Duration::from_secs(6));
        assert_eq!((rooms.held_frames(), rooms.held_bytes()), (0, 0), "age bound");
    }

    #[test]
    fn reads_are_paged_and_say_when_they_reach_the_head() {
        let rooms = Rooms::new(4, LIMITS);
        let chat = ChatId::from_u128(5);
        for seq in 1..=5 {
            rooms.publish(chat, seq, frame(seq));
        }
        let room = rooms.get(chat).unwrap();
        let shape = |r: Read| (r.frames, r.last, r.at_head);
        let page = room.read_after(0, 2, usize::MAX, |_| {}).unwrap();
        assert_eq!(shape(page), (2, 2, false));
        assert!(page.oldest.is_some(), "the reader learns how old what it took is");
        let rest = room.read_after(page.last, 10, usize::MAX, |_| {}).unwrap();
        assert_eq!(shape(rest), (3, 5, true));
        let none = room.read_after(5, 10, usize::MAX, |_| {}).unwrap();
        assert_eq!((shape(none), none.oldest), ((0, 5, true), None));
        // 8 bytes a frame: a byte budget of 9 stops after the second.
        assert_eq!(shape(room.read_after(0, 10, 9, |_| {}).unwrap()), (2, 2, false));
    }

    #[test]
    fn a_gap_in_what_this_node_received_restarts_history() {
        let rooms = Rooms::new(4, LIMITS);
        let chat = ChatId::from_u128(6);
        rooms.publish(chat, 1, frame(1));
        rooms.publish(chat, 2, frame(2));
        rooms.publish(chat, 5, frame(5));
        rooms.publish(chat, 4, frame(4));
        let room = rooms.get(chat).unwrap();
        assert_eq!(read_all(&room, 4), Ok(vec![5]));
        assert_eq!(read_all(&room, 2), Err(Evicted { oldest: 5 }), "3 and 4 were never held");
        assert_eq!(rooms.held_frames(), 1);
    }

    #[test]
    fn join_racing_the_last_leave_is_never_lost() {
        let rooms = Arc::new(Rooms::new(4, HistoryLimits { size: 0, ..LIMITS }));
        let chat = ChatId::from_u128(7);
        let mb = mailbox();
        for seq in 0..200u64 {
            let (first_room, first) = rooms.join(chat, UserId::from_u128(99), &mb);
            let barrier = Arc::new(Barrier::new(2));
            let (r, b, m) = (rooms.clone(), barrier.clone(), mb.clone());
            let joiner = std::thread::spawn(move || {
                b.wait();
                r.join(chat, UserId::from_u128(99), &m)
            });
            barrier.wait();
            first_room.stop_waiting(ticket(first));
            rooms.leave(chat);
            let (room, second) = joiner.join().unwrap();
            // Whatever the interleaving, the joiner's room is the live one.
            assert_eq!(rooms.publish(chat, seq, frame(seq)), 1);
            let mut second = match second {
                Joined::Live(rx) => rx,
                Joined::Waiting(ticket) => room.take_receiver(ticket).unwrap(),
            };
            assert_eq!(second.try_recv().unwrap().seq(), seq);
            drop(second);
            rooms.leave(chat);
            assert!(rooms.is_empty());
        }
    }
}
