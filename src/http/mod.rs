//! The HTTP edge: routes `/ws`, `/api/events`, `/healthz`, `/metrics` and the
//! browser's files (`ui`), and the one mapping from edge errors to status
//! codes and JSON bodies.

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
            HttpError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    pub fn into_response(self) -> Response<Body> {
        json(self.status(), &serde_json::json!({ "error": self.to_string() }))
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
            (&Method::GET, "/ws") => ws::upgrade(&self, req),
            (&Method::POST, "/api/events") => api::publish(&self, req).await,
            (&Method::GET, "/healthz") => Ok(ops::healthz(&self)),
            (&Method::GET, "/readyz") => Ok(ops::readyz(&self)),
            (&Method::GET, "/metrics") => Ok(ops::metrics(&self)),
            (&Method::GET, "/client.js") => Ok(ui::client_js(&req)),
            (&Method::GET, "/api/stats") => Ok(ui::stats(&self)),
            (&Method::GET, "/") => ui::page(&self, &req),
            (&Method::GET, "/demo/token") => ui::demo_token(&self, &req),
            (
                _,
                "/ws" | "/api/events" | "/healthz" | "/readyz" | "/metrics" | "/client.js" | "/api/stats",
            ) => Err(HttpError::MethodNotAllowed),
            _ => Err(HttpError::NotFound),
        };
        result.unwrap_or_else(HttpError::into_response)
    }
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
