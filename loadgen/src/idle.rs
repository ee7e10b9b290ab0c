//! `loadgen idle`: open N subscribed connections, optionally warm every room they joined with one
//! published event (`--warm`), hold them answering pings, optionally prove each is alive with an
//! application ping, and report connect rate and server memory per connection.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
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
use crate::publish::{self, Plan};
use crate::report::{ConnectSummary, IdleReport, PublishSummary};
use crate::stats::{Local, SeqOutcome, SeqTracker, Shared};
use crate::target::{self, Target};
use crate::ws::{Incoming, WsClient};

/// How long connection tasks get to close cleanly before they are aborted.
const CLOSE_GRACE: Duration = Duration::from_secs(10);
/// How long the ping check waits for every pong.
const PING_CHECK_WAIT: Duration = Duration::from_secs(5);
/// Pause after the last subscribe before reading the server's RSS, so its allocations settle.
const RSS_SETTLE: Duration = Duration::from_millis(500);
/// Small read buffer: idle connections receive only acks, pings and, with `--warm`, one small
/// event per room.
const BUF_SIZE: usize = 1024;
/// How long `--warm` waits for every connection's room events (publishing included).
const WARM_WAIT: Duration = Duration::from_secs(30);
/// Events per warm-up POST (a JSON array): ~250 bytes each, so a request stays far below the
/// server's default 1 MiB `server.max_body_bytes` and within `--batch`'s cap of 10,000.
const WARM_BATCH: usize = 1000;
/// Warm-up publish requests outstanding at once (one keep-alive connection each).
const WARM_IN_FLIGHT: usize = 4;

/// What `--warm` did.
struct Warm {
    rooms: u64,
    publish: PublishSummary,
    expected: u64,
    received: u64,
    secs: f64,
}

pub(crate) async fn run(args: IdleArgs) -> anyhow::Result<IdleReport> {
    let common = &args.common;
    common.check_durations(&[("--hold", args.hold)])?;
    let api_key = if args.warm {
        if args.subs_per_conn > args.rooms {
            bail!("--warm needs --subs-per-conn <= --rooms (one event per room and connection)");
        }
        Some(common.api_key.clone().context("--warm publishes events: give --api-key (or LOADGEN_API_KEY)")?)
    } else {
        None
    };
    let target = target::resolve(&common.url, common.allow_remote).await?;
    let mut notes = Vec::new();
    let conns = pool::cap_conns(args.conns, 0, &mut notes);
    let rooms: Vec<Uuid> = (0..args.rooms).map(|i| room_id(common.room_group, i)).collect();
    // Stamped into warm events so that other runs' events in the same rooms are told apart.
    let run_id = Uuid::new_v4().as_u64_pair().0 >> 1;
    let shared = Arc::new(Shared::new());
    let mut progress = Progress::new(common.json);
    let pid = common.server_pid;
    let rss_before = pid.and_then(|p| procfs::rss_bytes(Some(p)).ok());
    if pid.is_some() && rss_before.is_none() {
        notes.push(format!("cannot read /proc/{}/status: no server memory figures", pid.unwrap_or(0)));
    }

    let mut spec = Spec::new(common, vec![target.clone()], rooms.clone(), BUF_SIZE);
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
        move |client, _opened, phase| connection(client, conn_shared.clone(), run_id, phase),
    )
    .await?;
    let subscribed = shared.subscribed.load(Relaxed);
    let warm = match api_key {
        Some(api_key) => {
            // Rooms with a subscriber, and how many: a connection's rooms are distinct
            // (subs-per-conn <= rooms), so each subscription is one event frame due.
            let joined: Vec<(Uuid, u64)> = rooms
                .iter()
                .zip(pool.per_room.iter())
                .map(|(room, n)| (*room, n.load(Relaxed)))
                .filter(|(_, n)| *n > 0)
                .collect();
            Some(warm_up(target, api_key, joined, &shared, run_id, &mut progress, &mut notes).await)
        }
        None => None,
    };
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
    let foreign = shared.foreign_deliveries.load(Relaxed);
    let malformed = shared.malformed.load(Relaxed);
    if foreign + malformed > 0 {
        notes.push(format!(
            "{foreign} room events of other runs and {malformed} unreadable room frames arrived (not counted)"
        ));
    }
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
        warm: warm.is_some(),
        warm_rooms: warm.as_ref().map(|w| w.rooms),
        warm_events_expected: warm.as_ref().map(|w| w.expected),
        warm_events_received: warm.as_ref().map(|w| w.received),
        warm_events_duplicated: warm.as_ref().map(|_| shared.duplicated.load(Relaxed)),
        warm_secs: warm.as_ref().map(|w| w.secs),
        warm_publish: warm.map(|w| w.publish),
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

/// Publishes one event to each `joined` room (given with its subscriber count) and waits until
/// every connection has received one per room, or [`WARM_WAIT`] passed (the shortfall is
/// reported).
async fn warm_up(
    target: Target,
    api_key: String,
    joined: Vec<(Uuid, u64)>,
    shared: &Shared,
    run_id: u64,
    progress: &mut Progress,
    notes: &mut Vec<String>,
) -> Warm {
    let (warm_rooms, subscribers): (Vec<Uuid>, Vec<u64>) = joined.into_iter().unzip();
    let expected: u64 = subscribers.iter().sum();
    let count = warm_rooms.len();
    let start = Instant::now();
    let deadline = start + WARM_WAIT;
    let plan = Arc::new(Plan {
        targets: vec![target],
        api_key,
        rooms: warm_rooms,
        batch: WARM_BATCH,
        rate: 0,
        in_flight: WARM_IN_FLIGHT.min(count.div_ceil(WARM_BATCH)),
        start,
        end: deadline,
        run_id,
        content: "x".to_owned(),
        events: Some(count as u64),
    });
    let stats = Arc::new(publish::Stats::new(count));
    let publisher = tokio::spawn(publish::run(plan, stats.clone()));
    let stop_publisher = publisher.abort_handle();
    progress.phase("warm", expected);
    let received = loop {
        let got = shared.own_deliveries.load(Relaxed);
        progress.set(got, format!("events accepted {} of {count}", stats.events_accepted.load(Relaxed)));
        if got >= expected || Instant::now() >= deadline {
            break got;
        }
        if publisher.is_finished() && stats.events_uncertain.load(Relaxed) == 0 {
            // Every publish was answered: only the accepted events' frames can still come.
            let due: u64 = stats
                .accepted_per_room
                .iter()
                .zip(&subscribers)
                .map(|(events, n)| events.load(Relaxed) * n)
                .sum();
            if got >= due {
                break got;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let secs = start.elapsed().as_secs_f64();
    // The publishers stop by themselves at the deadline; a request then outstanding times out.
    if tokio::time::timeout(Duration::from_secs(15), publisher).await.is_err() {
        stop_publisher.abort();
        notes.push("warm-up publishers did not stop in time".to_owned());
    }
    if stats.aborted.load(Relaxed) {
        notes.push("the server refused the API key (401): warm-up publishing stopped".to_owned());
    }
    if received < expected {
        // The wait ends at WARM_WAIT, or earlier once every publish was answered and the
        // accepted events' frames are all in (nothing more can come).
        notes.push(format!(
            "warm: only {received} of {expected} room events arrived; gave up after {secs:.1} s \
             (at most {} s)",
            WARM_WAIT.as_secs()
        ));
    }
    Warm { rooms: count as u64, publish: PublishSummary::new(&stats, secs), expected, received, secs }
}

/// One held connection: answers server pings, sends the application ping when asked, counts
/// pongs and this run's warm events, and records a server close.
async fn connection(
    mut client: WsClient,
    shared: Arc<Shared>,
    run_id: u64,
    mut phase: watch::Receiver<Phase>,
) {
    let mut local = Local::default();
    let mut seqs = SeqTracker::default();
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
            loop {
                match client.next_incoming() {
                    Ok(Some(Incoming::Text(p))) => on_text(p, run_id, &mut seqs, &mut local),
                    Ok(Some(Incoming::Binary | Incoming::Uninflated)) => {}
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
            shared.flush(&mut local);
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

/// Accounts one text frame: a pong, or a room event. This run publishes one event per room (with
/// `--warm`), so the first of a room counts as received and any further one as a duplicate;
/// events of other runs are foreign.
fn on_text(p: &[u8], run_id: u64, seqs: &mut SeqTracker, local: &mut Local) {
    match msg::classify(p) {
        ServerMsg::Pong => local.pongs += 1,
        ServerMsg::Delivery(d) if d.run == Some(run_id) => match seqs.observe(d.chat_id, d.seq) {
            SeqOutcome::First => local.own += 1,
            SeqOutcome::InOrder | SeqOutcome::Gap(_) | SeqOutcome::Duplicate => local.duplicated += 1,
        },
        ServerMsg::Delivery(_) => local.foreign += 1,
        ServerMsg::Malformed => local.malformed += 1,
        ServerMsg::Subscribed(_) | ServerMsg::Error(_) | ServerMsg::Other => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(room: u32, seq: u64, run: u64) -> String {
        format!(
            r#"{{"type":"message.new","chat_id":"{}","seq":{seq},"data":{{"id":"i","content":"x","ts":1,"run":{run}}}}}"#,
            room_id(0, room)
        )
    }

    #[test]
    fn counts_one_warm_event_per_room_pongs_duplicates_and_foreign_events() {
        let mut seqs = SeqTracker::default();
        let mut local = Local::default();
        for frame in [
            event(0, 1, 7),
            event(1, 4, 7),
            event(1, 4, 7), // the same event again
            event(2, 9, 3), // another run's event
            r#"{"type":"pong"}"#.to_owned(),
            r#"{"type":"message.new","chat_id":"a","data":{}}"#.to_owned(),
        ] {
            on_text(frame.as_bytes(), 7, &mut seqs, &mut local);
        }
        assert_eq!((local.own, local.duplicated, local.foreign), (2, 1, 1));
        assert_eq!((local.pongs, local.malformed), (1, 1));
    }
}
