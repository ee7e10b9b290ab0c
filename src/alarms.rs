//! Moments to the millisecond ([`Stamp`]) and the node's one timer for its
//! connections' deadlines ([`Alarms`]): server pings, a client's silence,
//! token expiry and writes that make no progress.
//!
//! A tokio `Sleep` in every connection's task costs 112 bytes per idle
//! connection, and tips its task cell over into the next 128-byte size.
//! Here an armed deadline is one weak pointer to the connection's mailbox in
//! a node-wide map, and one task rings the mailboxes whose moment has come.
//! Alarms ring late by at most [`GRAIN_MS`], never early.

use std::collections::BTreeMap;
use std::num::NonZeroU64;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::mailbox::Mailbox;
use crate::sync::lock;

/// A moment to the millisecond, as milliseconds since the process's first
/// stamp (plus one, so `Option<Stamp>` needs no extra word): 8 bytes where an
/// `Instant` takes 16, and a connection keeps several of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Stamp(NonZeroU64);

/// The moment stamps count from (tokio's clock, so paused-time tests move it).
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Stamp {
    pub fn now() -> Stamp {
        Stamp::at(Instant::now())
    }

    pub fn at(at: Instant) -> Stamp {
        let ms = u64::try_from(at.saturating_duration_since(epoch()).as_millis()).unwrap_or(u64::MAX - 1);
        Stamp(NonZeroU64::MIN.saturating_add(ms))
    }

    /// Milliseconds since the epoch.
    fn millis(self) -> u64 {
        self.0.get() - 1
    }

    /// Time elapsed from `earlier` to this stamp (zero if it is later).
    pub fn since(self, earlier: Stamp) -> Duration {
        Duration::from_millis(self.0.get().saturating_sub(earlier.0.get()))
    }
}

impl std::ops::Add<Duration> for Stamp {
    type Output = Stamp;

    /// Saturates: config durations are bounded, and a far deadline is never.
    fn add(self, d: Duration) -> Stamp {
        Stamp(self.0.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)))
    }
}

/// Alarms are kept in slots of this many milliseconds: one wake of the
/// ringing task serves every connection whose deadline falls in the slot.
pub const GRAIN_MS: u64 = 10;

/// The node's pending alarms.
///
/// Bounded without bookkeeping per connection: a connection adds an alarm
/// only when its deadline moves earlier than the one it armed, or once the
/// armed one has rung, and each of its deadlines only moves later with
/// time, so it holds a handful at most. An alarm left by a connection that
/// ended rings nobody and is dropped when its moment comes (at most a ping
/// interval later), keeping only the mailbox's allocation until then.
#[derive(Default)]
pub struct Alarms {
    state: Mutex<State>,
    /// Wakes the ringer when an alarm earlier than all others was set, or
    /// the node is gone.
    changed: Notify,
}

#[derive(Default)]
struct State {
    /// Mailboxes to ring, by slot (milliseconds since the epoch / [`GRAIN_MS`]).
    due: BTreeMap<u64, Vec<Weak<Mailbox>>>,
    pending: usize,
    closed: bool,
}

impl Alarms {
    /// Makes the alarms and spawns the task that rings them; it ends once
    /// [`Alarms::close`] is called.
    pub fn start() -> Arc<Alarms> {
        let alarms = Arc::new(Alarms::default());
        tokio::spawn(alarms.clone().ring_until_closed());
        alarms
    }

    /// Rings `mailbox` at `at` or up to [`GRAIN_MS`] later.
    pub fn set(&self, at: Stamp, mailbox: &Arc<Mailbox>) {
        let slot = at.millis().div_ceil(GRAIN_MS);
        let earliest = {
            let mut state = self.state();
            let earliest = state.due.first_key_value().is_none_or(|(first, _)| slot < *first);
            state.due.entry(slot).or_default().push(Arc::downgrade(mailbox));
            state.pending += 1;
            earliest
        };
        if earliest {
            self.changed.notify_one();
        }
    }

    /// Alarms set and not yet rung (a gauge).
    pub fn pending(&self) -> usize {
        self.state().pending
    }

    /// Stops the ringing task.
    pub fn close(&self) {
        self.state().closed = true;
        self.changed.notify_one();
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    async fn ring_until_closed(self: Arc<Self>) {
        loop {
            let next = {
                let state = self.state();
                if state.closed {
                    return;
                }
                state.due.first_key_value().map(|(slot, _)| *slot)
            };
            // `notify_one` keeps a permit when nobody waits, so an alarm set
            // between the look above and this wait still cuts it short.
            match next {
                Some(slot) => {
                    let at = epoch() + Duration::from_millis(slot.saturating_mul(GRAIN_MS));
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => self.ring_due(),
                        () = self.changed.notified() => {}
                    }
                }
                None => self.changed.notified().await,
            }
        }
    }

    /// Rings every alarm whose slot has begun.
    fn ring_due(&self) {
        let now = Stamp::now().millis() / GRAIN_MS;
        let due = {
            let mut state = self.state();
            let later = state.due.split_off(&(now + 1));
            let due = std::mem::replace(&mut state.due, later);
            state.pending -= due.values().map(Vec::len).sum::<usize>();
            due
        };
        for mailbox in due.into_values().flatten() {
            if let Some(mailbox) = mailbox.upgrade() {
                mailbox.sound_alarm();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_keep_milliseconds_order_and_fit_an_option_in_one_word() {
        assert_eq!(std::mem::size_of::<Option<Stamp>>(), 8);
        // Later than the epoch whichever test (paused clocks among them) set it.
        let now = Instant::now() + Duration::from_secs(3600);
        let a = Stamp::at(now);
        let b = a + Duration::from_millis(1_500);
        assert!(b > a);
        assert_eq!(b.since(a), Duration::from_millis(1_500));
        assert_eq!(a.since(b), Duration::ZERO);
        assert!(
            Stamp::at(now + Duration::from_micros(999)).since(a) <= Duration::from_millis(1),
            "to the millisecond"
        );
        let never = a + Duration::MAX;
        assert!(never > b, "saturates instead of wrapping");
    }

    #[tokio::test(start_paused = true)]
    async fn alarms_ring_in_order_never_early_and_skip_ended_connections() {
        let alarms = Alarms::start();
        let early = Arc::new(Mailbox::new(1));
        let late = Arc::new(Mailbox::new(1));
        let gone = Arc::new(Mailbox::new(1));
        let start = Stamp::now();
        alarms.set(start + Duration::from_millis(500), &late);
        alarms.set(start + Duration::from_millis(105), &early);
        alarms.set(start + Duration::from_millis(200), &gone);
        drop(gone);
        assert_eq!(alarms.pending(), 3);

        tokio::time::sleep(Duration::from_millis(104)).await;
        assert!(!early.take_alarm(), "rang early");
        tokio::time::sleep(Duration::from_millis(1 + GRAIN_MS)).await;
        assert!(early.take_alarm(), "the earlier alarm set second rang first");
        assert!(!late.take_alarm());
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(late.take_alarm());
        assert_eq!(alarms.pending(), 0, "the ended connection's alarm was dropped");

        alarms.close();
        alarms.set(Stamp::now(), &early);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!early.take_alarm(), "closed alarms ring nobody");
    }
}
