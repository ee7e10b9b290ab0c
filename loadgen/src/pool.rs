//! Opening many subscribed connections: bounded concurrency, a per-connection timeout, an overall
//! deadline, round-robin rooms and source addresses, and the open-files cap; and reopening one
//! connection with `since` after it dropped. Shared by every mode.

use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use uuid::Uuid;

use crate::cli::{CommonArgs, Layout};
use crate::ident::Minter;
use crate::msg::Subscribed;
use crate::procfs;
use crate::progress::Progress;
use crate::stats::Shared;
use crate::target::Target;
use crate::ws::WsClient;

/// File descriptors kept free for the runtime, stdio, /proc reads and the publishers.
const SPARE_FDS: u64 = 64;

/// What the runner tells every connection task, through a `watch` channel it holds the sender of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Keep reading and answering pings.
    Run,
    /// Idle mode: send one `{"type":"ping"}` and keep running.
    PingCheck,
    /// Close the connection and end the task.
    Stop,
}

/// How to open the connections.
pub(crate) struct Spec {
    /// Nodes to connect to, chosen by `layout` (see [`Spec::node`]).
    pub(crate) targets: Vec<Target>,
    /// Where each connection first connects when there are several nodes.
    pub(crate) layout: Layout,
    pub(crate) minter: Minter,
    pub(crate) sources: Vec<IpAddr>,
    pub(crate) rooms: Vec<Uuid>,
    pub(crate) concurrency: usize,
    pub(crate) connect_timeout: Duration,
    /// Initial read buffer per connection (it grows for big frames).
    pub(crate) buf_size: usize,
    /// Rooms each connection subscribes to: connection `i` takes rooms `(i * n + j) % rooms`.
    pub(crate) subs_per_conn: usize,
    /// SO_RCVBUF for connection `i`, when it should have a small one (stalled readers).
    pub(crate) recv_buffer: Option<RecvBufferFor>,
    /// Subscribe with `"presence":true` (`--presence`).
    pub(crate) presence: bool,
}

/// Chooses SO_RCVBUF by connection index; `None` leaves the kernel default.
pub(crate) type RecvBufferFor = Arc<dyn Fn(usize) -> Option<u32> + Send + Sync>;

/// Where a freshly subscribed connection stands, handed to the mode's connection task.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Opened {
    pub(crate) index: usize,
    /// Index of its (first) room.
    pub(crate) room: usize,
    pub(crate) source: Option<IpAddr>,
    /// The first room's position from `subscribed`.
    pub(crate) seq: Option<u64>,
}

impl Spec {
    /// The connection plan every mode shares, from the common flags.
    pub(crate) fn new(common: &CommonArgs, targets: Vec<Target>, rooms: Vec<Uuid>, buf_size: usize) -> Spec {
        Spec {
            targets,
            layout: Layout::Spread,
            minter: Minter::new(&common.jwt_secret),
            sources: common.source_addrs.clone(),
            rooms,
            concurrency: common.connect_concurrency as usize,
            connect_timeout: common.connect_timeout,
            buf_size,
            subs_per_conn: 1,
            recv_buffer: None,
            presence: common.presence,
        }
    }

    /// Index into `targets` of the node connection `index` uses after `hops` reconnects: its
    /// first node by the layout (spread: a room's connections alternate over the nodes; by-room:
    /// all of room r's on node r % nodes), then the next nodes round-robin.
    pub(crate) fn node(&self, index: usize, hops: usize) -> usize {
        let (rooms, nodes) = (self.rooms.len().max(1), self.targets.len().max(1));
        let first = match self.layout {
            Layout::Spread => index / rooms,
            Layout::ByRoom => index * self.subs_per_conn.max(1) % rooms,
        };
        (first % nodes + hops % nodes) % nodes
    }
}

/// Connection tasks and their bookkeeping.
pub(crate) struct Pool {
    pub(crate) tasks: JoinSet<()>,
    /// Subscriptions per room index (to compute expected deliveries).
    pub(crate) per_room: Arc<Vec<AtomicU64>>,
    /// Set when the connect deadline passed: tasks still waiting for a permit give up.
    pub(crate) gave_up: Arc<AtomicBool>,
}

/// Caps `requested` connections to what the open-files limit allows, with a note saying so.
pub(crate) fn cap_conns(requested: u32, other_fds: u64, notes: &mut Vec<String>) -> u32 {
    let Some(limit) = procfs::open_files_limit() else { return requested };
    let usable = limit.saturating_sub(SPARE_FDS + other_fds);
    if u64::from(requested) <= usable {
        return requested;
    }
    let held = usable.min(u64::from(u32::MAX)) as u32;
    notes.push(format!(
        "requested {requested} connections, but one process may open only {limit} files \
         (RLIMIT_NOFILE), so this run holds {held}; run several loadgen processes (with the same \
         --room-group they share rooms, and --source-addrs spreads ephemeral ports) for more"
    ));
    held
}

/// Spawns `count` connection tasks. Connection `i` subscribes to its rooms (room `i % rooms` with
/// one subscription per connection) from source `i % sources`, then hands the client to `run`
/// until the phase says stop.
pub(crate) fn spawn<F, Fut>(
    spec: Arc<Spec>,
    count: u32,
    shared: Arc<Shared>,
    phase: watch::Receiver<Phase>,
    run: F,
) -> Pool
where
    F: Fn(WsClient, Opened, watch::Receiver<Phase>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(spec.concurrency.max(1)));
    let per_room: Arc<Vec<AtomicU64>> = Arc::new(spec.rooms.iter().map(|_| AtomicU64::new(0)).collect());
    let gave_up = Arc::new(AtomicBool::new(false));
    let mut tasks = JoinSet::new();
    for i in 0..count as usize {
        let (spec, shared, phase, run) = (spec.clone(), shared.clone(), phase.clone(), run.clone());
        let (permits, per_room, gave_up) = (permits.clone(), per_room.clone(), gave_up.clone());
        tasks.spawn(async move {
            let source = (!spec.sources.is_empty()).then(|| spec.sources[i % spec.sources.len()]);
            let (client, seq) = {
                // The permit bounds concurrent handshakes; it is released once subscribed.
                let Ok(_permit) = permits.acquire().await else { return };
                if gave_up.load(Relaxed) || *phase.borrow() == Phase::Stop {
                    return;
                }
                let opened = tokio::time::timeout(spec.connect_timeout, open(&spec, i, source)).await;
                match opened.unwrap_or_else(|_| Err(anyhow::anyhow!("handshake + subscribe timed out"))) {
                    Ok(opened) => opened,
                    Err(e) => {
                        shared.connect_failed(&e);
                        return;
                    }
                }
            };
            if gave_up.load(Relaxed) {
                // Measurement has started without it: counting it would skew expected deliveries.
                shared.connect_failed(&anyhow::anyhow!("subscribed after the connect deadline"));
                client.close().await;
                return;
            }
            for room in rooms_of(&spec, i) {
                per_room[room].fetch_add(1, Relaxed);
            }
            shared.subscribed.fetch_add(1, Relaxed);
            let room = i * spec.subs_per_conn % spec.rooms.len();
            run(client, Opened { index: i, room, source, seq }, phase).await;
        });
    }
    Pool { tasks, per_room, gave_up }
}

/// Room indexes connection `index` subscribes to (distinct while `subs_per_conn <= rooms`).
fn rooms_of(spec: &Spec, index: usize) -> impl Iterator<Item = usize> + '_ {
    let n = spec.subs_per_conn.max(1);
    (0..n).map(move |j| (index * n + j) % spec.rooms.len())
}

/// Connects connection `index` and subscribes it to its rooms; returns the first room's `seq`.
async fn open(spec: &Spec, index: usize, source: Option<IpAddr>) -> anyhow::Result<(WsClient, Option<u64>)> {
    let chats: Vec<Uuid> = rooms_of(spec, index).map(|r| spec.rooms[r]).collect();
    let token = spec.minter.mint(&chats)?;
    let recv_buffer = spec.recv_buffer.as_ref().and_then(|f| f(index));
    let target = &spec.targets[spec.node(index, 0)];
    let mut client = WsClient::connect(target, source, &token, spec.buf_size, recv_buffer, None).await?;
    client.presence = spec.presence;
    let mut first = None;
    for chat in &chats {
        let answer = client.subscribe(chat, None).await.context("subscribe")?;
        first = first.or(Some(answer.seq));
    }
    Ok((client, first.flatten()))
}

/// Opens connection `opened.index` again after it dropped: a fresh token and socket (same source
/// and receive buffer) to node `node` (an index into `spec.targets`), then `subscribe` to room
/// index `room` with `since`. Returns the client and the server's answer. Single-room
/// connections only (`subs_per_conn` 1).
pub(crate) async fn reopen(
    spec: &Spec,
    opened: &Opened,
    node: usize,
    room: usize,
    since: Option<u64>,
) -> anyhow::Result<(WsClient, Subscribed)> {
    let chat = spec.rooms[room];
    let token = spec.minter.mint(&[chat])?;
    let recv_buffer = spec.recv_buffer.as_ref().and_then(|f| f(opened.index));
    let target = &spec.targets[node % spec.targets.len()];
    let connect = async {
        let mut client =
            WsClient::connect(target, opened.source, &token, spec.buf_size, recv_buffer, None).await?;
        client.presence = spec.presence;
        let answer = client.subscribe(&chat, since).await.context("subscribe")?;
        anyhow::Ok((client, answer))
    };
    tokio::time::timeout(spec.connect_timeout, connect)
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("handshake + subscribe timed out")))
}

/// Opens `count` connections (each running `run` once subscribed), waits until they settle
/// within `deadline`, and fails if none subscribed. Returns the pool, the phase switch that
/// stops it, and how long connecting took.
pub(crate) async fn open_all<F, Fut>(
    spec: Arc<Spec>,
    count: u32,
    shared: &Arc<Shared>,
    deadline: Duration,
    close_grace: Duration,
    progress: &mut Progress,
    run: F,
) -> anyhow::Result<(Pool, watch::Sender<Phase>, Duration)>
where
    F: Fn(WsClient, Opened, watch::Receiver<Phase>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (phase_tx, phase_rx) = watch::channel(Phase::Run);
    progress.phase("connect", u64::from(count));
    let pool = spawn(spec, count, shared.clone(), phase_rx, run);
    let connect_time = wait_settled(&pool, shared, count, deadline, progress).await;
    if shared.subscribed.load(Relaxed) == 0 {
        progress.finish();
        stop(pool, &phase_tx, close_grace).await;
        anyhow::bail!("no connection subscribed: {}", shared.connect_error_summary());
    }
    Ok((pool, phase_tx, connect_time))
}

/// Waits until every connection subscribed or failed, or `deadline` passed; returns the wait.
pub(crate) async fn wait_settled(
    pool: &Pool,
    shared: &Shared,
    count: u32,
    deadline: Duration,
    progress: &Progress,
) -> Duration {
    let started = Instant::now();
    loop {
        let ok = shared.subscribed.load(Relaxed);
        let failed = shared.connect_errors.load(Relaxed);
        progress.set(ok + failed, format!("subscribed {ok}, failed {failed}"));
        if ok + failed >= u64::from(count) {
            break;
        }
        if started.elapsed() >= deadline {
            pool.gave_up.store(true, Relaxed);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    started.elapsed()
}

/// Tells every task to stop and waits up to `grace` for them, then aborts the rest.
pub(crate) async fn stop(mut pool: Pool, phase: &watch::Sender<Phase>, grace: Duration) {
    pool.gave_up.store(true, Relaxed);
    let _ = phase.send(Phase::Stop);
    let joined = tokio::time::timeout(grace, async { while pool.tasks.join_next().await.is_some() {} }).await;
    if joined.is_err() {
        pool.tasks.abort_all();
        while pool.tasks.join_next().await.is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ident::room_id;

    #[test]
    fn nodes_by_layout_then_round_robin_on_every_reconnect() {
        let target = |port| Target {
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            host: format!("127.0.0.1:{port}"),
            prefix: String::new(),
        };
        let mut spec = Spec {
            targets: vec![target(1), target(2)],
            layout: Layout::Spread,
            minter: Minter::new("s"),
            sources: Vec::new(),
            rooms: (0..3).map(|i| room_id(0, i)).collect(),
            concurrency: 1,
            connect_timeout: Duration::from_secs(1),
            buf_size: 1024,
            subs_per_conn: 1,
            recv_buffer: None,
            presence: false,
        };
        // Spread: connections 0..3 (rooms 0, 1, 2) on node 0, 3..6 on node 1.
        let first: Vec<usize> = (0..6).map(|i| spec.node(i, 0)).collect();
        assert_eq!(first, [0, 0, 0, 1, 1, 1]);
        // By room: room r's connections (i % 3 == r) start on node r % 2.
        spec.layout = Layout::ByRoom;
        let first: Vec<usize> = (0..6).map(|i| spec.node(i, 0)).collect();
        assert_eq!(first, [0, 1, 0, 0, 1, 0]);
        // Every reconnect moves to the next node.
        assert_eq!((0..4).map(|h| spec.node(1, h)).collect::<Vec<_>>(), [1, 0, 1, 0]);
        spec.targets.truncate(1);
        assert_eq!((0..3).map(|h| spec.node(4, h)).collect::<Vec<_>>(), [0, 0, 0]);
    }

    #[test]
    fn caps_to_the_open_files_limit() {
        let limit = procfs::open_files_limit().expect("linux");
        let mut notes = Vec::new();
        assert_eq!(cap_conns(10, 8, &mut notes), 10);
        assert!(notes.is_empty());
        let huge = u32::try_from(limit + 1000).unwrap_or(u32::MAX);
        let held = cap_conns(huge, 8, &mut notes);
        assert_eq!(u64::from(held), limit - SPARE_FDS - 8);
        assert!(notes[0].contains("several loadgen processes"), "{}", notes[0]);
    }
}
