//! The connection's one timer: server pings, the client's silence
//! (`pong_wait`), token expiry (4001) and a write that makes no progress
//! (`write_wait`, 4008). One deadline, the earliest of them, is armed at a time.

use tokio::time::Instant;

use super::{Conn, End, Socket};
use crate::error::CloseCode;
use crate::protocol::frame::{self, OpCode};

impl<S: Socket> Conn<S> {
    /// The earliest moment a timer must act.
    pub(super) fn deadline(&self) -> Instant {
        let ws = &self.node.ws;
        let mut at = self.next_ping.min(self.expires_at).min(self.last_heard + ws.pong_wait);
        if let Some(since) = self.stalled_since {
            at = at.min(since + ws.write_wait);
        }
        at
    }

    /// Acts on the timers when `deadline` has passed (outside a timer wake).
    pub(super) fn timers_due(&mut self, deadline: Instant) -> Result<(), End> {
        if Instant::now() >= deadline {
            return self.on_timer();
        }
        Ok(())
    }

    pub(super) fn on_timer(&mut self) -> Result<(), End> {
        let now = Instant::now();
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
