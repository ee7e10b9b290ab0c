//! One WebSocket connection, served by one task: it reads and answers client
//! commands and is the connection's write pump (the only writer of its
//! socket). It waits on the socket, its rooms, its user mailbox and one timer
//! at once, and writes every frame that is ready with one syscall.
//!
//! One task rather than a reader and a pump keeps an idle connection to one
//! small future, with no read buffer and no write buffer while idle.

mod inbound;
mod outbound;
mod subs;

use std::future::{poll_fn, Future};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::auth::Claims;
use crate::bus::{Bus, Topic};
use crate::config::WebSocketConfig;
use crate::membership;
use crate::metrics::Metrics;
use crate::protocol::client::{self, Command};
use crate::protocol::frame::{self, OpCode};
use crate::protocol::{server, ChatId, UserId};
use crate::rooms::{Drained, Mailbox, Rooms, UserMsg, Users};
use inbound::{Assembler, Inbound};
use outbound::Outbound;
use subs::{Stopped, Subscriptions};

/// Everything a connection needs from its node, shared by all connections.
pub struct Context {
    pub rooms: Arc<Rooms>,
    pub users: Arc<Users>,
    pub membership: Arc<membership::Table>,
    pub source: membership::Source,
    pub bus: Arc<dyn Bus>,
    pub metrics: Arc<Metrics>,
    pub ws: WebSocketConfig,
    /// Frames a connection may have queued before it is a slow consumer
    /// (`rooms.buffer`, the same bound its rooms give it).
    pub queue_limit: usize,
    /// Cancelled at shutdown, before every registered mailbox is told to
    /// close with 1001; a connection registering later checks it.
    pub shutdown: CancellationToken,
    /// Tracks connection tasks so shutdown can wait for them to drain.
    pub tasks: tokio_util::task::TaskTracker,
    /// Set by [`sense_load`] while the node writes more than
    /// [`BUSY_FRAMES_PER_SEC`]: connections then wait a moment to batch.
    pub busy: AtomicBool,
}

/// Frames written per second above which the node counts as busy.
pub const BUSY_FRAMES_PER_SEC: u64 = 100_000;
const LOAD_SAMPLE: Duration = Duration::from_millis(10);

/// Keeps `ctx.busy` current from the frames-written counter until `stop`.
/// Batching pays off only under load: on a quiet node, stepping aside before
/// each write costs a poll per delivery and gains nothing.
pub async fn sense_load(ctx: Arc<Context>, stop: CancellationToken) {
    let threshold = BUSY_FRAMES_PER_SEC * LOAD_SAMPLE.as_millis() as u64 / 1000;
    let mut last = ctx.metrics.frames_out.load(Ordering::Relaxed);
    let mut tick = tokio::time::interval(LOAD_SAMPLE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = ctx.metrics.frames_out.load(Ordering::Relaxed);
        ctx.busy.store(now.wrapping_sub(last) > threshold, Ordering::Relaxed);
        last = now;
    }
}

/// Most frames taken from rooms and mailbox in one turn, so one busy
/// connection cannot starve the others on its worker thread.
const MAX_TURN_FRAMES: usize = 256;
/// Most times a connection steps aside before writing while frames keep arriving.
const MAX_YIELDS: usize = 3;
/// Per-connection command budget: burst and refill per second.
const COMMAND_BURST: f32 = 100.0;
const COMMAND_RATE: f32 = 50.0;
/// Error replies within one connection's life before it is closed with 1008.
const MAX_ERRORS: u32 = 100;
/// Longest token lifetime honoured: about 30 years.
const MAX_LIFETIME_SECS: u64 = 30 * 365 * 86_400;
/// How long a closing connection waits for the client to finish.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// Which source woke the connection.
enum Wake {
    /// The socket is readable (false: its registration failed).
    Readable(bool),
    Writable,
    /// Room frames were queued (Err: a room stopped serving us).
    Room(Result<usize, Stopped>),
    Mailbox,
    Timer,
}

/// Why the connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Send a close frame with this code, then close.
    Close(u16, &'static str),
    /// The client closed or vanished: nothing more to send.
    Gone,
    /// The client sent a close frame: echo it.
    Echo(Option<u16>),
}

struct Conn {
    stream: TcpStream,
    ctx: Arc<Context>,
    user: UserId,
    token_chats: Box<[ChatId]>,
    expires_at: Instant,
    subs: Subscriptions,
    /// This connection's inbox for per-user frames; `Users` holds the other
    /// reference while the connection is registered.
    mailbox: Arc<Mailbox>,
    out: Outbound,
    assembler: Assembler,
    last_heard: Instant,
    next_ping: Instant,
    /// Set while frames wait for a socket that does not take them.
    stalled_since: Option<Instant>,
    tokens: f32,
    tokens_at: Instant,
    errors: u32,
    /// Frames were queued this turn by a delivery (not only by replies).
    fresh: bool,
    /// Counts the connection against `server.max_connections`; released
    /// before the gauges say the connection is gone.
    permit: Option<OwnedSemaphorePermit>,
}

/// Serves one upgraded connection until it ends. `early` holds bytes the
/// client sent right behind its handshake.
///
/// Not an `async fn`: the connection is built here, so the returned future
/// holds the `Conn` once instead of also keeping slots for these arguments
/// for its whole life (every idle connection is one such future).
pub fn serve(
    stream: TcpStream,
    early: Bytes,
    claims: Claims,
    ctx: Arc<Context>,
    permit: OwnedSemaphorePermit,
) -> impl Future<Output = ()> + Send {
    let now = Instant::now();
    // Capped so an absurd `exp` cannot overflow the clock.
    let lifetime = claims.exp.saturating_sub(crate::auth::now_secs()).min(MAX_LIFETIME_SECS);
    let mut conn = Conn {
        stream,
        user: claims.sub,
        token_chats: claims.chats.into_boxed_slice(),
        expires_at: now + Duration::from_secs(lifetime),
        subs: Subscriptions::default(),
        mailbox: Arc::new(Mailbox::new(ctx.ws.user_queue)),
        out: Outbound::default(),
        assembler: Assembler::default(),
        last_heard: now,
        next_ping: now + ctx.ws.ping_interval,
        stalled_since: None,
        tokens: COMMAND_BURST,
        tokens_at: now,
        errors: 0,
        fresh: false,
        permit: Some(permit),
        ctx,
    };
    // `early` is a slice of hyper's read buffer: holding it would keep that
    // whole buffer alive for the connection's life, so it is decoded now.
    let mut inbox = Vec::new();
    let early = conn.ingest(&early, &mut inbox);
    let early = early.map(|()| inbox);
    // The block owns `conn` and lends it: an `async fn` taking `self` by
    // value would keep a second copy of it in the future.
    async move { conn.lifecycle(early).await }
}

impl Conn {
    /// Registers, runs and unregisters the connection.
    async fn lifecycle(&mut self, early: Result<Vec<Inbound>, End>) {
        let ctx = self.ctx.clone();
        ctx.metrics.connections_opened.fetch_add(1, Ordering::Relaxed);
        ctx.metrics.connections_active.fetch_add(1, Ordering::Relaxed);
        ctx.users.register(self.user, self.mailbox.clone());
        // Checked after registering: a shutdown signalled earlier missed this mailbox.
        let watch = if ctx.shutdown.is_cancelled() {
            Err(End::Close(1001, "server shutting down"))
        } else {
            ctx.bus.watch(Topic::User(self.user)).await.map_err(|e| {
                tracing::warn!(error = %e, "cannot watch the user topic; closing");
                End::Close(1011, "event bus unavailable")
            })
        };
        let watched = watch.is_ok();
        let end = match watch.and(early) {
            Ok(inbox) => self.run(inbox).await,
            Err(end) => end,
        };
        // Closing is rare next to idling: its future lives on the heap, not
        // in every connection's task.
        Box::pin(self.finish(end)).await;
        if watched {
            // Only a watch that succeeded is counted by the bus.
            ctx.bus.unwatch(Topic::User(self.user));
        }
        ctx.users.unregister(self.user, &self.mailbox);
        drop(self.permit.take());
        ctx.metrics.connections_active.fetch_sub(1, Ordering::Relaxed);
        ctx.metrics.connections_closed.fetch_add(1, Ordering::Relaxed);
    }

    /// The connection's main loop; `inbox` holds messages that arrived with
    /// the handshake.
    async fn run(&mut self, mut inbox: Vec<Inbound>) -> End {
        if !inbox.is_empty() {
            if let Err(end) = Box::pin(self.handle(&mut inbox)).await {
                return end;
            }
        }
        let mut deadline = self.deadline();
        let sleep = tokio::time::sleep_until(deadline);
        let mut sleep = std::pin::pin!(sleep);
        loop {
            // One hand-written poll over every source instead of `select!`:
            // readiness, rooms and mailbox register their wakers in place,
            // so an idle connection's task holds no wait futures at all.
            let wake = poll_fn(|cx| {
                if let Poll::Ready(ready) = self.stream.poll_read_ready(cx) {
                    return Poll::Ready(Wake::Readable(ready.is_ok()));
                }
                if !self.out.is_empty() && self.stream.poll_write_ready(cx).is_ready() {
                    return Poll::Ready(Wake::Writable);
                }
                if !self.subs.is_empty() {
                    let out = &mut self.out;
                    if let Poll::Ready(taken) = self.subs.poll_take(cx, MAX_TURN_FRAMES, |f| out.push(f)) {
                        return Poll::Ready(Wake::Room(taken));
                    }
                }
                if self.mailbox.poll_pending(cx).is_ready() {
                    return Poll::Ready(Wake::Mailbox);
                }
                if sleep.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Wake::Timer);
                }
                Poll::Pending
            })
            .await;
            let step = match wake {
                Wake::Readable(true) => self.read_ready(&mut inbox),
                Wake::Readable(false) => Err(End::Gone),
                Wake::Writable => Ok(()),
                Wake::Room(item) => self.on_room(item),
                Wake::Mailbox => self.on_mailbox(),
                Wake::Timer => self.on_timer(),
            };
            let step = match step {
                // Boxed: commands are rare next to deliveries, and their
                // futures (a bus watch among them) need not widen every task.
                Ok(()) if !inbox.is_empty() => Box::pin(self.handle(&mut inbox)).await,
                other => other,
            };
            if let Err(end) = step {
                return end;
            }
            let fresh = std::mem::take(&mut self.fresh);
            let busy = self.ctx.busy.load(Ordering::Relaxed) || self.out.len() > 1;
            if fresh && self.stalled_since.is_none() && busy {
                // Frames from rooms are waiting and the node is under load
                // (or several frames are queued already). Step aside before
                // writing: the runtime polls its IO driver and runs the
                // publishers it wakes, so more frames join this write (one
                // syscall for many frames); again only while that keeps
                // bringing frames. On a quiet node a frame is written at once.
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
            let next = self.deadline();
            if next != deadline {
                deadline = next;
                sleep.as_mut().reset(deadline);
            }
        }
    }

    /// The earliest moment a timer must act.
    fn deadline(&self) -> Instant {
        let mut at = self.next_ping.min(self.expires_at).min(self.last_heard + self.ctx.ws.pong_wait);
        if let Some(since) = self.stalled_since {
            at = at.min(since + self.ctx.ws.write_wait);
        }
        at
    }

    fn on_timer(&mut self) -> Result<(), End> {
        let now = Instant::now();
        if now >= self.expires_at {
            return Err(End::Close(4001, "token expired"));
        }
        if now >= self.last_heard + self.ctx.ws.pong_wait {
            // Nothing from the client for pong_wait: it is gone.
            return Err(End::Gone);
        }
        if self.stalled_since.is_some_and(|since| now >= since + self.ctx.ws.write_wait) {
            return Err(self.slow_consumer());
        }
        if now >= self.next_ping {
            self.out.push(frame::encode(OpCode::Ping, b""));
            self.next_ping = now + self.ctx.ws.ping_interval;
        }
        Ok(())
    }

    /// Reads everything the socket has, into a stack buffer that exists only
    /// for this call: an idle connection holds no read buffer.
    fn read_ready(&mut self, inbox: &mut Vec<Inbound>) -> Result<(), End> {
        let mut buf = [0u8; 8192];
        let limit = self.ctx.ws.read_buffer_size.clamp(512, buf.len());
        loop {
            match self.stream.try_read(&mut buf[..limit]) {
                Ok(0) => return Err(End::Gone),
                Ok(n) => {
                    self.last_heard = Instant::now();
                    self.ingest(&buf[..n], inbox)?;
                    if n < limit || inbox.len() > 64 {
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(_) => return Err(End::Gone),
            }
        }
    }

    fn ingest(&mut self, data: &[u8], inbox: &mut Vec<Inbound>) -> Result<(), End> {
        self.assembler.ingest(data, self.ctx.ws.max_message_size, inbox).map_err(|e| {
            End::Close(
                e.close_code(),
                if e.close_code() == 1009 { "message too big" } else { "protocol error" },
            )
        })
    }

    /// Answers every complete client message, in order.
    async fn handle(&mut self, inbox: &mut Vec<Inbound>) -> Result<(), End> {
        // Taken whole, so an idle connection keeps no inbox buffer.
        for msg in std::mem::take(inbox) {
            match msg {
                Inbound::Text(text) => self.command(&text).await?,
                Inbound::Binary => self.reply_error(
                    "bad_request",
                    "binary frames are not accepted: commands are JSON text",
                    None,
                )?,
                Inbound::Ping(payload) => self.out.push(frame::encode(OpCode::Pong, &payload)),
                Inbound::Pong => {}
                Inbound::Close(code) => return Err(End::Echo(code)),
            }
        }
        Ok(())
    }

    async fn command(&mut self, text: &[u8]) -> Result<(), End> {
        if !self.take_token() {
            return self.reply_error("rate_limited", "too many commands; slow down", None);
        }
        match client::parse(text) {
            Ok(Command::Ping) => self.out.push(server::pong()),
            Ok(Command::Subscribe { chat_id, since: _ }) => self.subscribe(chat_id).await?,
            Ok(Command::Unsubscribe { chat_id }) => {
                self.leave(chat_id);
                self.out.push(server::unsubscribed(chat_id));
            }
            Err(e) => self.reply_error(e.code(), &e.to_string(), None)?,
        }
        Ok(())
    }

    async fn subscribe(&mut self, chat: ChatId) -> Result<(), End> {
        if self.subs.contains(chat) {
            self.out.push(server::subscribed(chat));
            return Ok(());
        }
        if self.subs.len() >= self.ctx.ws.max_subscriptions {
            return self.reply_error("too_many_subscriptions", "subscription limit reached", Some(chat));
        }
        if !membership::allowed(self.ctx.source, &self.ctx.membership, self.user, &self.token_chats, chat) {
            return self.reply_error("forbidden", "not a member of this chat", Some(chat));
        }
        // Join before watching the bus, so nothing delivered after the watch
        // completes can miss this receiver.
        let rx = self.ctx.rooms.join(chat);
        self.subs.insert(chat, rx);
        self.ctx.metrics.subscriptions_active.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.ctx.bus.watch(Topic::Room(chat)).await {
            tracing::warn!(%chat, error = %e, "cannot watch room on the bus");
            self.leave_unwatched(chat);
            return self.reply_error("unavailable", "event bus unavailable; retry", Some(chat));
        }
        self.out.push(server::subscribed(chat));
        Ok(())
    }

    /// Drops a subscription, if any; returns whether there was one.
    fn leave(&mut self, chat: ChatId) -> bool {
        let had = self.leave_unwatched(chat);
        if had {
            self.ctx.bus.unwatch(Topic::Room(chat));
        }
        had
    }

    fn leave_unwatched(&mut self, chat: ChatId) -> bool {
        // Dropping the stream drops its receiver before the room checks emptiness.
        let had = self.subs.remove(chat);
        if had {
            self.ctx.rooms.leave(chat);
            self.ctx.metrics.subscriptions_active.fetch_sub(1, Ordering::Relaxed);
        }
        had
    }

    fn reply_error(&mut self, code: &str, message: &str, chat: Option<ChatId>) -> Result<(), End> {
        self.ctx.metrics.client_error(code);
        self.out.push(server::error(code, message, chat));
        self.errors += 1;
        if self.errors > MAX_ERRORS {
            return Err(End::Close(1008, "too many invalid commands"));
        }
        Ok(())
    }

    fn take_token(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.tokens_at).as_secs_f32() * COMMAND_RATE;
        self.tokens = (self.tokens + refill).min(COMMAND_BURST);
        self.tokens_at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Room frames were queued: check the bounds, and take what the
    /// mailbox holds too.
    fn on_room(&mut self, taken: Result<usize, Stopped>) -> Result<(), End> {
        self.fresh = true;
        match taken {
            Ok(_) if self.out.len() > self.ctx.queue_limit => Err(self.slow_consumer()),
            Ok(_) if self.mailbox.take_pending() => self.on_mailbox(),
            Ok(_) => Ok(()),
            Err(Stopped::Lagged { chat, missed }) => {
                tracing::debug!(%chat, missed, user = %self.user, "slow consumer lagged its room");
                Err(self.slow_consumer())
            }
            Err(Stopped::Closed { chat }) => {
                tracing::error!(%chat, "room closed under a subscriber");
                Err(End::Close(1011, "room closed"))
            }
        }
    }

    /// Queues every room and mailbox frame that is ready now, so one write
    /// carries them all (adaptive batching: a connection that keeps up writes
    /// each frame at once, one that fell behind writes in bulk).
    fn drain_ready(&mut self, cx: &mut std::task::Context<'_>) -> Result<(), End> {
        let out = &mut self.out;
        match self.subs.poll_take(cx, MAX_TURN_FRAMES, |f| out.push(f)) {
            Poll::Ready(taken) => self.on_room(taken),
            Poll::Pending if self.mailbox.take_pending() => self.on_mailbox(),
            Poll::Pending => Ok(()),
        }
    }

    fn on_mailbox(&mut self) -> Result<(), End> {
        self.fresh = true;
        let mut msgs = Vec::new();
        match self.mailbox.drain(&mut msgs) {
            Drained::Messages => {}
            Drained::Overflowed => return Err(self.slow_consumer()),
            Drained::Shutdown => return Err(End::Close(1001, "server shutting down")),
        }
        for msg in msgs {
            match msg {
                UserMsg::Frame(frame) => self.out.push(frame),
                UserMsg::Removed(chat) => {
                    if self.leave(chat) {
                        self.out.push(server::removed(chat));
                    }
                }
            }
        }
        if self.out.len() > self.ctx.queue_limit {
            return Err(self.slow_consumer());
        }
        Ok(())
    }

    fn slow_consumer(&mut self) -> End {
        self.ctx.metrics.slow_consumers.fetch_add(1, Ordering::Relaxed);
        // The backlog is abandoned: the client resubscribes with `since`.
        self.out.truncate_unstarted();
        End::Close(4008, "slow consumer")
    }

    fn flush(&mut self) -> Result<(), End> {
        if self.out.is_empty() {
            return Ok(());
        }
        let written = self.out.flush(&self.stream).map_err(|_| End::Gone)?;
        let m = &self.ctx.metrics;
        if written.syscalls > 0 {
            m.frames_out.fetch_add(written.frames, Ordering::Relaxed);
            m.bytes_out.fetch_add(written.bytes, Ordering::Relaxed);
            m.write_syscalls.fetch_add(written.syscalls, Ordering::Relaxed);
        }
        if self.out.is_empty() {
            self.stalled_since = None;
        } else if self.stalled_since.is_none() || written.bytes > 0 {
            // write_wait bounds how long one write may make no progress.
            self.stalled_since = Some(Instant::now());
        }
        Ok(())
    }

    /// Ends the connection: leaves every room at once (so a slow consumer
    /// stops pinning room buffers), sends the close frame, and gives the
    /// client a bounded time to read it.
    async fn finish(&mut self, end: End) {
        let chats = self.subs.chats();
        for chat in chats {
            self.leave(chat);
        }
        let code = match end {
            End::Close(code, reason) => {
                self.out.push(frame::close(code, reason));
                Some(code)
            }
            End::Echo(code) => {
                // Echo the client's code (RFC 6455 5.5.1), but never a reserved one.
                let echo = code.filter(|c| (1000..5000).contains(c) && ![1004, 1005, 1006, 1015].contains(c));
                self.out.push(frame::close(echo.unwrap_or(1000), ""));
                Some(echo.unwrap_or(1000))
            }
            End::Gone => None,
        };
        self.ctx.metrics.closed_with(code);
        if code.is_none() {
            return;
        }
        let deadline = Instant::now() + self.ctx.ws.write_wait.min(CLOSE_LINGER * 5);
        while !self.out.is_empty() {
            if self.out.flush(&self.stream).is_err() {
                return;
            }
            if self.out.is_empty() {
                break;
            }
            if tokio::time::timeout_at(deadline, self.stream.writable()).await.is_err() {
                return;
            }
        }
        let _ = self.stream.shutdown().await;
        // Read until the client closes too, so unread input does not turn our
        // close into a reset that could discard the close frame.
        let linger = Instant::now() + CLOSE_LINGER;
        let mut buf = [0u8; 1024];
        while let Ok(Ok(())) = tokio::time::timeout_at(linger, self.stream.readable()).await {
            match self.stream.try_read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::memory::MemoryBus;
    use crate::bus::Deliver;

    fn context() -> Arc<Context> {
        let metrics = Arc::new(Metrics::default());
        let rooms = Arc::new(Rooms::new(4));
        let users = Arc::new(Users::new());
        let membership = Arc::new(membership::Table::default());
        let sink: Arc<dyn Deliver> = Arc::new(crate::broadcast::Broadcaster {
            rooms: rooms.clone(),
            users: users.clone(),
            membership: membership.clone(),
            metrics: metrics.clone(),
        });
        Arc::new(Context {
            rooms,
            users,
            membership,
            source: membership::Source::Open,
            bus: Arc::new(MemoryBus::new(sink)),
            metrics,
            ws: WebSocketConfig::default(),
            queue_limit: 16,
            shutdown: CancellationToken::new(),
            tasks: tokio_util::task::TaskTracker::new(),
            busy: AtomicBool::new(false),
        })
    }

    /// Every idle connection is one of these futures: keep it small.
    #[tokio::test]
    async fn the_connection_future_stays_small() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let ctx = context();
        let permit = Arc::new(tokio::sync::Semaphore::new(1)).try_acquire_owned().unwrap();
        let claims = Claims { sub: UserId::from_u128(1), exp: u64::MAX / 2, chats: vec![] };
        let fut = serve(stream, Bytes::new(), claims, ctx.clone(), permit);
        let size = std::mem::size_of_val(&fut);
        eprintln!("connection future: {size} bytes");
        // Dropping the unpolled future must not disturb the node.
        drop(fut);
        assert_eq!(ctx.users.len(), 0);
        assert!(size <= 768, "connection future grew to {size} bytes");
    }

    /// Batching is switched on by load and off again when it passes.
    #[tokio::test(start_paused = true)]
    async fn the_node_counts_as_busy_only_while_it_writes_fast() {
        let ctx = context();
        let stop = CancellationToken::new();
        let sensor = tokio::spawn(sense_load(ctx.clone(), stop.clone()));
        let per_sample = BUSY_FRAMES_PER_SEC * LOAD_SAMPLE.as_millis() as u64 / 1000;
        for _ in 0..3 {
            ctx.metrics.frames_out.fetch_add(per_sample * 2, Ordering::Relaxed);
            tokio::time::sleep(LOAD_SAMPLE).await;
        }
        assert!(ctx.busy.load(Ordering::Relaxed), "fast writing marks the node busy");
        for _ in 0..3 {
            ctx.metrics.frames_out.fetch_add(per_sample / 2, Ordering::Relaxed);
            tokio::time::sleep(LOAD_SAMPLE).await;
        }
        assert!(!ctx.busy.load(Ordering::Relaxed), "slow writing clears it");
        stop.cancel();
        sensor.await.unwrap();
    }
}
