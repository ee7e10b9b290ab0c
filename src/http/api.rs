//! The server API, behind the API key: `POST /api/events`, an authenticated,
//! size-limited publish of one event or a batch (all-or-nothing validation,
//! unknown types set aside, counted and named in the answer, or refused under
//! `api.reject_unknown`; 202 only for events handed to the bus);
//! `GET /api/rooms/{chat_id}/history`, a room's events as clients receive
//! them; `GET /api/info`, what the node is and how it is doing.

use std::sync::atomic::Ordering;

use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{header, Request, Response, StatusCode};

use super::{authorized, json, App, Body, HttpError};
use crate::bus::Health;
use crate::config::BusKind;
use crate::protocol::event::{self, parse_batch, Known};
use crate::protocol::{frame, ChatId};

/// Events one history answer holds by default (`limit`).
const HISTORY_DEFAULT_LIMIT: usize = 100;
/// Frame bytes one history answer holds at most (at least one event): the
/// caller reads on with `since` set to the last `seq` it got.
const HISTORY_MAX_BYTES: usize = 1 << 20;

/// `GET /api/info`: version, uptime, this node's connections and rooms, and
/// the bus's kind and state (`reason` is null while it is ok).
pub(super) fn info(app: &App, req: &Request<Incoming>) -> Result<Response<Body>, HttpError> {
    authorized(app, req)?;
    let node = &app.node;
    let (state, reason) = match node.bus.health() {
        Health::Ok => ("ok", None),
        Health::Degraded(reason) => ("degraded", Some(reason)),
    };
    let kind = match app.bus_kind {
        BusKind::Memory => "memory",
        BusKind::Redis => "redis",
        BusKind::RedisSentinel => "redis_sentinel",
        BusKind::RedisCluster => "redis_cluster",
    };
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": app.started.elapsed().as_secs(),
            "connections": node.metrics.connections_active.load(Ordering::Relaxed),
            "rooms": node.rooms.len(),
            "bus": {"kind": kind, "state": state, "reason": reason},
        }),
    ))
}

/// `POST /api/events`, timed into `herald_publish_duration_seconds` whatever its answer.
pub(super) async fn publish(app: &App, req: Request<Incoming>) -> Result<Response<Body>, HttpError> {
    let started = std::time::Instant::now();
    let answer = publish_events(app, req).await;
    app.node.metrics.publish_duration.observe(started.elapsed());
    answer
}

async fn publish_events(app: &App, req: Request<Incoming>) -> Result<Response<Body>, HttpError> {
    let metrics = &app.node.metrics;
    let reject = |e: HttpError| {
        metrics.publish_rejected.fetch_add(1, Ordering::Relaxed);
        e
    };
    authorized(app, &req).map_err(reject)?;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > app.max_body_bytes as u64) {
        return Err(reject(HttpError::TooLarge(app.max_body_bytes)));
    }
    let body = match Limited::new(req.into_body(), app.max_body_bytes).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(reject(HttpError::TooLarge(app.max_body_bytes)))
        }
        Err(_) => return Err(reject(HttpError::BadRequest("could not read the request body".into()))),
    };
    let batch = parse_batch(&body).map_err(|e| reject(HttpError::BadRequest(e.to_string())))?;
    let Known { events, ignored, first_unknown } = event::known(batch, &app.node.passthrough)
        .map_err(|e| reject(HttpError::BadRequest(e.to_string())))?;
    if let (true, Some((index, ty))) = (app.node.reject_unknown, first_unknown) {
        return Err(reject(HttpError::BadRequest(format!(
            "event {index}: unknown type `{}`",
            printable(&ty)
        ))));
    }
    if ignored > 0 {
        metrics.events_unknown.fetch_add(ignored as u64, Ordering::Relaxed);
    }
    let accepted = events.len();
    if accepted > 0 {
        // Push back before accepting: none of the batch is taken (contract
        // section 5), so the publisher retries it whole.
        app.node.admit(&events).await.map_err(|_| HttpError::Overloaded)?;
        if let Err(e) = app.node.bus.publish(events).await {
            metrics.publish_unavailable.fetch_add(1, Ordering::Relaxed);
            return Err(HttpError::Unavailable(e.to_string()));
        }
    }
    let mut body = serde_json::json!({ "accepted": accepted });
    if ignored > 0 {
        body["ignored"] = ignored.into();
    }
    Ok(json(StatusCode::ACCEPTED, &body))
}

/// A publisher's type as quoted back in an error: at most 64 characters.
fn printable(ty: &str) -> String {
    let mut out: String = ty.chars().take(64).collect();
    if out.len() < ty.len() {
        out.push_str("...");
    }
    out
}

/// The chat of a `/api/rooms/{chat_id}/history` path; `None` for any other path.
pub(super) fn history_path(path: &str) -> Option<&str> {
    path.strip_prefix("/api/rooms/")?.strip_suffix("/history").filter(|id| !id.contains('/'))
}

/// `GET /api/rooms/{chat_id}/history?since=N&limit=M`: the room's events after
/// `since`, oldest first, exactly as clients receive them, from this node's
/// history or (when it does not reach back) the bus's own, read the way a
/// recovering subscriber's is ([`crate::node::Node::fill_from_bus`]).
pub(super) async fn history(
    app: &App,
    req: &Request<Incoming>,
    chat: &str,
) -> Result<Response<Body>, HttpError> {
    authorized(app, req)?;
    let chat = ChatId::try_parse(chat)
        .map_err(|_| HttpError::BadRequest("chat_id in the path must be a UUID".into()))?;
    let max_limit = app.node.rooms.history_size();
    let (since, limit) = history_query(req.uri().query().unwrap_or(""), max_limit)?;
    let node = &app.node;
    let unavailable = |e: crate::bus::BusError| HttpError::Unavailable(e.to_string());
    let head = node.bus.head(chat).await.map_err(unavailable)?;
    let room = node.rooms.holder(chat);
    let read = async {
        let head = if since < head && !room.covers(since, head) {
            node.fill_from_bus(&room, chat, since, head).await?
        } else {
            head
        };
        // Seqs are consecutive in a room, so this many events at most lie in (since, head].
        let max = usize::try_from(head.saturating_sub(since)).unwrap_or(usize::MAX).min(limit);
        let mut frames = Vec::new();
        let complete = match room.read_after(since, max, HISTORY_MAX_BYTES, |f| frames.push(f)) {
            Ok(_) => since <= head,
            Err(evicted) if evicted.oldest > since && evicted.oldest <= head => {
                // History no longer reaches back to `since`: what it holds, from its oldest.
                let max = usize::try_from(head - evicted.oldest + 1).unwrap_or(usize::MAX).min(limit);
                let _ = room.read_after(evicted.oldest - 1, max, HISTORY_MAX_BYTES, |f| frames.push(f));
                false
            }
            Err(_) => false,
        };
        Ok::<_, crate::bus::BusError>((head, frames, complete))
    }
    .await;
    // Dropped again unless it holds something or has subscribers.
    drop(room);
    node.rooms.leave(chat);
    let (head, frames, complete) = read.map_err(unavailable)?;
    let size: usize = frames.iter().map(|f| f.len()).sum();
    let mut body = BytesMut::with_capacity(96 + size);
    body.put_slice(
        format!(r#"{{"chat_id":"{chat}","seq":{head},"recovered":{complete},"events":["#).as_bytes(),
    );
    for (i, f) in frames.iter().enumerate() {
        if i > 0 {
            body.put_u8(b',');
        }
        body.put_slice(frame::payload(f));
    }
    body.put_slice(b"]}");
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    Ok(resp)
}

/// The chat id of `/api/rooms/{chat_id}/presence`.
pub(super) fn presence_path(path: &str) -> Option<&str> {
    path.strip_prefix("/api/rooms/")?.strip_suffix("/presence").filter(|id| !id.contains('/'))
}

/// `GET /api/rooms/{chat_id}/presence`: the room's present users on every
/// node, sorted (404 under `presence.enabled: false`).
pub(super) async fn presence(
    app: &App,
    req: &Request<Incoming>,
    chat: &str,
) -> Result<Response<Body>, HttpError> {
    authorized(app, req)?;
    let Some(registry) = app.node.presence.as_ref() else { return Err(HttpError::NotFound) };
    let chat = ChatId::try_parse(chat)
        .map_err(|_| HttpError::BadRequest("chat_id in the path must be a UUID".into()))?;
    let users = match app.node.bus.present(chat).await {
        Ok(Some(users)) => users,
        Ok(None) => registry.users(chat),
        Err(e) => return Err(HttpError::Unavailable(e.to_string())),
    };
    let body = serde_json::json!({ "chat_id": chat, "users": users });
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    Ok(resp)
}

/// `since` (default 0) and `limit` (default 100, 1 to `max_limit`) of a
/// history query; anything else in it is refused.
fn history_query(query: &str, max_limit: usize) -> Result<(u64, usize), HttpError> {
    let bad = |m: String| HttpError::BadRequest(m);
    let (mut since, mut limit) = (None, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let number = value.bytes().all(|b| b.is_ascii_digit()) && !value.is_empty() && value.len() <= 20;
        let slot = match key {
            "since" => &mut since,
            "limit" => &mut limit,
            _ => {
                return Err(bad(format!(
                    "unknown query parameter `{}`; expected since, limit",
                    printable(key)
                )))
            }
        };
        if slot.is_some() {
            return Err(bad(format!("query parameter `{key}` given twice")));
        }
        let parsed = value.parse::<u64>().ok().filter(|_| number);
        *slot = Some(parsed.ok_or_else(|| bad(format!("`{key}` must be a non-negative integer")))?);
    }
    let limit = match limit {
        None => HISTORY_DEFAULT_LIMIT.min(max_limit),
        Some(n) if n >= 1 && n <= max_limit as u64 => n as usize,
        Some(_) => return Err(bad(format!("`limit` must be 1 to {max_limit} (rooms.history_size)"))),
    };
    Ok((since.unwrap_or(0), limit))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_paths_and_queries_are_read_strictly() {
        assert_eq!(history_path("/api/rooms/abc/history"), Some("abc"));
        assert_eq!(history_path("/api/rooms/a/b/history"), None);
        assert_eq!(history_path("/api/rooms/abc"), None);
        assert_eq!(history_query("", 1000).ok(), Some((0, 100)));
        assert_eq!(history_query("", 10).ok(), Some((0, 10)));
        assert_eq!(history_query("since=5&limit=7", 1000).ok(), Some((5, 7)));
        for bad in [
            "since=-1",
            "since=+1",
            "since=",
            "since",
            "limit=0",
            "limit=1001",
            "since=1&since=2",
            "x=1",
            "since=1e3",
            "since=99999999999999999999999",
        ] {
            assert!(history_query(bad, 1000).is_err(), "accepted {bad:?}");
        }
    }
}
