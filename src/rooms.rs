//! The room and user registries: who receives which frame on this node.
//!
//! Rooms are a `DashMap` of per-room live rings (`tokio::sync::broadcast` of
//! pre-encoded frames) and histories of the same frames, which serve recovery
//! (`since`) and readers that fell behind the ring; users map to the
//! mailboxes of their live connections. Both are plain methods callable from
//! any task: there is no hub loop. This module never awaits on a socket and
//! never sees the bus.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use futures_util::task::AtomicWaker;
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::backlog::Backlog;
use crate::config::RoomsConfig;
use crate::protocol::{ChatId, UserId};

/// One pre-encoded room event frame and its room `seq`, as the live ring
/// carries it: the seq lets a reader skip what it already has and see gaps.
/// A pointer, made once per event: the ring preallocates its slots, so a
/// small slot keeps an idle room small.
#[derive(Debug, Clone)]
pub struct Frame(Arc<(u64, Bytes, Instant)>);

impl Frame {
    pub fn new(seq: u64, bytes: Bytes, at: Instant) -> Frame {
        Frame(Arc::new((seq, bytes, at)))
    }

    pub fn seq(&self) -> u64 {
        self.0 .0
    }

    pub fn bytes(&self) -> &Bytes {
        &self.0 .1
    }

    /// When the frame was published on this node.
    pub fn at(&self) -> Instant {
        self.0 .2
    }
}

/// How much history rooms keep (`rooms.history_size`, `rooms.history_ttl`,
/// `rooms.history_bytes`).
#[derive(Debug, Clone, Copy)]
pub struct HistoryLimits {
    /// Events per room.
    pub size: usize,
    /// Age of the oldest event kept.
    pub ttl: Duration,
    /// Frame bytes held by every room of the node together.
    pub bytes: usize,
}

impl From<&RoomsConfig> for HistoryLimits {
    fn from(c: &RoomsConfig) -> Self {
        HistoryLimits { size: c.history_size, ttl: c.history_ttl, bytes: c.history_bytes }
    }
}

/// A reader asked for history that no longer reaches back to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evicted {
    /// The oldest `seq` still held (0: none held).
    pub oldest: u64,
}

/// What one read of the history returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Read {
    /// Frames handed over.
    pub frames: usize,
    /// The `seq` of the last frame handed over (the `after` asked for when none).
    pub last: u64,
    /// True when nothing newer is held: the reader is at the room's head.
    pub at_head: bool,
    /// When the first frame handed over was published.
    pub oldest: Option<Instant>,
}

/// One frame held for recovery.
struct Held {
    seq: u64,
    at: Instant,
    bytes: Bytes,
}

/// One room: its live ring and its history. Readers that keep up take frames
/// from the ring; a reader that lags the ring, or recovers after `since`,
/// reads the history at its own pace.
pub struct Room {
    /// The live ring (`rooms.buffer` frames), made by the first publish
    /// that has a subscriber to reach: a room that only holds history, or
    /// whose subscribers have had nothing yet, preallocates nothing (its
    /// channel and slots are most of a small room's cost). Receivers are
    /// the room's subscribers here, with those still in `waiting`.
    ring: OnceLock<broadcast::Sender<Frame>>,
    /// Subscribers that joined before the ring existed.
    waiting: Mutex<Option<Box<Waiting>>>,
    /// History and revocations, boxed only while the room has any.
    state: Mutex<Lazy>,
    /// The last `seq` published here.
    head: AtomicU64,
    /// Whether the state holds revocations: readers check it per poll for free.
    any_revoked: AtomicBool,
    /// Subscriptions counted in the node's backlog; changed, and read by a
    /// publish, only under the `state` lock.
    readers: AtomicU32,
    backlog: Arc<Backlog>,
}

/// How a subscription joined its room.
pub enum Joined {
    /// The ring exists: this receiver sees every frame published from now.
    Live(broadcast::Receiver<Frame>),
    /// No ring yet: the subscriber waits under this ticket. The publish that
    /// makes the ring makes its receiver too, before sending its frame, and
    /// nudges its mailbox; it takes the receiver with
    /// [`Room::take_receiver`].
    Waiting(u32),
}

/// Subscribers of a room that joined before it had a ring. A ticket is a
/// slot's index, so taking a receiver or leaving is O(1) however many wait,
/// and slots left free are reused first (a list threaded through them):
/// joining and leaving a room that never carried an event does not grow it.
/// Boxed, and only while any slot is in use.
struct Waiting {
    slots: Vec<Slot>,
    /// The first free slot (`NO_SLOT`: none).
    free: u32,
    /// Slots in use, and those of them still without a receiver.
    live: u32,
    asleep: u32,
}

const NO_SLOT: u32 = u32::MAX;

enum Slot {
    /// Free: the next free slot.
    Free(u32),
    /// No ring yet: whom to nudge when it is made.
    Asleep(Weak<Mailbox>),
    /// The ring was made: this subscriber's receiver, until it takes it.
    Ready(broadcast::Receiver<Frame>),
}

impl Waiting {
    fn add(lists: &mut Option<Box<Waiting>>, mailbox: &Arc<Mailbox>) -> u32 {
        let waiting = lists.get_or_insert_with(|| {
            Box::new(Waiting { slots: Vec::new(), free: NO_SLOT, live: 0, asleep: 0 })
        });
        let slot = Slot::Asleep(Arc::downgrade(mailbox));
        waiting.live += 1;
        waiting.asleep += 1;
        if let Some(Slot::Free(next)) = waiting.slots.get(waiting.free as usize) {
            let ticket = waiting.free;
            waiting.free = *next;
            waiting.slots[ticket as usize] = slot;
            return ticket;
        }
        waiting.slots.push(slot);
        // Slots are bounded by the room's subscribers, far below u32::MAX.
        u32::try_from(waiting.slots.len() - 1).unwrap_or(NO_SLOT)
    }

    /// Frees `ticket`'s slot, returning what it held; the whole box once
    /// nothing is left in it.
    fn take(lists: &mut Option<Box<Waiting>>, ticket: u32) -> Option<Slot> {
        let waiting = lists.as_mut()?;
        let slot = waiting.slots.get_mut(ticket as usize)?;
        if matches!(slot, Slot::Free(_)) {
            return None;
        }
        let taken = std::mem::replace(slot, Slot::Free(waiting.free));
        waiting.free = ticket;
        if matches!(taken, Slot::Asleep(_)) {
            waiting.asleep -= 1;
        }
        waiting.live -= 1;
        if waiting.live == 0 {
            *lists = None;
        }
        Some(taken)
    }
}

/// What a room holds besides its ring, allocated only while it holds
/// something: an idle room pays for one pointer (two-person rooms are the
/// common chat shape, so a room's fixed cost is most of a connection's).
#[derive(Default)]
struct State {
    /// Recent frames in `seq` order.
    held: VecDeque<Held>,
    /// Users removed from the room while connected here, with the room's
    /// head at that moment: their connections take nothing after it, even
    /// before they have seen the removal in their mailbox.
    revoked: Vec<(UserId, u64)>,
}

#[derive(Default)]
struct Lazy(Option<Box<State>>);

static NOTHING_HELD: VecDeque<Held> = VecDeque::new();

impl std::ops::Deref for Lazy {
    type Target = VecDeque<Held>;

    fn deref(&self) -> &VecDeque<Held> {
        self.0.as_ref().map_or(&NOTHING_HELD, |s| &s.held)
    }
}

impl Lazy {
    fn state(&mut self) -> &mut State {
        self.0.get_or_insert_with(Box::default)
    }

    fn revoked(&self) -> &[(UserId, u64)] {
        self.0.as_ref().map_or(&[], |s| &s.revoked)
    }

    /// Frees the box once it holds nothing.
    fn trim(&mut self) {
        if self.0.as_ref().is_some_and(|s| s.held.is_empty() && s.revoked.is_empty()) {
            self.0 = None;
        }
    }
}

impl Room {
    fn new(backlog: Arc<Backlog>) -> Room {
        Room {
            ring: OnceLock::new(),
            waiting: Mutex::new(None),
            state: Mutex::new(Lazy::default()),
            head: AtomicU64::new(0),
            any_revoked: AtomicBool::new(false),
            readers: AtomicU32::new(0),
            backlog,
        }
    }

    /// Counts a reader at position `last` in the node's backlog: from now on
    /// every frame published here is owed to it until it takes it.
    pub fn count_reader(&self, last: u64) {
        let _held = self.held();
        // A room that has carried nothing on this node takes its first
        // reader's position as its head: seqs start at a large origin
        // (`bus::seq_origin`), and a distance from 0 would be that origin.
        let _ = self.head.compare_exchange(0, last, Ordering::AcqRel, Ordering::Acquire);
        self.readers.fetch_add(1, Ordering::Relaxed);
        self.backlog.joined(self.distance(last));
    }

    /// Stops counting a reader that was at `last`: what it still owed is
    /// forgiven.
    pub fn uncount_reader(&self, last: u64) {
        let _held = self.held();
        self.readers.fetch_sub(1, Ordering::Relaxed);
        self.backlog.left(self.distance(last));
    }

    /// A counted reader moved from `from` to `to` without taking frames (a
    /// recovery placed it).
    pub fn move_reader(&self, from: u64, to: u64) {
        self.backlog.add(from.wrapping_sub(to) as i64);
    }

    /// The head minus `last`: negative while a reader is placed ahead of
    /// what this node has seen (the bus knew a newer head).
    fn distance(&self, last: u64) -> i64 {
        self.head.load(Ordering::Acquire).wrapping_sub(last) as i64
    }

    /// The last `seq` `user` may still receive here, when it was removed.
    pub fn cutoff(&self, user: UserId) -> Option<u64> {
        if !self.any_revoked.load(Ordering::Acquire) {
            return None;
        }
        self.held().revoked().iter().find(|(u, _)| *u == user).map(|(_, at)| *at)
    }

    fn set_revoked(&self, user: UserId, at: Option<u64>) {
        let mut lazy = self.held();
        let state = lazy.state();
        state.revoked.retain(|(u, _)| *u != user);
        if let Some(at) = at {
            state.revoked.push((user, at));
        }
        self.any_revoked.store(!state.revoked.is_empty(), Ordering::Release);
        lazy.trim();
    }

    fn held(&self) -> MutexGuard<'_, Lazy> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands `push` the held frames after `after`, in order: at most `max`
    /// frames, and no more once `max_bytes` are handed (at least one frame).
    /// Fails when the history no longer holds `after + 1` although newer
    /// frames exist: the reader fell further behind than history reaches.
    pub fn read_after(
        &self,
        after: u64,
        max: usize,
        max_bytes: usize,
        mut push: impl FnMut(Bytes),
    ) -> Result<Read, Evicted> {
        let held = self.held();
        let newest = held.back().map_or(0, |h| h.seq);
        if newest <= after {
            // Nothing newer is held. When the room has published past `after`
            // all the same, the frames in between were evicted (for bytes, or
            // too big to keep): the reader learns it now, not at the room's
            // next event. The head moves under this lock, with the history.
            if self.head.load(Ordering::Acquire) > after {
                return Err(Evicted { oldest: held.front().map_or(0, |h| h.seq) });
            }
            return Ok(Read { frames: 0, last: after, at_head: true, oldest: None });
        }
        let front = held.front().map_or(0, |h| h.seq);
        let Some(start) = after.checked_add(1).filter(|next| *next >= front) else {
            return Err(Evicted { oldest: front });
        };
        // Seqs are consecutive within a room's history, so `after` is found by offset.
        let start = usize::try_from(start - front).unwrap_or(usize::MAX);
        let mut read = Read { frames: 0, last: after, at_head: false, oldest: None };
        let mut bytes = 0;
        for h in held.iter().skip(start).take(max) {
            if h.seq != read.last + 1 {
                // A gap inside history (an event this node never received).
                return Err(Evicted { oldest: h.seq });
            }
            if bytes >= max_bytes {
                break;
            }
            bytes += h.bytes.len();
            read.oldest.get_or_insert(h.at);
            push(h.bytes.clone());
            read.frames += 1;
            read.last = h.seq;
        }
        read.at_head = read.last >= newest;
        Ok(read)
    }

    /// True when the history holds every frame with `seq` in `(since, head]`.
    pub fn covers(&self, since: u64, head: u64) -> bool {
        if since >= head {
            return since == head;
        }
        let held = self.held();
        match (held.front(), held.back()) {
            (Some(front), Some(back)) => front.seq <= since.saturating_add(1) && back.seq >= head,
            _ => false,
        }
    }

    /// Subscribers of this room on this node.
    pub fn subscribers(&self) -> usize {
        let asleep = self.waiting().as_ref().map_or(0, |w| w.asleep as usize);
        asleep + self.ring.get().map_or(0, broadcast::Sender::receiver_count)
    }

    fn waiting(&self) -> MutexGuard<'_, Option<Box<Waiting>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Joins: a receiver of the ring, or a ticket to wait for it.
    fn join(&self, mailbox: &Arc<Mailbox>) -> Joined {
        let mut waiting = self.waiting();
        if let Some(ring) = self.ring.get() {
            return Joined::Live(ring.subscribe());
        }
        Joined::Waiting(Waiting::add(&mut waiting, mailbox))
    }

    /// The ring to send on: made now, with a receiver for every waiting
    /// subscriber, if there is none yet and anyone waits for it.
    fn ring_for_send(&self, capacity: usize) -> Option<&broadcast::Sender<Frame>> {
        if let Some(ring) = self.ring.get() {
            return Some(ring);
        }
        let mut nudge = Vec::new();
        let ring = {
            let mut lists = self.waiting();
            let waiting = lists.as_mut()?;
            let ring = self.ring.get_or_init(|| broadcast::channel(capacity).0);
            for slot in &mut waiting.slots {
                if let Slot::Asleep(mailbox) = slot {
                    nudge.extend(mailbox.upgrade());
                    *slot = Slot::Ready(ring.subscribe());
                }
            }
            waiting.asleep = 0;
            ring
        };
        for mailbox in nudge {
            mailbox.nudge();
        }
        Some(ring)
    }

    /// The receiver made for the subscriber waiting under `ticket`, once
    /// the ring exists.
    pub fn take_receiver(&self, ticket: u32) -> Option<broadcast::Receiver<Frame>> {
        self.ring.get()?;
        let mut lists = self.waiting();
        let ready = lists.as_ref().and_then(|w| w.slots.get(ticket as usize));
        if !matches!(ready, Some(Slot::Ready(_))) {
            return None;
        }
        match Waiting::take(&mut lists, ticket) {
            Some(Slot::Ready(rx)) => Some(rx),
            _ => None,
        }
    }

    /// The subscriber waiting under `ticket` left.
    pub fn stop_waiting(&self, ticket: u32) {
        Waiting::take(&mut self.waiting(), ticket);
    }
}

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
    pub fn new(ring: usize, limits: HistoryLimits) -> Rooms {
        let ring = ring.max(1);
        Rooms {
            rooms: DashMap::new(),
            ring,
            limits,
            held_frames: AtomicUsize::new(0),
            held_bytes: AtomicUsize::new(0),
            backlog: Arc::new(Backlog::for_reach(limits.size.max(ring))),
        }
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
        let keep = self.limits.size > 0 && bytes.len() <= self.limits.bytes;
        if keep && self.held_bytes.load(Ordering::Relaxed) + bytes.len() > self.limits.bytes {
            // Over the node-wide budget: the globally oldest frames go, down
            // to 90% so the next publishes do not pay for this again. The
            // room's own lock is not held meanwhile (shedding locks others).
            self.shed((self.limits.bytes / 10 * 9).saturating_sub(bytes.len()));
        }
        {
            let mut held = room.held();
            let before = room.head.fetch_max(seq, Ordering::AcqRel);
            let readers = room.readers.load(Ordering::Relaxed);
            if seq > before && readers > 0 {
                // Under the room's lock: no reader joins or leaves between
                // the head moving and its readers being charged for it.
                let owed = (seq - before).saturating_mul(u64::from(readers));
                room.backlog.add(i64::try_from(owed).unwrap_or(i64::MAX));
            }
            if keep {
                self.keep(&mut held, seq, &bytes, now);
            }
        }
        match room.ring_for_send(self.ring) {
            Some(ring) if ring.receiver_count() > 0 => ring.send(Frame::new(seq, bytes, now)).unwrap_or(0),
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
    /// bounded like any history. Returns the room's head afterwards.
    pub fn fill(&self, room: &Room, frames: Vec<(u64, Instant, Bytes)>) -> u64 {
        let bytes: usize = frames.iter().map(|(_, _, b)| b.len()).sum();
        if self.held_bytes.load(Ordering::Relaxed) + bytes > self.limits.bytes {
            self.shed((self.limits.bytes / 10 * 9).saturating_sub(bytes));
        }
        let mut lazy = room.held();
        let mine = lazy.0.as_mut().map(|s| std::mem::take(&mut s.held)).unwrap_or_default();
        self.held_frames.fetch_sub(mine.len(), Ordering::Relaxed);
        self.held_bytes.fetch_sub(mine.iter().map(|h| h.bytes.len()).sum::<usize>(), Ordering::Relaxed);
        let mut merged: Vec<Held> = Vec::with_capacity(mine.len() + frames.len());
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
                kept.next().map(|(seq, at, bytes)| Held { seq, at, bytes })
            };
            let Some(next) = next else { break };
            match merged.last() {
                Some(last) if last.seq == next.seq => continue,
                Some(last) if last.seq + 1 != next.seq => merged.clear(),
                _ => {}
            }
            merged.push(next);
        }
        let over = merged.len().saturating_sub(self.limits.size);
        merged.drain(..over);
        self.held_frames.fetch_add(merged.len(), Ordering::Relaxed);
        self.held_bytes.fetch_add(merged.iter().map(|h| h.bytes.len()).sum::<usize>(), Ordering::Relaxed);
        let newest = merged.last().map_or(0, |h| h.seq);
        lazy.state().held = merged.into();
        lazy.trim();
        let before = room.head.fetch_max(newest, Ordering::AcqRel);
        let readers = room.readers.load(Ordering::Relaxed);
        if newest > before && readers > 0 && before > 0 {
            // As a publish would: every counted reader now owes these too.
            let owed = (newest - before).saturating_mul(u64::from(readers));
            room.backlog.add(i64::try_from(owed).unwrap_or(i64::MAX));
        }
        room.head.load(Ordering::Acquire)
    }

    /// Appends a frame to a room's history (its lock held).
    fn keep(&self, held: &mut Lazy, seq: u64, bytes: &Bytes, now: Instant) {
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
        let Some(state) = lazy.0.as_mut() else { return };
        for _ in 0..n {
            let Some(h) = state.held.pop_front() else { break };
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

/// A per-user message: a frame, or an instruction about one of its rooms.
#[derive(Debug, Clone)]
pub enum UserMsg {
    Frame(Bytes),
    /// The user was removed from this chat: drop the subscription.
    Removed(ChatId),
}

/// One connection's inbox for per-user traffic and node signals. Held by the
/// connection task and, while the connection is registered, by [`Users`].
pub struct Mailbox {
    queue: Mutex<Inbox>,
    /// Set by every push and signal, cleared when the connection looks.
    pending: AtomicBool,
    /// Set when the queue overflowed: the connection is a slow consumer.
    overflowed: AtomicBool,
    /// Set when the node shuts down: the connection closes with 1001.
    shutdown: AtomicBool,
    /// Set when one of the connection's deadlines came (`alarms`).
    alarm: AtomicBool,
    /// The connection task's waker. Polling registers it in place, so the
    /// task keeps no wait future for its mailbox.
    waker: AtomicWaker,
    capacity: usize,
}

/// Frame bytes a mailbox holds at most (besides its count bound).
const MAILBOX_BYTES: usize = 1 << 20;

#[derive(Default)]
struct Inbox {
    msgs: VecDeque<UserMsg>,
    bytes: usize,
}

/// What a connection finds when it looks at its mailbox.
#[derive(Debug, PartialEq, Eq)]
pub enum Drained {
    Messages,
    /// The queue overflowed: slow consumer.
    Overflowed,
    /// The node is shutting down.
    Shutdown,
}

impl Mailbox {
    pub fn new(capacity: usize) -> Mailbox {
        Mailbox {
            queue: Mutex::new(Inbox::default()),
            pending: AtomicBool::new(false),
            overflowed: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            alarm: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            capacity: capacity.max(1),
        }
    }

    fn push(&self, msg: UserMsg) {
        {
            let len = match &msg {
                UserMsg::Frame(frame) => frame.len(),
                UserMsg::Removed(_) => 0,
            };
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            if q.msgs.len() >= self.capacity || q.bytes + len > MAILBOX_BYTES {
                self.overflowed.store(true, Ordering::Relaxed);
            } else {
                q.bytes += len;
                q.msgs.push_back(msg);
            }
        }
        self.signal();
    }

    /// Asks the connection to close with 1001.
    pub fn shut_down(&self) {
        self.shutdown.store(true, Ordering::Relaxed);
        self.signal();
    }

    /// Tells the connection that one of its deadlines came.
    pub fn sound_alarm(&self) {
        self.alarm.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Consumes a sounded alarm. Check it after [`Mailbox::poll_pending`], which
    /// registers the waker an alarm wakes.
    pub fn take_alarm(&self) -> bool {
        self.alarm.swap(false, Ordering::Acquire)
    }

    /// A room this connection waits on made its ring: look at the rooms.
    /// Signalled like a push, so a nudge between the connection's look at
    /// its rooms and its registering with the mailbox is not lost.
    pub fn nudge(&self) {
        self.signal();
    }

    fn signal(&self) {
        self.pending.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Ready when something was pushed or signalled since the last look.
    pub fn poll_pending(&self, cx: &mut Context<'_>) -> Poll<()> {
        // Register before checking, so a push in between still wakes us.
        self.waker.register(cx.waker());
        if self.pending.swap(false, Ordering::Acquire) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Consumes the "something arrived" signal without waiting for it.
    pub fn take_pending(&self) -> bool {
        self.pending.swap(false, Ordering::Acquire)
    }

    /// Takes everything queued into `out`, and says what else happened.
    pub fn drain(&self, out: &mut Vec<UserMsg>) -> Drained {
        if self.shutdown.load(Ordering::Relaxed) {
            return Drained::Shutdown;
        }
        if self.overflowed.load(Ordering::Relaxed) {
            return Drained::Overflowed;
        }
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        out.extend(q.msgs.drain(..));
        q.bytes = 0;
        if q.msgs.capacity() > 0 {
            // Idle connections keep no queue buffer.
            q.msgs = VecDeque::new();
        }
        Drained::Messages
    }
}

/// Live connections per user, for per-user delivery.
#[derive(Default)]
pub struct Users {
    users: DashMap<UserId, Boxes>,
}

/// One user's mailboxes. Most users hold one connection: it is kept inline,
/// so a connection costs no list allocation here.
enum Boxes {
    One(Arc<Mailbox>),
    Many(Vec<Arc<Mailbox>>),
}

impl Boxes {
    fn as_slice(&self) -> &[Arc<Mailbox>] {
        match self {
            Boxes::One(mailbox) => std::slice::from_ref(mailbox),
            Boxes::Many(boxes) => boxes,
        }
    }

    fn push(&mut self, mailbox: Arc<Mailbox>) {
        match self {
            Boxes::One(first) => *self = Boxes::Many(vec![first.clone(), mailbox]),
            Boxes::Many(boxes) => boxes.push(mailbox),
        }
    }

    /// Removes `mailbox`; returns true when none is left.
    fn remove(&mut self, mailbox: &Arc<Mailbox>) -> bool {
        match self {
            Boxes::One(only) => Arc::ptr_eq(only, mailbox),
            Boxes::Many(boxes) => {
                boxes.retain(|b| !Arc::ptr_eq(b, mailbox));
                match boxes.as_slice() {
                    [] => true,
                    [one] => {
                        *self = Boxes::One(one.clone());
                        false
                    }
                    _ => false,
                }
            }
        }
    }
}

impl Users {
    pub fn new() -> Users {
        Users::default()
    }

    /// Registers a connection's mailbox; returns true if it is the user's first.
    pub fn register(&self, user: UserId, mailbox: Arc<Mailbox>) -> bool {
        match self.users.entry(user) {
            dashmap::Entry::Occupied(mut entry) => {
                entry.get_mut().push(mailbox);
                false
            }
            dashmap::Entry::Vacant(entry) => {
                entry.insert(Boxes::One(mailbox));
                true
            }
        }
    }

    /// Unregisters a connection; returns true if it was the user's last.
    pub fn unregister(&self, user: UserId, mailbox: &Arc<Mailbox>) -> bool {
        let mut last = false;
        self.users.remove_if_mut(&user, |_, boxes| {
            last = boxes.remove(mailbox);
            last
        });
        last
    }

    /// Sends a frame to every connection of `user`; returns how many.
    pub fn send(&self, user: UserId, msg: UserMsg) -> usize {
        let Some(boxes) = self.users.get(&user) else { return 0 };
        for mailbox in boxes.as_slice() {
            // A clone of `Bytes` is a reference count, not a copy.
            mailbox.push(msg.clone());
        }
        boxes.as_slice().len()
    }

    /// Tells every registered connection to close with 1001.
    pub fn shut_down_all(&self) {
        for entry in self.users.iter() {
            for mailbox in entry.value().as_slice() {
                mailbox.shut_down();
            }
        }
    }

    /// Users with at least one live connection.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// True when no user is connected.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;

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

    #[test]
    fn user_frames_reach_every_connection_of_that_user_only() {
        let users = Users::new();
        let (alice, bob) = (UserId::from_u128(10), UserId::from_u128(11));
        let (a1, a2, b1) = (Arc::new(Mailbox::new(8)), Arc::new(Mailbox::new(8)), Arc::new(Mailbox::new(8)));
        assert!(users.register(alice, a1.clone()));
        assert!(!users.register(alice, a2.clone()));
        assert!(users.register(bob, b1.clone()));
        assert_eq!(users.send(alice, UserMsg::Frame(Bytes::from_static(b"n"))), 2);
        let mut out = Vec::new();
        assert_eq!(a1.drain(&mut out), Drained::Messages);
        assert_eq!(a2.drain(&mut out), Drained::Messages);
        assert_eq!(b1.drain(&mut out), Drained::Messages);
        assert_eq!(out.len(), 2);
        users.shut_down_all();
        assert_eq!(b1.drain(&mut out), Drained::Shutdown);
        assert!(!users.unregister(alice, &a1));
        assert!(users.unregister(alice, &a2));
        assert_eq!(users.len(), 1);
        // Three connections come and go in any order; the last one out says so.
        let a3 = Arc::new(Mailbox::new(8));
        for m in [&a1, &a2, &a3] {
            users.register(alice, (*m).clone());
        }
        assert!(!users.unregister(alice, &a2));
        assert_eq!(users.send(alice, UserMsg::Frame(Bytes::from_static(b"m"))), 2);
        assert!(!users.unregister(alice, &a2), "not registered twice");
        assert!(!users.unregister(alice, &a3));
        assert_eq!(users.send(alice, UserMsg::Frame(Bytes::from_static(b"m"))), 1);
        assert!(users.unregister(alice, &a1));
        assert_eq!(users.send(alice, UserMsg::Frame(Bytes::from_static(b"m"))), 0);
    }

    #[test]
    fn an_overflowing_mailbox_reports_the_slow_consumer() {
        let mailbox = Mailbox::new(2);
        for _ in 0..3 {
            mailbox.push(UserMsg::Frame(Bytes::new()));
        }
        assert_eq!(mailbox.drain(&mut Vec::new()), Drained::Overflowed);
        // In bytes too: two half-megabyte frames fit, a third does not.
        let mailbox = Mailbox::new(100);
        for _ in 0..2 {
            mailbox.push(UserMsg::Frame(Bytes::from(vec![0; MAILBOX_BYTES / 2])));
        }
        assert_eq!(mailbox.drain(&mut Vec::new()), Drained::Messages);
        for _ in 0..3 {
            mailbox.push(UserMsg::Frame(Bytes::from(vec![0; MAILBOX_BYTES / 2])));
        }
        assert_eq!(mailbox.drain(&mut Vec::new()), Drained::Overflowed);
    }
}
