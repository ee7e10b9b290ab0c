//! The connection's one timer: server pings, the client's silence
//! (`pong_wait`), token expiry (4001) and a write that makes no progress
//! (`write_wait`, 4008). One deadline, the earliest of them, is armed at a time.
//! Moments are kept as [`Stamp`]s: every idle connection holds several.

use std::num::NonZeroU64;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::time::Instant;

use super::{Conn, End, Socket};
use crate::error::CloseCode;
use crate::protocol::frame::{self, OpCode};

/// A moment to the millisecond, as milliseconds since the process's first
/// stamp (plus one, so `Option<Stamp>` needs no extra word): 8 bytes where an
/// `Instant` takes 16, and a connection keeps five of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Stamp(NonZeroU64);

/// The moment stamps count from (tokio's clock, so paused-time tests move it).
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Stamp {
    pub(super) fn now() -> Stamp {
        Stamp::at(Instant::now())
    }

    pub(super) fn at(at: Instant) -> Stamp {
        let ms = u64::try_from(at.saturating_duration_since(epoch()).as_millis()).unwrap_or(u64::MAX - 1);
        Stamp(NonZeroU64::MIN.saturating_add(ms))
    }

    /// The same moment on tokio's clock (to arm a timer).
    pub(super) fn instant(self) -> Instant {
        epoch() + Duration::from_millis(self.0.get() - 1)
    }

    /// Time elapsed from `earlier` to this stamp (zero if it is later).
    pub(super) fn since(self, earlier: Stamp) -> Duration {
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

impl<S: Socket> Conn<S> {
    /// The earliest moment a timer must act.
    pub(super) fn deadline(&self) -> Stamp {
        let ws = &self.node.ws;
        let mut at = self.next_ping.min(self.expires_at).min(self.last_heard + ws.pong_wait);
        if let Some(since) = self.stalled_since {
            at = at.min(since + ws.write_wait);
        }
        at
    }

    /// Acts on the timers when `deadline` has passed (outside a timer wake).
    pub(super) fn timers_due(&mut self, deadline: Stamp) -> Result<(), End> {
        if Stamp::now() >= deadline {
            return self.on_timer();
        }
        Ok(())
    }

    pub(super) fn on_timer(&mut self) -> Result<(), End> {
        let now = Stamp::now();
        let ws = &self.node.ws;
        if now >= self.expires_at {
            return Err(End::Close(CloseCode::TokenExpired));
        }
        if now >= self.last_heard + ws.pong_wait {
            // Nothing from the client for pong_wait: it is gone.
            return Err(End::Gone);
        }
        if self.stalled_since.is_some_and(|since| now >= since + ws.write_wait) {
            return Err(self.slow_consumer());
        }
        if now >= self.next_ping {
            self.out.push(frame::encode(OpCode::Ping, b""));
            self.next_ping = now + ws.ping_interval;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_keep_milliseconds_order_and_fit_an_option_in_one_word() {
        assert_eq!(std::mem::size_of::<Option<Stamp>>(), 8);
        let now = Instant::now();
        let a = Stamp::at(now);
        let b = a + Duration::from_millis(1_500);
        assert!(b > a);
        assert_eq!(b.since(a), Duration::from_millis(1_500));
        assert_eq!(a.since(b), Duration::ZERO);
        assert!(a.instant() <= now && now - a.instant() < Duration::from_millis(1));
        let never = a + Duration::MAX;
        assert!(never > b, "saturates instead of wrapping");
    }
}
