//! The connection's one timer: server pings, the client's silence
//! (`pong_wait`), token expiry (4001) and a write that makes no progress
//! (`write_wait`, 4008). One deadline, the earliest of them, is armed at a
//! time, in the node's [`crate::alarms::Alarms`]: the task holds no timer.

use super::{Conn, End, Socket};
use crate::alarms::Stamp;
use crate::error::CloseCode;
use crate::protocol::frame::{self, OpCode};

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

    /// Arms the node's alarm for `at` unless an alarm at or before it is
    /// armed already (an early ring finds nothing due and re-arms).
    pub(super) fn arm(&mut self, at: Stamp) {
        if self.armed.is_none_or(|armed| at < armed) {
            self.node.alarms.set(at, &self.mailbox);
            self.armed = Some(at);
        }
    }

    /// The alarm rang: acts on every deadline that came.
    pub(super) fn on_alarm(&mut self) -> Result<(), End> {
        let now = Stamp::now();
        if self.armed.is_some_and(|armed| armed <= now) {
            self.armed = None;
        }
        self.on_timer()
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
