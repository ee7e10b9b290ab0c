//! Run summaries: the figures of a fanout, idle, recovery or soak run, printed as aligned text or
//! one JSON object.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::procfs::CpuUse;
use crate::publish;
use crate::stats::Shared;

/// Publish -> deliver latency percentiles in microseconds.
#[derive(Debug, Default, Serialize)]
pub(crate) struct LatencyUs {
    pub(crate) samples: u64,
    pub(crate) mean: f64,
    pub(crate) p50: u64,
    pub(crate) p90: u64,
    pub(crate) p99: u64,
    pub(crate) p999: u64,
    pub(crate) max: u64,
}

impl LatencyUs {
    pub(crate) fn from_histogram(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return LatencyUs::default();
        }
        LatencyUs {
            samples: h.len(),
            mean: (h.mean() * 10.0).round() / 10.0,
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// How connecting went: common to every mode's report.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ConnectSummary {
    pub(crate) conns_requested: u32,
    pub(crate) conns_subscribed: u64,
    pub(crate) connect_errors: u64,
    pub(crate) connect_error_kinds: BTreeMap<String, u64>,
    pub(crate) connect_secs: f64,
    pub(crate) rooms: u32,
}

impl ConnectSummary {
    pub(crate) fn new(requested: u32, rooms: u32, shared: &Shared, took: Duration) -> Self {
        ConnectSummary {
            conns_requested: requested,
            conns_subscribed: shared.subscribed.load(Relaxed),
            connect_errors: shared.connect_errors.load(Relaxed),
            connect_error_kinds: shared.connect_error_kinds(),
            connect_secs: took.as_secs_f64(),
            rooms,
        }
    }

    /// The connect rows of a human summary; `rate` adds connects per second.
    fn rows(&self, t: &mut Table, rate: Option<f64>) {
        t.row("connections subscribed", format!("{} / {}", self.conns_subscribed, self.conns_requested));
        t.row("connect errors", self.connect_errors);
        errors(t, &self.connect_error_kinds);
        match rate {
            Some(rate) => t.row("connect time", format!("{:.2} s ({rate:.0} conns/s)", self.connect_secs)),
            None => t.row("connect time", format!("{:.2} s", self.connect_secs)),
        }
        t.row("rooms", self.rooms);
    }
}

/// What the publishers did, as the fanout, recovery and soak reports show it.
#[derive(Debug, Serialize)]
pub(crate) struct PublishSummary {
    pub(crate) events_accepted: u64,
    pub(crate) events_accepted_per_sec: f64,
    /// HTTP status -> count, 2xx included (429: the server pushed back).
    pub(crate) publish_statuses: BTreeMap<u16, u64>,
    pub(crate) publish_io_errors: u64,
    pub(crate) publish_first_error: Option<String>,
}

impl PublishSummary {
    /// The publishers' outcome over `secs` of publishing.
    pub(crate) fn new(stats: &publish::Stats, secs: f64) -> PublishSummary {
        let events_accepted = stats.events_accepted.load(Relaxed);
        PublishSummary {
            events_accepted,
            events_accepted_per_sec: events_accepted as f64 / secs.max(1e-9),
            publish_statuses: stats.statuses.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            publish_io_errors: stats.io_errors.load(Relaxed),
            publish_first_error: stats.first_error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }

    fn rows(&self, t: &mut Table, accepted: String) {
        t.row("events accepted", accepted);
        t.row("publish answers", map(&self.publish_statuses));
        if self.publish_io_errors > 0 {
            t.row("publish io errors", self.publish_io_errors);
        }
        t.opt("first publish error", self.publish_first_error.as_ref());
    }
}

/// CPU and memory both sides used over a run's window.
#[derive(Debug, Serialize)]
pub(crate) struct Usage {
    pub(crate) loadgen_cpu_secs: f64,
    pub(crate) loadgen_cpu_pct: f64,
    pub(crate) loadgen_rss_bytes: Option<u64>,
    pub(crate) server_cpu_secs: Option<f64>,
    pub(crate) server_cpu_pct: Option<f64>,
    pub(crate) server_rss_bytes: Option<u64>,
}

impl Usage {
    pub(crate) fn new(cpu: &CpuUse, loadgen_rss: Option<u64>, server_rss: Option<u64>) -> Usage {
        let window_secs = cpu.wall_secs.max(1e-9);
        Usage {
            loadgen_cpu_secs: cpu.own_secs,
            loadgen_cpu_pct: 100.0 * cpu.own_secs / window_secs,
            loadgen_rss_bytes: loadgen_rss,
            server_cpu_secs: cpu.server_secs,
            server_cpu_pct: cpu.server_secs.map(|s| 100.0 * s / window_secs),
            server_rss_bytes: server_rss,
        }
    }

    fn rows(&self, t: &mut Table, per_delivery_us: Option<f64>) {
        t.row(
            "loadgen cpu",
            format!("{:.2} s ({:.0}% of one core)", self.loadgen_cpu_secs, self.loadgen_cpu_pct),
        );
        t.opt("loadgen rss", self.loadgen_rss_bytes.map(mib));
        if let (Some(secs), Some(pct)) = (self.server_cpu_secs, self.server_cpu_pct) {
            t.row("server cpu", format!("{secs:.2} s ({pct:.0}% of one core)"));
        }
        t.opt("server cpu per delivery", per_delivery_us.map(|us| format!("{us:.2} us")));
        t.opt("server rss", self.server_rss_bytes.map(mib));
    }
}

#[derive(Debug, Serialize)]
pub(crate) struct FanoutReport {
    pub(crate) mode: &'static str,
    pub(crate) url: String,
    #[serde(flatten)]
    pub(crate) connect: ConnectSummary,
    pub(crate) batch: u32,
    pub(crate) rate_target: u64,
    pub(crate) warmup_secs: f64,
    pub(crate) duration_secs: f64,
    pub(crate) publish_requests: u64,
    #[serde(flatten)]
    pub(crate) published: PublishSummary,
    /// Deliveries of events published inside the measured window.
    pub(crate) deliveries: u64,
    pub(crate) deliveries_per_sec: f64,
    pub(crate) latency_us: LatencyUs,
    /// Deliveries of this run's events over the whole run (warmup and drain included).
    pub(crate) deliveries_total: u64,
    pub(crate) expected_deliveries: u64,
    /// expected - received over the whole run.
    pub(crate) lost: u64,
    /// False when some publishes had an unknown outcome, so `lost` is an estimate.
    pub(crate) lost_exact: bool,
    /// Received more than expected (with `lost_exact`, that means duplicates the seq check missed).
    pub(crate) extra_deliveries: u64,
    /// Events missing by the per-room seq check (gaps).
    pub(crate) seq_gap_missing: u64,
    pub(crate) duplicated: u64,
    pub(crate) foreign_deliveries: u64,
    pub(crate) malformed_frames: u64,
    pub(crate) protocol_errors: u64,
    /// Close codes the server sent (1006 = the connection ended without a close frame).
    pub(crate) close_codes: BTreeMap<u16, u64>,
    #[serde(flatten)]
    pub(crate) usage: Usage,
    pub(crate) server_cpu_us_per_delivery: Option<f64>,
    /// Deliveries that arrived inside the measured window (whenever published).
    pub(crate) deliveries_arrived: u64,
    /// The server's CPU over the window / `deliveries_arrived`: what runs with
    /// `--inflate-every` compare (they read the publish time of sampled deliveries only).
    pub(crate) server_cpu_us_per_arrived_delivery: Option<f64>,
    /// `--inflate-every`: inflate one compressed delivery in this many per connection.
    pub(crate) inflate_every: u32,
    /// Compressed deliveries counted without being inflated.
    pub(crate) uninflated_deliveries: u64,
    /// With `--presence`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) presence: Option<PresenceSummary>,
    /// `--compress` was given (the server may still have declined).
    pub(crate) compress: bool,
    /// Bytes the clients read off their sockets per delivery over the whole run (handshakes,
    /// replies and pings included).
    pub(crate) wire_bytes_per_delivery: Option<f64>,
    pub(crate) notes: Vec<String>,
}

#[derive(Debug, Serialize)]
pub(crate) struct IdleReport {
    pub(crate) mode: &'static str,
    pub(crate) url: String,
    #[serde(flatten)]
    pub(crate) connect: ConnectSummary,
    pub(crate) connect_rate_per_sec: f64,
    pub(crate) hold_secs: f64,
    /// Connections still open at the end of the hold.
    pub(crate) conns_open_at_end: u64,
    pub(crate) close_codes: BTreeMap<u16, u64>,
    pub(crate) server_pings_answered: u64,
    pub(crate) ping_check_sent: Option<u64>,
    pub(crate) ping_check_pongs: Option<u64>,
    /// `--warm`: one event was published to every subscribed room before the memory sample.
    pub(crate) warm: bool,
    /// With `--warm`: rooms published to (one event each).
    pub(crate) warm_rooms: Option<u64>,
    /// With `--warm`: how the warm-up publishes went.
    pub(crate) warm_publish: Option<PublishSummary>,
    /// With `--warm`: room event frames due, one per subscribed room per connection.
    pub(crate) warm_events_expected: Option<u64>,
    /// With `--warm`: distinct (connection, room) warm events that arrived within the wait.
    pub(crate) warm_events_received: Option<u64>,
    /// With `--warm`: warm events a connection received again for the same room.
    pub(crate) warm_events_duplicated: Option<u64>,
    /// With `--warm`: from the first publish until every event arrived (or the wait ended).
    pub(crate) warm_secs: Option<f64>,
    pub(crate) server_rss_before_bytes: Option<u64>,
    pub(crate) server_rss_after_bytes: Option<u64>,
    pub(crate) server_rss_bytes: Option<u64>,
    /// Server RSS growth per connection, right after connecting.
    pub(crate) bytes_per_conn: Option<f64>,
    /// The same at the end of the hold: what idle connections keep once the
    /// connect burst has settled (an allocator may give back what the
    /// handshakes left).
    pub(crate) bytes_per_conn_held: Option<f64>,
    /// Rooms each connection subscribed to (`--subs-per-conn`).
    pub(crate) subs_per_conn: u32,
    /// Server RSS growth while connecting, per subscription.
    pub(crate) bytes_per_subscription: Option<f64>,
    pub(crate) server_cpu_secs_during_hold: Option<f64>,
    pub(crate) loadgen_cpu_secs: f64,
    pub(crate) loadgen_rss_bytes: Option<u64>,
    pub(crate) notes: Vec<String>,
}

/// One class of connections in a recovery or soak run (steady, churn, stall, switch).
#[derive(Debug, Serialize)]
pub(crate) struct ClassReport {
    pub(crate) class: &'static str,
    pub(crate) conns: u64,
    /// Σ over the class's connections of the events of their room after the position each was
    /// told (its first `subscribed`, or an unrecovered resume's answer), up to the room's last
    /// event (or, in a room left, where it left; before an unrecovered resume, the last seen).
    pub(crate) expected_deliveries: u64,
    /// Distinct events of this run delivered (replays included, duplicates not).
    pub(crate) deliveries: u64,
    /// expected - deliveries.
    pub(crate) lost: u64,
    /// Events skipped between two deliveries (a seq gap).
    pub(crate) gap_missing: u64,
    /// Events after the last one a connection saw, when the run stopped.
    pub(crate) tail_missing: u64,
    pub(crate) duplicated: u64,
    pub(crate) foreign_deliveries: u64,
    /// Deliveries to a room the connection never joined, and unreadable room events.
    pub(crate) malformed_frames: u64,
    /// Error replies from the server (a refused subscribe, a rate limit).
    pub(crate) error_replies: u64,
    /// Sockets the client dropped on purpose (churn).
    pub(crate) drops: u64,
    /// Times a connection stopped reading (stall).
    pub(crate) stalls: u64,
    /// Moves to another room (switch).
    pub(crate) switches: u64,
    /// Subscribes with `since`: reconnects, and switchers' returns to a room.
    pub(crate) resumes: u64,
    /// Resumes by a reconnect to another node than the one the connection dropped from
    /// (several nodes given).
    pub(crate) resumes_on_other_node: u64,
    pub(crate) recovered: u64,
    /// Events the recovered resumes were behind (replayed).
    pub(crate) recovered_events: u64,
    pub(crate) max_behind_on_resume: u64,
    /// Frame bytes of the biggest recovered replay that arrived whole.
    pub(crate) max_replay_bytes: u64,
    /// Resumes answered `recovered:false` (or without `recovered`): unrecoverable.
    pub(crate) not_recovered: u64,
    /// Events the unrecovered resumes skipped (not expected, not lost).
    pub(crate) not_recovered_skipped: u64,
    /// Unrecovered resumes whose answer moved the position further than the room had events, or
    /// backwards: the room was made again at a new seq origin.
    pub(crate) position_resets: u64,
    pub(crate) not_recovered_reasons: BTreeMap<String, u64>,
    pub(crate) reconnect_errors: u64,
    pub(crate) reconnect_error_kinds: BTreeMap<String, u64>,
    /// Close codes the server sent this class (1006 = ended without a close frame).
    pub(crate) close_codes: BTreeMap<u16, u64>,
}

/// Presence and typing traffic of a `--presence` run (this process's counts).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PresenceSummary {
    pub(crate) typing_every_ms: u64,
    pub(crate) typing_sent: u64,
    pub(crate) typing_received: u64,
    /// `presence.join` and `presence.leave` frames received.
    pub(crate) presence_events_received: u64,
}

impl PresenceSummary {
    /// The counts so far, when the run has `--presence`.
    pub(crate) fn read(common: &crate::cli::CommonArgs) -> Option<PresenceSummary> {
        use std::sync::atomic::Ordering::Relaxed;
        common.presence.then(|| PresenceSummary {
            typing_every_ms: common.typing().map_or(0, |d| d.as_millis() as u64),
            typing_sent: crate::msg::TYPING_SENT.load(Relaxed),
            typing_received: crate::msg::TYPING_RECEIVED.load(Relaxed),
            presence_events_received: crate::msg::PRESENCE_RECEIVED.load(Relaxed),
        })
    }

    fn rows(&self, t: &mut Table) {
        t.row(
            "presence / typing",
            format!(
                "{} joins+leaves received; typing {} sent (every {} ms), {} received",
                self.presence_events_received, self.typing_sent, self.typing_every_ms, self.typing_received
            ),
        );
    }
}

/// The opening figures of a run of the healthy classes (recovery, soak).
#[derive(Debug, Serialize)]
pub(crate) struct StreamsHead {
    pub(crate) mode: &'static str,
    pub(crate) url: String,
    /// The other nodes (`--also-url`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) also_urls: Vec<String>,
    /// Where connections first connected (`--layout`), with several nodes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) layout: Option<&'static str>,
    #[serde(flatten)]
    pub(crate) connect: ConnectSummary,
    pub(crate) rate_target: u64,
    pub(crate) duration_secs: f64,
    pub(crate) drain_secs: f64,
    /// With `--presence`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) presence: Option<PresenceSummary>,
}

#[derive(Debug, Serialize)]
pub(crate) struct RecoveryReport {
    #[serde(flatten)]
    pub(crate) head: StreamsHead,
    pub(crate) churn_conns: u64,
    pub(crate) stall_conns: u64,
    pub(crate) churn_every_ms: u64,
    pub(crate) outage_max_ms: u64,
    pub(crate) stall_for_ms: u64,
    pub(crate) stall_every_ms: u64,
    pub(crate) stall_rcvbuf: u32,
    #[serde(flatten)]
    pub(crate) streams: StreamsSummary,
}

/// What a run of the healthy classes (recovery, soak) found: publishing, per-class accounting,
/// the server's metrics and the CPU and memory both sides used.
#[derive(Debug, Serialize)]
pub(crate) struct StreamsSummary {
    #[serde(flatten)]
    pub(crate) published: PublishSummary,
    /// False when some publishes had an unknown outcome, so `lost` is an estimate.
    pub(crate) lost_exact: bool,
    /// Σ of the classes' `lost`.
    pub(crate) lost: u64,
    pub(crate) duplicated: u64,
    pub(crate) not_recovered: u64,
    pub(crate) classes: Vec<ClassReport>,
    /// Change of the server's recovery metrics over the run (absent when /metrics failed).
    pub(crate) server_metrics_delta: Option<BTreeMap<String, f64>>,
    pub(crate) protocol_errors: u64,
    pub(crate) server_pings_answered: u64,
    #[serde(flatten)]
    pub(crate) usage: Usage,
    pub(crate) notes: Vec<String>,
}

/// One kind of abusive client in a soak run.
#[derive(Debug, Serialize)]
pub(crate) struct AbuseReport {
    pub(crate) kind: &'static str,
    pub(crate) clients: u64,
    /// Connections opened (each client comes back after being closed).
    pub(crate) connections: u64,
    /// The outcomes the server's limits promise for this kind.
    pub(crate) expected: Vec<&'static str>,
    /// How connections ended: close code, `http <status>`, `eof`, or a failure.
    pub(crate) outcomes: BTreeMap<String, u64>,
    /// Outcomes not in `expected`.
    pub(crate) unexpected: u64,
    /// Connections still open when the run stopped (abusing, or not yet cut off).
    pub(crate) open_at_end: u64,
    /// Tricklers' full-speed reads that found no close frame (another connection was dropped).
    pub(crate) rounds_unclosed: u64,
}

/// One sample of the server during a soak run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Sample {
    /// Since publishing started.
    pub(crate) t_secs: f64,
    pub(crate) server_rss_kb: Option<u64>,
    pub(crate) tasks: Option<f64>,
    pub(crate) connections: Option<f64>,
    /// Distinct users connected (every connection, and every reconnect, is a fresh user).
    pub(crate) users: Option<f64>,
    pub(crate) rooms: Option<f64>,
    pub(crate) history_bytes: Option<f64>,
    pub(crate) events_accepted: u64,
    /// Distinct deliveries to the healthy classes so far.
    pub(crate) deliveries: u64,
}

impl Sample {
    /// The series' header line, matching [`Sample::line`].
    pub(crate) const HEADER: &'static str =
        "     t s   rss KiB   tasks   conns   users   rooms  history B   events  deliveries";

    pub(crate) fn line(&self) -> String {
        let f = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.0}"));
        format!(
            "{:>8.1} {:>9} {:>7} {:>7} {:>7} {:>7} {:>10} {:>8} {:>11}",
            self.t_secs,
            self.server_rss_kb.map_or_else(|| "-".to_owned(), |k| k.to_string()),
            f(self.tasks),
            f(self.connections),
            f(self.users),
            f(self.rooms),
            f(self.history_bytes),
            self.events_accepted,
            self.deliveries
        )
    }
}

/// How the server's RSS moved after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub(crate) struct RssGrowth {
    /// Samples after warm-up that the figures use.
    pub(crate) samples: usize,
    /// Least-squares slope.
    pub(crate) slope_kb_per_min: f64,
    pub(crate) max_minus_min_kb: u64,
}

/// Whether the soak held: no loss for healthy clients, and every close explained.
#[derive(Debug, Serialize)]
pub(crate) struct Verdict {
    pub(crate) pass: bool,
    /// Σ lost over steady, churn, stall and switch.
    pub(crate) healthy_lost: u64,
    pub(crate) healthy_duplicated: u64,
    /// Healthy connections that ended without a close frame (1006) the client did not cause.
    /// (Resumes not recovered fail the verdict too; they are in the classes.)
    pub(crate) healthy_unexplained_drops: u64,
    /// Abusive connections that ended in a way their limit does not promise.
    pub(crate) abusive_unexpected: u64,
    /// Why it failed (empty on a pass).
    pub(crate) reasons: Vec<String>,
}

#[derive(Debug, Serialize)]
pub(crate) struct SoakReport {
    #[serde(flatten)]
    pub(crate) head: StreamsHead,
    pub(crate) warmup_secs: f64,
    pub(crate) series: Vec<Sample>,
    /// Over the samples after warm-up; absent without --server-pid or with fewer than 2 samples.
    pub(crate) rss_growth: Option<RssGrowth>,
    pub(crate) abuse: Vec<AbuseReport>,
    pub(crate) verdict: Verdict,
    /// `herald_backlog_frames` once every client closed (0 unless the
    /// server's accounting drifted); absent for a server without it.
    pub(crate) backlog_at_end: Option<f64>,
    #[serde(flatten)]
    pub(crate) streams: StreamsSummary,
}

/// Aligned "label  value" lines.
struct Table(String);

impl Table {
    fn row(&mut self, label: &str, value: impl std::fmt::Display) {
        let _ = writeln!(self.0, "  {label:<30} {value}");
    }

    fn opt<T: std::fmt::Display>(&mut self, label: &str, value: Option<T>) {
        if let Some(v) = value {
            self.row(label, v);
        }
    }
}

fn kib(bytes: u64) -> String {
    format!("{:.0} KiB", bytes as f64 / 1024.0)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn map<K: std::fmt::Display>(m: &BTreeMap<K, u64>) -> String {
    if m.is_empty() {
        return "none".to_owned();
    }
    m.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", ")
}

fn errors(t: &mut Table, kinds: &BTreeMap<String, u64>) {
    for (text, n) in kinds {
        t.row("", format!("{n} x {text}"));
    }
}

fn notes(t: &mut Table, notes: &[String]) {
    for n in notes {
        let _ = writeln!(t.0, "  note: {n}");
    }
}

impl FanoutReport {
    pub(crate) fn human(&self) -> String {
        let mut t = Table(format!("loadgen fanout against {}\n", self.url));
        self.connect.rows(&mut t, None);
        t.row("window", format!("{:.1} s after {:.1} s warmup", self.duration_secs, self.warmup_secs));
        let rate = if self.rate_target == 0 { "max".to_owned() } else { format!("{}/s", self.rate_target) };
        t.row("publish", format!("{} requests, batch {}, rate {rate}", self.publish_requests, self.batch));
        let p = &self.published;
        p.rows(&mut t, format!("{} ({:.0}/s)", p.events_accepted, p.events_accepted_per_sec));
        t.row("deliveries (window)", self.deliveries);
        t.row("deliveries/s", format!("{:.0}", self.deliveries_per_sec));
        let l = &self.latency_us;
        t.row(
            "latency us",
            format!("p50 {}  p90 {}  p99 {}  p99.9 {}  max {}", l.p50, l.p90, l.p99, l.p999, l.max),
        );
        t.row(
            "deliveries (whole run)",
            format!("{} of {} expected", self.deliveries_total, self.expected_deliveries),
        );
        let exact = if self.lost_exact { "" } else { " (estimate: some publishes had unknown outcome)" };
        t.row("lost", format!("{}{exact}", self.lost));
        if self.extra_deliveries > 0 {
            t.row("more than expected", self.extra_deliveries);
        }
        t.row("seq gaps (missing)", self.seq_gap_missing);
        t.row("duplicated", self.duplicated);
        if self.foreign_deliveries > 0 {
            t.row("deliveries of other runs", self.foreign_deliveries);
        }
        if let Some(p) = &self.presence {
            p.rows(&mut t);
        }
        if self.malformed_frames + self.protocol_errors > 0 {
            t.row(
                "malformed / protocol errors",
                format!("{} / {}", self.malformed_frames, self.protocol_errors),
            );
        }
        t.row("server close codes", map(&self.close_codes));
        t.opt(
            "wire bytes per delivery",
            self.wire_bytes_per_delivery
                .map(|b| format!("{b:.1} ({})", if self.compress { "compression offered" } else { "plain" })),
        );
        if self.inflate_every > 1 {
            t.row(
                "inflated",
                format!(
                    "1 in {} per connection ({} deliveries counted uninflated; latency and the seq check from the rest)",
                    self.inflate_every, self.uninflated_deliveries
                ),
            );
        }
        t.opt(
            "deliveries arrived in window",
            self.server_cpu_us_per_arrived_delivery
                .map(|us| format!("{} ({us:.2} us server CPU each)", self.deliveries_arrived)),
        );
        self.usage.rows(&mut t, self.server_cpu_us_per_delivery);
        notes(&mut t, &self.notes);
        t.0
    }
}

impl IdleReport {
    pub(crate) fn human(&self) -> String {
        let mut t = Table(format!("loadgen idle against {}\n", self.url));
        self.connect.rows(&mut t, Some(self.connect_rate_per_sec));
        t.row("held", format!("{:.1} s, {} still open at the end", self.hold_secs, self.conns_open_at_end));
        t.row("server close codes", map(&self.close_codes));
        t.row("server pings answered", self.server_pings_answered);
        if let (Some(sent), Some(pongs)) = (self.ping_check_sent, self.ping_check_pongs) {
            t.row("ping check", format!("{pongs} pongs for {sent} pings"));
        }
        self.warm_rows(&mut t);
        t.opt("server rss before", self.server_rss_before_bytes.map(mib));
        t.opt("server rss subscribed", self.server_rss_after_bytes.map(mib));
        t.opt("server rss at end", self.server_rss_bytes.map(mib));
        t.opt("server bytes per conn", self.bytes_per_conn.map(|b| format!("{b:.0}")));
        t.opt("server bytes per conn at end", self.bytes_per_conn_held.map(|b| format!("{b:.0}")));
        if self.subs_per_conn > 1 {
            t.row("subscriptions per conn", self.subs_per_conn);
            t.opt("server bytes per subscription", self.bytes_per_subscription.map(|b| format!("{b:.0}")));
        }
        t.opt("server cpu during hold", self.server_cpu_secs_during_hold.map(|s| format!("{s:.2} s")));
        t.row("loadgen cpu (whole run)", format!("{:.2} s", self.loadgen_cpu_secs));
        t.opt("loadgen rss", self.loadgen_rss_bytes.map(mib));
        notes(&mut t, &self.notes);
        t.0
    }
}

impl IdleReport {
    /// With `--warm`, the warm events that did not arrive as "received of expected", if any.
    pub(crate) fn warm_shortfall(&self) -> Option<(u64, u64)> {
        let (received, expected) = (self.warm_events_received?, self.warm_events_expected?);
        (received < expected).then_some((received, expected))
    }

    fn warm_rows(&self, t: &mut Table) {
        let (Some(rooms), Some(expected), Some(received)) =
            (self.warm_rooms, self.warm_events_expected, self.warm_events_received)
        else {
            t.row("warm", "no (rooms carry no event)");
            return;
        };
        t.row("warm", format!("yes: one event to each of {rooms} rooms"));
        if let Some(p) = &self.warm_publish {
            p.rows(t, format!("{} of {rooms}", p.events_accepted));
        }
        let secs = self.warm_secs.unwrap_or(0.0);
        let verdict = match self.warm_shortfall() {
            None => format!("all arrived in {secs:.2} s"),
            Some(_) => format!("FAIL: {} missing after {secs:.1} s", expected - received),
        };
        t.row("warm events received", format!("{received} of {expected} expected ({verdict})"));
        if let Some(dup) = self.warm_events_duplicated.filter(|d| *d > 0) {
            t.row("warm events duplicated", dup);
        }
    }
}

impl RecoveryReport {
    pub(crate) fn human(&self) -> String {
        let mut t = self.head.table();
        t.row(
            "classes",
            format!(
                "{} churn (every ~{} ms, away <= {} ms), {} stall ({} ms every ~{} ms, SO_RCVBUF {})",
                self.churn_conns,
                self.churn_every_ms,
                self.outage_max_ms,
                self.stall_conns,
                self.stall_for_ms,
                self.stall_every_ms,
                self.stall_rcvbuf
            ),
        );
        self.streams.rows(&mut t, &self.head);
        notes(&mut t, &self.streams.notes);
        t.0
    }
}

impl SoakReport {
    pub(crate) fn human(&self) -> String {
        let mut t = self.head.table();
        self.streams.rows(&mut t, &self.head);
        for a in &self.abuse {
            t.row(
                &format!("[{}] x{}", a.kind, a.clients),
                format!(
                    "{} connections: {} (expected {}){}",
                    a.connections,
                    map(&a.outcomes),
                    a.expected.join(" or "),
                    if a.open_at_end > 0 {
                        format!(", {} open at end", a.open_at_end)
                    } else {
                        String::new()
                    }
                ),
            );
        }
        let _ = writeln!(t.0, "  server over time (warm-up: first {:.0} s)", self.warmup_secs);
        let _ = writeln!(t.0, "  {}", Sample::HEADER);
        for s in &self.series {
            let _ = writeln!(t.0, "  {}", s.line());
        }
        t.opt(
            "rss after warm-up",
            self.rss_growth.map(|g| {
                format!(
                    "slope {:+.1} KiB/min, max-min {} KiB over {} samples",
                    g.slope_kb_per_min, g.max_minus_min_kb, g.samples
                )
            }),
        );
        t.opt("server backlog at end", self.backlog_at_end.map(|b| format!("{b} frames")));
        let v = &self.verdict;
        t.row(
            "verdict",
            format!(
                "{} (healthy lost {}, duplicated {}, unexplained drops {}; abusive unexpected {})",
                if v.pass { "PASS" } else { "FAIL" },
                v.healthy_lost,
                v.healthy_duplicated,
                v.healthy_unexplained_drops,
                v.abusive_unexpected
            ),
        );
        for r in &v.reasons {
            t.row("", r);
        }
        notes(&mut t, &self.streams.notes);
        t.0
    }
}

impl StreamsHead {
    /// The title and the connect rows.
    fn table(&self) -> Table {
        let mut t = Table(format!("loadgen {} against {}\n", self.mode, self.url));
        if !self.also_urls.is_empty() {
            t.row(
                "other nodes",
                format!("{} (layout {})", self.also_urls.join(", "), self.layout.unwrap_or("?")),
            );
        }
        self.connect.rows(&mut t, None);
        if let Some(p) = &self.presence {
            p.rows(&mut t);
        }
        t
    }
}

impl StreamsSummary {
    /// Publishing, every class, the server's metric changes, CPU and RSS.
    fn rows(&self, t: &mut Table, head: &StreamsHead) {
        let p = &self.published;
        p.rows(
            t,
            format!(
                "{} ({:.0}/s, target {}/s) over {:.1} s + {:.1} s drain",
                p.events_accepted,
                p.events_accepted_per_sec,
                head.rate_target,
                head.duration_secs,
                head.drain_secs
            ),
        );
        for c in &self.classes {
            let _ = writeln!(t.0, "  [{}] {} connections", c.class, c.conns);
            t.row("  deliveries", format!("{} of {} expected", c.deliveries, c.expected_deliveries));
            t.row("  lost (gaps / tail)", format!("{} ({} / {})", c.lost, c.gap_missing, c.tail_missing));
            t.row("  duplicated", c.duplicated);
            if c.drops + c.stalls + c.switches > 0 {
                t.row("  drops / stalls / switches", format!("{} / {} / {}", c.drops, c.stalls, c.switches));
            }
            if c.resumes > 0 || c.reconnect_errors > 0 {
                t.row(
                    "  resumes",
                    format!(
                        "{} ({} recovered, {} events replayed, max {} behind, biggest replay {})",
                        c.resumes,
                        c.recovered,
                        c.recovered_events,
                        c.max_behind_on_resume,
                        kib(c.max_replay_bytes)
                    ),
                );
                if c.resumes_on_other_node > 0 {
                    t.row("  resumed on another node", c.resumes_on_other_node);
                }
                t.row(
                    "  not recovered",
                    format!("{} ({} events skipped)", c.not_recovered, c.not_recovered_skipped),
                );
                for (reason, n) in &c.not_recovered_reasons {
                    t.row("", format!("{n} x {reason}"));
                }
                t.row("  reconnect errors", c.reconnect_errors);
                errors(t, &c.reconnect_error_kinds);
            }
            if c.foreign_deliveries + c.malformed_frames + c.error_replies > 0 {
                t.row(
                    "  foreign / malformed / errors",
                    format!("{} / {} / {}", c.foreign_deliveries, c.malformed_frames, c.error_replies),
                );
            }
            t.row("  server close codes", map(&c.close_codes));
        }
        let exact = if self.lost_exact { "" } else { " (estimate: some publishes had unknown outcome)" };
        t.row("lost (all classes)", format!("{}{exact}", self.lost));
        t.row("duplicated (all classes)", self.duplicated);
        t.row("not recovered (all classes)", self.not_recovered);
        if let Some(delta) = &self.server_metrics_delta {
            // Unchanged samples (most close codes) are left to the JSON.
            for (name, v) in delta.iter().filter(|(_, v)| **v != 0.0) {
                t.row(&format!("server {name}"), format!("{v:+}"));
            }
        }
        if self.protocol_errors > 0 {
            t.row("protocol errors", self.protocol_errors);
        }
        self.usage.rows(t, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_percentiles() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("bounds");
        for us in 1..=1000 {
            h.record(us).expect("in range");
        }
        let l = LatencyUs::from_histogram(&h);
        assert_eq!((l.samples, l.p50, l.max), (1000, 500, 1000));
        assert!(l.p99 >= 990 && l.p999 >= l.p99);
        assert_eq!(LatencyUs::from_histogram(&Histogram::<u64>::new(3).expect("new")).samples, 0);
    }
}
