//! The healthy connection classes that `recovery` and `soak` run (steady, churn, stall, switch),
//! the fixed-rate publishing they read, and their exact accounting: per connection and room,
//! every seq of the run seen exactly once, or the reason it was not.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use uuid::Uuid;

use crate::cli::{CommonArgs, StreamArgs};
use crate::frame::CLOSE_ABNORMAL;
use crate::ident::room_id;
use crate::msg::{self, ServerMsg, Subscribed};
use crate::pool::{self, Opened, Phase, Pool, Spec};
use crate::procfs::{self, CpuMark};
use crate::progress::Progress;
use crate::publish::{self, Plan};
use crate::report::{ClassReport, ConnectSummary, PublishSummary, StreamsSummary, Usage};
use crate::scrape;
use crate::stats::{SeqOutcome, Shared};
use crate::target::{self, Target};
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
    "herald_redis_history_reads_total",
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
    /// Moves between rooms: unsubscribes, subscribes to the next room of its rotation (with
    /// `since` where it was before).
    Switch,
}

impl Class {
    pub(crate) const ALL: [Class; 4] = [Class::Steady, Class::Churn, Class::Stall, Class::Switch];

    fn name(self) -> &'static str {
        match self {
            Class::Steady => "steady",
            Class::Churn => "churn",
            Class::Stall => "stall",
            Class::Switch => "switch",
        }
    }
}

/// How the connections split into classes, and how each class disrupts itself.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mix {
    pub(crate) churn: usize,
    pub(crate) stall: usize,
    pub(crate) switch: usize,
    churn_every: Duration,
    outage: Duration,
    stall_for: Duration,
    stall_every: Duration,
    switch_every: Duration,
    switch_rooms: usize,
    rooms: usize,
    history_size: u64,
}

/// Switchers' share and pace (soak only).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Switching {
    pub(crate) fraction: f64,
    pub(crate) every: Duration,
    pub(crate) rooms: u32,
}

impl Mix {
    /// Splits `conns` by the fractions of `s` (and `switching`), checking they fit.
    pub(crate) fn new(conns: u32, s: &StreamArgs, switching: Option<Switching>) -> anyhow::Result<Mix> {
        let switch_fraction = switching.map_or(0.0, |w| w.fraction);
        if s.churn + s.stall + switch_fraction > 1.0 {
            bail!(
                "--churn {} + --stall {} + --switch {switch_fraction} is more than every connection",
                s.churn,
                s.stall
            );
        }
        if s.churn_every.is_zero() || s.stall_every.is_zero() || switching.is_some_and(|w| w.every.is_zero())
        {
            bail!("--churn-every, --stall-every and --switch-every must be more than 0");
        }
        let share = |f: f64| (f64::from(conns) * f).round() as usize;
        let churn = share(s.churn).min(conns as usize);
        let stall = share(s.stall).min(conns as usize - churn);
        let switch = share(switch_fraction).min(conns as usize - churn - stall);
        Ok(Mix {
            churn,
            stall,
            switch,
            churn_every: s.churn_every,
            outage: s.outage,
            stall_for: s.stall_for,
            stall_every: s.stall_every,
            switch_every: switching.map_or(Duration::MAX, |w| w.every),
            switch_rooms: switching.map_or(1, |w| w.rooms as usize).min(s.rooms as usize).max(1),
            rooms: s.rooms as usize,
            history_size: s.history_size,
        })
    }

    /// The first `churn` connections churn, the next `stall` stall, the next `switch` switch,
    /// the rest are steady; since connection `i` joins room `i % rooms`, every class spreads over
    /// the rooms.
    pub(crate) fn class_of(&self, index: usize) -> Class {
        if index < self.churn {
            Class::Churn
        } else if index < self.churn + self.stall {
            Class::Stall
        } else if index < self.churn + self.stall + self.switch {
            Class::Switch
        } else {
            Class::Steady
        }
    }

    /// The room after `from` in the rotation of a switcher whose own room is `home`: `home`, the
    /// next rooms, and back.
    fn next_room(&self, home: usize, from: Option<usize>) -> usize {
        let Some(from) = from else { return home };
        let step = (from + self.rooms - home) % self.rooms;
        (home + (step + 1) % self.switch_rooms) % self.rooms
    }

    fn every(&self, class: Class) -> Duration {
        match class {
            Class::Churn => self.churn_every,
            Class::Stall => self.stall_every,
            Class::Switch => self.switch_every,
            Class::Steady => Duration::MAX,
        }
    }
}

/// One connection's stream in one room, kept across reconnects: the position it was told, the
/// last seq it saw (the `since` it resumes with), and the stretches an unrecovered resume ended.
/// Everything is relative to positions the server gave: a room's seqs may start anywhere (Herald
/// starts a room's counter at the current Unix time in microseconds, other servers at 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Resume {
    /// The position the current stretch starts after: the first `subscribed`'s `seq`, or an
    /// unrecovered resume's. `None` while unknown (a `subscribed` without `seq`: the first
    /// delivery stands for it).
    base: Option<u64>,
    /// The last seq seen (the base until a delivery).
    last: u64,
    /// Events expected in stretches that an unrecovered resume ended.
    closed: u64,
    /// A recovered resume's replay under way: the seq it ends at and its bytes so far.
    replay: Option<(u64, u64)>,
    /// Bytes of the biggest replay that arrived whole.
    max_replay_bytes: u64,
}

/// What a `subscribed` answer to a resume means for the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resumed {
    /// Every missed event follows; `behind` of them.
    Recovered { behind: u64 },
    /// History did not reach back: the stream restarts after the answer's `seq`; `last` is the
    /// last seq seen before. `seq - last` events were skipped, unless the position was reset
    /// (a room made again starts at a new origin, far above or, elsewhere, below the old seqs).
    NotRecovered { last: u64, seq: u64 },
    /// The answer had no `recovered` field (a server without recovery); treated as not recovered.
    Unanswered { last: u64, seq: u64 },
}

impl Resume {
    /// Starts at the room position a `subscribed` reported (`None`: it reported none).
    pub(crate) fn new(seq: Option<u64>) -> Self {
        Resume { base: seq, last: seq.unwrap_or(0), closed: 0, replay: None, max_replay_bytes: 0 }
    }

    /// The last seq seen: the `since` of the next resume.
    pub(crate) fn since(&self) -> u64 {
        self.last
    }

    /// Checks one delivered seq (a frame of `bytes`) against the last.
    pub(crate) fn observe(&mut self, seq: u64, bytes: usize) -> SeqOutcome {
        if self.base.is_none() {
            // No position was given: this first event is the stream's start.
            self.base = Some(seq.saturating_sub(1));
            self.last = seq;
            return SeqOutcome::First;
        }
        if seq <= self.last {
            return SeqOutcome::Duplicate;
        }
        let before = std::mem::replace(&mut self.last, seq);
        if let Some((until, so_far)) = self.replay.as_mut() {
            if seq <= *until {
                *so_far += bytes as u64;
            }
            if seq >= *until {
                self.max_replay_bytes = self.max_replay_bytes.max(*so_far);
                self.replay = None;
            }
        }
        match seq - before {
            1 => SeqOutcome::InOrder,
            n => SeqOutcome::Gap(n - 1),
        }
    }

    /// Takes the answer to `subscribe` with `since = self.since()`. When recovered, the replay
    /// is checked like live events; otherwise the stream so far is closed where it got to and a
    /// new stretch starts after the answer's `seq` (whatever its distance from the last one).
    pub(crate) fn resumed(&mut self, answer: Subscribed) -> Resumed {
        let last = self.last;
        let seq = answer.seq.unwrap_or(last);
        // A replay cut short by this resume is not a whole one.
        self.replay = None;
        match answer.recovered {
            Some(true) => {
                let behind = seq.saturating_sub(last);
                if behind > 0 {
                    self.replay = Some((seq, 0));
                }
                Resumed::Recovered { behind }
            }
            other => {
                self.closed += last - self.base.unwrap_or(last);
                self.base = Some(seq);
                self.last = seq;
                if other.is_some() {
                    Resumed::NotRecovered { last, seq }
                } else {
                    Resumed::Unanswered { last, seq }
                }
            }
        }
    }

    /// The events this stream should have had if the room's last seq is `end` (at least the last
    /// one seen): the closed stretches and the current one.
    fn expected(&self, end: u64) -> u64 {
        self.closed + self.base.map_or(0, |base| end.max(self.last) - base)
    }
}

/// One room a connection has been in, as one stream across its visits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Visit {
    room: usize,
    resume: Resume,
}

/// Where a connection is and has been: one room for most classes, the rooms of its rotation for
/// switchers. A room left and joined again resumes with `since`, so each room is one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Positions {
    visits: Vec<Visit>,
    /// Index into `visits` of the room it is subscribed to (`None` between two rooms).
    current: Option<usize>,
    /// A room it asked to join and has no answer from yet.
    pending: Option<usize>,
}

impl Positions {
    /// In room `room` from the position its first `subscribed` gave (`None`: none given).
    pub(crate) fn new(room: usize, base: Option<u64>) -> Self {
        Positions { visits: vec![Visit { room, resume: Resume::new(base) }], current: Some(0), pending: None }
    }

    /// The room it is subscribed to, with no other subscribe in flight.
    fn settled_room(&self) -> Option<usize> {
        match (self.current, self.pending) {
            (Some(i), None) => Some(self.visits[i].room),
            _ => None,
        }
    }

    fn visit(&self, room: usize) -> Option<usize> {
        self.visits.iter().position(|v| v.room == room)
    }

    /// The room to be in (the pending one, else the current one, else `home`) and the `since`
    /// to join it with (where the connection was, when it was there before).
    pub(crate) fn target(&self, home: usize) -> (usize, Option<u64>) {
        let room = self.pending.or(self.current.map(|v| self.visits[v].room)).unwrap_or(home);
        (room, self.visit(room).map(|v| self.visits[v].resume.since()))
    }

    /// Leaves the current room for `room`: returns the room left and the `since` to ask for.
    pub(crate) fn switch_to(&mut self, room: usize) -> (Option<usize>, Option<u64>) {
        let left = self.current.take().map(|v| self.visits[v].room);
        self.pending = Some(room);
        (left, self.visit(room).map(|v| self.visits[v].resume.since()))
    }

    /// Takes the `subscribed` answer for `room`: a first visit starts at its `seq`, a return is a
    /// resume (returned).
    pub(crate) fn joined(&mut self, room: usize, answer: Subscribed) -> Option<Resumed> {
        self.pending = None;
        match self.visit(room) {
            Some(v) => {
                self.current = Some(v);
                Some(self.visits[v].resume.resumed(answer))
            }
            None => {
                self.visits.push(Visit { room, resume: Resume::new(answer.seq) });
                self.current = Some(self.visits.len() - 1);
                None
            }
        }
    }

    /// The pending join was refused.
    fn refused(&mut self) {
        self.pending = None;
    }

    /// Checks one delivery (a frame of `bytes`) against the stream of its room; `None` for a
    /// room never joined.
    fn observe(&mut self, chat_id: &[u8], seq: u64, bytes: usize, names: &[String]) -> Option<SeqOutcome> {
        let v = self.visits.iter_mut().find(|v| names[v.room].as_bytes() == chat_id)?;
        Some(v.resume.observe(seq, bytes))
    }

    /// Bytes of the biggest recovered replay that arrived whole, over every room.
    fn max_replay_bytes(&self) -> u64 {
        self.visits.iter().map(|v| v.resume.max_replay_bytes).max().unwrap_or(0)
    }

    /// The events this connection should have seen, and those after its last one that never came:
    /// in the room it is in, every event up to the room's final `head` (`None`: unknown, no tail
    /// counted); in rooms it left, those up to where it left (the rest come back with `since` on
    /// a return). Stretches an unrecovered resume ended count up to where they got to.
    pub(crate) fn settle(&self, head: impl Fn(usize) -> Option<u64>) -> (u64, u64) {
        let (mut expected, mut tail) = (0, 0);
        for (i, v) in self.visits.iter().enumerate() {
            let last = v.resume.since();
            let end = match (self.current == Some(i), v.resume.base) {
                (true, Some(_)) => head(v.room).unwrap_or(last).max(last),
                _ => last,
            };
            expected += v.resume.expected(end);
            tail += end - last;
        }
        (expected, tail)
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
    error_replies: AtomicU64,
    drops: AtomicU64,
    stalls: AtomicU64,
    switches: AtomicU64,
    resumes: AtomicU64,
    /// Resumes by a reconnect to another node than the one the connection was on.
    node_moves: AtomicU64,
    recovered: AtomicU64,
    recovered_events: AtomicU64,
    max_behind: AtomicU64,
    max_replay_bytes: AtomicU64,
    not_recovered: AtomicU64,
    not_recovered_skipped: AtomicU64,
    position_resets: AtomicU64,
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

    /// Counts the outcome of a subscribe with `since`. `most` is the most events the room can
    /// have had in the run: an unrecovered resume that moves further (or backwards) found the
    /// room's position reset, not that many events.
    fn resumed(&self, resumed: Resumed, history_size: u64, most: u64) {
        self.resumes.fetch_add(1, Relaxed);
        match resumed {
            Resumed::Recovered { behind } => {
                self.recovered.fetch_add(1, Relaxed);
                self.recovered_events.fetch_add(behind, Relaxed);
                self.max_behind.fetch_max(behind, Relaxed);
            }
            Resumed::NotRecovered { last, seq } | Resumed::Unanswered { last, seq } => {
                self.not_recovered.fetch_add(1, Relaxed);
                let reset = seq < last || seq - last > most;
                let skipped = if reset { 0 } else { seq - last };
                self.not_recovered_skipped.fetch_add(skipped, Relaxed);
                let reason = if matches!(resumed, Resumed::Unanswered { .. }) {
                    "no recovered field in subscribed (server without recovery)".to_owned()
                } else if reset {
                    self.position_resets.fetch_add(1, Relaxed);
                    "the room's position was reset (a new seq origin: room forgotten or bus restarted)"
                        .to_owned()
                } else if skipped > history_size {
                    format!("behind by more than history_size {history_size}")
                } else {
                    "history shorter than history_size (ttl or history_bytes)".to_owned()
                };
                ClassStats::count(&self.not_recovered_reasons, reason);
            }
        }
    }

    fn report(&self, name: &'static str) -> ClassReport {
        let get = |a: &AtomicU64| a.load(Relaxed);
        let clone = |m: &Mutex<BTreeMap<String, u64>>| m.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let expected = get(&self.expected);
        ClassReport {
            class: name,
            conns: get(&self.conns),
            expected_deliveries: expected,
            deliveries: get(&self.deliveries),
            lost: expected.saturating_sub(get(&self.deliveries)),
            gap_missing: get(&self.gap_missing),
            tail_missing: get(&self.tail_missing),
            duplicated: get(&self.duplicated),
            foreign_deliveries: get(&self.foreign),
            malformed_frames: get(&self.malformed),
            error_replies: get(&self.error_replies),
            drops: get(&self.drops),
            stalls: get(&self.stalls),
            switches: get(&self.switches),
            resumes: get(&self.resumes),
            resumes_on_other_node: get(&self.node_moves),
            recovered: get(&self.recovered),
            recovered_events: get(&self.recovered_events),
            max_behind_on_resume: get(&self.max_behind),
            max_replay_bytes: get(&self.max_replay_bytes),
            not_recovered: get(&self.not_recovered),
            not_recovered_skipped: get(&self.not_recovered_skipped),
            position_resets: get(&self.position_resets),
            not_recovered_reasons: clone(&self.not_recovered_reasons),
            reconnect_errors: get(&self.reconnect_errors),
            reconnect_error_kinds: clone(&self.reconnect_error_kinds),
            close_codes: self.close_codes.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }
}

/// What every connection task shares. Lives in an `Arc` held by the runner and every task.
pub(crate) struct Ctx {
    spec: Arc<Spec>,
    run_id: u64,
    mix: Mix,
    classes: [ClassStats; 4],
    /// The rooms' ids as the server writes them, to tell which room a delivery belongs to.
    room_names: Vec<String>,
    /// Each room's seq before publishing started (`u64::MAX`: no connection joined it then).
    room_start: Vec<AtomicU64>,
    /// Connections whose first `subscribed` carried no `seq` (a server without recovery): their
    /// expected position is a guess.
    no_position: AtomicU64,
    /// When drops, stalls and switches may happen: set once publishing starts (`None` before).
    disrupt_window: Mutex<Option<(Instant, Instant)>>,
    /// The publishers' counts: the events each room should have delivered.
    published: Arc<publish::Stats>,
    /// Events the publishers may have sent and not yet had answered (`--in-flight` x `--batch`).
    in_flight_events: u64,
    /// `--presence`: each connection sends typing in its room this often.
    typing: Option<Duration>,
}

impl Ctx {
    fn stats(&self, class: Class) -> &ClassStats {
        &self.classes[class as usize]
    }

    fn window(&self) -> Option<(Instant, Instant)> {
        *self.disrupt_window.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Room `room`'s last seq once every accepted event is in, when its start is known.
    fn final_head(&self, room: usize) -> Option<u64> {
        let start = self.room_start[room].load(Relaxed);
        (start != u64::MAX).then(|| start + self.published.accepted_per_room[room].load(Relaxed))
    }

    /// The most events room `room` can have had since the run began (accepted, unknown outcome,
    /// or still unanswered): a position that moved further was reset.
    fn most_events(&self, room: usize) -> u64 {
        let p = &self.published;
        p.accepted_per_room[room].load(Relaxed) + p.events_uncertain.load(Relaxed) + self.in_flight_events
    }

    /// Distinct events delivered to healthy connections so far.
    pub(crate) fn deliveries(&self) -> u64 {
        self.classes.iter().map(|c| c.deliveries.load(Relaxed)).sum()
    }

    /// The publishers' counts.
    pub(crate) fn published(&self) -> &publish::Stats {
        &self.published
    }

    /// How the connections split into classes.
    pub(crate) fn mix(&self) -> Mix {
        self.mix
    }

    /// Resumes of every class so far.
    pub(crate) fn resumes(&self) -> u64 {
        self.classes.iter().map(|c| c.resumes.load(Relaxed)).sum()
    }
}

/// A run of the healthy classes: connections opened, then publishing, then the drain and the
/// summary. `recovery` and `soak` drive it and add their own parts around it.
pub(crate) struct Harness {
    /// The `--url` node (the one `--server-pid` names).
    pub(crate) target: Target,
    /// Every node: `--url`, then each `--also-url`.
    pub(crate) targets: Vec<Target>,
    pub(crate) ctx: Arc<Ctx>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) connect: ConnectSummary,
    pub(crate) notes: Vec<String>,
    pub(crate) progress: Progress,
    pool: Pool,
    /// Tells every connection task to run or stop; each task holds a receiver.
    phase_tx: watch::Sender<Phase>,
    metrics_before: Option<BTreeMap<String, f64>>,
    api_key: String,
}

/// Publishing under way.
pub(crate) struct Publishing {
    pub(crate) start: Instant,
    pub(crate) end: Instant,
    /// Resolves once every publisher stopped; the publisher thread holds the sender.
    done: oneshot::Receiver<()>,
    mark0: CpuMark,
}

impl Harness {
    /// Opens the connections of every class (`extra_fds`: files the caller holds besides them).
    pub(crate) async fn open(
        common: &CommonArgs,
        s: &StreamArgs,
        switching: Option<Switching>,
        extra_fds: u64,
        mode: &str,
    ) -> anyhow::Result<Harness> {
        let api_key = common
            .api_key
            .clone()
            .with_context(|| format!("{mode} publishes events: give --api-key (or LOADGEN_API_KEY)"))?;
        let target = target::resolve(&common.url, common.allow_remote).await?;
        let mut targets = vec![target.clone()];
        for url in &s.also_urls {
            targets.push(target::resolve(url, common.allow_remote).await?);
        }
        let mut notes = Vec::new();
        let conns = pool::cap_conns(s.conns, u64::from(s.in_flight) + 1 + extra_fds, &mut notes);
        let mix = Mix::new(conns, s, switching)?;
        let rooms: Vec<Uuid> = (0..s.rooms).map(|i| room_id(common.room_group, i)).collect();
        let shared = Arc::new(Shared::new());
        let mut progress = Progress::new(common.json);
        let mut spec = Spec::new(common, targets.clone(), rooms.clone(), BUF_SIZE);
        spec.layout = s.layout;
        let rcvbuf = s.stall_rcvbuf;
        spec.recv_buffer = Some(Arc::new(move |i| (mix.class_of(i) == Class::Stall).then_some(rcvbuf)));
        let spec = Arc::new(spec);
        let ctx = Arc::new(Ctx {
            spec: spec.clone(),
            run_id: Uuid::new_v4().as_u64_pair().0 >> 1,
            mix,
            classes: Default::default(),
            room_names: rooms.iter().map(Uuid::to_string).collect(),
            room_start: rooms.iter().map(|_| AtomicU64::new(u64::MAX)).collect(),
            no_position: AtomicU64::new(0),
            disrupt_window: Mutex::new(None),
            published: Arc::new(publish::Stats::new(rooms.len())),
            in_flight_events: u64::from(s.in_flight) * u64::from(s.batch),
            typing: common.typing(),
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
        let metrics_before = match scrape::fetch_sum(&targets, METRICS).await {
            Ok(m) => Some(m),
            Err(e) => {
                notes.push(format!("no server metrics: {e:#}"));
                None
            }
        };
        let connect = ConnectSummary::new(s.conns, s.rooms, &shared, connect_time);
        Ok(Harness {
            target,
            targets,
            ctx,
            shared,
            connect,
            notes,
            progress,
            pool,
            phase_tx,
            metrics_before,
            api_key,
        })
    }

    /// The rooms of the run, by index.
    pub(crate) fn rooms(&self) -> Vec<Uuid> {
        self.ctx.spec.rooms.clone()
    }

    /// Starts publishing at the fixed rate for `duration`, and the disruptions with it.
    pub(crate) fn publish(
        &mut self,
        s: &StreamArgs,
        duration: Duration,
        server_pid: Option<u32>,
    ) -> anyhow::Result<Publishing> {
        let start = Instant::now();
        let end = start + duration;
        *self.ctx.disrupt_window.lock().unwrap_or_else(|p| p.into_inner()) = Some((start, end));
        // Wake every task so the disrupting classes schedule their first disruption.
        let _ = self.phase_tx.send(Phase::Run);
        let plan = Arc::new(Plan {
            targets: self.targets.clone(),
            api_key: self.api_key.clone(),
            rooms: self.ctx.spec.rooms.clone(),
            batch: s.batch as usize,
            rate: s.rate,
            in_flight: s.in_flight as usize,
            start,
            end,
            run_id: self.ctx.run_id,
            content: "x".repeat(s.content_bytes as usize),
            events: None,
        });
        let done = publish::spawn_thread(plan, self.ctx.published.clone())?;
        Ok(Publishing { start, end, done, mark0: CpuMark::now(server_pid) })
    }

    /// Waits for the publishers, drains, stops every connection (each settles its accounting)
    /// and sums the run up.
    pub(crate) async fn finish(
        mut self,
        publishing: Publishing,
        drain: Duration,
        server_pid: Option<u32>,
    ) -> StreamsSummary {
        let mark1 = CpuMark::now(server_pid);
        if tokio::time::timeout(Duration::from_secs(15), publishing.done).await.is_err() {
            self.notes.push("publishers did not stop in time".to_owned());
        }
        self.progress.phase("drain", 1);
        tokio::time::sleep(drain).await;
        let server_rss = server_pid.and_then(|p| procfs::rss_bytes(Some(p)).ok());
        let loadgen_rss = procfs::rss_bytes(None).ok();
        self.progress.phase("close", 1);
        // Tasks settle their tail accounting when told to stop, before closing.
        pool::stop(self.pool, &self.phase_tx, CLOSE_GRACE).await;
        self.progress.finish();
        let mut notes = self.notes;
        let metrics_after = match scrape::fetch_sum(&self.targets, METRICS).await {
            Ok(m) => Some(m),
            Err(e) => {
                notes.push(format!("no server metrics after the run: {e:#}"));
                None
            }
        };
        let (ctx, published) = (&self.ctx, &self.ctx.published);
        let cpu = mark1.since(&publishing.mark0);
        let uncertain = published.events_uncertain.load(Relaxed);
        if uncertain > 0 {
            notes.push(format!(
                "{uncertain} events had an unknown publish outcome: expected deliveries are estimates"
            ));
        }
        let no_position = ctx.no_position.load(Relaxed);
        if no_position > 0 {
            notes.push(format!(
                "{no_position} subscribed answers carried no seq (server without recovery): those \
                 streams start at their first delivery"
            ));
        }
        let unknown = ctx.room_start.iter().filter(|s| s.load(Relaxed) == u64::MAX).count();
        if unknown > 0 && ctx.mix.switch > 0 {
            notes.push(format!(
                "{unknown} rooms had no connection before publishing: switchers' tails there are not counted"
            ));
        }
        let classes: Vec<ClassReport> = Class::ALL
            .iter()
            .filter(|c| **c != Class::Switch || ctx.mix.switch > 0)
            .map(|c| ctx.stats(*c).report(c.name()))
            .collect();
        if classes.iter().any(|c| c.foreign_deliveries > 0) {
            notes.push("events of other publishers reached these rooms: tail accounting is off".to_owned());
        }
        let publish_secs = publishing.end.duration_since(publishing.start).as_secs_f64();
        StreamsSummary {
            published: PublishSummary::new(published, publish_secs),
            lost_exact: uncertain == 0,
            lost: classes.iter().map(|c| c.lost).sum(),
            duplicated: classes.iter().map(|c| c.duplicated).sum(),
            not_recovered: classes.iter().map(|c| c.not_recovered).sum(),
            classes,
            server_metrics_delta: self.metrics_before.zip(metrics_after).map(|(b, a)| scrape::delta(&b, &a)),
            protocol_errors: self.shared.protocol_errors.load(Relaxed),
            server_pings_answered: self.shared.pings_answered.load(Relaxed),
            usage: Usage::new(&cpu, loadgen_rss, server_rss),
            notes,
        }
    }
}

/// A small xorshift generator: disruption timings need spread, not quality.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(index: usize) -> Self {
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
    pub(crate) fn around(&mut self, mean: Duration) -> Duration {
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
    Typing,
    Read(std::io::Result<usize>),
}

/// One connection of any class: reads and checks deliveries; churners drop and resume, stallers
/// stop reading for a while, switchers move to the next room; any class resumes with `since`
/// after the server closes it. On stop it settles its tail: events of its room it never saw.
async fn connection(client: WsClient, opened: Opened, ctx: Arc<Ctx>, mut phase: watch::Receiver<Phase>) {
    let class = ctx.mix.class_of(opened.index);
    let stats = ctx.stats(class);
    stats.conns.fetch_add(1, Relaxed);
    match opened.seq {
        Some(base) => {
            ctx.room_start[opened.room].fetch_min(base, Relaxed);
        }
        None => {
            ctx.no_position.fetch_add(1, Relaxed);
        }
    }
    let mut positions = Positions::new(opened.room, opened.seq);
    // Reconnects so far: the next one goes to the node after the current one.
    let mut hops = 0;
    let mut tally = Tally::default();
    let mut rng = Rng::new(opened.index);
    let mut client = Some(client);
    let mut next_disrupt: Option<Instant> = None;
    let mut next_typing =
        ctx.typing.map(|every| Instant::now() + crate::fanout::first_typing(every, opened.index));
    loop {
        if *phase.borrow_and_update() == Phase::Stop {
            break;
        }
        let Some(c) = client.as_mut() else {
            client = reconnect(&ctx, &opened, class, &mut positions, &mut hops).await;
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
                Ok(Some(Incoming::Text(p))) => {
                    match on_text(p, ctx.run_id, &ctx.room_names, &mut positions, &mut tally) {
                        Reply::Subscribed(answer) => {
                            if let Some(room) = positions.pending {
                                if let Some(resumed) = positions.joined(room, answer) {
                                    stats.resumed(resumed, ctx.mix.history_size, ctx.most_events(room));
                                }
                            }
                        }
                        Reply::Error => {
                            stats.error_replies.fetch_add(1, Relaxed);
                            positions.refused();
                        }
                        Reply::None => {}
                    }
                }
                // Only fanout samples inflation; here every message is read.
                Ok(Some(Incoming::Binary | Incoming::Uninflated)) => tally.malformed += 1,
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
        if class != Class::Steady && next_disrupt.is_none() {
            if let Some((_, end)) = ctx.window().filter(|(_, end)| now < *end) {
                next_disrupt = Some(now + rng.around(ctx.mix.every(class))).filter(|at| *at < end);
            }
        }
        let wake = tokio::select! {
            biased;
            changed = phase.changed() => if changed.is_ok() { Wake::Phase } else { Wake::PhaseGone },
            () = tokio::time::sleep_until(next_disrupt.unwrap_or(now)), if next_disrupt.is_some() => Wake::Disrupt,
            () = tokio::time::sleep_until(next_typing.unwrap_or(now)), if next_typing.is_some() => Wake::Typing,
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
                        rng.upto(ctx.mix.outage)
                    }
                    Class::Stall => {
                        stats.stalls.fetch_add(1, Relaxed);
                        ctx.mix.stall_for
                    }
                    Class::Switch => {
                        if positions.pending.is_none() {
                            let (from, _) = positions.target(opened.room);
                            let next = ctx.mix.next_room(opened.room, positions.current.map(|_| from));
                            let (left, since) = positions.switch_to(next);
                            if let Some(c) = client.as_mut() {
                                if let Some(left) = left {
                                    c.queue_unsubscribe(&ctx.spec.rooms[left]);
                                }
                                c.queue_subscribe(&ctx.spec.rooms[next], since);
                            }
                            stats.switches.fetch_add(1, Relaxed);
                        }
                        Duration::ZERO
                    }
                    Class::Steady => Duration::ZERO,
                };
                // Back by the end of publishing, whatever --outage or --stall-for say: a
                // connection still away when the run stops could not have had the rest, and
                // the drain is for catching up, not for coming back.
                let left = ctx
                    .window()
                    .map_or(Duration::ZERO, |(_, end)| end.saturating_duration_since(Instant::now()));
                let pause = pause.min(left);
                if !pause.is_zero() {
                    // Not reading: a stop during the pause still ends the task.
                    tokio::select! {
                        _ = phase.changed() => {}
                        () = tokio::time::sleep(pause) => {}
                    }
                }
            }
            Wake::Typing => {
                next_typing = next_typing.zip(ctx.typing).map(|(at, every)| at + every);
                // Only in a room it is settled in: a typing the server refuses would read as a
                // refused subscribe.
                if let (Some(room), Some(c)) = (positions.settled_room(), client.as_mut()) {
                    c.queue_typing(&ctx.room_names[room]);
                }
            }
            Wake::Read(Ok(n)) if n > 0 => {}
            Wake::Read(_) => {
                stats.closed(CLOSE_ABNORMAL);
                client = None;
            }
        }
    }
    // Every event accepted for a room lies in (start, start + accepted]; what is above the last
    // seq seen never arrived.
    let (expected, tail) = positions.settle(|room| ctx.final_head(room));
    stats.expected.fetch_add(expected, Relaxed);
    stats.tail_missing.fetch_add(tail, Relaxed);
    stats.max_replay_bytes.fetch_max(positions.max_replay_bytes(), Relaxed);
    if let Some(c) = client {
        c.close().await;
    }
}

/// Opens the connection again, on the node after the one it was on (`hops` reconnects so far),
/// and joins the room it should be in, with `since` where it was there; counts the outcome.
/// `None` when the attempt failed (the caller backs off and retries the same node).
async fn reconnect(
    ctx: &Ctx,
    opened: &Opened,
    class: Class,
    positions: &mut Positions,
    hops: &mut usize,
) -> Option<WsClient> {
    let stats = ctx.stats(class);
    let (room, since) = positions.target(opened.room);
    let node = ctx.spec.node(opened.index, *hops + 1);
    match pool::reopen(&ctx.spec, opened, node, room, since).await {
        Ok((client, answer)) => {
            let moved = node != ctx.spec.node(opened.index, *hops);
            *hops += 1;
            if let Some(resumed) = positions.joined(room, answer) {
                stats.resumed(resumed, ctx.mix.history_size, ctx.most_events(room));
                if moved {
                    stats.node_moves.fetch_add(1, Relaxed);
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

/// A control reply the connection task acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reply {
    None,
    Subscribed(Subscribed),
    Error,
}

/// Accounts one text frame of a connection.
fn on_text(p: &[u8], run_id: u64, names: &[String], positions: &mut Positions, tally: &mut Tally) -> Reply {
    match msg::classify(p) {
        ServerMsg::Delivery(d) => {
            match positions.observe(d.chat_id, d.seq, p.len(), names) {
                None => {
                    // A room this connection never joined.
                    tally.malformed += 1;
                    return Reply::None;
                }
                Some(SeqOutcome::Duplicate) => {
                    tally.duplicated += 1;
                    return Reply::None;
                }
                Some(SeqOutcome::Gap(n)) => tally.gap_missing += n,
                Some(SeqOutcome::First | SeqOutcome::InOrder) => {}
            }
            if d.run == Some(run_id) {
                tally.deliveries += 1;
            } else {
                tally.foreign += 1;
            }
            Reply::None
        }
        ServerMsg::Malformed => {
            tally.malformed += 1;
            Reply::None
        }
        ServerMsg::Subscribed(answer) => Reply::Subscribed(answer),
        ServerMsg::Error(_) => Reply::Error,
        ServerMsg::Pong | ServerMsg::Other => Reply::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    fn answer(seq: u64, recovered: Option<bool>) -> Subscribed {
        Subscribed { seq: Some(seq), recovered }
    }

    fn names() -> Vec<String> {
        (0..4).map(|i| room_id(0, i).to_string()).collect()
    }

    fn frame(room: usize, seq: u64, run: u64) -> String {
        format!(
            r#"{{"type":"message.new","chat_id":"{}","seq":{seq},"data":{{"id":"i","content":"x","run":{run}}}}}"#,
            names()[room]
        )
    }

    /// Feeds deliveries of `room` to `p`, as run 1.
    fn feed(p: &mut Positions, t: &mut Tally, room: usize, seqs: impl IntoIterator<Item = u64>) {
        for seq in seqs {
            assert_eq!(on_text(frame(room, seq, 1).as_bytes(), 1, &names(), p, t), Reply::None);
        }
    }

    fn mix(args: &[&str], switching: Option<Switching>) -> Mix {
        let mut argv = vec!["loadgen", "recovery", "--jwt-secret", "s"];
        argv.extend_from_slice(args);
        let crate::cli::Command::Recovery(r) = crate::cli::Cli::parse_from(argv).command else {
            panic!("recovery")
        };
        Mix::new(r.streams.conns, &r.streams, switching).expect("fits")
    }

    /// A room position as Herald gives it: its counter starts at the Unix time in microseconds.
    const ORIGIN: u64 = 1_765_000_000_000_000;

    #[test]
    fn a_recovered_resume_continues_the_stream_with_no_gap_and_no_duplicate() {
        let o = ORIGIN;
        let mut p = Positions::new(0, Some(o + 10));
        let mut t = Tally::default();
        feed(&mut p, &mut t, 0, o + 11..=o + 14);
        // Dropped after 14; the room moved on to 19 meanwhile.
        assert_eq!(p.target(0), (0, Some(o + 14)));
        assert_eq!(p.joined(0, answer(o + 19, Some(true))), Some(Resumed::Recovered { behind: 5 }));
        // The replay (15..=19), then live events.
        feed(&mut p, &mut t, 0, o + 15..=o + 21);
        assert_eq!((t.deliveries, t.gap_missing, t.duplicated), (11, 0, 0));
        assert_eq!(p.settle(|_| Some(o + 21)), (11, 0));
        assert_eq!(p.settle(|_| Some(o + 25)), (15, 4), "events after the last one seen are the tail");
        // The replay's five frames arrived whole.
        assert_eq!(p.max_replay_bytes(), 5 * frame(0, o + 15, 1).len() as u64);
    }

    #[test]
    fn a_new_room_at_its_origin_expects_only_what_follows_it() {
        // Told the origin (no event yet), then the room's first events: nothing before counts.
        let mut p = Positions::new(2, Some(ORIGIN));
        let mut t = Tally::default();
        feed(&mut p, &mut t, 2, ORIGIN + 1..=ORIGIN + 3);
        assert_eq!((t.deliveries, t.gap_missing), (3, 0));
        assert_eq!(p.settle(|_| Some(ORIGIN + 3)), (3, 0));
        // A server that starts at 1 tells 0 for a new room: the same accounting.
        let mut p = Positions::new(2, Some(0));
        feed(&mut p, &mut t, 2, 1..=3);
        assert_eq!((t.deliveries, t.gap_missing), (6, 0));
        assert_eq!(p.settle(|_| Some(4)), (4, 1));
        // No position given: the first delivery starts the stream, whatever its seq.
        let mut p = Positions::new(2, None);
        assert_eq!(p.settle(|_| Some(ORIGIN + 9)), (0, 0), "nothing known, nothing expected");
        feed(&mut p, &mut t, 2, ORIGIN + 7..=ORIGIN + 8);
        assert_eq!((t.deliveries, t.gap_missing), (8, 0));
        assert_eq!(p.settle(|_| Some(ORIGIN + 9)), (3, 1));
    }

    #[test]
    fn a_replay_that_repeats_or_skips_is_counted() {
        let mut p = Positions::new(0, Some(0));
        let mut t = Tally::default();
        feed(&mut p, &mut t, 0, 1..=3);
        assert_eq!(p.joined(0, answer(6, Some(true))), Some(Resumed::Recovered { behind: 3 }));
        // The server replays 3 again, forgets 4, then sends 5 and 6.
        feed(&mut p, &mut t, 0, [3, 5, 6]);
        assert_eq!((t.deliveries, t.gap_missing, t.duplicated), (5, 1, 1));
    }

    #[test]
    fn an_unrecovered_resume_restarts_after_the_answer_and_says_how_much_was_skipped() {
        let mut r = Resume::new(Some(5));
        assert_eq!(r.observe(6, 1), SeqOutcome::InOrder);
        assert_eq!(r.resumed(answer(300, Some(false))), Resumed::NotRecovered { last: 6, seq: 300 });
        assert_eq!(r.since(), 300);
        assert_eq!(r.observe(301, 1), SeqOutcome::InOrder);
        // A server without recovery answers no `recovered` field.
        assert_eq!(r.resumed(answer(310, None)), Resumed::Unanswered { last: 301, seq: 310 });
        assert_eq!(r.observe(311, 1), SeqOutcome::InOrder);
        assert_eq!(r.observe(311, 1), SeqOutcome::Duplicate);
        // Expected: 6 (one event), 301 (one), then the stretch after 310; the skipped ones not.
        assert_eq!(r.expected(312), 1 + 1 + 2);
    }

    #[test]
    fn a_reset_room_is_a_new_stretch_not_a_flood_of_lost_or_skipped_events() {
        // Since 14 from the room's first life; it was forgotten and made again at a later origin.
        let (o, later) = (ORIGIN, ORIGIN + 90_000_000);
        let mut p = Positions::new(0, Some(o + 10));
        let mut t = Tally::default();
        feed(&mut p, &mut t, 0, o + 11..=o + 14);
        let resumed = p.joined(0, answer(later, Some(false))).expect("a resume");
        assert_eq!(resumed, Resumed::NotRecovered { last: o + 14, seq: later });
        feed(&mut p, &mut t, 0, later + 1..=later + 2);
        assert_eq!((t.deliveries, t.gap_missing, t.duplicated), (6, 0, 0));
        assert_eq!(p.settle(|_| Some(later + 3)), (4 + 3, 1));
        // Counted as a reset, not as 90 million events skipped; a real skip is counted.
        let stats = ClassStats::default();
        stats.resumed(resumed, 100, 500);
        stats.resumed(Resumed::NotRecovered { last: 5, seq: 300 }, 100, 500);
        stats.resumed(Resumed::NotRecovered { last: 300, seq: 1 }, 100, 500);
        let r = stats.report("churn");
        assert_eq!((r.not_recovered, r.not_recovered_skipped, r.position_resets), (3, 295, 2));
        assert_eq!(r.not_recovered_reasons.values().sum::<u64>(), 3);
    }

    #[test]
    fn classes_split_by_index_and_other_runs_are_not_deliveries() {
        let m = mix(&["--conns", "8", "--churn", "0.25", "--stall", "0.125"], None);
        let classes: Vec<Class> = (0..4).map(|i| m.class_of(i)).collect();
        assert_eq!(classes, [Class::Churn, Class::Churn, Class::Stall, Class::Steady]);
        let m = mix(
            &["--conns", "8", "--churn", "0.25", "--stall", "0.125"],
            Some(Switching { fraction: 0.25, every: Duration::from_secs(1), rooms: 3 }),
        );
        let classes: Vec<Class> = (2..6).map(|i| m.class_of(i)).collect();
        assert_eq!(classes, [Class::Stall, Class::Switch, Class::Switch, Class::Steady]);
        let mut p = Positions::new(0, Some(0));
        let mut t = Tally::default();
        on_text(frame(0, 1, 9).as_bytes(), 1, &names(), &mut p, &mut t);
        on_text(frame(0, 2, 1).as_bytes(), 1, &names(), &mut p, &mut t);
        // A room this connection never joined is not its stream.
        on_text(frame(3, 3, 1).as_bytes(), 1, &names(), &mut p, &mut t);
        assert_eq!((t.deliveries, t.foreign, t.gap_missing, t.malformed), (1, 1, 0, 1));
    }

    #[test]
    fn switchers_rotate_through_their_rooms_and_wrap_around_the_room_count() {
        let switching = Some(Switching { fraction: 0.5, every: Duration::from_secs(1), rooms: 3 });
        let m = mix(&["--rooms", "4"], switching);
        let mut at = None;
        let tour: Vec<usize> = (0..4)
            .map(|_| {
                let next = m.next_room(2, at);
                at = Some(next);
                next
            })
            .collect();
        assert_eq!(tour, [2, 3, 0, 2]);
        assert_eq!(m.next_room(2, None), 2, "between rooms it goes home");
        assert!(Mix::new(10, &parse_streams(&["--churn", "0.6", "--stall", "0.3"]), switching).is_err());
    }

    fn parse_streams(args: &[&str]) -> StreamArgs {
        let mut argv = vec!["loadgen", "recovery", "--jwt-secret", "s"];
        argv.extend_from_slice(args);
        let crate::cli::Command::Recovery(r) = crate::cli::Cli::parse_from(argv).command else {
            panic!("recovery")
        };
        r.streams
    }

    #[test]
    fn a_switcher_accounts_each_room_as_one_stream_across_visits() {
        let mut p = Positions::new(0, Some(10));
        let mut t = Tally::default();
        feed(&mut p, &mut t, 0, 11..=12);
        // To room 1 (first visit): no since; the stream there starts at the answer.
        assert_eq!(p.switch_to(1), (Some(0), None));
        // Room 0's frames still queued before `unsubscribed` count for room 0.
        feed(&mut p, &mut t, 0, [13]);
        assert_eq!(p.joined(1, answer(40, None)), None);
        feed(&mut p, &mut t, 1, 41..=42);
        // Back to room 0 with since 13: the events missed there are replayed.
        assert_eq!(p.switch_to(0), (Some(1), Some(13)));
        assert_eq!(p.joined(0, answer(16, Some(true))), Some(Resumed::Recovered { behind: 3 }));
        feed(&mut p, &mut t, 0, 14..=17);
        assert_eq!((t.deliveries, t.gap_missing, t.duplicated, t.malformed), (9, 0, 0, 0));
        // In room 0 at the end (head 18): 13 - 10 + 5 expected there, one never came; room 1 up to
        // where it was left.
        assert_eq!(p.settle(|room| Some(if room == 0 { 18 } else { 50 })), (8 + 2, 1));
        // A reconnect while a switch is pending joins the pending room.
        assert_eq!(p.switch_to(1), (Some(0), Some(42)));
        assert_eq!(p.target(0), (1, Some(42)));
        p.refused();
        assert_eq!(p.target(0), (0, Some(17)), "refused: home again");
    }
}
