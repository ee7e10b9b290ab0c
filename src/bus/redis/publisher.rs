//! The publisher task: batches concurrent `publish` calls into one pipeline of publish-script
//! calls, and answers each call with whether Redis took its events.

use std::sync::Arc;

use futures_util::stream::{FuturesUnordered, StreamExt};
use redis::aio::MultiplexedConnection;
use redis::Value;
use tokio::sync::{mpsc, oneshot};

use super::scripts::{channel, history_key, seq_key};
use super::shards::Link;
use super::Shared;
use crate::bus::{BusError, Topic};
use crate::protocol::event::DomainEvent;
use crate::protocol::route::{route, MemberChange, Route};
use crate::protocol::ChatId;
use crate::sync::lock;

/// Events one pipeline carries at most, so one write stays a reasonable size.
const MAX_BATCH_EVENTS: usize = 4096;

/// One `publish` call waiting for the publisher task.
pub(super) struct PublishReq {
    pub(super) events: Vec<DomainEvent>,
    /// The caller's `publish` future holds the receiver; dropping it just discards the answer.
    pub(super) reply: oneshot::Sender<Result<(), BusError>>,
}

/// Batches in flight at once. Each waits for its replies (under Cluster, for its slowest shard);
/// one at a time, every request queued meanwhile waited for a whole round trip before its own
/// began (a convoy). Order between batches does not matter: a request's events are all in one
/// batch, concurrent requests have no order between them, and Redis assigns a room's `seq` in
/// the same atomic step as its (S)PUBLISH, so each channel's order is its `seq` order whichever
/// batch runs first. Bounds what the task holds to `MAX_IN_FLIGHT × MAX_BATCH_EVENTS` events.
const MAX_IN_FLIGHT: usize = 4;

/// Serves publish calls until the bus handle is dropped (which aborts this task).
pub(super) async fn publisher_task(shared: Arc<Shared>, mut rx: mpsc::Receiver<PublishReq>) {
    let mut in_flight = FuturesUnordered::new();
    loop {
        tokio::select! {
            // Answer finished batches first: that frees room for the next one.
            biased;
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            first = rx.recv(), if in_flight.len() < MAX_IN_FLIGHT => {
                let Some(first) = first else { break };
                in_flight.push(run_batch(shared.clone(), gather(first, &mut rx)));
            }
        }
    }
    // The handle is gone: answer what is in flight.
    while in_flight.next().await.is_some() {}
}

/// `first` and everything queued behind it, up to `MAX_BATCH_EVENTS` events.
fn gather(first: PublishReq, rx: &mut mpsc::Receiver<PublishReq>) -> Vec<PublishReq> {
    let mut n = first.events.len();
    let mut batch = vec![first];
    while n < MAX_BATCH_EVENTS {
        match rx.try_recv() {
            Ok(req) => {
                n += req.events.len();
                batch.push(req);
            }
            Err(_) => break,
        }
    }
    batch
}

/// Publishes one batch and answers each of its requests.
async fn run_batch(shared: Arc<Shared>, batch: Vec<PublishReq>) {
    let results = match shared.link() {
        Ok(Link::One(mut conn)) => publish_batch(&shared, &mut conn, &batch).await,
        Ok(Link::Cluster(shards)) => super::cluster_publish::publish_batch(&shared, &shards, &batch).await,
        Err(error) => batch.iter().map(|_| Err(error.clone())).collect(),
    };
    for (req, result) in batch.into_iter().zip(results) {
        let _ = req.reply.send(result);
    }
}

/// Runs one script call per request in a single pipeline; one result per request.
async fn publish_batch(
    shared: &Shared,
    conn: &mut MultiplexedConnection,
    batch: &[PublishReq],
) -> Vec<Result<(), BusError>> {
    let calls: Vec<Option<ScriptCall>> =
        batch.iter().map(|req| script_call(shared, &req.events.iter().collect::<Vec<_>>(), false)).collect();
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for call in calls.iter().flatten() {
        pipe.add_command(call.cmd.clone());
    }
    let replies = if pipe.is_empty() {
        Ok(Vec::new())
    } else {
        pipe.query_async::<Vec<redis::RedisResult<Value>>>(conn).await
    };
    let mut replies = match replies {
        Ok(replies) => replies,
        Err(e) => {
            // The connection failed mid-pipeline: some calls may have run, but none is claimed.
            // The supervisor's PING or the disconnection push notices a dead connection.
            tracing::warn!(error = %e, "redis publish failed");
            let error = shared.fail(&e);
            return batch.iter().map(|_| Err(error.clone())).collect();
        }
    };
    // Someone flushed the script cache: load it again and retry those calls once (only those:
    // the others ran).
    let missing: Vec<usize> = replies
        .iter()
        .enumerate()
        .filter(|(_, r)| r.as_ref().err().and_then(|e| e.code()) == Some("NOSCRIPT"))
        .map(|(i, _)| i)
        .collect();
    if !missing.is_empty() {
        let cmds: Vec<&redis::Cmd> = calls.iter().flatten().map(|call| &call.cmd).collect();
        let mut retry = redis::pipe();
        retry.ignore_errors();
        for &i in &missing {
            retry.add_command(cmds[i].clone());
        }
        let source = &shared.scripts.sources[0];
        let loaded = redis::cmd("SCRIPT").arg("LOAD").arg(source).query_async::<String>(conn).await;
        let again = match loaded {
            Ok(_) => retry.query_async::<Vec<redis::RedisResult<Value>>>(conn).await,
            Err(e) => Err(e),
        };
        match again {
            Ok(again) => {
                for (i, reply) in missing.into_iter().zip(again) {
                    replies[i] = reply;
                }
            }
            // Those calls keep their NOSCRIPT error and are refused below.
            Err(e) => tracing::warn!(error = %e, "redis publish: reloading the script failed"),
        }
    }
    let mut replies = replies.into_iter();
    calls
        .iter()
        .map(|call| {
            let Some(call) = call else { return Ok(()) };
            match replies.next() {
                Some(Ok(Value::Array(seqs))) => {
                    for (room, seq) in call.rooms.iter().zip(seqs) {
                        if let (Some(chat), Value::Int(seq)) = (room, seq) {
                            shared.note_seq(*chat, u64::try_from(seq).unwrap_or(0));
                        }
                    }
                    Ok(())
                }
                Some(Ok(other)) => {
                    tracing::error!(reply = ?other, "redis publish script: unexpected reply");
                    Err(BusError::Rejected)
                }
                Some(Err(e)) => match shared.fail(&e) {
                    // Expected for a while after Redis lost its state: not an error of this node.
                    BusError::Settling => Err(BusError::Settling),
                    error => {
                        tracing::error!(error = %e, "redis publish script failed");
                        Err(error)
                    }
                },
                None => {
                    tracing::error!("redis pipeline: fewer replies than calls");
                    Err(BusError::Rejected)
                }
            }
        })
        .collect()
}

/// The channels an event is published on: its room's, one per addressed user (each once), and
/// the global membership channel for membership changes. Empty for events that go nowhere.
/// Under Cluster the script publishes only on the members channel (its own slot's): the room's
/// events have their own script and user copies are separate `SPUBLISH`es (`cluster_publish.rs`).
fn channels(shared: &Shared, route: &Route<'_>) -> Vec<String> {
    let mut channels: Vec<String> = Vec::new();
    if !shared.names.cluster {
        channels.extend(route.room.map(|c| channel(Topic::Room(c))));
        channels.extend(route.users.iter().map(|u| channel(Topic::User(*u))));
    }
    if route.membership.is_some() {
        channels.push(shared.names.members_channel.to_string());
    }
    channels
}

/// One publish script call and, per event it carries, the room whose seq the reply holds.
pub(super) struct ScriptCall {
    pub(super) cmd: redis::Cmd,
    rooms: Vec<Option<ChatId>>,
}

/// Builds the publish script call for one batch; `None` when no event needs Redis. `keep_all`
/// (Cluster, whose caller has picked the events) keeps events the script publishes nowhere.
pub(super) fn script_call(shared: &Shared, events: &[&DomainEvent], keep_all: bool) -> Option<ScriptCall> {
    let names = &shared.names;
    let mut keys: Vec<String> =
        vec![names.boot.into(), names.gseq.into(), names.member_index.into(), names.removed_index.into()];
    let mut rooms = Vec::with_capacity(events.len());
    let mut args: Vec<String> = Vec::new();
    let mut has_room = false;
    let routes: Vec<Route<'_>> = events.iter().map(|e| route(e)).collect();
    // Look the floors up in one short lock; the JSON encoding below runs without it.
    let floors: Vec<u64> = {
        let known = lock(&shared.floors);
        routes.iter().map(|r| r.room.and_then(|room| known.get(&room).copied()).unwrap_or(0)).collect()
    };
    for ((event, route), floor) in events.iter().zip(&routes).zip(floors) {
        let channels = channels(shared, route);
        if channels.is_empty() && !keep_all {
            continue;
        }
        // The script reads chat and user only for membership ops.
        let (op, key, floor, chat, user) = match (route.room, route.membership) {
            (Some(room), _) => {
                has_room = true;
                ("r", seq_key(room), floor, None, None)
            }
            (None, Some(MemberChange::Added { chat, user })) => {
                ("a", names.members_key(chat), 0, Some(chat), Some(user))
            }
            (None, Some(MemberChange::Removed { chat, user })) => {
                ("x", names.members_key(chat), 0, Some(chat), Some(user))
            }
            (None, None) => ("u", names.gseq.into(), 0, None, None),
        };
        let text = |id: Option<uuid::Uuid>| id.map(|id| id.to_string()).unwrap_or_default();
        keys.push(key);
        if let Some(room) = route.room {
            keys.push(history_key(room));
        } else if let Some(MemberChange::Added { chat, .. } | MemberChange::Removed { chat, .. }) =
            route.membership
        {
            keys.push(names.member_log.into());
            keys.push(names.removed_key(chat));
        }
        rooms.push(route.room);
        args.extend([op.to_string(), floor.to_string(), text(chat), text(user), event.to_json(None)]);
        args.push(channels.len().to_string());
        args.extend(channels);
    }
    if keys.len() == 4 {
        return None;
    }
    let settle_ms = shared.options.settle.as_millis().to_string();
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(shared.scripts.publish.get_hash())
        .arg(keys.len())
        .arg(&keys)
        .arg(settle_ms)
        .arg(if has_room { "1" } else { "0" })
        .arg(shared.options.history_size)
        .arg(shared.options.history_ttl.as_millis().to_string())
        .arg(shared.options.token_ttl.as_millis().to_string())
        .arg(&args);
    Some(ScriptCall { cmd, rooms })
}
