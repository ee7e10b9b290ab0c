//! Process-wide counters and their Prometheus text rendering for `/metrics`.
//!
//! Plain atomics: the fan-out path adds per write (a batch of frames), never
//! per recipient on a shared counter.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

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
    pub events_in: AtomicU64,
    pub events_unknown: AtomicU64,
    pub publish_rejected: AtomicU64,
    pub publish_unavailable: AtomicU64,
    pub frames_out: AtomicU64,
    pub bytes_out: AtomicU64,
    pub write_syscalls: AtomicU64,
    pub slow_consumers: AtomicU64,
    pub client_errors: [AtomicU64; ERROR_CODES.len()],
    pub close_codes: [AtomicU64; CLOSE_CODES.len()],
}

/// The contract's client error codes, in the order of `client_errors`.
pub const ERROR_CODES: [&str; 5] =
    ["bad_request", "unknown_type", "forbidden", "too_many_subscriptions", "rate_limited"];

/// Close codes Herald sends, in the order of `close_codes`; the last slot
/// counts connections that ended without a close frame from us.
pub const CLOSE_CODES: [u16; 9] = [1000, 1001, 1002, 1008, 1009, 1011, 4001, 4008, 0];

fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Metrics {
    pub fn client_error(&self, code: &str) {
        if let Some(i) = ERROR_CODES.iter().position(|c| *c == code) {
            inc(&self.client_errors[i]);
        }
    }

    pub fn closed_with(&self, code: Option<u16>) {
        let code = code.unwrap_or(0);
        let i = CLOSE_CODES.iter().position(|c| *c == code).unwrap_or(CLOSE_CODES.len() - 1);
        inc(&self.close_codes[i]);
    }

    /// Renders the Prometheus text format; `rooms` and `users` are read from
    /// the registries at scrape time.
    pub fn render(&self, rooms: usize, users: usize, bus_healthy: bool) -> String {
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
        one("rooms", "gauge", "Rooms with at least one local subscriber.", rooms as u64);
        one("users", "gauge", "Users with at least one live connection.", users as u64);
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
        one("frames_out_total", "counter", "WebSocket frames written to clients.", get(&self.frames_out));
        one("bytes_out_total", "counter", "Bytes written to clients.", get(&self.bytes_out));
        one(
            "write_syscalls_total",
            "counter",
            "Socket writes (several frames may share one).",
            get(&self.write_syscalls),
        );
        one(
            "slow_consumers_dropped_total",
            "counter",
            "Connections closed with 4008.",
            get(&self.slow_consumers),
        );
        one("bus_up", "gauge", "1 when the event bus accepts publishes.", u64::from(bus_healthy));
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
        for (code, c) in ERROR_CODES.iter().zip(&self.client_errors) {
            let _ = writeln!(out, "herald_client_errors_total{{code=\"{code}\"}} {}", get(c));
        }
        let _ = writeln!(
            out,
            "# HELP herald_closes_total Connections ended, by the close code Herald sent (0: none)."
        );
        let _ = writeln!(out, "# TYPE herald_closes_total counter");
        for (code, c) in CLOSE_CODES.iter().zip(&self.close_codes) {
            let _ = writeln!(out, "herald_closes_total{{code=\"{code}\"}} {}", get(c));
        }
        out
    }
}
