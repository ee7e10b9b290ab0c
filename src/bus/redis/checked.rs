//! The cache of "no revocation" answers from Redis, so an upgrade storm is not a Redis storm.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::Shared;
use crate::protocol::UserId;
use crate::sync::lock;

/// How long a "no revocation" answer from Redis is trusted (revocations published meanwhile
/// arrive on the members channel and forget it at once).
const CHECKED_FOR: Duration = Duration::from_secs(60);
/// Users whose "no revocation" answer is held at most; a full table starts over.
const CHECKED_MAX: usize = 65_536;

/// See [`Shared::checked`].
#[derive(Default)]
pub(super) struct Checked {
    /// Moved by every forget: an answer read before it is not cached.
    epoch: u64,
    users: HashMap<UserId, Instant>,
}

impl Shared {
    /// `Ok` when Redis said recently that it holds no revocation for `user`; otherwise the epoch
    /// to hand [`Shared::checked_none`] with Redis's answer.
    pub(super) fn checked_recently(&self, user: UserId) -> Result<(), u64> {
        let checked = lock(&self.checked);
        match checked.users.get(&user) {
            Some(at) if at.elapsed() < CHECKED_FOR => Ok(()),
            _ => Err(checked.epoch),
        }
    }

    /// Redis said it holds no revocation for `user`, in an answer asked for at `epoch`: cached
    /// unless a revocation or a loss came in between.
    pub(super) fn checked_none(&self, user: UserId, epoch: u64) {
        let mut checked = lock(&self.checked);
        if checked.epoch != epoch {
            return;
        }
        if checked.users.len() >= CHECKED_MAX {
            checked.users.clear();
        }
        checked.users.insert(user, Instant::now());
    }

    /// Forgets the cached answers for `user` (all of them for `None`).
    pub(super) fn forget_checked(&self, user: Option<UserId>) {
        let mut checked = lock(&self.checked);
        checked.epoch += 1;
        match user {
            Some(user) => {
                checked.users.remove(&user);
            }
            None => checked.users = HashMap::new(),
        }
    }
}
