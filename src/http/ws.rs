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
use crate::auth::{AuthError, Claims};
use crate::bans::issued_before;
use crate::conn;
use crate::protocol::extension;

pub(super) async fn upgrade(app: &Arc<App>, mut req: Request<Incoming>) -> Result<Response<Body>, HttpError> {
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
    check_revoked(app, &claims).await?;
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        return Err(HttpError::BadRequest("expected a WebSocket upgrade request".into()));
    }
    let permit = app.conn_limit.clone().try_acquire_owned().map_err(|_| {
        metrics.upgrades_rejected_limit.fetch_add(1, Ordering::Relaxed);
        HttpError::Unavailable("too many connections".into())
    })?;
    let (mut response, fut) = fastwebsockets::upgrade::upgrade(&mut req)
        .map_err(|e| HttpError::BadRequest(format!("bad WebSocket handshake: {e}")))?;
    let deflate = if app.node.ws.compression {
        let offers = req.headers().get_all(header::SEC_WEBSOCKET_EXTENSIONS).iter();
        let context = app.node.ws.compression_context;
        extension::negotiate(offers.filter_map(|v| v.to_str().ok()), context).and_then(|(agreed, answer)| {
            let answer = header::HeaderValue::from_str(&answer).ok()?;
            response.headers_mut().insert(header::SEC_WEBSOCKET_EXTENSIONS, answer);
            Some(agreed)
        })
    } else {
        None
    };
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
                node.tasks.spawn(conn::serve(stream, early, deflate, claims, node.clone(), permit));
            }
            None => tracing::error!("upgraded connection is not a TCP stream"),
        }
    });
    let (parts, _) = response.into_parts();
    Ok(Response::from_parts(parts, Body::default()))
}

/// Refuses a token issued before a revocation of its user: the node's own
/// bans first, then (for a user it holds none for) the bus's, which the
/// node then holds too.
async fn check_revoked(app: &App, claims: &Claims) -> Result<(), HttpError> {
    let node = &app.node;
    let now = crate::auth::now_secs();
    let before = match node.bans.revoked_before(claims.sub, now) {
        // Refused already by what this node holds: no need to ask.
        Some(before) if issued_before(claims.iat, before) => Some(before),
        local => {
            // Unknown is not "not revoked", and a cut-off this node holds may be older than one
            // it missed while cut off from the bus: ask (the bus caches "none" answers and
            // forgets them on every revocation it hears and every lost connection). Without the
            // bus the upgrade is refused (503), as the connection would be right after it (1011).
            let kept =
                node.bus.revoked(claims.sub).await.map_err(|e| HttpError::Unavailable(e.to_string()))?;
            if let Some(before) = kept {
                if node.bans.revoke(claims.sub, before, now).is_err() {
                    node.bans.count_dropped();
                }
            }
            local.max(kept)
        }
    };
    if before.is_some_and(|before| issued_before(claims.iat, before)) {
        node.metrics.upgrades_rejected_auth.fetch_add(1, Ordering::Relaxed);
        return Err(HttpError::Unauthorized(AuthError::Revoked.reason()));
    }
    Ok(())
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
