//! `loadgen recovery`: publish at a fixed rate while a fraction of connections repeatedly drop
//! their socket and resume with `since`, and another fraction stops reading for a while; report,
//! per class, whether every connection saw every seq of its room exactly once.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::sync::watch;
use tokio::time::Instant;
use uuid::Uuid;

use crate::cli::RecoveryArgs;
use crate::frame::CLOSE_ABNORMAL;
use crate::ident::room_id;
use crate::msg::{self, ServerMsg, Subscribed};
use crate::pool::{self, Opened, Phase, Spec};
use crate::procfs::{self, CpuMark};
use crate::progress::Progress;
use crate::publish::{self, Plan};
use crate::report::{ClassReport, ConnectSummary, RecoveryReport};
use crate::scrape;
use crate::stats::{SeqOutcome, Shared};
use crate::target;
use crate::ws::{Incoming, WsClient};

/// How long connection tasks get to close cleanly before they are aborted.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Read buffer per connection.
const BUF_SIZE: usize = 16 << 10;
/// Pause between failed reconnect attempts.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(100);
/// The server metrics compared before and after the run.
const METRICS: &[&str] = &[
    "herald_catchups_total",
    "herald_recoveries_total",
    "herald_slow_consumers_dropped_total",
    "herald_history_frames",
    "herald_history_bytes",
    "herald_closes_total",
];

/// What a connection does besides reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// Reads all the time.
    Steady,
    /// Drops its socket at random moments and resumes with `since`.
    Churn,
    /// Stops reading for a while (small SO_RCVBUF), then resumes.
    Stall,
}

impl Class {
    const ALL: [Class; 3] = [Class::Steady, Class::Churn, Class::Stall];

    fn name(self) -> &'static str {
        match self {
            Class::Steady => "steady",
            Class::Churn => "churn",
            Class::Stall => "stall",
        }
    }
}

/// The first `churn` connections churn, the next `stall` stall, the rest are steady; since
/// connection `i` joins room `i % rooms`, every class spreads over the rooms.
fn class_of(index: usize, churn: usize, stall: usize) -> Class {
    if index < churn {
        Class::Churn
    } else if index < churn + stall {
        Class::Stall
    } else {
        Class::Steady
    }
}

/// One connection's position in its room, kept across reconnects: the `since` it resumes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Resume {
    last: u64,
}

/// What a `subscribed` answer to a resume means for the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resumed {
    /// Every missed event follows; `behind` of them.
    Recovered { behind: u64 },
    /// History did not reach back: `skipped` events will never arrive; live from `seq + 1`.
    NotRecovered { skipped: u64 },
    /// The answer had no `recovered` field (a server without recovery); treated as not recovered.
    Unanswered { skipped: u64 },
}

impl Resume {
    /// Starts at the room position the first `subscribed` reported.
    pub(crate) fn new(seq: u64) -> Self {
        Resume { last: seq }
    }

    /// The last seq seen: the `since` of the next resume.
    pub(crate) fn since(&self) -> u64 {
        self.last
    }

    /// Checks one delivered seq against the last.
    pub(crate) fn observe(&mut self, seq: u64) -> SeqOutcome {
        if seq <= self.last {
            return SeqOutcome::Duplicate;
        }
        let before = std::mem::replace(&mut self.last, seq);
        match seq - before {
            1 => SeqOutcome::InOrder,
            n => SeqOutcome::Gap(n - 1),
        }
    }

    /// Takes the answer to `subscribe` with `since = self.since()`. When recovered, the replay
    /// is checked like live events; otherwise the stream restarts after the answer's `seq`.
    pub(crate) fn resumed(&mut self, answer: Subscribed) -> Resumed {
        let seq = answer.seq.unwrap_or(self.last);
        let behind = seq.saturating_sub(self.last);
        match answer.recovered {
            Some(true) => Resumed::Recovered { behind },
            other => {
                self.last = seq;
                if other.is_some() {
                    Resumed::NotRecovered { skipped: behind }
                } else {
                    Resumed::Unanswered { skipped: behind }
                }
            }
        }
    }
}

/// Counters of one class; every connection task of the class adds to them.
#[derive(Debug, Default)]
struct ClassStats {
    conns: AtomicU64,
    expected: AtomicU64,
    deliveries: AtomicU64,
    gap_missing: AtomicU64,
    duplicated: AtomicU64,
    tail_missing: AtomicU64,
    foreign: AtomicU64,
    malformed: AtomicU64,
    drops: AtomicU64,
    stalls: AtomicU64,
    resumes: AtomicU64,
    recovered: AtomicU64,
    recovered_events: AtomicU64,
    max_behind: AtomicU64,
    not_recovered: AtomicU64,
    not_recovered_skipped: AtomicU64,
    reconnect_errors: AtomicU64,
    not_recovered_reasons: Mutex<BTreeMap<String, u64>>,
    reconnect_error_kinds: Mutex<BTreeMap<String, u64>>,
    close_codes: Mutex<BTreeMap<u16, u64>>,
}

/// Per-read tallies of one connection, added to its [`ClassStats`] after each socket read.
#[derive(Debug, Default)]
struct Tally {
    deliveries: u64,
    gap_missing: u64,
    duplicated: u64,
    foreign: u64,
    malformed: u64,
}

impl ClassStats {
    fn flush(&self, t: &mut Tally) {
        for (counter, value) in [
            (&self.deliveries, t.deliveries),
            (&self.gap_missing, t.gap_missing),
            (&self.duplicated, t.duplicated),
            (&self.foreign, t.foreign),
            (&self.malformed, t.malformed),
        ] {
            if value != 0 {
                counter.fetch_add(value, Relaxed);
            }
        }
        *t = Tally::default();
    }

    fn count(map: &Mutex<BTreeMap<String, u64>>, key: String) {
        *map.lock().unwrap_or_else(|p| p.into_inner()).entry(key).or_insert(0) += 1;
    }

    fn closed(&self, code: u16) {
        *self.close_codes.lock().unwrap_or_else(|p| p.into_inner()).entry(code).or_insert(0) += 1;
    }

    fn report(&self, name: &'static str) -> ClassReport {
        let get = |a: &AtomicU64| a.load(Relaxed);
        let clone = |m: &Mutex<BTreeMap<String, u64>>| m.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let expected = get(&self.expected);
        let accounted = get(&self.deliveries) + get(&self.not_recovered_skipped);
        ClassReport {
            class: name,
            conns: get(&self.conns),
            expected_deliveries: expected,
            deliveries: get(&self.deliveries),
            lost: expected.saturating_sub(accounted),
            gap_missing: get(&self.gap_missing),
            tail_missing: get(&self.tail_missing),
            duplicated: get(&self.duplicated),
            foreign_deliveries: get(&self.foreign),
            malformed_frames: get(&self.malformed),
            drops: get(&self.drops),
            stalls: get(&self.stalls),
            resumes: get(&self.resumes),
            recovered: get(&self.recovered),
            recovered_events: get(&self.recovered_events),
            max_behind_on_resume: get(&self.max_behind),
            not_recovered: get(&self.not_recovered),
            not_recovered_skipped: get(&self.not_recovered_skipped),
            not_recovered_reasons: clone(&self.not_recovered_reasons),
            reconnect_errors: get(&self.reconnect_errors),
            reconnect_error_kinds: clone(&self.reconnect_error_kinds),
            close_codes: self.close_codes.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }
}

/// What every connection task shares. Lives in an `Arc` held by the runner and every task.
struct Ctx {
    spec: Arc<Spec>,
    run_id: u64,
    churn: usize,
    stall: usize,
    churn_every: Duration,
    outage: Duration,
    stall_for: Duration,
    stall_every: Duration,
    history_size: u64,
    classes: [ClassStats; 3],
    /// Connections whose first `subscribed` carried no `seq` (a server without recovery): their
    /// expected position is a guess.
    no_position: AtomicU64,
    /// When drops and stalls may happen: set once publishing starts (`None` before).
    disrupt_window: Mutex<Option<(Instant, Instant)>>,
    /// The publishers' counts: the events each room should have delivered.
    published: Arc<publish::Stats>,
}

impl Ctx {
    fn stats(&self, class: Class) -> &ClassStats {
        &self.classes[class as usize]
    }

    fn window(&self) -> Option<(Instant, Instant)> {
        *self.disrupt_window.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub(crate) async fn run(args: RecoveryArgs) -> anyhow::Result<RecoveryReport> {
    let common = &args.common;
    common.check_durations(&[
        ("--duration", args.duration),
        ("--drain", args.drain),
        ("--churn-every", args.churn_every),
        ("--outage", args.outage),
        ("--stall-for", args.stall_for),
        ("--stall-every", args.stall_every),
    ])?;
    if args.duration.is_zero() {
        bail!("--duration must be more than 0");
    }
    if args.churn + args.stall > 1.0 {
        bail!("--churn {} + --stall {} is more than every connection", args.churn, args.stall);
    }
    if args.churn_every.is_zero() || args.stall_every.is_zero() {
        bail!("--churn-every and --stall-every must be more than 0");
    }
    let api_key =
        common.api_key.clone().context("recovery publishes events: give --api-key (or LOADGEN_API_KEY)")?;
    let target = target::resolve(&common.url, common.allow_remote).await?;
    let mut notes = Vec::new();
    let conns = pool::cap_conns(args.conns, u64::from(args.in_flight) + 1, &mut notes);
    let churn = (f64::from(conns) * args.churn).round() as usize;
    let stall = ((f64::from(conns) * args.stall).round() as usize).min(conns as usize - churn);
    let rooms: Vec<Uuid> = (0..args.rooms).map(|i| room_id(common.room_group, i)).collect();
    let run_id = Uuid::new_v4().as_u64_pair().0 >> 1;
    let shared = Arc::new(Shared::new());
    let published = Arc::new(publish::Stats::new(rooms.len()));
    let mut progress = Progress::new(common.json);

    let mut spec = Spec::new(common, vec![target.clone()], rooms.clone(), BUF_SIZE);
    let rcvbuf = args.stall_rcvbuf;
    spec.recv_buffer = Some(Arc::new(move |i| (class_of(i, churn, stall) == Class::Stall).then_some(rcvbuf)));
    let spec = Arc::new(spec);
    let ctx = Arc::new(Ctx {
        spec: spec.clone(),
        run_id,
        churn,
        stall,
        churn_every: args.churn_every,
        outage: args.outage,
        stall_for: args.stall_for,
        stall_every: args.stall_every,
        history_size: args.history_size,
        classes: Default::default(),
        no_position: AtomicU64::new(0),
        disrupt_window: Mutex::new(None),
        published: published.clone(),
    });
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
    let metrics_before = match scrape::fetch(&target, METRICS).await {
        Ok(m) => Some(m),
        Err(e) => {
            notes.push(format!("no server metrics: {e:#}"));
            None
        }
    };

    let start = Instant::now();
    let end = start + args.duration;
    *ctx.disrupt_window.lock().unwrap_or_else(|p| p.into_inner()) = Some((start, end));
    // Wake every task so churners and stallers schedule their first disruption.
    let _ = phase_tx.send(Phase::Run);
    let plan = Arc::new(Plan {
        targets: vec![target.clone()],
        api_key,
        rooms: rooms.clone(),
        batch: args.batch as usize,
        rate: args.rate,
        in_flight: args.in_flight as usize,
        start,
        end,
        run_id,
        content: "x".repeat(args.content_bytes as usize),
    });
    let publisher = publish::spawn_thread(plan, published.clone())?;
    let mark0 = CpuMark::now(common.server_pid);
    let total = args.duration.as_millis() as u64;
    progress.phase("publish", total);
    while Instant::now() < end {
        let s = ctx.stats(Class::Churn);
        progress.set(
            start.elapsed().as_millis().min(u128::from(total)) as u64,
            format!(
                "ms  events {}  resumes {}",
                published.events_accepted.load(Relaxed),
                s.resumes.load(Relaxed) + ctx.stats(Class::Stall).resumes.load(Relaxed)
            ),
        );
        tokio::time::sleep_until(end.min(Instant::now() + Duration::from_millis(200))).await;
    }
    let mark1 = CpuMark::now(common.server_pid);
    if tokio::time::timeout(Duration::from_secs(15), publisher).await.is_err() {
        notes.push("publishers did not stop in time".to_owned());
    }
    progress.phase("drain", 1);
    tokio::time::sleep(args.drain).await;
    let server_rss = common.server_pid.and_then(|p| procfs::rss_bytes(Some(p)).ok());
    let loadgen_rss = procfs::rss_bytes(None).ok();
    progress.phase("close", 1);
    // Tasks settle their tail accounting when told to stop, before closing.
    pool::stop(pool, &phase_tx, CLOSE_GRACE).await;
    progress.finish();
    let metrics_after = match scrape::fetch(&target, METRICS).await {
        Ok(m) => Some(m),
        Err(e) => {
            notes.push(format!("no server metrics after the run: {e:#}"));
            None
        }
    };

    let cpu = mark1.since(&mark0);
    let window_secs = cpu.wall_secs.max(1e-9);
    if published.events_uncertain.load(Relaxed) > 0 {
        notes.push(format!(
            "{} events had an unknown publish outcome: expected deliveries are estimates",
            published.events_uncertain.load(Relaxed)
        ));
    }
    let no_position = ctx.no_position.load(Relaxed);
    if no_position > 0 {
        notes.push(format!(
            "{no_position} subscribed answers carried no seq (server without recovery): positions start at 0"
        ));
    }
    let classes: Vec<ClassReport> = Class::ALL.iter().map(|c| ctx.stats(*c).report(c.name())).collect();
    if classes.iter().any(|c| c.foreign_deliveries > 0) {
        notes.push("events of other publishers reached these rooms: tail accounting is off".to_owned());
    }
    let events_accepted = published.events_accepted.load(Relaxed);
    let statuses = published.statuses.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let first_error = published.first_error.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Ok(RecoveryReport {
        mode: "recovery",
        url: common.url.clone(),
        connect: ConnectSummary::new(args.conns, args.rooms, &shared, connect_time),
        rate_target: args.rate,
        duration_secs: args.duration.as_secs_f64(),
        drain_secs: args.drain.as_secs_f64(),
        churn_conns: churn as u64,
        stall_conns: stall as u64,
        churn_every_ms: args.churn_every.as_millis() as u64,
        outage_max_ms: args.outage.as_millis() as u64,
        stall_for_ms: args.stall_for.as_millis() as u64,
        stall_every_ms: args.stall_every.as_millis() as u64,
        stall_rcvbuf: args.stall_rcvbuf,
        events_accepted,
        events_accepted_per_sec: events_accepted as f64 / args.duration.as_secs_f64(),
        publish_statuses: statuses,
        publish_io_errors: published.io_errors.load(Relaxed),
        publish_first_error: first_error,
        lost_exact: published.events_uncertain.load(Relaxed) == 0,
        lost: classes.iter().map(|c| c.lost).sum(),
        duplicated: classes.iter().map(|c| c.duplicated).sum(),
        not_recovered: classes.iter().map(|c| c.not_recovered).sum(),
        classes,
        server_metrics_delta: metrics_before.zip(metrics_after).map(|(b, a)| scrape::delta(&b, &a)),
        protocol_errors: shared.protocol_errors.load(Relaxed),
        server_pings_answered: shared.pings_answered.load(Relaxed),
        loadgen_cpu_secs: cpu.own_secs,
        loadgen_cpu_pct: 100.0 * cpu.own_secs / window_secs,
        loadgen_rss_bytes: loadgen_rss,
        server_cpu_secs: cpu.server_secs,
        server_cpu_pct: cpu.server_secs.map(|s| 100.0 * s / window_secs),
        server_rss_bytes: server_rss,
        notes,
    })
}

/// A small xorshift generator: disruption timings need spread, not quality.
struct Rng(u64);

impl Rng {
    fn new(index: usize) -> Self {
        let mut seed = [0u8; 8];
        let _ = getrandom::fill(&mut seed);
        Rng((u64::from_le_bytes(seed) ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1)
    }

    /// Uniform in 0..1.
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in 0.5 * mean .. 1.5 * mean.
    fn around(&mut self, mean: Duration) -> Duration {
        mean.mul_f64(0.5 + self.unit())
    }

    /// Uniform in 0 .. max.
    fn upto(&mut self, max: Duration) -> Duration {
        max.mul_f64(self.unit())
    }
}

/// What woke a connection task.
enum Wake {
    Phase,
    PhaseGone,
    Disrupt,
    Read(std::io::Result<usize>),
}

/// One connection of any class: reads and checks deliveries; churners drop and resume, stallers
/// stop reading for a while; any class resumes with `since` after the server closes it. On stop
/// it settles its tail: events of its room it never saw.
async fn connection(client: WsClient, opened: Opened, ctx: Arc<Ctx>, mut phase: watch::Receiver<Phase>) {
    let class = class_of(opened.index, ctx.churn, ctx.stall);
    let stats = ctx.stats(class);
    stats.conns.fetch_add(1, Relaxed);
    let base = opened.seq.unwrap_or_else(|| {
        ctx.no_position.fetch_add(1, Relaxed);
        0
    });
    let mut resume = Resume::new(base);
    let mut tally = Tally::default();
    let mut rng = Rng::new(opened.index);
    let mut client = Some(client);
    let mut next_disrupt: Option<Instant> = None;
    loop {
        if *phase.borrow_and_update() == Phase::Stop {
            break;
        }
        let Some(c) = client.as_mut() else {
            client = reconnect(&ctx, &opened, class, &mut resume).await;
            if client.is_none() {
                let wait = tokio::time::sleep(RECONNECT_BACKOFF);
                tokio::select! {
                    _ = phase.changed() => {}
                    () = wait => {}
                }
            }
            continue;
        };
        let mut close = None;
        loop {
            match c.next_incoming() {
                Ok(Some(Incoming::Text(p))) => on_text(p, ctx.run_id, &mut resume, &mut tally),
                Ok(Some(Incoming::Binary)) => tally.malformed += 1,
                Ok(Some(Incoming::Close(code))) => {
                    close = Some(code);
                    break;
                }
                Ok(None) => break,
                Err(_) => {
                    close = Some(CLOSE_ABNORMAL);
                    break;
                }
            }
        }
        stats.flush(&mut tally);
        if let Some(code) = close {
            // A server close is a disconnection like any other: resume with since.
            stats.closed(code);
            if let Some(c) = client.take() {
                if code != CLOSE_ABNORMAL {
                    c.answer_close(code).await;
                }
            }
            continue;
        }
        if c.has_output() && c.flush_out().await.is_err() {
            stats.closed(CLOSE_ABNORMAL);
            client = None;
            continue;
        }
        let now = Instant::now();
        let window = ctx.window();
        if class != Class::Steady && next_disrupt.is_none() {
            if let Some((_, end)) = window.filter(|(_, end)| now < *end) {
                let every = if class == Class::Churn { ctx.churn_every } else { ctx.stall_every };
                next_disrupt = Some(now + rng.around(every)).filter(|at| *at < end);
            }
        }
        let wake = tokio::select! {
            biased;
            changed = phase.changed() => if changed.is_ok() { Wake::Phase } else { Wake::PhaseGone },
            () = tokio::time::sleep_until(next_disrupt.unwrap_or(now)), if next_disrupt.is_some() => Wake::Disrupt,
            read = c.fill() => Wake::Read(read),
        };
        match wake {
            Wake::Phase => {}
            Wake::PhaseGone => break,
            Wake::Disrupt => {
                next_disrupt = None;
                let pause = match class {
                    Class::Churn => {
                        // Drop the socket without a close frame, as a lost network would.
                        client = None;
                        stats.drops.fetch_add(1, Relaxed);
                        rng.upto(ctx.outage)
                    }
                    Class::Stall => {
                        stats.stalls.fetch_add(1, Relaxed);
                        ctx.stall_for
                    }
                    Class::Steady => Duration::ZERO,
                };
                // Not reading: a stop during the pause still ends the task.
                tokio::select! {
                    _ = phase.changed() => {}
                    () = tokio::time::sleep(pause) => {}
                }
            }
            Wake::Read(Ok(n)) if n > 0 => {}
            Wake::Read(_) => {
                stats.closed(CLOSE_ABNORMAL);
                client = None;
            }
        }
    }
    // Every event accepted for this room lies in (base, base + accepted]; what is above the last
    // seq seen never arrived.
    let accepted = ctx.published.accepted_per_room[opened.room].load(Relaxed);
    stats.expected.fetch_add(accepted, Relaxed);
    stats.tail_missing.fetch_add((base + accepted).saturating_sub(resume.since()), Relaxed);
    if let Some(c) = client {
        c.close().await;
    }
}

/// Opens the connection again and resumes with `since`; counts the outcome. `None` when the
/// attempt failed (the caller backs off and retries).
async fn reconnect(ctx: &Ctx, opened: &Opened, class: Class, resume: &mut Resume) -> Option<WsClient> {
    let stats = ctx.stats(class);
    match pool::reopen(&ctx.spec, opened, Some(resume.since())).await {
        Ok((client, answer)) => {
            stats.resumes.fetch_add(1, Relaxed);
            match resume.resumed(answer) {
                Resumed::Recovered { behind } => {
                    stats.recovered.fetch_add(1, Relaxed);
                    stats.recovered_events.fetch_add(behind, Relaxed);
                    stats.max_behind.fetch_max(behind, Relaxed);
                }
                Resumed::NotRecovered { skipped } | Resumed::Unanswered { skipped } => {
                    stats.not_recovered.fetch_add(1, Relaxed);
                    stats.not_recovered_skipped.fetch_add(skipped, Relaxed);
                    let reason = if answer.recovered.is_none() {
                        "no recovered field in subscribed (server without recovery)".to_owned()
                    } else if skipped > ctx.history_size {
                        format!("behind by more than history_size {}", ctx.history_size)
                    } else {
                        "history shorter than history_size (ttl or history_bytes)".to_owned()
                    };
                    ClassStats::count(&stats.not_recovered_reasons, reason);
                }
            }
            Some(client)
        }
        Err(e) => {
            stats.reconnect_errors.fetch_add(1, Relaxed);
            let mut text = format!("{e:#}");
            text.truncate(120);
            ClassStats::count(&stats.reconnect_error_kinds, text);
            None
        }
    }
}

/// Accounts one text frame of a connection's room.
fn on_text(p: &[u8], run_id: u64, resume: &mut Resume, tally: &mut Tally) {
    match msg::classify(p) {
        ServerMsg::Delivery(d) => {
            match resume.observe(d.seq) {
                SeqOutcome::Duplicate => {
                    tally.duplicated += 1;
                    return;
                }
                SeqOutcome::Gap(n) => tally.gap_missing += n,
                SeqOutcome::First | SeqOutcome::InOrder => {}
            }
            if d.run == Some(run_id) {
                tally.deliveries += 1;
            } else {
                tally.foreign += 1;
            }
        }
        ServerMsg::Malformed => tally.malformed += 1,
        ServerMsg::Subscribed(_) | ServerMsg::Pong | ServerMsg::Error(_) | ServerMsg::Other => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(seq: u64, recovered: Option<bool>) -> Subscribed {
        Subscribed { seq: Some(seq), recovered }
    }

    fn frame(seq: u64, run: u64) -> String {
        format!(
            r#"{{"type":"message.new","chat_id":"c","seq":{seq},"data":{{"id":"i","content":"x","run":{run}}}}}"#
        )
    }

    #[test]
    fn a_recovered_resume_continues_the_stream_with_no_gap_and_no_duplicate() {
        let mut r = Resume::new(10);
        let mut t = Tally::default();
        for seq in 11..=14 {
            on_text(frame(seq, 1).as_bytes(), 1, &mut r, &mut t);
        }
        // Dropped after 14; the room moved on to 19 meanwhile.
        assert_eq!(r.since(), 14);
        assert_eq!(r.resumed(answer(19, Some(true))), Resumed::Recovered { behind: 5 });
        // The replay (15..=19), then live events.
        for seq in 15..=21 {
            on_text(frame(seq, 1).as_bytes(), 1, &mut r, &mut t);
        }
        assert_eq!((t.deliveries, t.gap_missing, t.duplicated), (11, 0, 0));
        assert_eq!(r.since(), 21);
    }

    #[test]
    fn a_replay_that_repeats_or_skips_is_counted() {
        let mut r = Resume::new(0);
        let mut t = Tally::default();
        for seq in 1..=3 {
            on_text(frame(seq, 1).as_bytes(), 1, &mut r, &mut t);
        }
        assert_eq!(r.resumed(answer(6, Some(true))), Resumed::Recovered { behind: 3 });
        // The server replays 3 again, forgets 4, then sends 5 and 6.
        for seq in [3, 5, 6] {
            on_text(frame(seq, 1).as_bytes(), 1, &mut r, &mut t);
        }
        assert_eq!((t.deliveries, t.gap_missing, t.duplicated), (5, 1, 1));
    }

    #[test]
    fn an_unrecovered_resume_restarts_after_the_answer_and_says_how_much_was_skipped() {
        let mut r = Resume::new(5);
        assert_eq!(r.resumed(answer(300, Some(false))), Resumed::NotRecovered { skipped: 295 });
        assert_eq!(r.since(), 300);
        assert_eq!(r.observe(301), SeqOutcome::InOrder);
        // A server without recovery answers no `recovered` field.
        assert_eq!(r.resumed(answer(310, None)), Resumed::Unanswered { skipped: 9 });
        assert_eq!(r.observe(311), SeqOutcome::InOrder);
        assert_eq!(r.observe(311), SeqOutcome::Duplicate);
    }

    #[test]
    fn classes_split_by_index_and_other_runs_are_not_deliveries() {
        let classes: Vec<Class> = (0..6).map(|i| class_of(i, 2, 1)).collect();
        assert_eq!(
            classes,
            [Class::Churn, Class::Churn, Class::Stall, Class::Steady, Class::Steady, Class::Steady]
        );
        let mut r = Resume::new(0);
        let mut t = Tally::default();
        on_text(frame(1, 9).as_bytes(), 1, &mut r, &mut t);
        on_text(frame(2, 1).as_bytes(), 1, &mut r, &mut t);
        assert_eq!((t.deliveries, t.foreign, t.gap_missing), (1, 1, 0));
    }
}
