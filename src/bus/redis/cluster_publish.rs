//! Publishing under Redis Cluster: a batch is split by slot. A batch's events of one room (from
//! every request in it, in order) are one
//! [`ROOM_PUBLISH_LUA`](super::scripts::ROOM_PUBLISH_LUA) call on the room's primary (seq,
//! history and `SPUBLISH` in one step); the other events of a request are one publish-script
//! call on the `{herald}` slot's primary (global counter, membership, member log, members
//! channel); then every copy addressed to a user is an `SPUBLISH` on that user's shard. Each
//! shard's calls go in one pipeline, all shards at once; a request is answered `Ok` only when
//! every part of it was taken by Redis.

use std::collections::HashMap;

use futures_util::future::join_all;
use redis::aio::MultiplexedConnection;
use redis::{Cmd, Value};

use super::publisher::{script_call, PublishReq};
use super::scripts::{channel, history_key, seq_key};
use super::shards::Shards;
use super::{Phase, Shared};
use crate::bus::{BusError, Topic};
use crate::protocol::event::DomainEvent;
use crate::protocol::route::route;
use crate::protocol::ChatId;
use crate::sync::lock;

/// One script call of a batch, and what its reply means.
struct Call {
    shard: usize,
    cmd: Cmd,
    /// Per event the call carries, in order: its request, its JSON without seq, its room (for a
    /// room event), and the user channels its copies go to.
    events: Vec<(usize, String, Option<ChatId>, Vec<String>)>,
}

/// Publishes a batch over the cluster; one result per request.
pub(super) async fn publish_batch(
    shared: &Shared,
    shards: &Shards,
    batch: &[PublishReq],
) -> Vec<Result<(), BusError>> {
    let settling = *shared.phase.borrow() == Phase::Settling;
    let herald = shards.shard_of(shared.names.boot.as_bytes());
    let mut results: Vec<Result<(), BusError>> = vec![Ok(()); batch.len()];
    let mut calls: Vec<Call> = Vec::new();
    // The call of each room the batch publishes to (index into `calls`).
    let mut room_calls: HashMap<ChatId, usize> = HashMap::new();
    for (req, publish) in batch.iter().enumerate() {
        let routes: Vec<_> = publish.events.iter().map(route).collect();
        if settling && routes.iter().any(|r| r.room.is_some()) {
            // As the one-server script refuses: nothing of the request is sent.
            results[req] = Err(BusError::Settling);
            continue;
        }
        let copies = |users: &[crate::protocol::UserId]| -> Vec<String> {
            users.iter().map(|u| channel(Topic::User(*u))).collect()
        };
        let mut global: Vec<&DomainEvent> = Vec::new();
        let mut global_events = Vec::new();
        for (event, route) in publish.events.iter().zip(&routes) {
            let payload = event.to_json(None);
            match route.room {
                Some(room) => {
                    let index = *room_calls.entry(room).or_insert_with(|| {
                        let floor = lock(&shared.floors).get(&room).copied().unwrap_or(0);
                        let mut cmd = redis::cmd("EVALSHA");
                        cmd.arg(shared.scripts.room.get_hash())
                            .arg(2)
                            .arg(seq_key(room))
                            .arg(history_key(room))
                            .arg(floor)
                            .arg(shared.options.history_size)
                            .arg(shared.options.history_ttl.as_millis().to_string())
                            .arg(channel(Topic::Room(room)));
                        let shard = shards.shard_of(seq_key(room).as_bytes());
                        calls.push(Call { shard, cmd, events: Vec::new() });
                        calls.len() - 1
                    });
                    let call = &mut calls[index];
                    call.cmd.arg(&payload);
                    call.events.push((req, payload, Some(room), copies(&route.users)));
                }
                None if route.membership.is_some() || !route.users.is_empty() => {
                    global.push(event);
                    global_events.push((req, payload, None, copies(&route.users)));
                }
                // Goes nowhere (as on one server).
                None => {}
            }
        }
        if let Some(call) = script_call(shared, &global, true) {
            calls.push(Call { shard: herald, cmd: call.cmd, events: global_events });
        }
    }

    // Every shard's script calls in one pipeline, all shards at once.
    let mut calls_cmds: Vec<(usize, Cmd)> = Vec::with_capacity(calls.len());
    for call in &mut calls {
        calls_cmds.push((call.shard, std::mem::replace(&mut call.cmd, Cmd::new())));
    }
    let replies = run_per_shard(shards, calls_cmds).await;
    let (mut copy_reqs, mut copies): (Vec<usize>, Vec<(usize, Cmd)>) = (Vec::new(), Vec::new());
    for (call, reply) in calls.iter().zip(replies) {
        let seqs: Vec<u64> = match reply {
            Ok(Value::Int(seq)) => vec![u64::try_from(seq).unwrap_or(0)],
            Ok(Value::Array(seqs)) => seqs
                .iter()
                .map(|v| if let Value::Int(n) = v { u64::try_from(*n).unwrap_or(0) } else { 0 })
                .collect(),
            Ok(other) => {
                tracing::error!(reply = ?other, "redis cluster publish script: unexpected reply");
                call.events.iter().for_each(|e| fail_once(&mut results[e.0], BusError::Rejected));
                continue;
            }
            Err(e) => {
                if e.code() == Some("NOSCRIPT") {
                    // A primary lost its scripts (flushed, or a replica promoted): the next
                    // session loads them.
                    shared.end_session();
                }
                let error = shared.fail(&e);
                if !matches!(error, BusError::Settling) {
                    tracing::warn!(error = %e, "redis cluster publish failed");
                }
                call.events.iter().for_each(|e| fail_once(&mut results[e.0], error.clone()));
                continue;
            }
        };
        for ((req, payload, room, users), seq) in call.events.iter().zip(seqs) {
            if let Some(room) = room {
                shared.note_seq(*room, seq);
            }
            if users.is_empty() {
                continue;
            }
            let message = format!("{},\"seq\":{seq}}}", &payload[..payload.len().saturating_sub(1)]);
            for user_channel in users {
                let mut cmd = redis::cmd("SPUBLISH");
                cmd.arg(user_channel).arg(&message);
                copy_reqs.push(*req);
                copies.push((shards.shard_of(user_channel.as_bytes()), cmd));
            }
        }
    }
    if !copies.is_empty() {
        let replies = run_per_shard(shards, copies).await;
        for (req, reply) in copy_reqs.iter().zip(replies) {
            if let Err(e) = reply {
                tracing::warn!(error = %e, "redis cluster user copy failed");
                fail_once(&mut results[*req], shared.fail(&e));
            }
        }
    }
    results
}

/// Keeps a request's first error.
fn fail_once(result: &mut Result<(), BusError>, error: BusError) {
    if result.is_ok() {
        *result = Err(error);
    }
}

/// Runs each shard's commands as one pipeline (in the given order), all shards at once; one
/// reply per command, in the given order.
async fn run_per_shard(shards: &Shards, cmds: Vec<(usize, Cmd)>) -> Vec<redis::RedisResult<Value>> {
    let total = cmds.len();
    let mut per_shard: Vec<(Vec<usize>, redis::Pipeline)> =
        (0..shards.commands.len()).map(|_| (Vec::new(), redis::pipe())).collect();
    // Moved, not copied, into their shard's pipeline: a command holds its events' JSON.
    for (i, (shard, cmd)) in cmds.into_iter().enumerate() {
        let (idx, pipe) = &mut per_shard[shard];
        idx.push(i);
        pipe.add_command(cmd);
    }
    let runs = per_shard.into_iter().enumerate().filter(|(_, (idx, _))| !idx.is_empty()).map(
        |(shard, (idx, mut pipe))| {
            pipe.ignore_errors();
            let mut conn: MultiplexedConnection = shards.commands[shard].clone();
            async move {
                let replies = pipe.query_async::<Vec<redis::RedisResult<Value>>>(&mut conn).await;
                (idx, replies)
            }
        },
    );
    let mut out: Vec<Option<redis::RedisResult<Value>>> = (0..total).map(|_| None).collect();
    for (idx, replies) in join_all(runs).await {
        match replies {
            Ok(replies) => {
                let mut replies = replies.into_iter();
                for i in idx {
                    out[i] = replies.next();
                }
            }
            Err(e) => {
                // The shard's connection failed mid-pipeline: some calls may have run, none is
                // claimed; the session's PING or the disconnection push ends the session.
                for i in idx {
                    out[i] = Some(Err(clone_error(&e)));
                }
            }
        }
    }
    out.into_iter()
        .map(|r| r.unwrap_or_else(|| Err(redis::RedisError::from((redis::ErrorKind::Io, "no reply")))))
        .collect()
}

/// A copy of an error for each call it failed (the redis crate's error is not `Clone`).
fn clone_error(e: &redis::RedisError) -> redis::RedisError {
    let kind = if e.is_timeout() || e.is_io_error() || e.is_connection_dropped() {
        redis::ErrorKind::Io
    } else {
        redis::ErrorKind::Client
    };
    redis::RedisError::from((kind, "redis cluster pipeline failed", e.to_string()))
}
