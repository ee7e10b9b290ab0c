//! The user registry: each user with a live connection on this node, and
//! the mailboxes of those connections, for per-user delivery and shutdown.

use std::sync::Arc;

use dashmap::DashMap;

use crate::mailbox::{Mailbox, UserMsg};
use crate::protocol::UserId;

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

    /// Offers an ephemeral message to every connection of `user` (each
    /// decides whether it wants it); returns (queued, dropped as full).
    pub fn send_ephemeral(&self, user: UserId, msg: &UserMsg) -> (usize, usize) {
        let Some(boxes) = self.users.get(&user) else { return (0, 0) };
        let mut queued = 0;
        for mailbox in boxes.as_slice() {
            queued += usize::from(mailbox.push_ephemeral(msg.clone()));
        }
        (queued, boxes.as_slice().len() - queued)
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
    use crate::mailbox::Drained;
    use bytes::Bytes;

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
}
