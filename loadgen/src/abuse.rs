//! The abusive clients of `loadgen soak`: ping floods, garbage commands, non-UTF-8 text, readers
//! that trickle, idle HTTP connections and slowloris handshakes. Each comes back after the server
//! ends it, and how it was ended is tallied against what SECURITY.md's limits promise.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use uuid::Uuid;

use crate::frame::{CLOSE_ABNORMAL, OP_PING};
use crate::ident::Minter;
use crate::report::AbuseReport;
use crate::scrape;
use crate::target::Target;
use crate::ws::{Incoming, WsClient};

/// Pings in a flood: well past the command budget (burst 100) and the error budget (100).
const FLOOD_PINGS: usize = 300;
/// Garbage commands in a burst: each earns an error reply; past 100 the server closes.
const GARBAGE_COMMANDS: usize = 150;
/// A trickler's SO_RCVBUF, read size and pace: 800 B/s, far below 64 KiB per write_wait.
const TRICKLE_RCVBUF: u32 = 4096;
const TRICKLE_BYTES: usize = 16;
const TRICKLE_EVERY: Duration = Duration::from_millis(20);
/// A trickler's advertised MSS: the server's kernel then gives its socket a send buffer of tens
/// of KiB instead of megabytes (loopback's MSS is 64 KiB), so the stall shows within seconds.
const TRICKLE_MSS: u32 = 536;
/// Rooms a trickler joins at most (the server's default `websocket.max_subscriptions`).
const TRICKLE_ROOMS: usize = 256;
/// How long a trickler reads at full speed looking for its close frame before trickling again:
/// a backlog of a few hundred KiB drains in milliseconds on loopback.
const FAST_READ: Duration = Duration::from_millis(500);
/// How often a trickler looks at the server's count of slow consumers dropped.
const DROPS_POLL: Duration = Duration::from_millis(250);
/// The server's count of connections closed with 4008.
const DROPS_METRIC: &str = "herald_slow_consumers_dropped_total";
/// A slowloris client's pace: one header byte per this.
const DRIP_EVERY: Duration = Duration::from_millis(100);
/// Longest an error text kept as an outcome.
const OUTCOME_TEXT: usize = 80;

/// One kind of abusive client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Abuse {
    /// Sends a burst of pings and never reads the pongs.
    PingFlood,
    /// Sends text that is not a command until its error budget runs out.
    Garbage,
    /// Sends one text frame that is not UTF-8.
    NonUtf8,
    /// Joins every room with a tiny receive buffer and reads 16 bytes every 20 ms.
    Trickle,
    /// Opens a TCP connection to the HTTP port and sends nothing.
    IdleHttp,
    /// Sends a request's headers a byte at a time and never finishes them.
    Slowloris,
}

impl Abuse {
    pub(crate) const ALL: [Abuse; 6] =
        [Abuse::PingFlood, Abuse::Garbage, Abuse::NonUtf8, Abuse::Trickle, Abuse::IdleHttp, Abuse::Slowloris];

    fn name(self) -> &'static str {
        match self {
            Abuse::PingFlood => "ping_flood",
            Abuse::Garbage => "garbage",
            Abuse::NonUtf8 => "non_utf8",
            Abuse::Trickle => "trickle",
            Abuse::IdleHttp => "idle_http",
            Abuse::Slowloris => "slowloris",
        }
    }

    /// How the server ends this client, by SECURITY.md: close codes for WebSockets; for plain
    /// HTTP a close (`eof`), after a 408 when hyper answers the header timeout.
    pub(crate) fn expected(self) -> &'static [&'static str] {
        match self {
            Abuse::PingFlood | Abuse::Garbage => &["1008"],
            Abuse::NonUtf8 => &["1007"],
            Abuse::Trickle => &["4008"],
            Abuse::IdleHttp | Abuse::Slowloris => &["eof", "http 408"],
        }
    }
}

/// How one abusive connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The server's close frame (1006: the stream ended without one).
    Close(u16),
    /// Plain HTTP: the server answered this status, then closed.
    Http(u16),
    /// Plain HTTP: the server closed without a word.
    Eof,
    /// Anything else (connect refused, reset, a bad frame), with the reason.
    Failed(String),
}

impl Outcome {
    /// The tally key: "1008", "http 408", "eof", or the failure.
    pub(crate) fn key(&self) -> String {
        match self {
            Outcome::Close(code) => code.to_string(),
            Outcome::Http(status) => format!("http {status}"),
            Outcome::Eof => "eof".to_owned(),
            Outcome::Failed(why) => why.chars().take(OUTCOME_TEXT).collect(),
        }
    }

    fn failed(what: &str, e: impl std::fmt::Display) -> Outcome {
        Outcome::Failed(format!("{what}: {e:#}"))
    }
}

/// Counters of one kind; its tasks add to them.
#[derive(Debug, Default)]
struct AbuseStats {
    clients: AtomicU64,
    connections: AtomicU64,
    open_at_end: AtomicU64,
    rounds_unclosed: AtomicU64,
    outcomes: Mutex<BTreeMap<String, u64>>,
}

/// What every abusive task shares; held in an `Arc` by the runner and each task.
pub(crate) struct AbuseCtx {
    pub(crate) target: Target,
    pub(crate) minter: Minter,
    pub(crate) rooms: Vec<Uuid>,
    pub(crate) source: Option<IpAddr>,
    pub(crate) pause: Duration,
    stats: [AbuseStats; 6],
}

impl AbuseCtx {
    pub(crate) fn new(
        target: Target,
        minter: Minter,
        rooms: Vec<Uuid>,
        source: Option<IpAddr>,
        pause: Duration,
    ) -> Self {
        AbuseCtx { target, minter, rooms, source, pause, stats: Default::default() }
    }

    fn stats(&self, kind: Abuse) -> &AbuseStats {
        &self.stats[kind as usize]
    }

    /// One report per kind that ran.
    pub(crate) fn reports(&self) -> Vec<AbuseReport> {
        Abuse::ALL
            .iter()
            .filter(|k| self.stats(**k).clients.load(Relaxed) > 0)
            .map(|k| {
                let s = self.stats(*k);
                let outcomes = s.outcomes.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let unexpected = outcomes
                    .iter()
                    .filter(|(o, _)| !k.expected().contains(&o.as_str()))
                    .map(|(_, n)| n)
                    .sum();
                AbuseReport {
                    kind: k.name(),
                    clients: s.clients.load(Relaxed),
                    connections: s.connections.load(Relaxed),
                    expected: k.expected().to_vec(),
                    outcomes,
                    unexpected,
                    open_at_end: s.open_at_end.load(Relaxed),
                    rounds_unclosed: s.rounds_unclosed.load(Relaxed),
                }
            })
            .collect()
    }
}

/// Starts `count` clients of each kind (in `Abuse::ALL` order); they run until `stop` turns true.
pub(crate) fn spawn(ctx: &Arc<AbuseCtx>, counts: [u32; 6], stop: &watch::Receiver<bool>) -> JoinSet<()> {
    let mut tasks = JoinSet::new();
    for (kind, count) in Abuse::ALL.into_iter().zip(counts) {
        for _ in 0..count {
            ctx.stats(kind).clients.fetch_add(1, Relaxed);
            tasks.spawn(client(kind, ctx.clone(), stop.clone()));
        }
    }
    tasks
}

/// One abusive client: connect, abuse until the server ends it, tally how, pause, again.
async fn client(kind: Abuse, ctx: Arc<AbuseCtx>, mut stop: watch::Receiver<bool>) {
    let stats = ctx.stats(kind);
    loop {
        if *stop.borrow() {
            return;
        }
        stats.connections.fetch_add(1, Relaxed);
        let outcome = tokio::select! {
            _ = stop.wait_for(|s| *s) => {
                stats.open_at_end.fetch_add(1, Relaxed);
                return;
            }
            outcome = round(kind, &ctx) => outcome,
        };
        *stats.outcomes.lock().unwrap_or_else(|p| p.into_inner()).entry(outcome.key()).or_insert(0) += 1;
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            () = tokio::time::sleep(ctx.pause) => {}
        }
    }
}

/// One connection of `kind`, until the server ends it.
async fn round(kind: Abuse, ctx: &AbuseCtx) -> Outcome {
    match kind {
        Abuse::IdleHttp => match tcp(&ctx.target, ctx.source).await {
            Ok(stream) => http_end(stream, None).await,
            Err(e) => Outcome::failed("connect", e),
        },
        Abuse::Slowloris => match tcp(&ctx.target, ctx.source).await {
            Ok(mut stream) => {
                let head = format!("GET /healthz HTTP/1.1\r\nHost: {}\r\nX-Slow: ", ctx.target.host);
                if let Err(e) = stream.write_all(head.as_bytes()).await {
                    return Outcome::failed("write", e);
                }
                http_end(stream, Some(DRIP_EVERY)).await
            }
            Err(e) => Outcome::failed("connect", e),
        },
        Abuse::PingFlood | Abuse::Garbage | Abuse::NonUtf8 | Abuse::Trickle => {
            let chats =
                if kind == Abuse::Trickle { &ctx.rooms[..ctx.rooms.len().min(TRICKLE_ROOMS)] } else { &[] };
            let token = match ctx.minter.mint(chats) {
                Ok(t) => t,
                Err(e) => return Outcome::failed("token", e),
            };
            let (rcvbuf, mss) =
                if kind == Abuse::Trickle { (Some(TRICKLE_RCVBUF), Some(TRICKLE_MSS)) } else { (None, None) };
            let mut c = match WsClient::connect(&ctx.target, ctx.source, &token, 4096, rcvbuf, mss).await {
                Ok(c) => c,
                Err(e) => return Outcome::failed("connect", e),
            };
            match kind {
                Abuse::PingFlood => (0..FLOOD_PINGS).for_each(|_| c.queue_frame(OP_PING, b"")),
                Abuse::Garbage => (0..GARBAGE_COMMANDS).for_each(|_| c.queue_text(b"this is not a command")),
                Abuse::NonUtf8 => c.queue_text(&[b'{', 0xff, 0xfe, b'}']),
                _ => return trickle(c, chats, &ctx.target, ctx.stats(kind)).await,
            }
            // A write cut short by the close still leaves the close frame to read.
            let _ = c.flush_out().await;
            read_close(&mut c).await
        }
    }
}

/// Subscribes to `chats`, then reads 16 bytes every 20 ms (answering pings) until the server
/// closes it.
///
/// The close frame waits behind everything the server's kernel holds for this socket, and the
/// server gives it only `write_wait` to go out: at 800 B/s it never would. So when the server's
/// count of 4008 closes moves (it counts when it decides), the trickler reads at full speed to
/// find out whether the close was its own. Reading early costs nothing but a round (the server
/// sees progress and starts over); reading only then keeps the server's send buffer from growing.
async fn trickle(mut c: WsClient, chats: &[Uuid], target: &Target, stats: &AbuseStats) -> Outcome {
    for chat in chats {
        if let Err(e) = c.subscribe(chat, None).await {
            return Outcome::failed("subscribe", e);
        }
    }
    let drops = || async { scrape::fetch(target, &[DROPS_METRIC]).await.ok()?.get(DROPS_METRIC).copied() };
    let mut seen = drops().await;
    let mut next_poll = Instant::now() + DROPS_POLL;
    loop {
        if let Some(end) = buffered_close(&mut c) {
            return end;
        }
        match c.fill_at_most(TRICKLE_BYTES).await {
            Ok(n) if n > 0 => {}
            _ => return Outcome::Close(CLOSE_ABNORMAL),
        }
        // It answers the server's pings as any client does: one that never writes is a vanished
        // client (dropped after pong_wait without a close frame), not a slow reader.
        if c.has_output() && c.flush_out().await.is_err() {
            return Outcome::Close(CLOSE_ABNORMAL);
        }
        tokio::time::sleep(TRICKLE_EVERY).await;
        if Instant::now() < next_poll {
            continue;
        }
        next_poll = Instant::now() + DROPS_POLL;
        let now = drops().await;
        if now.is_some() && now != seen {
            seen = now;
            if let Ok(end) = tokio::time::timeout(FAST_READ, read_close(&mut c)).await {
                return end;
            }
            stats.rounds_unclosed.fetch_add(1, Relaxed);
        }
    }
}

/// A close (or a broken stream) already in the buffer; other frames are skipped unread.
fn buffered_close(c: &mut WsClient) -> Option<Outcome> {
    loop {
        match c.next_incoming() {
            Ok(Some(Incoming::Close(code))) => return Some(Outcome::Close(code)),
            Ok(Some(_)) => {}
            Ok(None) => return None,
            Err(e) => return Some(Outcome::failed("bad frame", e)),
        }
    }
}

/// Reads at full speed until the close frame (or the end of the stream: 1006).
async fn read_close(c: &mut WsClient) -> Outcome {
    loop {
        if let Some(end) = buffered_close(c) {
            return end;
        }
        if !matches!(c.fill().await, Ok(n) if n > 0) {
            return Outcome::Close(CLOSE_ABNORMAL);
        }
    }
}

/// A plain TCP connection to the server, from `source` when given.
async fn tcp(target: &Target, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let socket = if target.addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }?;
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    socket.connect(target.addr).await
}

/// Waits for the server to end a plain HTTP connection, sending one more header byte every
/// `drip` when given (slowloris). The status of any answer is kept.
async fn http_end(mut stream: TcpStream, drip: Option<Duration>) -> Outcome {
    let mut status = None;
    let mut buf = [0u8; 1024];
    loop {
        let wait = tokio::time::sleep(drip.unwrap_or(Duration::MAX));
        let read = tokio::select! {
            read = stream.read(&mut buf) => read,
            () = wait, if drip.is_some() => {
                if let Err(e) = stream.write_all(b"a").await {
                    return status.map_or_else(|| Outcome::failed("write", e), Outcome::Http);
                }
                continue;
            }
        };
        match read {
            Ok(0) => return status.map_or(Outcome::Eof, Outcome::Http),
            Ok(n) => status = status.or_else(|| http_status(&buf[..n])),
            Err(e) => return status.map_or_else(|| Outcome::failed("read", e), Outcome::Http),
        }
    }
}

/// The status code at the start of an HTTP/1.x response.
fn http_status(head: &[u8]) -> Option<u16> {
    let rest = head.strip_prefix(b"HTTP/1.")?;
    std::str::from_utf8(rest.get(2..5)?).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_keyed_and_checked_against_what_each_kind_expects() {
        assert_eq!(Outcome::Close(1008).key(), "1008");
        assert_eq!(Outcome::Http(408).key(), "http 408");
        assert_eq!(Outcome::Eof.key(), "eof");
        assert!(Outcome::failed("connect", "x".repeat(200)).key().len() == OUTCOME_TEXT);
        assert!(Abuse::PingFlood.expected().contains(&"1008"));
        assert!(!Abuse::Trickle.expected().contains(&"1006"), "a trickler must see its 4008");
        assert_eq!(http_status(b"HTTP/1.1 408 Request Timeout\r\n"), Some(408));
        assert_eq!(http_status(b"HTTP/1.0 200"), Some(200));
        assert_eq!(http_status(b"SSH-2.0"), None);
    }

    #[test]
    fn reports_count_the_unexpected_outcomes_of_each_kind_that_ran() {
        let target =
            Target { addr: "127.0.0.1:1".parse().expect("literal"), host: "h".into(), prefix: String::new() };
        let ctx = AbuseCtx::new(target, Minter::new("s"), Vec::new(), None, Duration::ZERO);
        let s = ctx.stats(Abuse::NonUtf8);
        s.clients.store(1, Relaxed);
        s.outcomes.lock().expect("fresh").extend([("1007".to_owned(), 5), ("1006".to_owned(), 2)]);
        let reports = ctx.reports();
        assert_eq!(reports.len(), 1, "kinds with no client are left out");
        assert_eq!((reports[0].kind, reports[0].unexpected), ("non_utf8", 2));
    }
}
