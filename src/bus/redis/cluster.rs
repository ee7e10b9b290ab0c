//! The Redis Cluster supervisor: one session spans the whole cluster. It reads the slot map from
//! a seed, opens two connections per primary (commands; shard subscriptions), restores what the
//! node needs as on one server (scripts on every primary, room counter floors per room, the
//! members channel and the membership snapshot in the `{herald}` slot, then every watched room
//! and user with `SSUBSCRIBE` on its slot's primary), and serves until any part fails.
//!
//! Any failure ends the whole session as a lost connection does on one server: a primary's
//! connection lost or not answering `PING`, a `MOVED` reply (the slot map changed: see
//! `Shared::fail`), or a `SUNSUBSCRIBE` the node did not ask for (Redis drops a slot's shard
//! subscriptions when the slot moves to another primary). The next session reads the map again,
//! so subscriptions follow their slots, and clients see any gap as one (`recovered:false` when
//! history does not cover it), never a silent one. A primary with a node id the last session did
//! not have (a promoted replica) is a failover: it is marked in the `{herald}` slot and every node
//! that opens a session within `settle` of the mark refuses room events until then, while all
//! nodes re-seed the counters they know.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use futures_util::future::join_all;
use redis::aio::MultiplexedConnection;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::delivery::Inbound;
use super::endpoint::{Endpoint, Failure, Master};
use super::io_thread;
use super::scripts::{channel, seq_key};
use super::shards::{self, Link, Shards};
use super::supervisor::{
    connection_config, floors_of, forward_push, go_live, known_floors, load_scripts, mark_failover, reseed,
    restore_membership, session_timers, settle_deadline, until_lost, Attempts,
};
use super::Shared;
use crate::bus::Topic;
use crate::protocol::ChatId;

/// Channels per pipeline of `SSUBSCRIBE` / `SUNSUBSCRIBE`, and rooms per re-seed or touch pipeline.
const CHUNK: usize = 512;

/// Sessions one after another, with backoff, until the bus handle is dropped.
pub(super) async fn supervise(shared: Arc<Shared>, endpoint: Endpoint, inbound: mpsc::Sender<Inbound>) {
    let mut attempts = Attempts::new("redis cluster bus");
    // The primaries' node ids of the last session: a new one is a promoted replica.
    let mut last_ids: Option<Vec<String>> = None;
    while let Some(gen) = attempts.next(&shared, &inbound).await {
        match open(&shared, &endpoint, &inbound, gen, &mut last_ids).await {
            Ok((shards, settle_until)) => {
                for primary in &shards.topology.primaries {
                    shared.stats.note_endpoint(&primary.addr(), |e| e.sessions += 1);
                }
                attempts.opened(&shared, &endpoint.describe());
                let err = run(&shared, &shards, gen, settle_until).await;
                shared.go_down();
                tracing::error!(
                    redis = %endpoint.describe(), error = %err,
                    "redis cluster bus session ended; publishes answer 503 until the next one"
                );
            }
            Err(failure) => attempts.failed(&shared, &failure),
        }
        attempts.back_off(&shared).await;
    }
}

/// Reads the slot map, connects to every primary and restores the node's state there.
async fn open(
    shared: &Arc<Shared>,
    endpoint: &Endpoint,
    inbound: &mpsc::Sender<Inbound>,
    gen: u64,
    last_ids: &mut Option<Vec<String>>,
) -> Result<(Arc<Shards>, Option<Instant>), Failure> {
    let (topology, seed) = endpoint.discover(shared.options.connect_timeout).await?;
    let leaving = Arc::new(Mutex::new(HashMap::new()));
    let masters = topology
        .primaries
        .iter()
        .map(|p| endpoint.primary(&seed, p))
        .collect::<Result<Vec<Master>, Failure>>()?;
    let opened = join_all(masters.iter().map(|master| async {
        let commands = connect(shared, master, inbound, gen, None).await?;
        let subscriptions = connect(shared, master, inbound, gen, Some(leaving.clone())).await?;
        Ok::<_, redis::RedisError>((commands, subscriptions))
    }))
    .await;
    let (mut commands, mut subscriptions) = (Vec::new(), Vec::new());
    for (master, opened) in masters.iter().zip(opened) {
        let (c, s) = opened.map_err(|e| endpoint.failure(master.key, &master.shown, &master.addr, &e))?;
        commands.push(c);
        subscriptions.push(s);
    }
    let shards = Arc::new(Shards { topology, commands, subscriptions, leaving });
    let settle_until = restore(shared, &shards, inbound, gen, last_ids)
        .await
        .map_err(|e| endpoint.failure("bus.redis_cluster_urls", &endpoint.describe(), "", &e))?;
    Ok((shards, settle_until))
}

/// One connection to a primary; with `leaving`, the subscription connection (it checks every
/// `SUNSUBSCRIBE` against the requested ones).
async fn connect(
    shared: &Arc<Shared>,
    master: &Master,
    inbound: &mpsc::Sender<Inbound>,
    gen: u64,
    leaving: Option<shards::Leaving>,
) -> Result<MultiplexedConnection, redis::RedisError> {
    let subscribing = leaving.is_some();
    let push_tx = inbound.clone();
    let weak = Arc::downgrade(shared);
    let push_sender = move |info: PushInfo| -> Result<(), ()> {
        let Some(shared) = weak.upgrade() else { return Err(()) };
        match (&info.kind, &leaving) {
            (PushKind::SUnsubscribe, Some(leaving)) => {
                let channel = match info.data.first() {
                    Some(Value::BulkString(c)) => c.as_slice(),
                    _ => &[],
                };
                if !shards::was_requested(leaving, channel) {
                    shared.stats.shard_unsubscribed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        channel = %String::from_utf8_lossy(channel),
                        "redis cluster dropped a shard subscription (its slot moved); reopening the session"
                    );
                    shared.lost_gen.fetch_max(gen, Ordering::SeqCst);
                    shared.lost.notify_one();
                }
                Ok(())
            }
            _ => forward_push(&shared, &push_tx, gen, info),
        }
    };
    let config = connection_config(shared, push_sender);
    if subscribing {
        // Read on the I/O thread: what waits for delivery must be where the overload word counts
        // it. Commands stay on the node's runtime: their replies wake the callers there.
        io_thread::connect(
            &master.client,
            &config,
            shared.options.connect_timeout + shared.options.response_timeout,
        )
        .await
    } else {
        master.client.get_multiplexed_async_connection_with_config(&config).await
    }
}

/// Scripts, failover mark, re-seed, membership, subscriptions: as `supervisor::open_session`
/// does on one server, spread over the shards. Returns until when room events wait.
async fn restore(
    shared: &Shared,
    shards: &Arc<Shards>,
    inbound: &mpsc::Sender<Inbound>,
    gen: u64,
    last_ids: &mut Option<Vec<String>>,
) -> Result<Option<Instant>, redis::RedisError> {
    for conn in &shards.commands {
        load_scripts(shared, &mut conn.clone()).await?;
    }
    let herald = shards.shard_of(shared.names.boot.as_bytes());
    let mut global = shards.commands[herald].clone();
    let ids: Vec<String> = shards.topology.primaries.iter().map(|p| p.id.clone()).collect();
    let promoted: Vec<&shards::Primary> = match last_ids {
        Some(last) => shards.topology.primaries.iter().filter(|p| !last.contains(&p.id)).collect(),
        None => Vec::new(),
    };
    if !promoted.is_empty() {
        shared.stats.failovers.fetch_add(1, Ordering::Relaxed);
        for primary in &promoted {
            shared.stats.note_endpoint(&primary.addr(), |e| e.failovers_to += 1);
            tracing::warn!(redis = %primary.addr(), "redis cluster bus followed a failover to a new primary");
        }
        mark_failover(shared, &mut global).await?;
    }
    // The boot mark and failover mark live in the `{herald}` slot: their age decides settling.
    let age_ms = reseed(shared, &mut global, &[]).await?;
    reseed_rooms(shared, shards, &known_floors(shared)).await?;
    let settle_until = settle_deadline(shared, age_ms);

    // Membership first, as on one server.
    let members = [shared.names.members_channel.to_string()];
    subscribe(&mut shards.subscriptions[herald].clone(), "SSUBSCRIBE", &members).await?;
    restore_membership(shared, &mut global, inbound, gen).await?;
    reconcile(shared, shards).await?;

    *last_ids = Some(ids);
    go_live(shared, gen, Link::Cluster(shards.clone()), settle_until);
    Ok(settle_until)
}

/// Serves the session until any part of it fails; returns why.
async fn run(
    shared: &Shared,
    shards: &Arc<Shards>,
    gen: u64,
    mut settle_until: Option<Instant>,
) -> redis::RedisError {
    let (mut ping, mut touch) = session_timers(shared);
    loop {
        tokio::select! {
            _ = shared.topics.changed() => {
                if let Err(e) = reconcile(shared, shards).await {
                    return e;
                }
            }
            _ = touch.tick() => {
                if let Err(e) = touch_watched(shared, shards).await {
                    return e;
                }
            }
            _ = ping.tick() => {
                let conns = shards.commands.iter().chain(&shards.subscriptions);
                let pings = join_all(conns.map(|conn| {
                    let mut conn = conn.clone();
                    tokio::time::timeout(shared.options.ping_timeout, async move {
                        redis::cmd("PING").query_async::<Value>(&mut conn).await
                    })
                }))
                .await;
                for pong in pings {
                    match pong {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return e,
                        Err(_) => return redis::RedisError::from((redis::ErrorKind::Io, "PING timed out")),
                    }
                }
            }
            () = until_lost(shared, gen, &mut settle_until) => {
                return redis::RedisError::from((redis::ErrorKind::Io, "a shard connection closed, or its slots moved"));
            }
        }
    }
}

/// `SSUBSCRIBE` / `SUNSUBSCRIBE` of channels of one shard, one channel per command (Redis wants
/// one slot per command, and one confirmation per command keeps replies in step).
async fn subscribe(
    conn: &mut MultiplexedConnection,
    command: &str,
    channels: &[String],
) -> Result<(), redis::RedisError> {
    for chunk in channels.chunks(CHUNK) {
        let mut pipe = redis::pipe();
        for c in chunk {
            pipe.cmd(command).arg(c).ignore();
        }
        pipe.query_async::<()>(conn).await?;
    }
    Ok(())
}

/// Topics grouped by the shard that serves their channel.
fn by_shard(shards: &Shards, topics: &[Topic]) -> Vec<(usize, Vec<Topic>)> {
    let mut groups: HashMap<usize, Vec<Topic>> = HashMap::new();
    for topic in topics {
        groups.entry(shards.shard_of(channel(*topic).as_bytes())).or_default().push(*topic);
    }
    groups.into_iter().collect()
}

/// As `supervisor::reconcile`, each topic on its slot's primary.
async fn reconcile(shared: &Shared, shards: &Shards) -> Result<(), redis::RedisError> {
    loop {
        let plan = shared.topics.plan();
        if !plan.reseed.is_empty() {
            reseed_rooms(shared, shards, &floors_of(shared, &plan.reseed)).await?;
        }
        if plan.settled() {
            return Ok(());
        }
        for (shard, topics) in by_shard(shards, &plan.unsubscribe) {
            let channels: Vec<String> = topics.iter().map(|t| channel(*t)).collect();
            shards.expect_leaving(&channels);
            subscribe(&mut shards.subscriptions[shard].clone(), "SUNSUBSCRIBE", &channels).await?;
            shared.topics.unsubscribed(&topics);
        }
        for (shard, topics) in by_shard(shards, &plan.subscribe) {
            let channels: Vec<String> = topics.iter().map(|t| channel(*t)).collect();
            subscribe(&mut shards.subscriptions[shard].clone(), "SSUBSCRIBE", &channels).await?;
            shared.topics.subscribed(&topics);
        }
    }
}

/// One script call per room, pipelined per shard: `script` with the room's counter as its key
/// and `arg` (per room) as its argument.
async fn per_room(shards: &Shards, rooms: &[(ChatId, String)], hash: &str) -> Result<(), redis::RedisError> {
    let keys: Vec<String> = rooms.iter().map(|(chat, _)| seq_key(*chat)).collect();
    for (mut conn, indexes) in shards.group(&keys) {
        for chunk in indexes.chunks(CHUNK) {
            let mut pipe = redis::pipe();
            for i in chunk {
                pipe.cmd("EVALSHA").arg(hash).arg(1).arg(&keys[*i]).arg(&rooms[*i].1).ignore();
            }
            pipe.query_async::<()>(&mut conn).await?;
        }
    }
    Ok(())
}

/// Raises room counters to the node's floors, each on its slot's primary.
async fn reseed_rooms(
    shared: &Shared,
    shards: &Shards,
    floors: &[(ChatId, u64)],
) -> Result<(), redis::RedisError> {
    let rooms: Vec<(ChatId, String)> = floors.iter().map(|(c, f)| (*c, f.to_string())).collect();
    per_room(shards, &rooms, shared.scripts.reseed_room.get_hash()).await
}

/// Refreshes the expiry of the counters of every room this node watches.
async fn touch_watched(shared: &Shared, shards: &Shards) -> Result<(), redis::RedisError> {
    let ttl = shared.options.history_ttl.as_millis().to_string();
    let rooms: Vec<(ChatId, String)> =
        shared.topics.watched_rooms().into_iter().map(|c| (c, ttl.clone())).collect();
    per_room(shards, &rooms, shared.scripts.touch.get_hash()).await
}
