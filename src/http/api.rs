//! `POST /api/events`: authenticated, size-limited publish of one event or a
//! batch; all-or-nothing validation, unknown types set aside (counted, and
//! named in the answer), and 202 only for events handed to the bus.

use std::sync::atomic::Ordering;

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{header, Request, Response, StatusCode};

use super::{authorized, json, App, Body, HttpError};
use crate::protocol::event::{self, parse_batch, Known};

pub(super) async fn publish(app: &App, req: Request<Incoming>) -> Result<Response<Body>, HttpError> {
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
    let Known { events, ignored } = event::known(batch);
    if ignored > 0 {
        metrics.events_unknown.fetch_add(ignored as u64, Ordering::Relaxed);
    }
    let accepted = events.len();
    if accepted > 0 {
        // Push back before accepting: none of the batch is taken (contract
        // section 5), so the publisher retries it whole.
        app.node.admit().await.map_err(|_| HttpError::Overloaded)?;
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
