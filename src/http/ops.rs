//! Operations endpoints: `/healthz` (alive), `/readyz` (ready for traffic)
//! and Prometheus `/metrics`.

use std::fmt::Write;

use hyper::{header, Response, StatusCode};

use super::{json, App, Body};
use crate::bus::Health;
use crate::metrics::Gauges;

pub(super) fn healthz(app: &App) -> Response<Body> {
    match app.node.bus.health() {
        Health::Ok => json(StatusCode::OK, &serde_json::json!({"status": "ok"})),
        // Still serving WebSockets, so still 200; publishers see 503 on publish.
        Health::Degraded(reason) => {
            json(StatusCode::OK, &serde_json::json!({"status": "degraded", "reason": reason}))
        }
    }
}

/// `GET /readyz`: whether a load balancer should send this node new
/// clients and publishes: 503 while the bus cannot serve (new WebSockets
/// would be closed with 1011, publishes refused) or the node is draining.
pub(super) fn readyz(app: &App) -> Response<Body> {
    if app.node.shutdown.is_cancelled() {
        return json(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({"status": "not_ready", "reason": "shutting down"}),
        );
    }
    match app.node.bus.health() {
        Health::Ok => json(StatusCode::OK, &serde_json::json!({"status": "ready"})),
        Health::Degraded(reason) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({"status": "not_ready", "reason": reason}),
        ),
    }
}

pub(super) fn metrics(app: &App) -> Response<Body> {
    let node = &app.node;
    let gauges = Gauges {
        rooms: node.rooms.len(),
        users: node.users.len(),
        history_frames: node.rooms.held_frames(),
        history_bytes: node.rooms.held_bytes(),
        tasks: node.tasks.len(),
        members: node.membership.len(),
        backlog: node.rooms.backlog().owed(),
        backlog_limit: node.rooms.backlog().limit(),
        late: node.late.load(std::sync::atomic::Ordering::Relaxed),
        alarms: node.alarms.pending(),
        presence_users: node.presence.as_ref().map_or(0, |p| p.len()),
        typing_slots: node.presence.as_ref().map_or(0, |p| p.typing_slots()),
        process: crate::process::read(),
    };
    let mut text = node.metrics.render(&gauges, node.bus.health() == Health::Ok);
    for (name, help, value) in node.bus.gauges() {
        let _ =
            writeln!(text, "# HELP herald_{name} {help}\n# TYPE herald_{name} gauge\nherald_{name} {value}");
    }
    for (name, kind, help, value) in node.bans.metrics() {
        let _ =
            writeln!(text, "# HELP herald_{name} {help}\n# TYPE herald_{name} {kind}\nherald_{name} {value}");
    }
    for (name, kind, help, value) in node.bus.pressure().map(|p| p.metrics()).unwrap_or_default() {
        let _ =
            writeln!(text, "# HELP herald_{name} {help}\n# TYPE herald_{name} {kind}\nherald_{name} {value}");
    }
    for (name, help, value) in node.bus.counters() {
        let _ = writeln!(
            text,
            "# HELP herald_{name} {help}\n# TYPE herald_{name} counter\nherald_{name} {value}"
        );
    }
    for (name, help, label, samples) in node.bus.labelled_counters() {
        let _ = writeln!(text, "# HELP herald_{name} {help}\n# TYPE herald_{name} counter");
        for (at, value) in samples {
            // Label values are escaped as the text format asks (an address holds none of these).
            let at = at.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
            let _ = writeln!(text, "herald_{name}{{{label}=\"{at}\"}} {value}");
        }
    }
    let mut resp = Response::new(Body::from(text));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; version=0.0.4"));
    resp
}
