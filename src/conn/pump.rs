//! The connection's wait loop and write pump: one hand-written poll over the
//! socket, the rooms and the mailbox (rung by the node's alarms too); reads into a stack buffer;
//! takes ready frames in bulk (stepping aside to batch while the node is
//! busy); writes them with as few syscalls as it can.

use std::future::poll_fn;
use std::io;
use std::sync::atomic::Ordering;
use std::task::Poll;

use bytes::Bytes;

use super::subs::{Budget, Stopped, Taken};
use super::{Conn, End, Socket};
use crate::alarms::Stamp;
use crate::error::CloseCode;
use crate::mailbox::{Drained, UserMsg};
use crate::node::{Node, MAX_QUEUED};
use crate::protocol::deflate::{Agreed, Wire};
use crate::protocol::server;

/// Most frames taken from rooms and mailbox in one turn, so one busy
/// connection cannot starve the others on its worker thread.
const MAX_TURN_FRAMES: usize = 256;
/// Room frame bytes a connection holds queued at most (besides
/// [`MAX_QUEUED`] frames): past it, it stops taking from its rooms until the
/// socket drains, and reads the rest from history later.
const MAX_QUEUED_BYTES: usize = 1 << 20;
/// Everything a connection may have queued (room frames, per-user frames,
/// replies) before it counts as not reading: closed with 4008.
const MAX_OUT_BYTES: usize = 4 << 20;
/// While frames wait, the socket must take at least this much per
/// `write_wait`, or the connection is a slow consumer: a reader that
/// trickles a byte at a time cannot hold its queue forever.
const MIN_PROGRESS: u32 = 64 * 1024;
/// Most times a connection steps aside before writing while frames keep arriving.
const MAX_YIELDS: usize = 3;

/// The bytes a room frame goes out as on this connection: its compressed
/// twin when the connection negotiated permessage-deflate (made by the
/// first such connection to need it, then shared), the plain frame
/// otherwise. Per recipient this is a reference-count bump, never a
/// compression.
fn wire_for(wire: &Wire, agreed: Option<Agreed>, last: &mut u64, node: &Node) -> Bytes {
    wire.for_peer(agreed, node.ws.compression_threshold, last, |before, after| {
        let m = &node.metrics;
        m.compressed_frames.fetch_add(1, Ordering::Relaxed);
        m.compression_bytes_in.fetch_add(before as u64, Ordering::Relaxed);
        m.compression_bytes_out.fetch_add(after as u64, Ordering::Relaxed);
    })
    .clone()
}

/// The bits of [`Conn`]'s `turn`.
///
/// `SOCKET` and `ROOMS` mark sources polled pending earlier in the task's
/// current poll. Polling one again before the task returns `Pending` would
/// find nothing new and only take its lock again (the socket's
/// registration, the room ring's tail): whatever arrives after a source
/// registered the task's waker wakes the task, and a task woken while it
/// runs is polled once more, with both bits cleared. They are cleared
/// whenever the task may yield, so they never outlive the poll that set them.
mod turn {
    /// Frames were queued by a delivery (not only by replies).
    pub(super) const FRESH: u8 = 1;
    /// The socket's read readiness.
    pub(super) const SOCKET: u8 = 2;
    /// Every room: each ring receiver registered, each ringless room
    /// waiting for a mailbox nudge (which clears the bit).
    pub(super) const ROOMS: u8 = 4;
    pub(super) const QUIET: u8 = SOCKET | ROOMS;
    /// One pass of the wait poll, counted in two bits (up to [`PASSES`]).
    pub(super) const PASS: u8 = 8;
    /// A poll that keeps finding work never yields, so its marks would never
    /// clear: after this many passes every source is looked at again, and
    /// client input and its timers are not held back by a steady trickle of
    /// frames.
    pub(super) const PASSES: u8 = 3 * PASS;
}

/// Which source woke the connection.
enum Wake {
    /// The socket is readable (false: its registration failed).
    Readable(bool),
    Writable,
    /// Room frames were queued (Err: a room stopped serving us).
    Room(Result<Taken, Stopped>),
    Mailbox,
    /// The node's alarm rang for a deadline.
    Alarm,
}

impl<S: Socket> Conn<S> {
    /// The connection's main loop; the inbox may hold messages that arrived
    /// with the handshake.
    pub(super) async fn run(&mut self) -> End {
        if !self.inbox.is_empty() {
            if let Err(end) = Box::pin(self.handle()).await {
                return end;
            }
        }
        let mut deadline = self.deadline();
        self.arm(deadline);
        loop {
            // One hand-written poll over every source instead of `select!`:
            // readiness, rooms and mailbox register their wakers in place,
            // so an idle connection's task holds no wait futures at all.
            let wake = poll_fn(|cx| self.poll_wake(cx)).await;
            let step = match wake {
                // A client that floods keeps the socket readable, which is
                // polled first: timers are checked here too, or it would
                // starve them.
                Wake::Readable(true) => self.read_ready().and_then(|()| self.timers_due(deadline)),
                Wake::Readable(false) => Err(End::Gone),
                Wake::Writable => Ok(()),
                Wake::Room(item) => self.on_room(item),
                Wake::Mailbox => self.on_mailbox(),
                Wake::Alarm => self.on_alarm(),
            };
            let step = match step {
                // Boxed: commands are rare next to deliveries, and their
                // futures (a bus watch among them) need not widen every task.
                Ok(()) if !self.inbox.is_empty() => {
                    self.turn &= !turn::QUIET;
                    Box::pin(self.handle()).await
                }
                other => other,
            };
            if let Err(end) = step {
                return end;
            }
            let fresh = self.turn & turn::FRESH != 0;
            self.turn &= !turn::FRESH;
            let busy = self.node.busy.load(Ordering::Relaxed) || self.out.len() > 1;
            if fresh && self.stalled_since.is_none() && busy {
                // Frames from rooms are waiting and the node is under load
                // (or several frames are queued already). Step aside before
                // writing: the runtime polls its IO driver and runs the
                // publishers it wakes, so more frames join this write (one
                // syscall for many frames); again only while that keeps
                // bringing frames. On a quiet node a frame is written at once.
                self.turn &= !turn::QUIET;
                for _ in 0..MAX_YIELDS {
                    let before = self.out.len();
                    tokio::task::yield_now().await;
                    if let Err(end) = poll_fn(|cx| Poll::Ready(self.drain_ready(cx))).await {
                        return end;
                    }
                    if self.out.len() == before || self.out.len() >= MAX_TURN_FRAMES {
                        break;
                    }
                }
            }
            if let Err(end) = self.flush() {
                return end;
            }
            deadline = self.deadline();
            self.arm(deadline);
        }
    }

    /// One look at every source the connection waits on; registers the
    /// task's waker with each it finds pending.
    fn poll_wake(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Wake> {
        if self.turn & turn::PASSES == turn::PASSES {
            self.turn &= !(turn::QUIET | turn::PASSES);
        }
        self.turn += turn::PASS;
        let quiet = self.turn;
        if quiet & turn::SOCKET == 0 {
            if let Poll::Ready(ready) = self.stream.poll_read_ready(cx) {
                return Poll::Ready(Wake::Readable(ready.is_ok()));
            }
            self.turn |= turn::SOCKET;
        }
        if !self.out.is_empty() && self.stream.poll_write_ready(cx).is_ready() {
            return Poll::Ready(Wake::Writable);
        }
        let room_budget = self.room_budget().filter(|_| !self.subs.is_empty());
        if let Some(room_budget) = room_budget.filter(|_| quiet & turn::ROOMS == 0) {
            match self.take_rooms(cx, room_budget) {
                Poll::Ready(taken) => {
                    if taken.as_ref().is_ok_and(|t| t.waiting) {
                        self.turn |= turn::ROOMS;
                    }
                    return Poll::Ready(Wake::Room(taken));
                }
                Poll::Pending => self.turn |= turn::ROOMS,
            }
        }
        if self.mailbox.poll_pending(cx).is_ready() {
            return Poll::Ready(Wake::Mailbox);
        }
        if self.mailbox.take_alarm() {
            return Poll::Ready(Wake::Alarm);
        }
        // The task yields: what woke it next may be any source.
        self.turn &= !(turn::QUIET | turn::PASSES);
        Poll::Pending
    }

    /// Reads everything the socket has, into a stack buffer that exists only
    /// for this call: an idle connection holds no read buffer.
    fn read_ready(&mut self) -> Result<(), End> {
        let mut buf = [0u8; 8192];
        let limit = self.node.ws.read_buffer_size.clamp(512, buf.len());
        loop {
            match self.stream.try_read(&mut buf[..limit]) {
                Ok(0) => return Err(End::Gone),
                Ok(n) => {
                    self.last_heard = Stamp::now();
                    self.ingest(&buf[..n])?;
                    // Answer what waits before reading on: the inbox is
                    // bounded in messages here, and in bytes by the
                    // reassembler, which holds back the rest of a read.
                    if n < limit || self.inbox.len() > 64 || self.assembler.held_back() {
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(_) => return Err(End::Gone),
            }
        }
    }

    /// Decodes client bytes into the inbox.
    pub(super) fn ingest(&mut self, data: &[u8]) -> Result<(), End> {
        self.assembler
            .ingest(data, self.node.ws.max_message_size, self.deflate.is_some(), &mut self.inbox)
            .map_err(|e| End::Close(e.close_code()))
    }

    /// Room frames were queued: count catch-ups, and take what the mailbox
    /// holds too.
    fn on_room(&mut self, taken: Result<Taken, Stopped>) -> Result<(), End> {
        self.turn |= turn::FRESH;
        match taken {
            Ok(taken) => {
                if let Some(oldest) = taken.oldest {
                    self.out.waiting_since(oldest);
                }
                if taken.catchups > 0 {
                    self.node.metrics.catchups.fetch_add(u64::from(taken.catchups), Ordering::Relaxed);
                }
                if self.mailbox.take_pending() {
                    return self.on_mailbox();
                }
                Ok(())
            }
            Err(Stopped::Evicted { chat, last, oldest }) => {
                tracing::debug!(%chat, last, oldest, user = %self.user, "slow consumer fell behind the room's history");
                Err(self.slow_consumer())
            }
            Err(Stopped::Closed { chat }) => {
                tracing::error!(%chat, "room closed under a subscriber");
                Err(End::Close(CloseCode::InternalError))
            }
        }
    }

    /// Queues every room and mailbox frame that is ready now, so one write
    /// carries them all (adaptive batching: a connection that keeps up writes
    /// each frame at once, one that fell behind writes in bulk).
    fn drain_ready(&mut self, cx: &mut std::task::Context<'_>) -> Result<(), End> {
        let room_taken = match self.room_budget() {
            Some(budget) => self.take_rooms(cx, budget),
            None => Poll::Pending,
        };
        match room_taken {
            Poll::Ready(taken) => self.on_room(taken),
            _ if self.mailbox.take_pending() => self.on_mailbox(),
            _ => Ok(()),
        }
    }

    /// Queues what the rooms have ready, within `budget`.
    fn take_rooms(
        &mut self,
        cx: &mut std::task::Context<'_>,
        budget: Budget,
    ) -> Poll<Result<Taken, Stopped>> {
        let (out, agreed, node) = (&mut self.out, self.deflate, &self.node);
        // Only a connection that agreed to compression needs it: a plain
        // one leaves the mailbox's cache line alone here.
        let mut last = if agreed.is_some() { self.mailbox.deflated_last() } else { 0 };
        let taken = self
            .subs
            .poll_take(cx, self.user, budget, |f| out.push_owed(wire_for(&f, agreed, &mut last, node)));
        if agreed.is_some() {
            self.mailbox.set_deflated_last(last);
        }
        taken
    }

    pub(super) fn on_mailbox(&mut self) -> Result<(), End> {
        self.turn |= turn::FRESH;
        // A signal may be a small room's nudge, or one that made its ring:
        // the rooms must be looked at again.
        self.turn &= !turn::ROOMS;
        let mut msgs = Vec::new();
        match self.mailbox.drain(&mut msgs) {
            Drained::Messages => {}
            Drained::Overflowed => return Err(self.slow_consumer()),
            Drained::Shutdown => return Err(End::Close(CloseCode::GoingAway)),
        }
        for msg in msgs {
            match msg {
                UserMsg::Frame(frame) => self.out.push(frame),
                UserMsg::Ephemeral { chat, listeners_only, skip, frame } => {
                    if skip != self.mailbox.token() && self.subs.wants(chat, listeners_only) {
                        // Presence and typing never make a connection a slow
                        // consumer: past its queue budget (the room frames'
                        // bound) they are dropped, not queued towards 4008.
                        if self.room_budget().is_some() {
                            self.out.push(frame);
                        } else {
                            self.node.metrics.ephemeral_dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                UserMsg::Removed(chat) => {
                    if self.leave(chat) {
                        self.out.push(server::removed(chat));
                    }
                }
                UserMsg::Disconnect => return Err(End::Close(CloseCode::Disconnected)),
                UserMsg::Revoke(before) if crate::bans::issued_before(Some(self.issued_at), before) => {
                    return Err(End::Close(CloseCode::Disconnected))
                }
                UserMsg::Revoke(_) => {}
            }
        }
        self.check_queued()
    }

    /// Per-user frames and replies have no history to catch up from: a
    /// connection holding more than [`MAX_OUT_BYTES`] queued is not reading.
    pub(super) fn check_queued(&mut self) -> Result<(), End> {
        if self.out.bytes() > MAX_OUT_BYTES {
            return Err(self.slow_consumer());
        }
        Ok(())
    }

    /// What the connection may still take from its rooms this turn; none
    /// once its queue budget ([`MAX_QUEUED`] frames, [`MAX_QUEUED_BYTES`]) is
    /// spent. The one place that decides whether the queue is full.
    fn room_budget(&self) -> Option<Budget> {
        let budget = Budget {
            frames: MAX_QUEUED.saturating_sub(self.out.len()).min(MAX_TURN_FRAMES),
            bytes: MAX_QUEUED_BYTES.saturating_sub(self.out.bytes()),
        };
        (budget.frames > 0 && budget.bytes > 0).then_some(budget)
    }

    pub(super) fn flush(&mut self) -> Result<(), End> {
        if self.out.is_empty() {
            return Ok(());
        }
        let written = self.out.flush(&self.stream, self.node.rooms.backlog()).map_err(|_| End::Gone)?;
        // A connection whose queue is full takes nothing more until its
        // socket drains: it stops counting in the node's backlog meanwhile,
        // so one stalled reader never makes the node refuse publishers.
        let full = self.room_budget().is_none();
        if full != self.subs.is_parked() {
            if full {
                self.node.rooms.backlog().pay(self.out.forgive());
            }
            self.subs.park(full);
        }
        if let Some(waited) = written.waited {
            self.node.lag.record(waited);
        }
        let m = &self.node.metrics;
        if written.syscalls > 0 {
            m.frames_out.add(written.frames as i64);
            m.bytes_out.add(written.bytes as i64);
            m.write_syscalls.add(written.syscalls as i64);
        }
        if self.out.is_empty() {
            self.stalled_since = None;
            self.progress = 0;
            self.pong_queued = false;
        } else if self.stalled_since.is_none() {
            self.stalled_since = Some(Stamp::now());
            self.progress = 0;
        } else {
            // The deadline moves on only for real progress: a reader that
            // trickles a few bytes at a time still meets write_wait.
            self.progress = self.progress.saturating_add(u32::try_from(written.bytes).unwrap_or(u32::MAX));
            if self.progress >= MIN_PROGRESS {
                self.stalled_since = Some(Stamp::now());
                self.progress = 0;
            }
        }
        Ok(())
    }
}
