//! One room: its live ring of pre-encoded frames, the tickets of
//! subscribers waiting for that ring (all a small room has), its history
//! (read by readers that fell behind the ring, by recoveries and by a small
//! room's subscribers), its head, the readers it counts in the node's
//! backlog, and the users it revoked.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use tokio::sync::broadcast;
use tokio::time::Instant;

use super::history::{Evicted, Lazy, Read};
use super::waiting::Waiting;
use crate::backlog::Backlog;
use crate::mailbox::Mailbox;
use crate::protocol::deflate::Wire;
use crate::protocol::UserId;
use crate::sync::lock;

/// One pre-encoded room event frame and its room `seq`, as the live ring
/// carries it: the seq lets a reader skip what it already has and see gaps.
/// A pointer, made once per event: the ring preallocates its slots, so a
/// small slot keeps an idle room small. Its bytes are a [`Wire`], shared
/// with the room's history, so the frame is compressed at most once.
#[derive(Debug, Clone)]
pub struct Frame(Arc<(u64, Wire, Instant)>);

impl Frame {
    pub fn new(seq: u64, bytes: Wire, at: Instant) -> Frame {
        Frame(Arc::new((seq, bytes, at)))
    }

    pub fn seq(&self) -> u64 {
        self.0 .0
    }

    pub fn bytes(&self) -> &Wire {
        &self.0 .1
    }

    /// When the frame was published on this node.
    pub fn at(&self) -> Instant {
        self.0 .2
    }
}

/// Subscribers up to which a room carries its events without a live ring:
/// its subscribers read each frame from history, woken through their
/// tickets. A ring and a receive future per subscriber cost more than a
/// two-person room's whole history of a few events; past this size the
/// ring's one send serves many readers without each taking the history's
/// lock.
pub(super) const SMALL_ROOM: usize = 8;

/// One room: its live ring and its history. Readers that keep up take frames
/// from the ring; a reader that lags the ring, or recovers after `since`,
/// reads the history at its own pace.
pub struct Room {
    /// The live ring (`rooms.buffer` frames), made by the first publish
    /// that reaches more than [`SMALL_ROOM`] subscribers (or a frame history
    /// will not hold): a room that only holds history, whose subscribers
    /// have had nothing yet, or that has few, preallocates nothing (its
    /// channel, slots and receive futures are most of a small room's cost).
    /// Receivers are the room's subscribers here, with those still in
    /// `waiting`. Once made it stays while the room exists.
    pub(super) ring: OnceLock<broadcast::Sender<Frame>>,
    /// Subscribers that joined before the ring existed: the tickets a
    /// small room wakes for each frame.
    waiting: Mutex<Option<Box<Waiting>>>,
    /// History and revocations: one frame inline, boxed once there is more.
    state: Mutex<Lazy>,
    /// The last `seq` published here.
    pub(super) head: AtomicU64,
    /// Whether the state holds revocations: readers check it per poll for free.
    pub(super) any_revoked: AtomicBool,
    /// Subscriptions counted in the node's backlog; changed, and read by a
    /// publish, only under the `state` lock.
    pub(super) readers: AtomicU32,
    /// The node's backlog, shared by every room ([`super::Rooms::backlog`]).
    pub(super) backlog: Arc<Backlog>,
    /// Frames the ring holds once made (`rooms.buffer`, at most 65,536),
    /// less one: two bytes, so the room fits a smaller size class.
    capacity_less_one: u16,
}

/// How a subscription joined its room.
pub enum Joined {
    /// The ring exists: this receiver sees every frame published from now.
    Live(broadcast::Receiver<Frame>),
    /// No ring yet: the subscriber waits under this ticket. A publish that
    /// keeps its frame in a small room's history nudges its mailbox (it
    /// reads the frame there); the publish that makes the ring makes its
    /// receiver too, before sending its frame, and nudges it; it takes the
    /// receiver with [`Room::take_receiver`].
    Waiting(u32),
}

impl Room {
    /// `capacity`: from 1 to 65,536 frames (`rooms.buffer`), clamped.
    pub(super) fn new(backlog: Arc<Backlog>, capacity: usize) -> Room {
        Room {
            ring: OnceLock::new(),
            waiting: Mutex::new(None),
            state: Mutex::new(Lazy::default()),
            head: AtomicU64::new(0),
            any_revoked: AtomicBool::new(false),
            readers: AtomicU32::new(0),
            backlog,
            capacity_less_one: u16::try_from(capacity.saturating_sub(1)).unwrap_or(u16::MAX),
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

    /// Removes `user`'s revocation, and records a new one at `at` if given.
    pub(super) fn set_revoked(&self, user: UserId, at: Option<u64>) {
        let mut lazy = self.held();
        let state = lazy.state();
        state.revoked.retain(|(u, _)| *u != user);
        if let Some(at) = at {
            state.revoked.push((user, at));
        }
        self.any_revoked.store(!state.revoked.is_empty(), Ordering::Release);
        lazy.trim();
    }

    /// The room's history and revocations, locked.
    pub(super) fn held(&self) -> MutexGuard<'_, Lazy> {
        lock(&self.state)
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
        mut push: impl FnMut(Wire),
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

    /// The newest `seq` held, if any.
    pub fn newest(&self) -> Option<u64> {
        self.held().back().map(|h| h.seq)
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
        let asleep = self.waiting().as_ref().map_or(0, |w| w.asleep());
        asleep + self.ring.get().map_or(0, broadcast::Sender::receiver_count)
    }

    /// The room's waiting list, locked.
    pub(super) fn waiting(&self) -> MutexGuard<'_, Option<Box<Waiting>>> {
        lock(&self.waiting)
    }

    /// Joins: a receiver of the ring, or a ticket to wait for it.
    pub(super) fn join(&self, mailbox: &Arc<Mailbox>) -> Joined {
        let mut waiting = self.waiting();
        if let Some(ring) = self.ring.get() {
            return Joined::Live(ring.subscribe());
        }
        Joined::Waiting(Waiting::add(&mut waiting, mailbox))
    }

    /// The ring to send on: made now, with a receiver for every waiting
    /// subscriber, if there is none yet and the room needs one. A room of at
    /// most [`SMALL_ROOM`] subscribers carries frames its history `keeps`
    /// without a ring: its subscribers keep their tickets and read the frame
    /// from history when [`Room::nudge_waiting`] wakes them. Call it before
    /// the frame moves the head: a subscriber that sees the new head and
    /// finds no ring then knows the frame is in history.
    pub(super) fn ring_for_send(&self, keeps: bool) -> Option<&broadcast::Sender<Frame>> {
        if let Some(ring) = self.ring.get() {
            return Some(ring);
        }
        let (ring, nudge) = {
            let mut lists = self.waiting();
            let waiting = lists.as_mut()?;
            if keeps && waiting.asleep() <= SMALL_ROOM {
                return None;
            }
            let ring = self.ring.get_or_init(|| broadcast::channel(self.ring_capacity() as usize).0);
            (ring, waiting.wake(ring))
        };
        for mailbox in nudge {
            mailbox.nudge();
        }
        Some(ring)
    }

    /// A frame was kept in history, and the room has no ring: wakes every
    /// subscriber waiting under a ticket to read it there; returns how many.
    pub(super) fn nudge_waiting(&self) -> usize {
        // Under the lock, without collecting: this runs once per event.
        self.waiting().as_ref().map_or(0, |w| w.nudge())
    }

    /// Frames its ring holds (or would): a reader of a room without one
    /// that runs further behind has fallen behind as it would a ring.
    pub fn ring_capacity(&self) -> u64 {
        u64::from(self.capacity_less_one) + 1
    }

    /// The newest `seq` the node-wide byte budget may shed here. A room
    /// without a ring carries its last `rooms.buffer` frames to its
    /// subscribers from history, where a ring would hold them whatever the
    /// budget: shedding those closed a reader that ran a few frames behind,
    /// as any reader of a ring may, with 4008 once other rooms published.
    pub(super) fn sheddable(&self) -> u64 {
        let ringless = self.ring.get().is_none() && self.waiting().as_ref().is_some_and(|w| w.asleep() > 0);
        if !ringless {
            return u64::MAX;
        }
        self.head().saturating_sub(self.ring_capacity())
    }

    /// The room's head: the last `seq` this node published here.
    pub fn head(&self) -> u64 {
        self.head.load(Ordering::Acquire)
    }

    /// The receiver made for the subscriber waiting under `ticket`, once
    /// the ring exists.
    pub fn take_receiver(&self, ticket: u32) -> Option<broadcast::Receiver<Frame>> {
        self.ring.get()?;
        Waiting::take_ready(&mut self.waiting(), ticket)
    }

    /// The subscriber waiting under `ticket` left.
    pub fn stop_waiting(&self, ticket: u32) {
        Waiting::leave(&mut self.waiting(), ticket);
    }
}
