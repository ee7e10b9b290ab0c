//! One WebSocket connection, served by one task: it reads and answers client
//! commands and is the connection's write pump (the only writer of its
//! socket). It waits on the socket, its rooms, its user mailbox and one timer
//! at once, and writes every frame that is ready with one syscall.
//!
//! One task rather than a reader and a pump keeps an idle connection to one
//! small future, with no read buffer and no write buffer while idle. The
//! task's parts live in child modules that share the [`Conn`] struct:
//! [`pump`] (the wait loop, reads, deliveries, batching and writes),
//! [`session`] (client commands, subscriptions and recovery, the rate limit),
//! [`timers`] (ping, silence, token expiry, write stall) and [`close`] (the
//! close handshake); [`inbound`], [`outbound`] and [`subs`] are its
//! reassembly buffer, write queue and rooms.

mod close;
mod inbound;
mod outbound;
mod pump;
mod session;
mod subs;
mod timers;

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use crate::auth::Claims;
use crate::bus::Topic;
use crate::error::CloseCode;
use crate::node::Node;
use crate::protocol::{ChatId, UserId};
use crate::rooms::Mailbox;
use inbound::{Assembler, Inbound};
use outbound::Outbound;
use subs::Subscriptions;

/// Longest token lifetime honoured: about 30 years.
const MAX_LIFETIME_SECS: u64 = 30 * 365 * 86_400;

/// Why the connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Send a close frame with this code and its reason, then close.
    Close(CloseCode),
    /// The client closed or vanished: nothing more to send.
    Gone,
    /// The client sent a close frame: echo it.
    Echo(Option<u16>),
}

struct Conn {
    stream: TcpStream,
    node: Arc<Node>,
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
    node: Arc<Node>,
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
        mailbox: Arc::new(Mailbox::new(node.ws.user_queue)),
        out: Outbound::default(),
        assembler: Assembler::default(),
        last_heard: now,
        next_ping: now + node.ws.ping_interval,
        stalled_since: None,
        tokens: session::COMMAND_BURST,
        tokens_at: now,
        errors: 0,
        fresh: false,
        permit: Some(permit),
        node,
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
        let node = self.node.clone();
        node.metrics.connections_opened.fetch_add(1, Ordering::Relaxed);
        node.metrics.connections_active.fetch_add(1, Ordering::Relaxed);
        node.users.register(self.user, self.mailbox.clone());
        // Checked after registering: a shutdown signalled earlier missed this mailbox.
        let watch = if node.shutdown.is_cancelled() {
            Err(End::Close(CloseCode::GoingAway))
        } else {
            node.bus.watch(Topic::User(self.user)).await.map_err(|e| {
                tracing::warn!(error = %e, "cannot watch the user topic; closing");
                End::Close(CloseCode::InternalError)
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
            node.bus.unwatch(Topic::User(self.user));
        }
        node.users.unregister(self.user, &self.mailbox);
        drop(self.permit.take());
        node.metrics.connections_active.fetch_sub(1, Ordering::Relaxed);
        node.metrics.connections_closed.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// Every idle connection is one of these futures: keep it small.
    #[tokio::test]
    async fn the_connection_future_stays_small() -> Result<(), Box<dyn std::error::Error>> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let stream = TcpStream::connect(listener.local_addr()?).await?;
        let node = Arc::new(Node::build(&Config::default()).await?);
        let permit = Arc::new(tokio::sync::Semaphore::new(1)).try_acquire_owned()?;
        let claims = Claims { sub: UserId::from_u128(1), exp: u64::MAX / 2, chats: vec![] };
        let fut = serve(stream, Bytes::new(), claims, node.clone(), permit);
        let size = std::mem::size_of_val(&fut);
        eprintln!("connection future: {size} bytes");
        // Dropping the unpolled future must not disturb the node.
        drop(fut);
        assert_eq!(node.users.len(), 0);
        assert!(size <= 768, "connection future grew to {size} bytes");
        Ok(())
    }
}
