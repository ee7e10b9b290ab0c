//! `POST /api/users/{user_id}/disconnect` and `POST /api/users/{user_id}/revoke`:
//! an operator acting on one user. Applied on this node before the answer,
//! then carried by the bus to the other nodes (PROTOCOL.md section 7).

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{header, Request, Response, StatusCode};
use serde::Deserialize;

use super::{authorized, json, App, Body, HttpError};
use crate::auth::now_secs;
use crate::broadcast::act;
use crate::bus::Control;
use crate::protocol::UserId;

/// The largest body these routes read: `{"before": <unix seconds>}` and some space.
const MAX_BODY: usize = 1024;
/// How far past the node's clock `before` may lie (clock skew between the caller and Herald):
/// a cut-off in the future would also refuse tokens issued after the call.
const MAX_AHEAD_SECS: u64 = 60;

/// What a route under `/api/users/` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Action {
    Disconnect,
    Revoke,
}

/// The user id text and the action of `/api/users/{user_id}/{action}`, if the path is one.
pub(super) fn route(path: &str) -> Option<(&str, Action)> {
    let rest = path.strip_prefix("/api/users/")?;
    let (user, action) = rest.split_once('/')?;
    let action = match action {
        "disconnect" => Action::Disconnect,
        "revoke" => Action::Revoke,
        _ => return None,
    };
    (!user.is_empty() && !user.contains('/')).then_some((user, action))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    before: Option<u64>,
}

pub(super) async fn handle(app: &App, req: Request<Incoming>) -> Result<Response<Body>, HttpError> {
    authorized(app, &req)?;
    let Some((user, action)) = route(req.uri().path()) else { return Err(HttpError::NotFound) };
    let user: UserId =
        user.parse().map_err(|_| HttpError::BadRequest("user_id in the path is not a UUID".into()))?;
    let body = read_small(req).await?;
    let node = &app.node;
    let now = now_secs();
    match action {
        Action::Disconnect => {
            if !body.iter().all(u8::is_ascii_whitespace) && body.as_ref() != b"{}" {
                return Err(HttpError::BadRequest("disconnect takes no body".into()));
            }
            let msg = Control::Disconnect(user);
            let disconnected = act(&node.users, &node.bans, msg, now);
            node.bus.control(msg).await.map_err(|e| HttpError::Unavailable(e.to_string()))?;
            Ok(json(StatusCode::OK, &serde_json::json!({ "disconnected": disconnected })))
        }
        Action::Revoke => {
            let before = if body.iter().all(u8::is_ascii_whitespace) {
                now
            } else {
                let parsed: RevokeBody = serde_json::from_slice(&body).map_err(|e| {
                    HttpError::BadRequest(format!("body is not {{\"before\": <unix seconds>}}: {e}"))
                })?;
                parsed.before.unwrap_or(now)
            };
            if before > now + MAX_AHEAD_SECS {
                return Err(HttpError::BadRequest(format!(
                    "before is {before}, more than {MAX_AHEAD_SECS} s after this node's clock ({now})"
                )));
            }
            // Held here first, so this node refuses the tokens from the moment it answers;
            // a node that cannot hold it says so rather than answer 200 for a ban it forgets.
            node.bans
                .revoke(user, before, now)
                .map_err(|e| HttpError::Unavailable(format!("{e}; retry later")))?;
            // The connections told are all of the user's here; only those holding an older token
            // close, which only they know: the answer names the cut-off, not a count.
            let msg = Control::Revoke { user, before };
            act(&node.users, &node.bans, msg, now);
            node.bus.control(msg).await.map_err(|e| HttpError::Unavailable(e.to_string()))?;
            Ok(json(StatusCode::OK, &serde_json::json!({ "revoked_before": before })))
        }
    }
}

/// Reads a body of at most [`MAX_BODY`] bytes (413 beyond).
async fn read_small(req: Request<Incoming>) -> Result<bytes::Bytes, HttpError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(HttpError::TooLarge(MAX_BODY));
    }
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(HttpError::TooLarge(MAX_BODY)),
        Err(_) => Err(HttpError::BadRequest("could not read the request body".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_two_actions_under_a_single_segment_route() {
        let id = "7d1b3c2a-0f7e-4a55-9a55-1b2c3d4e5f60";
        assert_eq!(route(&format!("/api/users/{id}/disconnect")), Some((id, Action::Disconnect)));
        assert_eq!(route(&format!("/api/users/{id}/revoke")), Some((id, Action::Revoke)));
        assert_eq!(route("/api/users/x/revoke"), Some(("x", Action::Revoke)), "the handler says 400");
        for path in ["/api/users//revoke", "/api/users/a/b/revoke", "/api/users/a/ban", "/api/users/a"] {
            assert_eq!(route(path), None, "{path}");
        }
    }
}
