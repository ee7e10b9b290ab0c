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

/// What a room holds besides its ring, allocated only while it holds
/// something: an idle room pays for one pointer (two-person rooms are the
/// common chat shape, so a room's fixed cost is most of a connection's).
#[derive(Default)]
pub(super) struct State {
    /// Recent frames in `seq` order.
    pub(super) held: VecDeque<Held>,
    /// Users removed from the room while connected here, with the room's
    /// head at that moment: their connections take nothing after it, even
    /// before they have seen the removal in their mailbox.
    pub(super) revoked: Vec<(UserId, u64)>,
}

/// A room's [`State`], boxed only while it holds something; reads as the
/// frames held (none while unboxed).
#[derive(Default)]
pub(super) struct Lazy(Option<Box<State>>);

static NOTHING_HELD: VecDeque<Held> = VecDeque::new();

impl std::ops::Deref for Lazy {
    type Target = VecDeque<Held>;

    fn deref(&self) -> &VecDeque<Held> {
        self.0.as_ref().map_or(&NOTHING_HELD, |s| &s.held)
    }
}

impl Lazy {
    /// The state, boxed now if it was not.
    pub(super) fn state(&mut self) -> &mut State {
        self.0.get_or_insert_with(Box::default)
    }

    pub(super) fn revoked(&self) -> &[(UserId, u64)] {
        self.0.as_ref().map_or(&[], |s| &s.revoked)
    }

    /// Takes every frame held, leaving none (call [`Lazy::trim`] after).
    pub(super) fn take_held(&mut self) -> VecDeque<Held> {
        self.0.as_mut().map(|s| std::mem::take(&mut s.held)).unwrap_or_default()
    }

    /// Takes the oldest frame held (call [`Lazy::trim`] after).
    pub(super) fn pop_front(&mut self) -> Option<Held> {
        self.0.as_mut()?.held.pop_front()
    }

    /// Frees the box once it holds nothing.
    pub(super) fn trim(&mut self) {
        if self.0.as_ref().is_some_and(|s| s.held.is_empty() && s.revoked.is_empty()) {
            self.0 = None;
        }
    }
}
