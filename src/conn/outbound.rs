//! The connection's write queue: pre-encoded frames waiting for the socket,
//! written several per syscall when more than one is ready.
//!
//! Frames are shared `Bytes` (a reference count, not a copy of the room's
//! frame), so a queued frame costs 32 bytes whatever its size.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::num::NonZeroU32;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::Socket;
use crate::backlog::Backlog;

/// Most frames gathered into one `writev`.
const MAX_IOVECS: usize = 64;
/// Most bytes copied into one `send` when several frames are ready.
const GATHER_BYTES: usize = 64 * 1024;

thread_local! {
    /// One gather buffer per worker thread, shared by every connection it
    /// serves: no connection keeps a write buffer of its own.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(GATHER_BYTES));
}

/// What one flush wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Written {
    pub(crate) frames: u64,
    pub(crate) bytes: u64,
    pub(crate) syscalls: u64,
    /// How long the oldest room frame queued before this write had waited
    /// since it reached the node, when the write sent anything: the sojourn
    /// the load sensor judges (publish to write, the wait for the socket
    /// and the runtime included).
    pub(crate) waited: Option<Duration>,
}

/// A moment on tokio's clock in microseconds, wrapping every 71 minutes,
/// in 4 bytes where an `Instant` takes 16, in every connection. Ages are
/// differences, right for anything younger than half the wrap: a queued
/// frame waits seconds at most (`websocket.write_wait` ends a stalled
/// connection long before). The lowest bit is always set, so it is never
/// zero (and `Option<Micros>` costs nothing more).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Micros(NonZeroU32);

/// The moment [`Micros`] count from (tokio's clock, so paused-time tests
/// move it): an hour before the first one taken, so frames that reached the
/// node before it are not clamped to it.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(|| {
        let now = Instant::now();
        now.checked_sub(Duration::from_secs(3600)).unwrap_or(now)
    })
}

impl Micros {
    fn at(at: Instant) -> Micros {
        // Truncated on purpose: the count wraps.
        let us = at.saturating_duration_since(epoch()).as_micros() as u32;
        Micros(NonZeroU32::MIN | us)
    }

    /// How long before `later` this moment was.
    fn before(self, later: Micros) -> u32 {
        later.0.get().wrapping_sub(self.0.get())
    }

    fn age(self, now: Instant) -> Duration {
        Duration::from_micros(u64::from(self.before(Micros::at(now))))
    }

    /// The earlier of two moments less than half the wrap apart.
    fn earliest(self, other: Micros) -> Micros {
        if other.before(self) < u32::MAX / 2 {
            other
        } else {
            self
        }
    }
}

#[derive(Default)]
pub(crate) struct Outbound {
    queue: VecDeque<Bytes>,
    /// Bytes of the front frame already written. This and `bytes` are 4
    /// bytes each (every idle connection holds an `Outbound`): no frame
    /// comes near 4 GiB (a publish body is at most 1 GiB, checked at
    /// startup, and client messages far less), and the queue is closed with
    /// 4008 past `MAX_OUT_BYTES`, so a saturated `bytes` only closes it.
    offset: u32,
    /// Bytes queued and not yet written (saturating).
    bytes: u32,
    /// Room frames queued and not yet written: the node's backlog counts
    /// them as owed until the socket takes them (at most the connection's
    /// queue bound, `MAX_QUEUED`).
    owed: u32,
    /// When the oldest room frame still queued reached the node. Kept until
    /// the queue empties: after a partial write the next frame's moment is
    /// not known, and the older one errs towards "late" (CoDel judges the
    /// head of the queue too).
    since: Option<Micros>,
}

/// A length as the queue's 4-byte counts (saturating: no frame or queue
/// comes near 4 GiB).
fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl Outbound {
    pub(crate) fn push(&mut self, frame: Bytes) {
        if self.queue.capacity() == 0 {
            // An idle connection's queue holds no buffer, so most deliveries
            // make one: at the size growth would give, without its path.
            self.queue = VecDeque::with_capacity(4);
        }
        self.bytes = self.bytes.saturating_add(len32(frame.len()));
        self.queue.push_back(frame);
    }

    /// Queues a room frame, owed in the node's backlog until written.
    pub(crate) fn push_owed(&mut self, frame: Bytes) {
        self.owed = self.owed.saturating_add(1);
        self.push(frame);
    }

    /// Room frames that reached the node at `at` (the oldest of a take)
    /// were queued: the next write reports how long they waited.
    pub(crate) fn waiting_since(&mut self, at: Instant) {
        let at = Micros::at(at);
        self.since = Some(self.since.map_or(at, |since| since.earliest(at)));
    }

    /// Room frames queued and not yet paid for.
    pub(crate) fn owed(&self) -> usize {
        self.owed as usize
    }

    /// Stops counting queued room frames as owed; returns how many were.
    pub(crate) fn forgive(&mut self) -> usize {
        std::mem::take(&mut self.owed) as usize
    }

    /// Bytes queued and not yet written.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes as usize
    }

    pub(crate) fn len(&self) -> usize {
        self.queue.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Forgets everything not yet started: used when closing, so the close
    /// frame follows the frame in flight without the backlog before it.
    pub(crate) fn truncate_unstarted(&mut self) {
        let keep = usize::from(self.offset > 0);
        self.queue.truncate(keep);
        self.bytes = self.queue.front().map_or(0, |f| len32(f.len() - self.offset as usize));
    }

    /// Writes as much as the socket takes without blocking, and pays the
    /// node's `backlog` for the room frames written (here, so that no
    /// writer can forget to).
    pub(crate) fn flush(&mut self, stream: &impl Socket, backlog: &Backlog) -> io::Result<Written> {
        let mut written = Written::default();
        let since = self.since;
        while !self.queue.is_empty() {
            let result = if self.queue.len() == 1 {
                stream.try_write(&self.queue[0][self.offset as usize..])
            } else if self.queue[0].len() - self.offset as usize <= GATHER_BYTES {
                // Several small frames: copy them into one buffer and `send`
                // it, which measured cheaper than `writev` of many iovecs.
                SCRATCH.with(|scratch| {
                    let mut buf = scratch.borrow_mut();
                    buf.clear();
                    for (i, frame) in self.queue.iter().enumerate() {
                        let part = if i == 0 { &frame[self.offset as usize..] } else { &frame[..] };
                        if i > 0 && buf.len() + part.len() > GATHER_BYTES {
                            break;
                        }
                        buf.extend_from_slice(part);
                    }
                    stream.try_write(&buf)
                })
            } else {
                let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
                let mut n = 0;
                for (i, frame) in self.queue.iter().take(MAX_IOVECS).enumerate() {
                    slices[i] = IoSlice::new(if i == 0 { &frame[self.offset as usize..] } else { frame });
                    n = i + 1;
                }
                stream.try_write_vectored(&slices[..n])
            };
            match result {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    written.syscalls += 1;
                    written.bytes += n as u64;
                    written.frames += self.advance(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        // Written frames pay for room frames first (replies among them make it
        // pay early); an empty queue settles it exactly.
        let paid = if self.queue.is_empty() { self.owed } else { self.owed.min(written.frames as u32) };
        self.owed -= paid;
        backlog.pay(paid as usize);
        if written.frames > 0 {
            written.waited = since.map(|since| since.age(Instant::now()));
        }
        if self.queue.is_empty() {
            self.since = None;
            if self.queue.capacity() > 0 {
                // Idle connections keep no buffer.
                self.queue = VecDeque::new();
            }
        }
        Ok(written)
    }

    /// Drops `n` written bytes from the front; returns frames completed.
    fn advance(&mut self, mut n: usize) -> u64 {
        let mut done = 0;
        while n > 0 {
            let Some(front) = self.queue.front() else { break };
            let left = front.len() - self.offset as usize;
            if n >= left {
                n -= left;
                self.bytes = self.bytes.saturating_sub(len32(left));
                self.offset = 0;
                self.queue.pop_front();
                done += 1;
            } else {
                // n < left: the front frame's offset stays within its length.
                debug_assert!(self.offset as usize + n < front.len());
                self.offset += len32(n);
                self.bytes = self.bytes.saturating_sub(len32(n));
                n = 0;
            }
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn writes_many_frames_in_one_syscall_and_keeps_order() -> TestResult {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let client = tokio::net::TcpStream::connect(listener.local_addr()?).await?;
        let (server, _) = listener.accept().await?;
        let mut out = Outbound::default();
        for i in 0..10u8 {
            out.push(Bytes::from(vec![i; 100]));
        }
        server.writable().await?;
        let w = out.flush(&server, &Backlog::new(1, 0))?;
        assert_eq!((w.frames, w.bytes, w.syscalls), (10, 1000, 1));
        assert!(out.is_empty());
        let mut got = vec![0u8; 1000];
        let mut client = client;
        client.read_exact(&mut got).await?;
        for i in 0..10u8 {
            assert!(got[i as usize * 100..(i as usize + 1) * 100].iter().all(|b| *b == i));
        }
        Ok(())
    }

    /// Frames too big to gather go out with `writev`, still in order and
    /// complete, across however many writes the socket needs.
    #[tokio::test]
    async fn large_frames_are_written_whole_and_in_order() -> TestResult {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let mut client = tokio::net::TcpStream::connect(listener.local_addr()?).await?;
        let (server, _) = listener.accept().await?;
        let sizes = [10, GATHER_BYTES + 1, 10, 3 * GATHER_BYTES, 7];
        let mut out = Outbound::default();
        let backlog = Backlog::new(1, 0);
        for (i, size) in sizes.iter().enumerate() {
            // Room frames, owed until written.
            out.push_owed(Bytes::from(vec![i as u8; *size]));
            backlog.add(1);
        }
        let total: usize = sizes.iter().sum();
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; total];
            client.read_exact(&mut got).await.map(|_| got)
        });
        let mut frames = 0;
        assert_eq!(backlog.owed(), sizes.len() as i64);
        while !out.is_empty() {
            server.writable().await?;
            frames += out.flush(&server, &backlog)?.frames;
        }
        assert_eq!(frames, sizes.len() as u64);
        assert_eq!((backlog.owed(), out.owed()), (0, 0), "every written room frame is paid for");
        let got = reader.await??;
        let mut at = 0;
        for (i, size) in sizes.iter().enumerate() {
            assert!(got[at..at + size].iter().all(|b| *b == i as u8), "frame {i} intact and in place");
            at += size;
        }
        Ok(())
    }

    /// A write reports how long the oldest room frame queued before it had
    /// waited since reaching the node (the load sensor's sojourn sample);
    /// once the queue empties the next frames start a new wait.
    #[tokio::test(start_paused = true)]
    async fn a_write_reports_how_long_its_oldest_room_frame_waited() -> TestResult {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let _client = tokio::net::TcpStream::connect(listener.local_addr()?).await?;
        let (server, _) = listener.accept().await?;
        let backlog = Backlog::new(1, 0);
        let mut out = Outbound::default();
        let published = Instant::now();
        tokio::time::advance(Duration::from_millis(5)).await;
        out.push(Bytes::from_static(b"reply"));
        assert_eq!(out.flush(&server, &backlog)?.waited, None, "no room frame waited");
        for at in [published + Duration::from_millis(2), published] {
            out.push_owed(Bytes::from_static(b"frame"));
            backlog.add(1);
            out.waiting_since(at);
        }
        tokio::time::advance(Duration::from_millis(30)).await;
        let w = out.flush(&server, &backlog)?;
        assert_eq!((w.frames, w.waited), (2, Some(Duration::from_millis(35))), "the oldest frame's wait");
        out.push_owed(Bytes::from_static(b"frame"));
        backlog.add(1);
        out.waiting_since(Instant::now());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(out.flush(&server, &backlog)?.waited, Some(Duration::from_millis(1)), "a new wait");
        assert_eq!(backlog.owed(), 0);
        Ok(())
    }

    /// The 4-byte moments wrap: ages and "which is older" stay right across it.
    #[test]
    fn moments_compare_across_the_wrap() {
        let at = |us: u32| Micros(NonZeroU32::MIN | us);
        let (before_wrap, after_wrap) = (at(u32::MAX - 1_000), at(2_000));
        assert_eq!(before_wrap.before(after_wrap), 3_002);
        assert_eq!(before_wrap.earliest(after_wrap), before_wrap);
        assert_eq!(after_wrap.earliest(before_wrap), before_wrap);
        assert_eq!(after_wrap.earliest(after_wrap), after_wrap);
    }

    #[test]
    fn partial_writes_resume_mid_frame() {
        let mut out = Outbound::default();
        out.push(Bytes::from_static(b"abc"));
        out.push(Bytes::from_static(b"de"));
        assert_eq!(out.bytes(), 5);
        assert_eq!(out.advance(2), 0);
        assert_eq!((out.offset, out.bytes()), (2, 3));
        out.truncate_unstarted();
        assert_eq!((out.len(), out.bytes()), (1, 1));
        assert_eq!(out.advance(1), 1);
        assert!(out.is_empty() && out.bytes() == 0);
    }
}
