//! The HTTP edge: routes `/ws` (`ws`), `/api/events`, `/api/info` and
//! `/api/rooms/{chat_id}/history` (`api`), `/api/users/{id}/disconnect` and
//! `/api/users/{id}/revoke` (`act`), the operator endpoints `/healthz`,
//! `/readyz` and `/metrics` (`ops`) and the browser's `/`, `/client.js`,
//! `/api/stats` and `/demo/token` (`ui`); decides which listener serves
//! which route ([`Surface`]); and holds the one API key gate and the one
//! mapping from edge errors to status codes and JSON bodies.

mod act;
mod api;
mod ops;
mod ui;
mod ws;

pub use ui::{DemoPage, Ui};

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{header, Method, Request, Response, StatusCode};
use tokio::sync::Semaphore;

use crate::auth::Verifier;
use crate::config::BusKind;
use crate::node::Node;

/// Response body type of every route.
pub type Body = Full<Bytes>;

/// What the HTTP routes share.
pub struct App {
    pub node: Arc<Node>,
    pub verifier: Verifier,
    pub api_keys: Vec<String>,
    pub allowed_origins: Vec<String>,
    pub max_body_bytes: usize,
    /// One permit per open WebSocket (`server.max_connections`); each
    /// connection task holds its permit until it ends.
    pub conn_limit: Arc<Semaphore>,
    /// The demo page's switch and demo (`ui.enabled`).
    pub ui: Ui,
    /// When the node started serving, for `/api/info`'s uptime.
    pub started: Instant,
    /// `bus.kind`, for `/api/info`.
    pub bus_kind: BusKind,
}

/// The routes one listener serves: the one place that decides what
/// `server.internal_listen` moves off the public port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// The only listener (no `server.internal_listen`): every route.
    All,
    /// `server.listen` beside an internal listener: the browser's routes
    /// (`/ws`, `/client.js`, `/`, `/demo/token`); the operator's are 404.
    Public,
    /// `server.internal_listen`: the operator's routes (`/api/*`,
    /// `/metrics`, `/healthz`, `/readyz`); the browser's are 404.
    Internal,
}

impl Surface {
    /// Whether this listener serves `path` at all (else 404, whatever the method).
    pub fn serves(self, path: &str) -> bool {
        match self {
            Surface::All => true,
            Surface::Public => !Surface::is_operators(path),
            Surface::Internal => Surface::is_operators(path),
        }
    }

    /// The operator's routes: the server API (everything under `/api/`,
    /// routes added later included), metrics and health.
    fn is_operators(path: &str) -> bool {
        path.starts_with("/api/") || matches!(path, "/metrics" | "/healthz" | "/readyz")
    }
}

/// An error answered at the edge; never leaks internals.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("origin not allowed")]
    Forbidden,
    #[error("{0}")]
    BadRequest(String),
    #[error("body larger than {0} bytes")]
    TooLarge(usize),
    #[error("{0}")]
    Unavailable(String),
    /// The node cannot fan out as fast as events arrive: retry later.
    #[error("overloaded")]
    Overloaded,
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
}

impl HttpError {
    fn status(&self) -> StatusCode {
        match self {
            HttpError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            HttpError::Forbidden => StatusCode::FORBIDDEN,
            HttpError::BadRequest(_) => StatusCode::BAD_REQUEST,
            HttpError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            HttpError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            HttpError::NotFound => StatusCode::NOT_FOUND,
            HttpError::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            HttpError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    pub fn into_response(self) -> Response<Body> {
        let overloaded = matches!(self, HttpError::Overloaded);
        let mut resp = json(self.status(), &serde_json::json!({ "error": self.to_string() }));
        if overloaded {
            resp.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        resp
    }
}

/// A JSON response.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(value.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    resp
}

impl App {
    /// Routes one request that arrived on a listener serving `surface`.
    pub async fn handle(self: Arc<Self>, surface: Surface, req: Request<Incoming>) -> Response<Body> {
        if !surface.serves(req.uri().path()) {
            return HttpError::NotFound.into_response();
        }
        let result = match (req.method(), req.uri().path()) {
            (&Method::GET, "/ws") => ws::upgrade(&self, req).await,
            (&Method::POST, "/api/events") => api::publish(&self, req).await,
            (&Method::GET, "/api/info") => api::info(&self, &req),
            (&Method::GET, "/healthz") => Ok(ops::healthz(&self)),
            (&Method::GET, "/readyz") => Ok(ops::readyz(&self)),
            (&Method::GET, "/metrics") => Ok(ops::metrics(&self)),
            (&Method::GET, "/client.js") => Ok(ui::client_js(&req)),
            (&Method::GET, "/api/stats") => Ok(ui::stats(&self)),
            (&Method::GET, "/") => ui::page(&self, &req),
            (&Method::GET, "/demo/token") => ui::demo_token(&self, &req),
            (method, path) if api::history_path(path).is_some() => match api::history_path(path) {
                Some(chat) if method == Method::GET => api::history(&self, &req, chat).await,
                _ => Err(HttpError::MethodNotAllowed),
            },
            (method, path) if api::presence_path(path).is_some() => match api::presence_path(path) {
                Some(chat) if method == Method::GET => api::presence(&self, &req, chat).await,
                _ => Err(HttpError::MethodNotAllowed),
            },
            (&Method::POST, path) if act::route(path).is_some() => act::handle(&self, req).await,
            (_, path) if act::route(path).is_some() => Err(HttpError::MethodNotAllowed),
            (
                _,
                "/ws" | "/api/events" | "/api/info" | "/healthz" | "/readyz" | "/metrics" | "/client.js"
                | "/api/stats",
            ) => Err(HttpError::MethodNotAllowed),
            _ => Err(HttpError::NotFound),
        };
        result.unwrap_or_else(HttpError::into_response)
    }
}

/// Checks the request's `Authorization: Bearer <api key>` against `api.keys`.
fn authorized(app: &App, req: &Request<Incoming>) -> Result<(), HttpError> {
    let key = bearer(req).ok_or(HttpError::Unauthorized("missing API key"))?;
    if !app.api_keys.iter().any(|k| constant_time_eq(k.as_bytes(), key.as_bytes())) {
        return Err(HttpError::Unauthorized("invalid API key"));
    }
    Ok(())
}

/// Compares secrets in time independent of where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token of an `Authorization: Bearer <token>` header, if any.
fn bearer(req: &Request<Incoming>) -> Option<&str> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overloaded_is_429_with_retry_after_and_a_fixed_body() {
        let resp = HttpError::Overloaded.into_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers().get(header::RETRY_AFTER).and_then(|v| v.to_str().ok()), Some("1"));
        let other = HttpError::Unauthorized("x").into_response();
        assert!(other.headers().get(header::RETRY_AFTER).is_none());
    }

    #[test]
    fn each_route_is_served_by_one_listener_of_two_and_every_route_by_one_alone() {
        let operators =
            ["/api/events", "/api/info", "/api/stats", "/api/later", "/metrics", "/healthz", "/readyz"];
        let browsers = ["/ws", "/client.js", "/", "/demo/token", "/api", "/metricsx"];
        for path in operators {
            assert!(Surface::Internal.serves(path) && !Surface::Public.serves(path), "{path}");
        }
        for path in browsers {
            assert!(Surface::Public.serves(path) && !Surface::Internal.serves(path), "{path}");
        }
        assert!(operators.iter().chain(&browsers).all(|p| Surface::All.serves(p)));
    }
}
