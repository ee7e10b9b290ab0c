//! Process-wide counters and their Prometheus text rendering for `/metrics`.
//!
//! Plain atomics, except the counters every write adds to, which are striped
//! per thread: the fan-out path adds per write (a batch of frames), never per
//! recipient, and never to a cache line that other workers write too.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::{Ended, ErrorCode};
use crate::process::Process;
use crate::striped::{Histogram, Striped};

/// Gauges read from the registries at scrape time.
#[derive(Debug, Default, Clone, Copy)]
pub struct Gauges {
    pub rooms: usize,
    pub users: usize,
    pub history_frames: usize,
    pub history_bytes: usize,
    /// Connection tasks alive (with those still closing).
    pub tasks: usize,
    /// (chat, user) pairs in the membership table.
    pub members: usize,
    /// Room frames owed to this node's readers, and the limit past which
    /// publishers are pushed back.
    pub backlog: i64,
    pub backlog_limit: i64,
    /// Publishes pushed back for delivery latency (`api.overload_latency`).
    pub late: bool,
    /// Connection deadlines armed in the node's alarms.
    pub alarms: usize,
    /// (room, user) pairs present on this node (leaving ones included).
    pub presence_users: usize,
    /// Typing slots held: (room, user) pairs that sent a typing event within `presence.typing_interval`.
    pub typing_slots: usize,
    /// This process's facts (`None` where `/proc` is not available).
    pub process: Option<Process>,
}

/// Every counter and gauge Herald exports.
#[derive(Default)]
pub struct Metrics {
    pub connections_opened: AtomicU64,
    pub connections_closed: AtomicU64,
    pub connections_active: AtomicU64,
    pub subscriptions_active: AtomicU64,
    pub upgrades_rejected_auth: AtomicU64,
    pub upgrades_rejected_origin: AtomicU64,
    pub upgrades_rejected_limit: AtomicU64,
    /// HTTP connections open (before upgrade, or plain requests).
    pub http_connections: AtomicU64,
    /// Connections closed at accept: `server.max_http_connections` reached.
    pub http_rejected: AtomicU64,
    pub events_in: AtomicU64,
    pub events_unknown: AtomicU64,
    pub publish_rejected: AtomicU64,
    pub publish_unavailable: AtomicU64,
    /// Added to by every write of every connection: striped per thread.
    pub frames_out: Striped,
    pub bytes_out: Striped,
    pub write_syscalls: Striped,
    pub slow_consumers: AtomicU64,
    /// Subscriptions with `since` answered `recovered: true` / `false`.
    pub recovered: AtomicU64,
    pub not_recovered: AtomicU64,
    /// Times a connection fell behind a room's live ring and read on from
    /// its history instead.
    pub catchups: AtomicU64,
    /// Pings not answered because a pong to the same client was still
    /// waiting to be written.
    pub pongs_dropped: AtomicU64,
    /// permessage-deflate: frame compressions (at most two per frame, alone
    /// and after the room's previous frame, however many connections
    /// receive it), their payload bytes before and after, and
    /// the open connections that negotiated it.
    pub compressed_frames: AtomicU64,
    pub compression_bytes_in: AtomicU64,
    pub compression_bytes_out: AtomicU64,
    pub compression_connections: AtomicU64,
    /// Publishes refused with 429 because the node was overloaded.
    pub publish_overloaded: AtomicU64,
    /// Of those, the ones refused for another node's readers (shared pressure).
    pub publish_overloaded_remote: AtomicU64,
    /// Delivery latency, fed by the connections through the node's lag
    /// sensor ([`crate::node::Lag`]), which holds the other end.
    pub delivery_latency: Arc<Histogram>,
    /// How long `POST /api/events` took, from its request to its answer.
    pub publish_duration: Histogram,
    /// The median delivery lag of the last window (ms, lower bound of its bucket).
    pub lag_median_ms: AtomicU64,
    /// Typing events sent on to a room, and dropped by the rate limit.
    pub typing_delivered: AtomicU64,
    pub typing_dropped: AtomicU64,
    /// Presence and typing frames not queued because a mailbox was full.
    pub ephemeral_dropped: AtomicU64,
    pub client_errors: [AtomicU64; ErrorCode::ALL.len()],
    pub close_codes: [AtomicU64; Ended::LABELS.len()],
}

fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Metrics {
    pub fn client_error(&self, code: ErrorCode) {
        inc(&self.client_errors[code.index()]);
    }

    pub fn closed_with(&self, ended: Ended) {
        inc(&self.close_codes[ended.index()]);
    }

    /// Renders the Prometheus text format.
    pub fn render(&self, gauges: &Gauges, bus_healthy: bool) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut out = String::with_capacity(4096);
        let mut one = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP herald_{name} {help}\n# TYPE herald_{name} {kind}\nherald_{name} {value}"
            );
        };
        one("connections", "gauge", "Open WebSocket connections.", get(&self.connections_active));
        one(
            "connections_opened_total",
            "counter",
            "WebSocket connections accepted.",
            get(&self.connections_opened),
        );
        one(
            "connections_closed_total",
            "counter",
            "WebSocket connections ended.",
            get(&self.connections_closed),
        );
        one("subscriptions", "gauge", "Active room subscriptions.", get(&self.subscriptions_active));
        one("rooms", "gauge", "Rooms held on this node (with subscribers or history).", gauges.rooms as u64);
        one("users", "gauge", "Users with at least one live connection.", gauges.users as u64);
        one(
            "membership_pairs",
            "gauge",
            "(chat, user) pairs in the membership table (membership: events only).",
            gauges.members as u64,
        );
        one("tasks", "gauge", "Connection tasks alive, closing ones included.", gauges.tasks as u64);
        one("history_frames", "gauge", "Frames held in room histories.", gauges.history_frames as u64);
        one("history_bytes", "gauge", "Frame bytes held in room histories.", gauges.history_bytes as u64);
        one(
            "backlog_frames",
            "gauge",
            "Room frames published and not yet written to this node's readers (the overload signal).",
            gauges.backlog.max(0) as u64,
        );
        one(
            "backlog_limit_frames",
            "gauge",
            "Backlog above which publishes wait, then get 429.",
            gauges.backlog_limit.max(0) as u64,
        );
        one(
            "delivery_late",
            "gauge",
            "1 while most socket writes send frames older than api.overload_latency (publishes wait, then get 429).",
            u64::from(gauges.late),
        );
        one(
            "alarms",
            "gauge",
            "Connection deadlines (ping, silence, expiry, stalled write) armed and not yet rung.",
            gauges.alarms as u64,
        );
        one(
            "catchups_total",
            "counter",
            "Times a connection fell behind a room's live ring and read on from its history.",
            get(&self.catchups),
        );
        one("events_in_total", "counter", "Domain events accepted for delivery.", get(&self.events_in));
        one(
            "events_unknown_total",
            "counter",
            "Domain events of unknown type, ignored.",
            get(&self.events_unknown),
        );
        one(
            "publish_rejected_total",
            "counter",
            "Publish requests refused (400/401/413).",
            get(&self.publish_rejected),
        );
        one(
            "publish_unavailable_total",
            "counter",
            "Publish requests answered 503.",
            get(&self.publish_unavailable),
        );
        one("frames_out_total", "counter", "WebSocket frames written to clients.", self.frames_out.get());
        one("bytes_out_total", "counter", "Bytes written to clients.", self.bytes_out.get());
        one(
            "write_syscalls_total",
            "counter",
            "Socket writes (several frames may share one).",
            self.write_syscalls.get(),
        );
        one(
            "slow_consumers_dropped_total",
            "counter",
            "Connections closed with 4008.",
            get(&self.slow_consumers),
        );
        one(
            "pongs_dropped_total",
            "counter",
            "Client pings left unanswered because an earlier pong was still unwritten.",
            get(&self.pongs_dropped),
        );
        one(
            "compressed_frames_total",
            "counter",
            "Frame compressions for permessage-deflate (at most two per frame, alone and after the room's previous one, whatever its recipients).",
            get(&self.compressed_frames),
        );
        one(
            "compression_bytes_in_total",
            "counter",
            "Payload bytes of the frames compressed, before compression.",
            get(&self.compression_bytes_in),
        );
        one(
            "compression_bytes_out_total",
            "counter",
            "Payload bytes of the frames compressed, after compression.",
            get(&self.compression_bytes_out),
        );
        one(
            "compression_connections",
            "gauge",
            "Open connections that negotiated permessage-deflate.",
            get(&self.compression_connections),
        );
        one(
            "http_connections",
            "gauge",
            "HTTP connections open (not upgraded).",
            get(&self.http_connections),
        );
        one(
            "http_rejected_total",
            "counter",
            "Connections closed at accept because server.max_http_connections were open.",
            get(&self.http_rejected),
        );
        one(
            "publish_overloaded_total",
            "counter",
            "Publish requests answered 429: the node could not fan out as fast as events arrived.",
            get(&self.publish_overloaded),
        );
        one(
            "publish_overloaded_remote_total",
            "counter",
            "Of the publishes answered 429, those refused for rooms another node reported overloaded.",
            get(&self.publish_overloaded_remote),
        );
        one(
            "delivery_lag_median_ms",
            "gauge",
            "Median wait of the oldest room frame a socket write sent, over the last 50 ms.",
            get(&self.lag_median_ms),
        );
        one(
            "presence_users",
            "gauge",
            "(room, user) pairs present on this node, those within presence.leave_delay included.",
            gauges.presence_users as u64,
        );
        one(
            "typing_slots",
            "gauge",
            "(room, user) pairs whose typing slot is taken: a typing event within presence.typing_interval.",
            gauges.typing_slots as u64,
        );
        one(
            "typing_delivered_total",
            "counter",
            "Typing events sent on to a room's subscribers.",
            get(&self.typing_delivered),
        );
        one(
            "typing_dropped_total",
            "counter",
            "Typing events dropped: more than one per user per room per presence.typing_interval.",
            get(&self.typing_dropped),
        );
        one(
            "ephemeral_dropped_total",
            "counter",
            "Presence and typing frames not queued for a connection whose mailbox or write queue was full.",
            get(&self.ephemeral_dropped),
        );
        one("bus_up", "gauge", "1 when the event bus accepts publishes.", u64::from(bus_healthy));
        let _ = writeln!(out, "# HELP herald_recoveries_total Subscriptions with since, by outcome.");
        let _ = writeln!(out, "# TYPE herald_recoveries_total counter");
        for (result, c) in [("recovered", &self.recovered), ("not_recovered", &self.not_recovered)] {
            let _ = writeln!(out, "herald_recoveries_total{{result=\"{result}\"}} {}", get(c));
        }
        let _ = writeln!(out, "# HELP herald_upgrades_rejected_total Upgrades refused before the handshake.");
        let _ = writeln!(out, "# TYPE herald_upgrades_rejected_total counter");
        for (reason, c) in [
            ("auth", &self.upgrades_rejected_auth),
            ("origin", &self.upgrades_rejected_origin),
            ("limit", &self.upgrades_rejected_limit),
        ] {
            let _ = writeln!(out, "herald_upgrades_rejected_total{{reason=\"{reason}\"}} {}", get(c));
        }
        let _ = writeln!(out, "# HELP herald_client_errors_total Error replies sent to clients, by code.");
        let _ = writeln!(out, "# TYPE herald_client_errors_total counter");
        for (code, c) in ErrorCode::ALL.iter().zip(&self.client_errors) {
            let _ = writeln!(out, "herald_client_errors_total{{code=\"{}\"}} {}", code.as_str(), get(c));
        }
        let _ = writeln!(
            out,
            "# HELP herald_closes_total Connections ended, by the close code sent (other: a client's own code echoed; none: no close frame)."
        );
        let _ = writeln!(out, "# TYPE herald_closes_total counter");
        for (code, c) in Ended::LABELS.iter().zip(&self.close_codes) {
            let _ = writeln!(out, "herald_closes_total{{code=\"{code}\"}} {}", get(c));
        }
        self.delivery_latency.render(
            &mut out,
            "delivery_latency_seconds",
            "Age of the oldest frame a connection takes for its socket, once per wake: from the event reaching this node to its write.",
        );
        self.publish_duration.render(
            &mut out,
            "publish_duration_seconds",
            "Time to answer POST /api/events (admission wait and bus handoff included), any status.",
        );
        let _ = writeln!(out, "# HELP herald_build_info The running Herald's version; always 1.");
        let _ = writeln!(out, "# TYPE herald_build_info gauge");
        let _ = writeln!(out, "herald_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
        if let Some(p) = &gauges.process {
            render_process(&mut out, p);
        }
        out
    }
}

/// The standard process metrics, under their usual names (no `herald_`
/// prefix), so stock dashboards and alerts find them.
fn render_process(out: &mut String, p: &Process) {
    let samples: [(&str, &str, &str, f64); 4] = [
        ("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", p.resident_bytes as f64),
        ("process_cpu_seconds_total", "counter", "User and system CPU time spent in seconds.", p.cpu_seconds),
        ("process_open_fds", "gauge", "Number of open file descriptors.", p.open_fds as f64),
        (
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since the Unix epoch in seconds.",
            p.start_time_seconds,
        ),
    ];
    for (name, kind, help, value) in samples {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
    }
}
