//! Ending a connection: leave every room, send the close frame (or echo
//! the client's), count how it ended, and linger briefly so the close frame
//! is read rather than reset away.

use std::io;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use super::{Conn, End, Socket};
use crate::error::{CloseCode, Ended};
use crate::protocol::frame;

/// How long a closing connection waits for the client to finish.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

impl<S: Socket> Conn<S> {
    pub(super) fn slow_consumer(&mut self) -> End {
        self.node.metrics.slow_consumers.fetch_add(1, Ordering::Relaxed);
        // The backlog is abandoned: the client resubscribes with `since`.
        self.out.truncate_unstarted();
        End::Close(CloseCode::SlowConsumer)
    }

    /// Ends the connection: leaves every room at once (so a slow consumer
    /// stops pinning room buffers), sends the close frame, and gives the
    /// client a bounded time to read it.
    pub(super) async fn finish(&mut self, end: End) {
        let chats = self.subs.chats();
        for chat in chats {
            self.leave(chat);
        }
        let ended = match end {
            End::Close(code) => {
                self.out.push(frame::close(code.code(), code.reason()));
                Ended::Sent(code)
            }
            End::Echo(code) => {
                // Echo the client's code (RFC 6455 5.5.1), but never a reserved one.
                let echo = code.filter(|c| (1000..5000).contains(c) && ![1004, 1005, 1006, 1015].contains(c));
                let echo = echo.unwrap_or(CloseCode::Normal.code());
                self.out.push(frame::close(echo, ""));
                Ended::Echoed(echo)
            }
            End::Gone => Ended::Vanished,
        };
        self.node.metrics.closed_with(ended);
        if ended == Ended::Vanished {
            return;
        }
        let deadline = Instant::now() + self.node.ws.write_wait.min(CLOSE_LINGER * 5);
        while !self.out.is_empty() {
            if self.out.flush(&self.stream, self.node.rooms.backlog()).is_err() {
                return;
            }
            if self.out.is_empty() {
                break;
            }
            let writable = std::future::poll_fn(|cx| self.stream.poll_write_ready(cx));
            if tokio::time::timeout_at(deadline, writable).await.is_err() {
                return;
            }
        }
        let _ = self.stream.shutdown().await;
        // Read until the client closes too, so unread input does not turn our
        // close into a reset that could discard the close frame.
        let linger = Instant::now() + CLOSE_LINGER;
        let mut buf = [0u8; 1024];
        loop {
            let readable = std::future::poll_fn(|cx| self.stream.poll_read_ready(cx));
            if !matches!(tokio::time::timeout_at(linger, readable).await, Ok(Ok(()))) {
                break;
            }
            match self.stream.try_read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => break,
            }
        }
    }
}
