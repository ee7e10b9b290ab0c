//! `GET /ws`: authenticate and check the origin before the handshake, take a
//! connection permit, upgrade, and hand the raw socket to [`crate::conn`].

use std::sync::atomic::Ordering;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::upgrade::Upgraded;
use hyper::{header, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{bearer, App, Body, HttpError};
use crate::conn;

pub(super) fn upgrade(app: &Arc<App>, mut req: Request<Incoming>) -> Result<Response<Body>, HttpError> {
    let metrics = &app.node.metrics;
    if !app.allowed_origins.is_empty() {
        let origin = req.headers().get(header::ORIGIN).and_then(|v| v.to_str().ok());
        if !origin.is_some_and(|o| app.allowed_origins.iter().any(|a| a == o)) {
            metrics.upgrades_rejected_origin.fetch_add(1, Ordering::Relaxed);
            return Err(HttpError::Forbidden);
        }
    }
    let token = query_token(&req).or_else(|| bearer(&req).map(str::to_string)).unwrap_or_default();
    let claims = app.verifier.verify(&token).map_err(|e| {
        metrics.upgrades_rejected_auth.fetch_add(1, Ordering::Relaxed);
        HttpError::Unauthorized(e.reason())
    })?;
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        return Err(HttpError::BadRequest("expected a WebSocket upgrade request".into()));
    }
    let permit = app.conn_limit.clone().try_acquire_owned().map_err(|_| {
        metrics.upgrades_rejected_limit.fetch_add(1, Ordering::Relaxed);
        HttpError::Unavailable("too many connections".into())
    })?;
    let (response, fut) = fastwebsockets::upgrade::upgrade(&mut req)
        .map_err(|e| HttpError::BadRequest(format!("bad WebSocket handshake: {e}")))?;
    let node = app.node.clone();
    app.node.tasks.spawn(async move {
        let upgraded = match fut.await {
            Ok(ws) => ws.into_inner().into_inner(),
            Err(e) => {
                tracing::debug!(error = %e, "upgrade did not complete");
                return;
            }
        };
        match raw_socket(upgraded) {
            // A task of its own: the connection's long-lived future then
            // carries none of this short-lived handshake state.
            Some((stream, early)) => {
                node.tasks.spawn(conn::serve(stream, early, claims, node.clone(), permit));
            }
            None => tracing::error!("upgraded connection is not a TCP stream"),
        }
    });
    let (parts, _) = response.into_parts();
    Ok(Response::from_parts(parts, Body::default()))
}

/// Takes the TCP socket back from hyper, with any bytes it read past the handshake.
fn raw_socket(upgraded: Upgraded) -> Option<(TcpStream, bytes::Bytes)> {
    let parts = upgraded.downcast::<TokioIo<TcpStream>>().ok()?;
    Some((parts.io.into_inner(), parts.read_buf))
}

/// The `token` query parameter, percent-decoded.
fn query_token(req: &Request<Incoming>) -> Option<String> {
    crate::auth::token_from_query(req.uri().query()?)
}
