//! A room's history: the frames it holds for recovery (`since`) and for
//! readers that fell behind its live ring, boxed with its revocations only
//! while it has any; the limits every room's history keeps to, and what a
//! read of it returns.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::config::RoomsConfig;
use crate::protocol::deflate::Wire;
use crate::protocol::UserId;

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
pub(super) struct Held {
    pub(super) seq: u64,
    pub(super) at: Instant,
    pub(super) bytes: Wire,
}

/// The frame of `seq`, after the room's previous one when `held` (the last
/// frame held) is it (`seq - 1`), so its compressed twin may refer to it.
pub(super) fn chained(held: Option<&Held>, seq: u64, bytes: Bytes) -> Wire {
    match held {
        Some(prev) if prev.seq.checked_add(1) == Some(seq) => Wire::after(bytes, &prev.bytes),
        _ => Wire::new(bytes),
    }
}

/// What a room holds besides its ring and its one frame, allocated only
/// while it holds more: an idle room pays for nothing here (two-person rooms
/// are the common chat shape, so a room's fixed cost is most of a
/// connection's).
#[derive(Default)]
pub(super) struct State {
    /// Recent frames in `seq` order.
    pub(super) held: VecDeque<Held>,
    /// Users removed from the room while connected here, with the room's
    /// head at that moment: their connections take nothing after it, even
    /// before they have seen the removal in their mailbox.
    pub(super) revoked: Vec<(UserId, u64)>,
}

/// A room's history and revocations: nothing, one frame inline (a warm
/// two-person room: no box and no slot besides the frame), or a boxed
/// [`State`] once it holds more.
#[derive(Default)]
pub(super) enum Lazy {
    #[default]
    Empty,
    One(Held),
    Boxed(Box<State>),
}

impl Lazy {
    /// The frames held, oldest first, as two runs (a ring buffer's halves).
    pub(super) fn slices(&self) -> (&[Held], &[Held]) {
        match self {
            Lazy::Empty => (&[], &[]),
            Lazy::One(h) => (std::slice::from_ref(h), &[]),
            Lazy::Boxed(s) => s.held.as_slices(),
        }
    }

    /// The frames held, oldest first.
    pub(super) fn iter(&self) -> impl Iterator<Item = &Held> {
        let (a, b) = self.slices();
        a.iter().chain(b)
    }

    pub(super) fn len(&self) -> usize {
        let (a, b) = self.slices();
        a.len() + b.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(super) fn front(&self) -> Option<&Held> {
        self.iter().next()
    }

    pub(super) fn back(&self) -> Option<&Held> {
        let (a, b) = self.slices();
        b.last().or(a.last())
    }

    /// The state, boxed now (with the frame held inline, if any) if it was not.
    pub(super) fn state(&mut self) -> &mut State {
        if !matches!(self, Lazy::Boxed(_)) {
            let mut state = Box::<State>::default();
            if let Lazy::One(h) = std::mem::take(self) {
                state.held.reserve_exact(2);
                state.held.push_back(h);
            }
            *self = Lazy::Boxed(state);
        }
        match self {
            Lazy::Boxed(s) => s,
            // Made boxed just above.
            _ => unreachable!("boxed above"),
        }
    }

    /// Appends a frame: inline while it is the only one.
    pub(super) fn push_back(&mut self, h: Held) {
        if let Lazy::Empty = self {
            *self = Lazy::One(h);
            return;
        }
        let held = &mut self.state().held;
        if held.len() == held.capacity() && held.len() < 4 {
            // One slot more at a time up to four (a `VecDeque` would start
            // at four): most rooms of a chat carry a few events at a time.
            held.reserve_exact(1);
        }
        held.push_back(h);
    }

    pub(super) fn revoked(&self) -> &[(UserId, u64)] {
        match self {
            Lazy::Boxed(s) => &s.revoked,
            _ => &[],
        }
    }

    /// Takes every frame held, leaving none (call [`Lazy::trim`] after).
    pub(super) fn take_held(&mut self) -> VecDeque<Held> {
        match std::mem::take(self) {
            Lazy::Empty => VecDeque::new(),
            Lazy::One(h) => VecDeque::from([h]),
            Lazy::Boxed(mut s) => {
                let held = std::mem::take(&mut s.held);
                *self = Lazy::Boxed(s);
                held
            }
        }
    }

    /// Takes the oldest frame held (call [`Lazy::trim`] after).
    pub(super) fn pop_front(&mut self) -> Option<Held> {
        match self {
            Lazy::Empty => None,
            Lazy::One(_) => match std::mem::take(self) {
                Lazy::One(h) => Some(h),
                _ => None,
            },
            Lazy::Boxed(s) => s.held.pop_front(),
        }
    }

    /// Frees the box once it holds nothing.
    pub(super) fn trim(&mut self) {
        if let Lazy::Boxed(s) = self {
            if s.held.is_empty() && s.revoked.is_empty() {
                *self = Lazy::Empty;
            }
        }
    }

    /// Slots the history has room for (tests: it grows from one).
    #[cfg(test)]
    pub(super) fn capacity(&self) -> usize {
        match self {
            Lazy::Empty => 0,
            Lazy::One(_) => 1,
            Lazy::Boxed(s) => s.held.capacity(),
        }
    }
}
