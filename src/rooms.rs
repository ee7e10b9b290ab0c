//! The room and user registries: who receives which frame on this node.
//!
//! Rooms are per-room `tokio::sync::broadcast` channels of pre-encoded frames
//! in a `DashMap`; users map to the mailboxes of their live connections. Both
//! are plain methods callable from any task: there is no hub loop. This module
//! never awaits on a socket and never sees the bus.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use dashmap::DashMap;
use futures_util::task::AtomicWaker;
use tokio::sync::broadcast;

use crate::protocol::{ChatId, UserId};

/// Room channels, keyed by chat. A room exists while it has a subscriber.
pub struct Rooms {
    rooms: DashMap<ChatId, broadcast::Sender<Bytes>>,
    /// Frames a room retains for its slowest reader before that reader lags.
    capacity: usize,
}

impl Rooms {
    pub fn new(capacity: usize) -> Rooms {
        Rooms { rooms: DashMap::new(), capacity: capacity.max(1) }
    }

    /// Joins a room, creating it on first use. Done under the map entry's lock,
    /// so it cannot interleave with [`Rooms::leave`] removing the same room.
    pub fn join(&self, chat: ChatId) -> broadcast::Receiver<Bytes> {
        self.rooms.entry(chat).or_insert_with(|| broadcast::channel(self.capacity).0).subscribe()
    }

    /// Called after a subscriber dropped its receiver: removes the room if
    /// that was its last subscriber. The emptiness check runs under the
    /// entry's write lock, so a concurrent `join` either keeps the room alive
    /// or recreates it.
    pub fn leave(&self, chat: ChatId) {
        self.rooms.remove_if(&chat, |_, tx| tx.receiver_count() == 0);
    }

    /// Sends one pre-encoded frame to every subscriber of `chat`; returns how
    /// many receivers it was queued for. Per event, not per recipient: one
    /// lookup and one channel send whatever the room's size.
    pub fn send(&self, chat: ChatId, frame: Bytes) -> usize {
        // Clone the sender out so the shard lock is not held while the send
        // wakes receivers (that cost grows with the room's size).
        let Some(tx) = self.rooms.get(&chat).map(|r| r.clone()) else { return 0 };
        tx.send(frame).unwrap_or(0)
    }

    /// Rooms that currently have subscribers.
    pub fn len(&self) -> usize {
        self.rooms.len()
    }

    /// True when no room has a subscriber.
    pub fn is_empty(&self) -> bool {
        self.rooms.is_empty()
    }

    /// Subscribers of one room on this node.
    pub fn subscribers(&self, chat: ChatId) -> usize {
        self.rooms.get(&chat).map_or(0, |tx| tx.receiver_count())
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
    queue: Mutex<VecDeque<UserMsg>>,
    /// Set by every push and signal, cleared when the connection looks.
    pending: AtomicBool,
    /// Set when the queue overflowed: the connection is a slow consumer.
    overflowed: AtomicBool,
    /// Set when the node shuts down: the connection closes with 1001.
    shutdown: AtomicBool,
    /// The connection task's waker. Polling registers it in place, so the
    /// task keeps no wait future for its mailbox.
    waker: AtomicWaker,
    capacity: usize,
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
            queue: Mutex::new(VecDeque::new()),
            pending: AtomicBool::new(false),
            overflowed: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            capacity: capacity.max(1),
        }
    }

    fn push(&self, msg: UserMsg) {
        {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            if q.len() >= self.capacity {
                self.overflowed.store(true, Ordering::Relaxed);
            } else {
                q.push_back(msg);
            }
        }
        self.signal();
    }

    /// Asks the connection to close with 1001.
    pub fn shut_down(&self) {
        self.shutdown.store(true, Ordering::Relaxed);
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
        out.extend(q.drain(..));
        if q.capacity() > 0 {
            // Idle connections keep no queue buffer.
            *q = VecDeque::new();
        }
        Drained::Messages
    }
}

/// Live connections per user, for per-user delivery.
#[derive(Default)]
pub struct Users {
    users: DashMap<UserId, Vec<Arc<Mailbox>>>,
}

impl Users {
    pub fn new() -> Users {
        Users::default()
    }

    /// Registers a connection's mailbox; returns true if it is the user's first.
    pub fn register(&self, user: UserId, mailbox: Arc<Mailbox>) -> bool {
        let mut entry = self.users.entry(user).or_default();
        entry.push(mailbox);
        entry.len() == 1
    }

    /// Unregisters a connection; returns true if it was the user's last.
    pub fn unregister(&self, user: UserId, mailbox: &Arc<Mailbox>) -> bool {
        let mut last = false;
        self.users.remove_if_mut(&user, |_, boxes| {
            boxes.retain(|b| !Arc::ptr_eq(b, mailbox));
            last = boxes.is_empty();
            last
        });
        last
    }

    /// Sends a frame to every connection of `user`; returns how many.
    pub fn send(&self, user: UserId, msg: UserMsg) -> usize {
        let Some(boxes) = self.users.get(&user) else { return 0 };
        for mailbox in boxes.iter() {
            // A clone of `Bytes` is a reference count, not a copy.
            mailbox.push(msg.clone());
        }
        boxes.len()
    }

    /// Tells every registered connection to close with 1001.
    pub fn shut_down_all(&self) {
        for entry in self.users.iter() {
            for mailbox in entry.value() {
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

    #[test]
    fn rooms_are_created_on_join_and_removed_with_their_last_subscriber() {
        let rooms = Rooms::new(4);
        let chat = ChatId::from_u128(1);
        let a = rooms.join(chat);
        let mut b = rooms.join(chat);
        assert_eq!((rooms.len(), rooms.subscribers(chat)), (1, 2));
        assert_eq!(rooms.send(chat, Bytes::from_static(b"x")), 2);
        assert_eq!(b.try_recv().unwrap(), Bytes::from_static(b"x"));
        drop(a);
        rooms.leave(chat);
        assert_eq!(rooms.len(), 1);
        drop(b);
        rooms.leave(chat);
        assert_eq!(rooms.len(), 0);
        assert_eq!(rooms.send(chat, Bytes::from_static(b"x")), 0);
    }

    #[test]
    fn join_racing_the_last_leave_is_never_lost() {
        let rooms = Arc::new(Rooms::new(4));
        let chat = ChatId::from_u128(2);
        for _ in 0..200 {
            let first = rooms.join(chat);
            let barrier = Arc::new(Barrier::new(2));
            let (r, b) = (rooms.clone(), barrier.clone());
            let joiner = std::thread::spawn(move || {
                b.wait();
                r.join(chat)
            });
            barrier.wait();
            drop(first);
            rooms.leave(chat);
            let mut second = joiner.join().unwrap();
            // Whatever the interleaving, the joiner's room is the live one.
            assert_eq!(rooms.send(chat, Bytes::from_static(b"y")), 1);
            assert_eq!(second.try_recv().unwrap(), Bytes::from_static(b"y"));
            drop(second);
            rooms.leave(chat);
            assert!(rooms.is_empty());
        }
    }

    #[test]
    fn a_lagging_receiver_is_told_and_others_are_not_affected() {
        let rooms = Rooms::new(2);
        let chat = ChatId::from_u128(3);
        let mut slow = rooms.join(chat);
        let mut fast = rooms.join(chat);
        for i in 0..3u8 {
            rooms.send(chat, Bytes::from(vec![i]));
            assert_eq!(fast.try_recv().unwrap()[0], i);
        }
        assert!(matches!(slow.try_recv(), Err(broadcast::error::TryRecvError::Lagged(1))));
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
    }

    #[test]
    fn an_overflowing_mailbox_reports_the_slow_consumer() {
        let mailbox = Mailbox::new(2);
        for _ in 0..3 {
            mailbox.push(UserMsg::Frame(Bytes::new()));
        }
        assert_eq!(mailbox.drain(&mut Vec::new()), Drained::Overflowed);
    }
}
