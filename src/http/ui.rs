//! What a browser loads from Herald: the JavaScript client at `/client.js`,
//! the node's numbers at `/api/stats`, and the demo page at `/` with the
//! demo user's token source `/demo/token` (true embedded default only: see
//! `demo::is_embedded_default`).

use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};

use super::{json, App, Body, HttpError};
use crate::bus::Health;
use crate::protocol::{ChatId, UserId};

/// The client, compiled in so the binary serves the version it speaks.
const CLIENT_JS: &str = include_str!("../../client/herald-client.js");
const PAGE: &str = include_str!("demo.html");
/// Where the page's settings go: a JSON object, or `null` without a demo.
const PAGE_SLOT: &str = "/*DEMO*/null";

/// The demo the page runs as. `main` builds it only on the true embedded
/// default, from credentials generated for that run (`demo::Demo::page`):
/// the page hands them to any request that names a loopback `Host`, which a
/// same-host proxy, a port-forward or a tunnel also sends, so it must never
/// carry a configured secret or key.
#[derive(Clone)]
pub struct DemoPage {
    /// The HS256 secret `/demo/token` signs with.
    pub secret: String,
    pub user: UserId,
    pub chat: ChatId,
    /// The key the page's publish form sends.
    pub api_key: String,
    /// Lifetime of each token `/demo/token` mints.
    pub token_ttl: Duration,
}

/// The page's switch and, on the true embedded default, its demo.
#[derive(Clone, Default)]
pub struct Ui {
    /// `ui.enabled`; unset means "only with a demo". `true` without a demo
    /// serves the page with no settings: it asks for a token, chat and key.
    pub enabled: Option<bool>,
    pub demo: Option<DemoPage>,
}

impl Ui {
    fn page_on(&self) -> bool {
        self.enabled.unwrap_or(self.demo.is_some())
    }

    /// The demo, when the page is on and the request names a loopback host:
    /// a page that carries an API key must not be readable through a DNS
    /// name rebound to 127.0.0.1 by some other site.
    fn demo_for(&self, req: &Request<Incoming>) -> Option<&DemoPage> {
        self.demo.as_ref().filter(|_| self.page_on() && loopback_host(req))
    }
}

/// `GET /client.js`: cacheable, revalidated by ETag, loadable cross-origin
/// (apps may import the client straight from their Herald).
pub(super) fn client_js(req: &Request<Incoming>) -> Response<Body> {
    let etag = etag();
    let fresh = req.headers().get(header::IF_NONE_MATCH).is_some_and(|v| v.as_bytes() == etag.as_bytes());
    let mut resp = if fresh {
        let mut r = Response::new(Body::default());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        Response::new(Body::from(CLIENT_JS))
    };
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/javascript; charset=utf-8"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=300, must-revalidate"));
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    resp
}

/// A strong validator of the compiled-in client.
fn etag() -> String {
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    let hash = CLIENT_JS
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    format!("\"{}-{hash:016x}\"", env!("CARGO_PKG_VERSION"))
}

/// `GET /api/stats`: the numbers the demo page plots; counters are totals,
/// the page derives per-second rates from two readings.
pub(super) fn stats(app: &App) -> Response<Body> {
    use std::sync::atomic::Ordering::Relaxed;
    let node = &app.node;
    let m = &node.metrics;
    json(
        StatusCode::OK,
        &serde_json::json!({
            "connections": m.connections_active.load(Relaxed),
            "subscriptions": m.subscriptions_active.load(Relaxed),
            "rooms": node.rooms.len(),
            "users": node.users.len(),
            "events_in_total": m.events_in.load(Relaxed),
            "frames_out_total": m.frames_out.get(),
            "slow_consumers_dropped_total": m.slow_consumers.load(Relaxed),
            "bus_up": node.bus.health() == Health::Ok,
        }),
    )
}

/// `GET /`: the demo page, with the demo's settings when there is one.
pub(super) fn page(app: &App, req: &Request<Incoming>) -> Result<Response<Body>, HttpError> {
    if !app.ui.page_on() {
        return Err(HttpError::NotFound);
    }
    let settings = match app.ui.demo_for(req) {
        Some(demo) => serde_json::json!({
            "user": demo.user,
            "chat": demo.chat,
            "apiKey": demo.api_key,
            "tokenUrl": "/demo/token",
        })
        .to_string()
        // A `</script>` inside a string must not end the script element.
        .replace('<', "\\u003c"),
        None => "null".to_string(),
    };
    let mut resp = Response::new(Body::from(PAGE.replacen(PAGE_SLOT, &settings, 1)));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    // It may carry the demo's API key: never store it.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    Ok(resp)
}

/// `GET /demo/token`: a fresh token for the demo user, as an app's backend
/// would hand one to its page (the client calls it on every reconnect).
pub(super) fn demo_token(app: &App, req: &Request<Incoming>) -> Result<Response<Body>, HttpError> {
    let demo = app.ui.demo_for(req).ok_or(HttpError::NotFound)?;
    let token = crate::auth::mint_hs256(&demo.secret, demo.user, &[demo.chat], demo.token_ttl);
    let mut resp = json(StatusCode::OK, &serde_json::json!({ "token": token }));
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

/// Whether the `Host` header names this machine (`localhost`, 127.x, `[::1]`).
fn loopback_host(req: &Request<Incoming>) -> bool {
    let Some(host) = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_page_has_the_settings_slot() {
        assert_eq!(super::PAGE.matches(super::PAGE_SLOT).count(), 1);
    }

    #[test]
    fn the_etag_is_quoted_and_versioned() {
        let etag = super::etag();
        assert!(etag.starts_with(&format!("\"{}-", env!("CARGO_PKG_VERSION"))) && etag.ends_with('"'));
    }
}
