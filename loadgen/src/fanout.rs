//! `loadgen fanout`: subscribe C connections over R rooms, publish over HTTP for warmup + window,
//! drain, close, and report throughput, latency, loss, duplicates and CPU.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::sync::watch;
use tokio::time::Instant;
use uuid::Uuid;

use crate::cli::FanoutArgs;
use crate::ident::room_id;
use crate::msg::{self, ServerMsg};
use crate::pool::{self, Opened, Phase, Spec};
use crate::procfs::{self, CpuMark};
use crate::progress::Progress;
use crate::publish::{self, unix_nanos, Plan};
use crate::report::{ConnectSummary, FanoutReport, LatencyUs, PublishSummary, Usage};
use crate::stats::{Local, SeqOutcome, SeqTracker, Shared};
use crate::target;
use crate::ws::{Incoming, WsClient};

/// How long connection tasks get to close cleanly before they are aborted.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Read buffer per connection: big enough for many frames per read.
const BUF_SIZE: usize = 16 << 10;

/// The measured window as unix nanoseconds of publish time, `[start, end)`; 0 until set.
#[derive(Debug, Default)]
struct Window {
    start: AtomicU64,
    end: AtomicU64,
}

/// What each connection task needs besides its socket.
struct Ctx {
    shared: Arc<Shared>,
    window: Window,
    run_id: u64,
    /// The rooms' ids as the server writes them, to start each room's seq check at its position.
    room_names: Vec<String>,
    /// `--presence`: each connection sends typing in its room this often.
    typing: Option<Duration>,
    /// `--inflate-every`.
    inflate_every: u32,
}

pub(crate) async fn run(args: FanoutArgs) -> anyhow::Result<FanoutReport> {
    let common = &args.common;
    common.check_durations(&[
        ("--duration", args.duration),
        ("--warmup", args.warmup),
        ("--drain", args.drain),
    ])?;
    if args.duration.is_zero() {
        bail!("--duration must be more than 0");
    }
    let api_key =
        common.api_key.clone().context("fanout publishes events: give --api-key (or LOADGEN_API_KEY)")?;
    let target = target::resolve(&common.url, common.allow_remote).await?;
    let mut targets = vec![target.clone()];
    for url in &args.also_urls {
        targets.push(target::resolve(url, common.allow_remote).await?);
    }
    let mut notes = Vec::new();
    let conns = pool::cap_conns(args.conns, u64::from(args.in_flight), &mut notes);
    let rooms: Vec<Uuid> = (0..args.rooms).map(|i| room_id(common.room_group, i)).collect();
    let run_id = Uuid::new_v4().as_u64_pair().0 >> 1;
    let shared = Arc::new(Shared::new());
    let room_names = rooms.iter().map(Uuid::to_string).collect();
    let ctx = Arc::new(Ctx {
        shared: shared.clone(),
        window: Window::default(),
        run_id,
        room_names,
        typing: common.typing(),
        inflate_every: args.inflate_every,
    });
    let mut progress = Progress::new(common.json);

    let spec = Arc::new(Spec::new(common, targets.clone(), rooms.clone(), BUF_SIZE));
    let conn_ctx = ctx.clone();
    let (pool, phase_tx, connect_time) = pool::open_all(
        spec,
        conns,
        &shared,
        common.connect_deadline,
        CLOSE_GRACE,
        &mut progress,
        move |client, opened, phase| connection(client, opened, conn_ctx.clone(), phase),
    )
    .await?;
    let subscribed = shared.subscribed.load(Relaxed);
    if subscribed < u64::from(conns) {
        notes.push(format!("only {subscribed} of {conns} connections subscribed; measuring with those"));
    }

    // Publish for warmup + window. The window is in publish-time nanoseconds so that a delivery
    // counts by when its event was sent, not when it arrived.
    let start = Instant::now();
    let window_start = start + args.warmup;
    let end = window_start + args.duration;
    let start_ns = unix_nanos() + args.warmup.as_nanos() as u64;
    ctx.window.start.store(start_ns, Relaxed);
    ctx.window.end.store(start_ns + args.duration.as_nanos() as u64, Relaxed);
    let publish_targets = if args.publish_urls.is_empty() {
        targets
    } else {
        let mut publish_targets = Vec::new();
        for url in &args.publish_urls {
            publish_targets.push(target::resolve(url, common.allow_remote).await?);
        }
        notes.push(format!("publishers post to {} only", args.publish_urls.join(", ")));
        publish_targets
    };
    let plan = Arc::new(Plan {
        targets: publish_targets,
        api_key,
        rooms: rooms.clone(),
        batch: args.batch as usize,
        rate: args.rate,
        in_flight: args.in_flight as usize,
        start,
        end,
        run_id,
        content: crate::deflate::prose(args.content_bytes as usize),
        events: None,
    });
    let pstats = Arc::new(publish::Stats::new(rooms.len()));
    let publisher = publish::spawn_thread(plan, pstats.clone())?;

    let total = (args.warmup + args.duration).as_millis() as u64;
    progress.phase("publish", total);
    let tick = |progress: &Progress| {
        let shown = start.elapsed().as_millis().min(u128::from(total)) as u64;
        progress.set(
            shown,
            format!(
                "ms  events {}  deliveries {}",
                pstats.events_accepted.load(Relaxed),
                shared.own_deliveries.load(Relaxed)
            ),
        );
    };
    while Instant::now() < window_start {
        tick(&progress);
        tokio::time::sleep_until(window_start.min(Instant::now() + Duration::from_millis(200))).await;
    }
    let mark0 = CpuMark::now(common.server_pid);
    while Instant::now() < end {
        tick(&progress);
        tokio::time::sleep_until(end.min(Instant::now() + Duration::from_millis(200))).await;
    }
    let mark1 = CpuMark::now(common.server_pid);
    let server_rss = common.server_pid.and_then(|p| procfs::rss_bytes(Some(p)).ok());
    // Workers stop by themselves at `end`; an outstanding request times out on its own.
    if tokio::time::timeout(Duration::from_secs(15), publisher).await.is_err() {
        notes.push("publishers did not stop in time".to_owned());
    }
    progress.phase("drain", 1);
    tokio::time::sleep(args.drain).await;
    let loadgen_rss = procfs::rss_bytes(None).ok();
    progress.phase("close", 1);
    let per_room = pool.per_room.clone();
    pool::stop(pool, &phase_tx, CLOSE_GRACE).await;
    progress.finish();

    let cpu = mark1.since(&mark0);
    let deliveries = shared.window_deliveries.load(Relaxed);
    let expected: u64 = pstats
        .accepted_per_room
        .iter()
        .zip(per_room.iter())
        .map(|(events, subs)| events.load(Relaxed) * subs.load(Relaxed))
        .sum();
    let received = shared.own_deliveries.load(Relaxed);
    let arrived = shared.arrived_window_deliveries.load(Relaxed);
    if args.inflate_every > 1 {
        notes.push(format!(
            "--inflate-every {}: deliveries, deliveries_per_sec and latency count sampled deliveries only; \
             compare runs by deliveries_arrived and server_cpu_us_per_arrived_delivery; clients asked for \
             server_no_context_takeover (skipped messages would break a kept window), so wire bytes \
             are those of standalone frames",
            args.inflate_every
        ));
    }
    if pstats.aborted.load(Relaxed) {
        notes.push("the server refused the API key (401): publishing stopped".to_owned());
    }
    Ok(FanoutReport {
        mode: "fanout",
        url: common.url.clone(),
        connect: ConnectSummary::new(args.conns, args.rooms, &shared, connect_time),
        batch: args.batch,
        rate_target: args.rate,
        warmup_secs: args.warmup.as_secs_f64(),
        duration_secs: args.duration.as_secs_f64(),
        publish_requests: pstats.requests.load(Relaxed),
        published: PublishSummary::new(&pstats, (args.warmup + args.duration).as_secs_f64()),
        deliveries,
        deliveries_per_sec: deliveries as f64 / args.duration.as_secs_f64(),
        latency_us: LatencyUs::from_histogram(&shared.latency()),
        deliveries_total: received,
        expected_deliveries: expected,
        lost: expected.saturating_sub(received),
        lost_exact: pstats.events_uncertain.load(Relaxed) == 0,
        extra_deliveries: received.saturating_sub(expected),
        seq_gap_missing: shared.gap_missing.load(Relaxed),
        duplicated: shared.duplicated.load(Relaxed),
        foreign_deliveries: shared.foreign_deliveries.load(Relaxed),
        malformed_frames: shared.malformed.load(Relaxed),
        protocol_errors: shared.protocol_errors.load(Relaxed),
        close_codes: shared.close_codes(),
        usage: Usage::new(&cpu, loadgen_rss, server_rss),
        server_cpu_us_per_delivery: cpu
            .server_secs
            .filter(|_| deliveries > 0 && args.inflate_every == 1)
            .map(|s| s * 1e6 / deliveries as f64),
        deliveries_arrived: arrived,
        server_cpu_us_per_arrived_delivery: cpu
            .server_secs
            .filter(|_| arrived > 0)
            .map(|s| s * 1e6 / arrived as f64),
        inflate_every: args.inflate_every,
        uninflated_deliveries: shared.uninflated_deliveries.load(Relaxed),
        presence: crate::report::PresenceSummary::read(common),
        compress: common.compress,
        wire_bytes_per_delivery: (received > 0)
            .then(|| crate::deflate::wire_bytes() as f64 / received as f64),
        notes,
    })
}

/// One subscribed connection: reads deliveries until told to stop or the server closes.
async fn connection(mut client: WsClient, opened: Opened, ctx: Arc<Ctx>, mut phase: watch::Receiver<Phase>) {
    let mut local = Local::default();
    let mut seqs = SeqTracker::default();
    if let Some(seq) = opened.seq {
        // Checked from the position the server told, so a missing first event is a gap too.
        seqs.start(ctx.room_names[opened.room].as_bytes(), seq);
    }
    // Deliveries counted unread since the last one read: the next one read must be that many
    // further on (each connection is in one room, so every compressed frame is its room's).
    let mut unread = 0u64;
    client.sample_inflation(ctx.inflate_every);
    let shared = &ctx.shared;
    // Typing starts spread over the first interval, so connections do not send in step.
    let mut next_typing = ctx.typing.map(|every| Instant::now() + first_typing(every, opened.index));
    'phases: loop {
        if *phase.borrow_and_update() == Phase::Stop {
            break;
        }
        let changed = phase.changed();
        tokio::pin!(changed);
        loop {
            // Everything read so far arrived "now": one clock read per socket read.
            let now = unix_nanos();
            let window = (ctx.window.start.load(Relaxed), ctx.window.end.load(Relaxed));
            let mut close = None;
            loop {
                match client.next_incoming() {
                    Ok(Some(Incoming::Text(p))) => {
                        on_text(p, now, window, ctx.run_id, &mut seqs, &mut unread, &mut local)
                    }
                    Ok(Some(Incoming::Uninflated)) => {
                        unread += 1;
                        local.own += 1;
                        local.uninflated += 1;
                        if now >= window.0 && now < window.1 {
                            local.arrived_in_window += 1;
                        }
                    }
                    Ok(Some(Incoming::Binary)) => local.malformed += 1,
                    Ok(Some(Incoming::Close(code))) => {
                        close = Some(code);
                        break;
                    }
                    Ok(None) => break,
                    Err(_) => {
                        shared.protocol_errors.fetch_add(1, Relaxed);
                        close = Some(crate::frame::CLOSE_ABNORMAL);
                        break;
                    }
                }
            }
            shared.flush(&mut local);
            shared.pings_answered.fetch_add(client.take_pings(), Relaxed);
            if let Some(code) = close {
                shared.closed(code);
                if code != crate::frame::CLOSE_ABNORMAL {
                    client.answer_close(code).await;
                }
                return;
            }
            if client.has_output() && client.flush_out().await.is_err() {
                shared.closed(crate::frame::CLOSE_ABNORMAL);
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
                () = tokio::time::sleep_until(next_typing.unwrap_or_else(Instant::now)), if next_typing.is_some() => {
                    client.queue_typing(&ctx.room_names[opened.room]);
                    next_typing = next_typing.zip(ctx.typing).map(|(at, every)| at + every);
                }
                read = client.fill() => {
                    if !matches!(read, Ok(n) if n > 0) {
                        shared.closed(crate::frame::CLOSE_ABNORMAL);
                        return;
                    }
                }
            }
        }
    }
    client.close().await;
}

/// When connection `index` first sends typing: spread over one interval.
pub(crate) fn first_typing(every: Duration, index: usize) -> Duration {
    every.mul_f64((index % 101) as f64 / 101.0)
}

/// Accounts one text frame: seq check, ownership, window and latency. `unread` deliveries were
/// counted before it without being read (`--inflate-every`): the seq check expects a delivery
/// that many further on.
fn on_text(
    p: &[u8],
    now: u64,
    window: (u64, u64),
    run_id: u64,
    seqs: &mut SeqTracker,
    unread: &mut u64,
    local: &mut Local,
) {
    match msg::classify(p) {
        ServerMsg::Delivery(d) => {
            if *unread > 0 && !seqs.skip_sole(std::mem::take(unread)) {
                // Unread deliveries whose room is unknown: the check cannot place them.
                local.malformed += 1;
            }
            match seqs.observe(d.chat_id, d.seq) {
                SeqOutcome::Duplicate => {
                    local.duplicated += 1;
                    return;
                }
                SeqOutcome::Gap(n) => local.gap_missing += n,
                SeqOutcome::First | SeqOutcome::InOrder => {}
            }
            if d.run != Some(run_id) {
                local.foreign += 1;
                return;
            }
            local.own += 1;
            if now >= window.0 && now < window.1 {
                local.arrived_in_window += 1;
            }
            if let Some(ts) = d.ts {
                if ts >= window.0 && ts < window.1 {
                    local.in_window += 1;
                    local.latencies_us.push(now.saturating_sub(ts) / 1000);
                }
            }
        }
        ServerMsg::Malformed => local.malformed += 1,
        ServerMsg::Pong => local.pongs += 1,
        ServerMsg::Subscribed(_) | ServerMsg::Error(_) | ServerMsg::Other => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(seq: u64, ts: u64, run: u64) -> String {
        format!(
            r#"{{"type":"message.new","chat_id":"c","seq":{seq},"data":{{"id":"i","content":"x","ts":{ts},"run":{run}}}}}"#
        )
    }

    #[test]
    fn accounts_window_latency_gaps_duplicates_and_foreign_events() {
        let mut seqs = SeqTracker::default();
        let mut local = Local::default();
        let window = (1_000_000, 2_000_000);
        let now = 2_500_000;
        for (seq, ts, run) in [
            (1, 500_000, 7),   // own, before the window
            (2, 1_000_000, 7), // own, in window: 1500 us
            (2, 1_000_000, 7), // duplicate
            (5, 1_900_000, 7), // gap of 2, in window: 600 us
            (6, 1_950_000, 9), // another run's event
            (7, 2_000_000, 7), // own, after the window
        ] {
            on_text(frame(seq, ts, run).as_bytes(), now, window, 7, &mut seqs, &mut 0, &mut local);
        }
        assert_eq!((local.own, local.in_window, local.foreign), (4, 2, 1));
        assert_eq!((local.duplicated, local.gap_missing), (1, 2));
        assert_eq!(local.latencies_us, vec![1500, 600]);
    }

    #[test]
    fn deliveries_counted_unread_keep_the_seq_check_exact() {
        let mut seqs = SeqTracker::default();
        seqs.start(b"c", 10);
        let mut local = Local::default();
        let window = (0, u64::MAX);
        let mut read = |seq, unread: u64, local: &mut Local| {
            on_text(frame(seq, 1, 7).as_bytes(), 5, window, 7, &mut seqs, &mut { unread }, local)
        };
        read(11, 0, &mut local);
        read(15, 3, &mut local); // 12..=14 counted unread
        assert_eq!((local.gap_missing, local.duplicated), (0, 0));
        read(20, 3, &mut local); // one of 16..=19 never came
        assert_eq!((local.gap_missing, local.duplicated), (1, 0));
        read(22, 2, &mut local); // one more counted than sent: 21 twice
        assert_eq!(local.duplicated, 1);
    }
}
