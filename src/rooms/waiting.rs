//! A room's waiting list: the tickets of subscribers that joined before the
//! room had a live ring, each a weak pointer to the mailbox to nudge (for
//! each frame a small room keeps in history, and when the ring is made),
//! then the receiver made for it until it takes it.

use std::sync::{Arc, Weak};

use tokio::sync::broadcast;

use super::Frame;
use crate::mailbox::Mailbox;

/// Subscribers of a room that joined before it had a ring. A ticket is a
/// slot's index, so taking a receiver or leaving is O(1) however many wait,
/// and slots left free are reused first (a list threaded through them):
/// joining and leaving a room that never carried an event does not grow it.
/// Boxed, and only while any slot is in use.
pub(super) struct Waiting {
    pub(super) slots: Vec<Slot>,
    /// The first free slot (`NO_SLOT`: none).
    free: u32,
    /// Slots in use, and those of them still without a receiver.
    live: u32,
    asleep: u32,
}

const NO_SLOT: u32 = u32::MAX;

pub(super) enum Slot {
    /// Free: the next free slot.
    Free(u32),
    /// No ring yet: whom to nudge for a frame kept in history, or when the
    /// ring is made.
    Asleep(Weak<Mailbox>),
    /// The ring was made: this subscriber's receiver, until it takes it.
    /// Boxed: it is there only until the subscriber's next poll, and a
    /// slot of two words keeps a small room's list small.
    Ready(Box<broadcast::Receiver<Frame>>),
}

impl Waiting {
    /// Adds a subscriber that waits for the ring, nudging `mailbox` when it
    /// is made; returns its ticket.
    pub(super) fn add(lists: &mut Option<Box<Waiting>>, mailbox: &Arc<Mailbox>) -> u32 {
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
        if waiting.slots.len() == waiting.slots.capacity() && waiting.slots.len() < 4 {
            // One slot at a time up to four (a `Vec` would start at four):
            // two-person rooms are the common chat shape.
            waiting.slots.reserve_exact(1);
        }
        waiting.slots.push(slot);
        // Slots are bounded by the room's subscribers, far below u32::MAX.
        u32::try_from(waiting.slots.len() - 1).unwrap_or(NO_SLOT)
    }

    /// Subscribers still without a receiver.
    pub(super) fn asleep(&self) -> usize {
        self.asleep as usize
    }

    /// A frame was kept for subscribers without a ring: signals the
    /// mailbox of each (of connections still alive); returns how many.
    pub(super) fn nudge(&self) -> usize {
        let mut nudged = 0;
        for slot in &self.slots {
            if let Slot::Asleep(mailbox) = slot {
                if let Some(mailbox) = mailbox.upgrade() {
                    mailbox.nudge();
                    nudged += 1;
                }
            }
        }
        nudged
    }

    /// The ring was made: gives every subscriber still asleep its receiver,
    /// and returns the mailboxes to nudge (those of connections still alive).
    pub(super) fn wake(&mut self, ring: &broadcast::Sender<Frame>) -> Vec<Arc<Mailbox>> {
        let mut nudge = Vec::new();
        for slot in &mut self.slots {
            if let Slot::Asleep(mailbox) = slot {
                nudge.extend(mailbox.upgrade());
                *slot = Slot::Ready(Box::new(ring.subscribe()));
            }
        }
        self.asleep = 0;
        nudge
    }

    /// The receiver made for `ticket`, freeing its slot; none while it has
    /// no receiver yet.
    pub(super) fn take_ready(
        lists: &mut Option<Box<Waiting>>,
        ticket: u32,
    ) -> Option<broadcast::Receiver<Frame>> {
        let ready = lists.as_ref().and_then(|w| w.slots.get(ticket as usize));
        if !matches!(ready, Some(Slot::Ready(_))) {
            return None;
        }
        match Waiting::take(lists, ticket) {
            Some(Slot::Ready(rx)) => Some(*rx),
            _ => None,
        }
    }

    /// The subscriber waiting under `ticket` left: frees its slot.
    pub(super) fn leave(lists: &mut Option<Box<Waiting>>, ticket: u32) {
        Waiting::take(lists, ticket);
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
