//! The HTTP edge: routes `/ws` (`ws`), `/api/events` (`api`),
//! `/api/users/{id}/disconnect` and `/api/users/{id}/revoke` (`act`), the operator
//! endpoints `/healthz`, `/readyz` and `/metrics` (`ops`) and the browser's
//! `/`, `/client.js`, `/api/stats` and `/demo/token` (`ui`), and the one
//! mapping from edge errors to status codes and JSON bodies.

mod act;
mod api;
mod ops;
mod ui;
mod ws;

pub use ui::{DemoPage, Ui};

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{header, Method, Request, Response, StatusCode};
use tokio::sync::Semaphore;

use crate::auth::Verifier;
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
    /// Routes one request.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let result = match (req.method(), req.uri().path()) {
            (&Method::GET, "/ws") => ws::upgrade(&self, req).await,
            (&Method::POST, "/api/events") => api::publish(&self, req).await,
            (&Method::GET, "/healthz") => Ok(ops::healthz(&self)),
            (&Method::GET, "/readyz") => Ok(ops::readyz(&self)),
            (&Method::GET, "/metrics") => Ok(ops::metrics(&self)),
            (&Method::GET, "/client.js") => Ok(ui::client_js(&req)),
            (&Method::GET, "/api/stats") => Ok(ui::stats(&self)),
            (&Method::GET, "/") => ui::page(&self, &req),
            (&Method::GET, "/demo/token") => ui::demo_token(&self, &req),
            (&Method::POST, path) if act::route(path).is_some() => act::handle(&self, req).await,
            (_, path) if act::route(path).is_some() => Err(HttpError::MethodNotAllowed),
            (
                _,
                "/ws" | "/api/events" | "/healthz" | "/readyz" | "/metrics" | "/client.js" | "/api/stats",
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
}
