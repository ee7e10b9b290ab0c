//! `loadgen idle`: open N subscribed connections, hold them answering pings, optionally prove each
//! is alive with an application ping, and report connect rate and server memory per connection.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use uuid::Uuid;

use crate::cli::IdleArgs;
use crate::frame::CLOSE_ABNORMAL;
use crate::ident::room_id;
use crate::msg::{self, ServerMsg};
use crate::pool::{self, Phase, Spec};
use crate::procfs::{self, CpuMark};
use crate::progress::Progress;
use crate::report::{ConnectSummary, IdleReport};
use crate::stats::Shared;
use crate::target;
use crate::ws::{Incoming, WsClient};

/// How long connection tasks get to close cleanly before they are aborted.
const CLOSE_GRACE: Duration = Duration::from_secs(10);
/// How long the ping check waits for every pong.
const PING_CHECK_WAIT: Duration = Duration::from_secs(5);
/// Pause after the last subscribe before reading the server's RSS, so its allocations settle.
const RSS_SETTLE: Duration = Duration::from_millis(500);
/// Small read buffer: idle connections receive only acks and pings.
const BUF_SIZE: usize = 1024;

pub(crate) async fn run(args: IdleArgs) -> anyhow::Result<IdleReport> {
    let common = &args.common;
    common.check_durations(&[("--hold", args.hold)])?;
    let target = target::resolve(&common.url, common.allow_remote).await?;
    let mut notes = Vec::new();
    let conns = pool::cap_conns(args.conns, 0, &mut notes);
    let rooms: Vec<Uuid> = (0..args.rooms).map(|i| room_id(common.room_group, i)).collect();
    let shared = Arc::new(Shared::new());
    let mut progress = Progress::new(common.json);
    let pid = common.server_pid;
    let rss_before = pid.and_then(|p| procfs::rss_bytes(Some(p)).ok());
    if pid.is_some() && rss_before.is_none() {
        notes.push(format!("cannot read /proc/{}/status: no server memory figures", pid.unwrap_or(0)));
    }

    let mut spec = Spec::new(common, vec![target], rooms, BUF_SIZE);
    spec.subs_per_conn = args.subs_per_conn as usize;
    let spec = Arc::new(spec);
    let conn_shared = shared.clone();
    let (pool, phase_tx, connect_time) = pool::open_all(
        spec,
        conns,
        &shared,
        common.connect_deadline,
        CLOSE_GRACE,
        &mut progress,
        move |client, _opened, phase| connection(client, conn_shared.clone(), phase),
    )
    .await?;
    let subscribed = shared.subscribed.load(Relaxed);
    tokio::time::sleep(RSS_SETTLE).await;
    let rss_after = pid.and_then(|p| procfs::rss_bytes(Some(p)).ok());

    let hold_start = Instant::now();
    let hold_end = hold_start + args.hold;
    let mark0 = CpuMark::now(pid);
    progress.phase("hold", args.hold.as_millis() as u64);
    while Instant::now() < hold_end {
        let closed: u64 = shared.close_codes().values().sum();
        progress.set(hold_start.elapsed().as_millis() as u64, format!("ms  open {}", subscribed - closed));
        tokio::time::sleep_until(hold_end.min(Instant::now() + Duration::from_millis(250))).await;
    }
    let mark1 = CpuMark::now(pid);
    let closed: u64 = shared.close_codes().values().sum();
    let open_at_end = subscribed.saturating_sub(closed);

    let (mut ping_sent, mut ping_pongs) = (None, None);
    if args.ping_check {
        progress.phase("ping", open_at_end);
        let _ = phase_tx.send(Phase::PingCheck);
        let deadline = Instant::now() + PING_CHECK_WAIT;
        while shared.pongs.load(Relaxed) < open_at_end && Instant::now() < deadline {
            progress.set(shared.pongs.load(Relaxed), String::new());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ping_sent = Some(open_at_end);
        ping_pongs = Some(shared.pongs.load(Relaxed));
    }
    let rss_end = pid.and_then(|p| procfs::rss_bytes(Some(p)).ok());
    let loadgen_rss = procfs::rss_bytes(None).ok();
    progress.phase("close", 1);
    pool::stop(pool, &phase_tx, CLOSE_GRACE).await;
    progress.finish();

    let cpu = mark1.since(&mark0);
    let connect_secs = connect_time.as_secs_f64();
    Ok(IdleReport {
        mode: "idle",
        url: common.url.clone(),
        connect: ConnectSummary::new(args.conns, args.rooms, &shared, connect_time),
        connect_rate_per_sec: subscribed as f64 / connect_secs.max(1e-9),
        hold_secs: cpu.wall_secs,
        conns_open_at_end: open_at_end,
        close_codes: shared.close_codes(),
        server_pings_answered: shared.pings_answered.load(Relaxed),
        ping_check_sent: ping_sent,
        ping_check_pongs: ping_pongs,
        server_rss_before_bytes: rss_before,
        server_rss_after_bytes: rss_after,
        server_rss_bytes: rss_end,
        bytes_per_conn: rss_before
            .zip(rss_after)
            .map(|(before, after)| (after as f64 - before as f64) / subscribed as f64),
        bytes_per_conn_held: rss_before
            .zip(rss_end)
            .map(|(before, end)| (end as f64 - before as f64) / open_at_end.max(1) as f64),
        subs_per_conn: args.subs_per_conn,
        bytes_per_subscription: rss_before.zip(rss_after).map(|(before, after)| {
            (after as f64 - before as f64) / (subscribed as f64 * f64::from(args.subs_per_conn))
        }),
        server_cpu_secs_during_hold: cpu.server_secs,
        loadgen_cpu_secs: procfs::cpu_seconds(None).unwrap_or(0.0),
        loadgen_rss_bytes: loadgen_rss,
        notes,
    })
}

/// One held connection: answers server pings, sends the application ping when asked, counts
/// pongs, and records a server close.
async fn connection(mut client: WsClient, shared: Arc<Shared>, mut phase: watch::Receiver<Phase>) {
    'phases: loop {
        match *phase.borrow_and_update() {
            Phase::Stop => break,
            Phase::PingCheck => client.queue_text(br#"{"type":"ping"}"#),
            Phase::Run => {}
        }
        let changed = phase.changed();
        tokio::pin!(changed);
        loop {
            let mut close = None;
            let mut pongs = 0;
            loop {
                match client.next_incoming() {
                    Ok(Some(Incoming::Text(p))) => {
                        if matches!(msg::classify(p), ServerMsg::Pong) {
                            pongs += 1;
                        }
                    }
                    Ok(Some(Incoming::Binary)) => {}
                    Ok(Some(Incoming::Close(code))) => {
                        close = Some(code);
                        break;
                    }
                    Ok(None) => break,
                    Err(_) => {
                        shared.protocol_errors.fetch_add(1, Relaxed);
                        close = Some(CLOSE_ABNORMAL);
                        break;
                    }
                }
            }
            if pongs > 0 {
                shared.pongs.fetch_add(pongs, Relaxed);
            }
            shared.pings_answered.fetch_add(client.take_pings(), Relaxed);
            if let Some(code) = close {
                shared.closed(code);
                if code != CLOSE_ABNORMAL {
                    client.answer_close(code).await;
                }
                return;
            }
            if client.has_output() && client.flush_out().await.is_err() {
                shared.closed(CLOSE_ABNORMAL);
                return;
            }
            tokio::select! {
                biased;
                changed = &mut changed => {
                    if changed.is_err() {
                        break 'phases;
                    }
                    continue 'phases;
                }
                read = client.fill() => {
                    if !matches!(read, Ok(n) if n > 0) {
                        shared.closed(CLOSE_ABNORMAL);
                        return;
                    }
                }
            }
        }
    }
    client.close().await;
}
