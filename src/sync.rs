//! The one way Herald takes a `std` mutex: a lock whose holder panicked is
//! taken all the same, so a panic in one task does not spread to every
//! other task that uses the same lock (a room, a mailbox, the alarms, a bus
//! stripe).

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex`, ignoring poison.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
