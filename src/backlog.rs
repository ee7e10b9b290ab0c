//! The node's delivery backlog: room frames published and not yet written to
//! the sockets of this node's subscribers, counted exactly and cheap enough
//! to read on every publish. It is the admission control's signal
//! ([`crate::node::Node::admit`]): publishers are pushed back while most
//! readers run far behind, long before they fall past the rooms' history.
//!
//! The count is `Σ (room head − reader position)` over every subscription,
//! plus frames taken from a room but still queued for the socket. It is kept
//! by deltas, never by scanning: a publish adds the room's reader count (under
//! the room's lock, so a reader joining or leaving cannot interleave), a
//! reader joining or leaving adds or removes its own distance from the head
//! (under the same lock), and a connection pays for frames as the socket takes
//! them. Every term is undone exactly when its subscription or connection
//! ends, so the count cannot drift.

use std::sync::atomic::{AtomicI64, Ordering};

use crate::striped::Striped;

/// Frames owed to this node's readers, and how many readers owe them.
pub struct Backlog {
    /// Striped: publishers and every worker's connections add at once.
    owed: Striped,
    readers: AtomicI64,
    /// Owed frames per reader, on average, above which the node is overloaded.
    per_reader: i64,
    /// Owed frames below which the node is never overloaded, whatever the
    /// average: a few stalled readers on a small node are not an overload.
    floor: i64,
}

impl Backlog {
    /// `per_reader`: the average distance from the head that counts as
    /// overloaded; `floor`: the least backlog that does.
    pub fn new(per_reader: u64, floor: u64) -> Backlog {
        Backlog {
            owed: Default::default(),
            readers: AtomicI64::new(0),
            per_reader: i64::try_from(per_reader.max(1)).unwrap_or(i64::MAX),
            floor: i64::try_from(floor).unwrap_or(i64::MAX),
        }
    }

    /// The backlog for rooms whose readers can fall `reach` frames behind
    /// (history, or the live ring when there is none) before they are
    /// dropped: overloaded once readers run a quarter of that behind on
    /// average, which leaves them room to catch up, and never for less than
    /// two readers at the very edge with a full write queue (`queued`
    /// frames, the connections' bound) each.
    pub fn for_reach(reach: usize, queued: usize) -> Backlog {
        let reach = reach as u64;
        Backlog::new(reach / 4, 2 * (reach + queued as u64))
    }

    /// Adds `frames` owed (negative: paid).
    pub fn add(&self, frames: i64) {
        if frames != 0 {
            self.owed.add(frames);
        }
    }

    /// Frames written to a socket: no longer owed.
    pub fn pay(&self, frames: usize) {
        self.add(-i64::try_from(frames).unwrap_or(i64::MAX));
    }

    /// A reader started counting, `behind` frames from its room's head (call
    /// under the room's lock).
    pub fn joined(&self, behind: i64) {
        self.readers.fetch_add(1, Ordering::Relaxed);
        self.add(behind);
    }

    /// A reader stopped counting, `behind` frames from its room's head (call
    /// under the room's lock).
    pub fn left(&self, behind: i64) {
        self.readers.fetch_sub(1, Ordering::Relaxed);
        self.add(-behind);
    }

    /// Frames owed now (a moment's sum of the stripes).
    pub fn owed(&self) -> i64 {
        self.owed.sum()
    }

    /// Subscriptions counted.
    pub fn readers(&self) -> i64 {
        self.readers.load(Ordering::Relaxed)
    }

    /// The backlog above which the node counts as overloaded.
    pub fn limit(&self) -> i64 {
        self.readers().saturating_mul(self.per_reader).max(self.floor)
    }

    /// True while the node owes its readers more than it can catch up with
    /// before they fall past history.
    pub fn over(&self) -> bool {
        self.owed() > self.limit()
    }

    /// True past half the limit: where a node warns the other nodes (Redis
    /// bus), whose publishers' events are tens of ms on their way when the
    /// word reaches them, so readers must absorb more than a local
    /// publisher's.
    pub fn near(&self) -> bool {
        self.owed() > self.limit() / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_is_an_average_per_reader_with_a_floor() {
        let b = Backlog::new(25, 300);
        assert_eq!(b.limit(), 300, "no readers: the floor");
        for _ in 0..100 {
            b.joined(0);
        }
        assert_eq!(b.limit(), 2_500);
        // One stalled reader at the edge of history is not an overload...
        b.add(100 + 512);
        assert!(!b.over());
        // ...most readers 30 frames behind is.
        b.add(99 * 30);
        assert!(b.over());
        b.pay(99 * 30);
        assert!(!b.over());
        b.left(612);
        assert_eq!((b.owed(), b.readers()), (0, 99));
    }
}
