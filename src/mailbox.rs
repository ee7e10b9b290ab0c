//! A connection's signal hub: one mailbox per connection, through which
//! everything but its rooms' frames reaches it (per-user frames and
//! removals, the node's shutdown, its alarms, and the nudge of a room that
//! made the ring it waited for), with the waker its task polls.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::task::AtomicWaker;

use crate::protocol::ChatId;
use crate::sync::lock;

/// A per-user message: a frame, or an instruction about one of its rooms.
#[derive(Debug, Clone)]
pub enum UserMsg {
    Frame(Bytes),
    /// An ephemeral room frame (presence or typing): queued by the
    /// connection only while it is subscribed to `chat` (and, for
    /// `listeners_only`, asked for presence events), and not by the
    /// connection whose [`Mailbox::token`] is `skip` (a typing's sender).
    Ephemeral {
        chat: ChatId,
        listeners_only: bool,
        skip: u64,
        frame: Bytes,
    },
    /// The user was removed from this chat: drop the subscription.
    Removed(ChatId),
    /// An operator disconnected the user: close with 4003.
    Disconnect,
    /// The user's tokens issued before this (Unix seconds) were revoked:
    /// a connection holding one closes with 4003.
    Revoke(u64),
}

/// One connection's inbox for per-user traffic and node signals. Held by the
/// connection task and, while the connection is registered, by
/// [`Users`](crate::users::Users); the rooms it waits on and its armed
/// alarms hold it weakly.
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
    capacity: u32,
    /// The id of the last room frame queued compressed to the socket (0:
    /// none): its payload ends the client's inflate window, so the room's
    /// next frame may go out compressed after it (`Wire::for_peer`). Only
    /// the connection task touches it; kept here, not in the task, whose
    /// future is held under 400 bytes.
    deflated_last: AtomicU64,
}

/// Frame bytes a mailbox holds at most (besides its count bound).
const MAILBOX_BYTES: usize = 1 << 20;

/// Boxed and made only while something is queued: every connection has a
/// mailbox and most are empty most of the time, so an empty one costs a
/// pointer, not a queue's header (with the rest, the `Arc` stays in the
/// 80-byte class; a unit test keeps it there).
#[derive(Default)]
struct Inbox {
    // The extra allocation is the point: it exists only while messages wait.
    #[allow(clippy::box_collection)]
    msgs: Option<Box<VecDeque<UserMsg>>>,
    /// At most [`MAILBOX_BYTES`].
    bytes: u32,
}

impl Inbox {
    fn len(&self) -> usize {
        self.msgs.as_ref().map_or(0, |m| m.len())
    }

    /// Whether one more message of `len` bytes stays within both bounds.
    fn fits(&self, len: usize, capacity: u32) -> bool {
        self.len() < capacity as usize && self.bytes as usize + len <= MAILBOX_BYTES
    }

    /// Queues `msg` of `len` bytes (checked by [`Inbox::fits`]).
    fn push(&mut self, msg: UserMsg, len: usize) {
        // At most MAILBOX_BYTES after the check: fits in u32.
        self.bytes += len as u32;
        self.msgs.get_or_insert_default().push_back(msg);
    }

    /// Drops the oldest ephemeral message (presence, typing) to make room;
    /// false when there is none.
    fn evict_ephemeral(&mut self) -> bool {
        let Some(msgs) = self.msgs.as_mut() else { return false };
        let Some(i) = msgs.iter().position(|m| matches!(m, UserMsg::Ephemeral { .. })) else {
            return false;
        };
        if let Some(UserMsg::Ephemeral { frame, .. }) = msgs.remove(i) {
            self.bytes -= frame.len() as u32;
        }
        true
    }
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
            capacity: u32::try_from(capacity).unwrap_or(u32::MAX).max(1),
            deflated_last: AtomicU64::new(0),
        }
    }

    /// See [`Mailbox::deflated_last`]'s field.
    pub(crate) fn deflated_last(&self) -> u64 {
        self.deflated_last.load(Ordering::Relaxed)
    }

    pub(crate) fn set_deflated_last(&self, id: u64) {
        self.deflated_last.store(id, Ordering::Relaxed);
    }

    /// Queues `msg`, or marks the connection a slow consumer when the
    /// queue is full (in count or bytes); signals the connection either way.
    pub(crate) fn push(&self, msg: UserMsg) {
        {
            let len = match &msg {
                UserMsg::Frame(frame) | UserMsg::Ephemeral { frame, .. } => frame.len(),
                UserMsg::Removed(_) | UserMsg::Disconnect | UserMsg::Revoke(_) => 0,
            };
            let mut q = lock(&self.queue);
            // Presence and typing frames give way: they never make a connection a slow consumer.
            while !q.fits(len, self.capacity) && q.evict_ephemeral() {}
            if q.fits(len, self.capacity) {
                q.push(msg, len);
            } else {
                self.overflowed.store(true, Ordering::Relaxed);
            }
        }
        self.signal();
    }

    /// Queues an ephemeral message (presence, typing) unless the queue is
    /// full: those are dropped (false), never a reason to close the
    /// connection as a slow consumer.
    pub(crate) fn push_ephemeral(&self, msg: UserMsg) -> bool {
        {
            let len = match &msg {
                UserMsg::Ephemeral { frame, .. } | UserMsg::Frame(frame) => frame.len(),
                _ => 0,
            };
            let mut q = lock(&self.queue);
            if !q.fits(len, self.capacity) {
                return false;
            }
            q.push(msg, len);
        }
        self.signal();
        true
    }

    /// This connection's token: its address, unique while it lives (a
    /// typing's sender is told apart by it).
    pub fn token(self: &std::sync::Arc<Self>) -> u64 {
        std::sync::Arc::as_ptr(self) as usize as u64
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
        let mut q = lock(&self.queue);
        // Idle connections keep no queue.
        if let Some(msgs) = q.msgs.take() {
            out.extend(*msgs);
        }
        q.bytes = 0;
        Drained::Messages
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every connection holds one: with its `Arc`'s counts it stays in
    /// the allocator's 80-byte class (an empty queue is a pointer).
    #[test]
    fn a_mailbox_stays_small() {
        assert!(std::mem::size_of::<Mailbox>() + 16 <= 80, "{}", std::mem::size_of::<Mailbox>());
    }

    #[test]
    fn presence_frames_give_way_and_never_overflow_a_mailbox() {
        let mailbox = Mailbox::new(2);
        let ephemeral = || UserMsg::Ephemeral {
            chat: ChatId::from_u128(1),
            listeners_only: false,
            skip: 0,
            frame: Bytes::from_static(b"t"),
        };
        assert!(mailbox.push_ephemeral(ephemeral()) && mailbox.push_ephemeral(ephemeral()));
        assert!(!mailbox.push_ephemeral(ephemeral()), "a full queue drops them");
        // A user frame takes an ephemeral's place instead of overflowing.
        mailbox.push(UserMsg::Frame(Bytes::from_static(b"n")));
        mailbox.push(UserMsg::Frame(Bytes::from_static(b"m")));
        let mut got = Vec::new();
        assert_eq!(mailbox.drain(&mut got), Drained::Messages);
        assert!(got.iter().all(|m| matches!(m, UserMsg::Frame(_))) && got.len() == 2);
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
