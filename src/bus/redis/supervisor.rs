//! The supervisor task: owns the node's Redis session (a command connection and a subscription
//! connection, [`Session`]). It connects, restores what a node
//! needs (scripts, room counter floors, the membership snapshot and the membership changes it
//! missed, then its subscriptions), alone issues the `SUBSCRIBE` / `UNSUBSCRIBE` commands that
//! `topics.rs` plans to match local interest, detects a lost connection (or, under Sentinel, a
//! demoted master), and reconnects with capped, jittered backoff to the server the endpoint names.
//! The session steps that do not depend on the topology (backoff, connection options, failover
//! mark, re-seed floors, settle window, membership restore, going live) are here too, and the
//! cluster supervisor (`cluster.rs`) calls them for its sessions.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, PushInfo, PushKind, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::delivery::{Inbound, MemberSnapshot, Missed};
use super::endpoint::{self, Endpoint, Master};
use super::io_thread;
use super::scripts::{channel, seq_key, MARK_FAILOVER_LUA};
use super::shards::Link;
use super::{MemberMark, Phase, Shared, INBOUND_BYTES, INBOUND_CAPACITY};
use crate::bus::Control;
use crate::protocol::event::DomainEvent;
use crate::protocol::ChatId;
use crate::sync::lock;

/// Channels per `SUBSCRIBE` / `UNSUBSCRIBE` command, and rooms per re-seed or touch call.
const CHUNK: usize = 512;

/// One session per connection, backoff between attempts, until the bus handle is dropped (which
/// aborts this task). Each attempt resolves the endpoint again: under Sentinel that is how a
/// failover is followed (the sentinels name the promoted replica).
pub(super) async fn supervise(shared: Arc<Shared>, endpoint: Endpoint, inbound: mpsc::Sender<Inbound>) {
    let mut attempts = Attempts::new("redis bus");
    // The master of the last session, so a move to another server is counted as a failover.
    let mut last_addr: Option<String> = None;
    // The replication ID of the last session's server: a promoted replica has another one, also
    // behind an unchanged address (a managed Redis's endpoint moved to the new primary).
    let mut last_replid: Option<String> = None;
    while let Some(gen) = attempts.next(&shared, &inbound).await {
        let attempt = match endpoint.resolve(shared.options.connect_timeout).await {
            Ok(master) => {
                match open_session(&shared, &master, &inbound, gen, last_addr.as_deref(), &mut last_replid)
                    .await
                {
                    Ok(session) => Ok((session, master)),
                    Err(e) => {
                        endpoint.pass_over(&master);
                        Err(endpoint.failure(master.key, &master.shown, &master.addr, &e))
                    }
                }
            }
            Err(failure) => Err(failure),
        };
        match attempt {
            Ok(((session, settle_until), master)) => {
                let failover = last_addr.as_ref().is_some_and(|last| *last != master.addr);
                shared.stats.note_endpoint(&master.addr, |e| {
                    e.sessions += 1;
                    e.failovers_to += u64::from(failover);
                });
                if failover {
                    shared.stats.failovers.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(redis = %master.shown, "redis bus followed a failover to a new master");
                }
                last_addr = Some(master.addr.clone());
                attempts.opened(&shared, &master.shown);
                let err = run_session(&shared, session, gen, settle_until, master.check_role).await;
                shared.go_down();
                tracing::error!(
                    redis = %master.shown, error = %err,
                    "redis bus lost its connection; publishes answer 503 until it is back"
                );
            }
            Err(failure) => attempts.failed(&shared, &failure),
        }
        attempts.back_off(&shared).await;
    }
}

/// A supervisor's session attempts: the generation of each, whether a session was ever up, the
/// failures in a row and the backoff delay. `bus` names the kind of bus in the logs.
pub(super) struct Attempts {
    gen: u64,
    delay: Duration,
    was_up: bool,
    failures: u64,
    bus: &'static str,
}

impl Attempts {
    pub(super) fn new(bus: &'static str) -> Attempts {
        Attempts { gen: 0, delay: Duration::from_millis(50), was_up: false, failures: 0, bus }
    }

    /// The next attempt's generation, announced to the delivery task before the connection
    /// exists, so it precedes every push of that connection; `None` once the bus is dropped.
    /// Waits first for the delivery queue to be down to a quarter: a session opened onto a queue
    /// still full of the last one's pushes would drop its own first ones, and end again.
    pub(super) async fn next(&mut self, shared: &Shared, inbound: &mpsc::Sender<Inbound>) -> Option<u64> {
        while inbound.max_capacity() - inbound.capacity() > INBOUND_CAPACITY / 4
            || shared.inbound_bytes.load(Ordering::Relaxed) > INBOUND_BYTES / 4
        {
            if inbound.is_closed() {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.gen += 1;
        inbound.send(Inbound::Reset { gen: self.gen }).await.ok()?;
        Some(self.gen)
    }

    /// A session opened on `redis` (as shown in logs): a reconnect when one was up before, and
    /// the backoff starts over.
    pub(super) fn opened(&mut self, shared: &Shared, redis: &str) {
        if self.was_up {
            shared.stats.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        if self.was_up || self.failures > 0 {
            tracing::warn!(redis = %redis, "{} reconnected; subscriptions restored", self.bus);
        }
        self.was_up = true;
        self.failures = 0;
        self.delay = Duration::from_millis(50);
    }

    /// A session that could not open: the bus is down, the failure is counted (per endpoint
    /// too), and logged on the first failure and then every ~30 attempts, not on every retry.
    pub(super) fn failed(&mut self, shared: &Shared, failure: &endpoint::Failure) {
        shared.go_down();
        shared.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
        shared.stats.note_endpoint(&failure.addr, |e| e.connect_failures += 1);
        self.failures += 1;
        if self.failures == 1 || self.failures % 30 == 0 {
            tracing::error!(error = %failure, attempts = self.failures, "{} cannot connect; retrying", self.bus);
        }
    }

    /// Waits the delay plus up to half of it again (jitter, so nodes do not retry in step), then
    /// doubles the delay up to `backoff_max`.
    pub(super) async fn back_off(&mut self, shared: &Shared) {
        let jitter = self.delay.mul_f64(f64::from(getrandom::u32().unwrap_or(0) % 1000) / 2000.0);
        tokio::time::sleep(self.delay + jitter).await;
        self.delay = (self.delay * 2).min(shared.options.backoff_max);
    }
}

/// The options of every connection the bus opens: its timeouts, and `push_sender` for pushes.
pub(super) fn connection_config(
    shared: &Shared,
    push_sender: impl Fn(PushInfo) -> Result<(), ()> + Send + Sync + 'static,
) -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(shared.options.connect_timeout))
        .set_response_timeout(Some(shared.options.response_timeout))
        .set_push_sender(push_sender)
}

/// Marks a failover (in the `{herald}` slot under Cluster): every node that opens a session
/// within `settle` of the mark settles before it publishes room events.
pub(super) async fn mark_failover(
    shared: &Shared,
    conn: &mut MultiplexedConnection,
) -> Result<(), redis::RedisError> {
    let keep_ms = u64::try_from((shared.options.settle * 10).as_millis()).unwrap_or(u64::MAX);
    redis::Script::new(MARK_FAILOVER_LUA)
        .key(shared.names.failover())
        .arg(keep_ms)
        .invoke_async::<i64>(conn)
        .await?;
    Ok(())
}

/// Every room counter floor this node knows.
pub(super) fn known_floors(shared: &Shared) -> Vec<(ChatId, u64)> {
    lock(&shared.floors).iter().map(|(c, s)| (*c, *s)).collect()
}

/// The floors of the rooms a plan asks to re-seed (those this node knows a floor for).
pub(super) fn floors_of(shared: &Shared, rooms: &[ChatId]) -> Vec<(ChatId, u64)> {
    let known = lock(&shared.floors);
    rooms.iter().filter_map(|c| known.get(c).map(|f| (*c, *f))).collect()
}

/// Until when room events wait, given the age of Redis's state (ms since the boot or failover
/// mark): `None` when it is older than `settle`.
pub(super) fn settle_deadline(shared: &Shared, age_ms: u64) -> Option<Instant> {
    let settle_ms = u64::try_from(shared.options.settle.as_millis()).unwrap_or(u64::MAX);
    (age_ms < settle_ms).then(|| Instant::now() + Duration::from_millis(settle_ms - age_ms))
}

/// After the members channel is subscribed: the membership snapshot (with the changes missed)
/// goes to the delivery task, revocations published while this node was cut off are applied, and
/// every watched topic is marked for the first reconcile to subscribe again.
pub(super) async fn restore_membership(
    shared: &Shared,
    conn: &mut MultiplexedConnection,
    inbound: &mpsc::Sender<Inbound>,
    gen: u64,
) -> Result<(), redis::RedisError> {
    let snapshot = member_snapshot(shared, conn).await?;
    if inbound.send(Inbound::Snapshot { gen, snapshot }).await.is_err() {
        return Err(redis::RedisError::from((redis::ErrorKind::Client, "redis bus stopped")));
    }
    // Revocations published while this node was cut off reached nobody here: read those of
    // the users connected here before serving again, so their old-token connections close too.
    catch_up_revocations(shared, conn).await?;
    // Everything watched is resubscribed by the first reconcile.
    shared.topics.resubscribe_all();
    Ok(())
}

/// Makes a restored session the one publishes use, and opens the bus (settling until
/// `settle_until`, if any).
pub(super) fn go_live(shared: &Shared, gen: u64, link: Link, settle_until: Option<Instant>) {
    shared.session_gen.store(gen, Ordering::SeqCst);
    *lock(&shared.conn) = Some(link);
    shared.phase.send_replace(if settle_until.is_some() { Phase::Settling } else { Phase::Up });
}

/// Returns once this session's connection is lost (a wake-up for generation `gen`; older ones
/// are passed over), and meanwhile ends the settle window at `settle_until`, opening the bus to
/// room events. Cancel-safe: `run` polls it in a `select!` with the session's other work.
pub(super) async fn until_lost(shared: &Shared, gen: u64, settle_until: &mut Option<Instant>) {
    loop {
        let settle_at = settle_until.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            () = shared.lost.notified() => {
                if shared.lost_gen.load(Ordering::SeqCst) == gen {
                    return;
                }
            }
            () = tokio::time::sleep_until(settle_at), if settle_until.is_some() => {
                *settle_until = None;
                shared.phase.send_replace(Phase::Up);
            }
        }
    }
}

/// The liveness ping and the counter refresh of a session. Counters of watched rooms without
/// events expire after the history TTL: they are refreshed well before (see `HEAD_LUA`).
pub(super) fn session_timers(shared: &Shared) -> (tokio::time::Interval, tokio::time::Interval) {
    let mut ping = tokio::time::interval(shared.options.ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let every = (shared.options.history_ttl / 3).clamp(Duration::from_millis(50), Duration::from_secs(60));
    let mut touch = tokio::time::interval(every);
    touch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    (ping, touch)
}

/// What a connection's push sender does with a push of generation `gen` (it runs on the
/// connection's reader: it must not block, so it only forwards or counts): a lost connection
/// wakes the supervisor, a message (or shard message) goes to the delivery task.
pub(super) fn forward_push(
    shared: &Shared,
    push_tx: &mpsc::Sender<Inbound>,
    gen: u64,
    info: PushInfo,
) -> Result<(), ()> {
    match info.kind {
        PushKind::Disconnection => {
            // `fetch_max`: a late word from an older session must not hide this one's end.
            shared.lost_gen.fetch_max(gen, Ordering::SeqCst);
            shared.lost.notify_one();
            Ok(())
        }
        PushKind::Message | PushKind::SMessage => {
            if shared.dropped_gen.load(Ordering::SeqCst) == gen {
                dropped(shared, gen, false);
                return Ok(());
            }
            let room = matches!(info.data.first(), Some(Value::BulkString(c)) if c.ends_with(b":room"));
            let bytes = Inbound::push_bytes(&info);
            let before = shared.inbound_bytes.fetch_add(bytes, Ordering::Relaxed);
            // One push bigger than the whole budget still passes an empty queue: an event may be
            // as big as `server.max_body_bytes` allows, and must not end every session.
            if before > 0 && before + bytes > INBOUND_BYTES {
                shared.inbound_bytes.fetch_sub(bytes, Ordering::Relaxed);
                dropped(shared, gen, room);
                return Ok(());
            }
            match push_tx.try_send(Inbound::Push { gen, info, bytes }) {
                Ok(()) => Ok(()),
                Err(e) => {
                    shared.inbound_bytes.fetch_sub(bytes, Ordering::Relaxed);
                    match e {
                        mpsc::error::TrySendError::Full(_) => {
                            dropped(shared, gen, room);
                            Ok(())
                        }
                        mpsc::error::TrySendError::Closed(_) => Err(()),
                    }
                }
            }
        }
        // Subscribe confirmations are awaited as replies; other kinds do not concern us.
        _ => Ok(()),
    }
}

/// A push of session `gen` the delivery task has no room for (in pushes or bytes): dropped and
/// counted. A room event dropped is a `seq` gap, which clients recover from Redis's history. Any
/// other push (`room` false) may be a membership change or a revocation, which only a new session
/// reads back (the membership snapshot with the changes missed, the connected users'
/// revocations): the session ends, and the rest of its pushes are dropped too.
fn dropped(shared: &Shared, gen: u64, room: bool) {
    // A revocation may be among what is dropped: ask Redis again.
    shared.forget_checked(None);
    if !room && shared.dropped_gen.fetch_max(gen, Ordering::SeqCst) < gen {
        shared.lost_gen.fetch_max(gen, Ordering::SeqCst);
        shared.lost.notify_one();
        tracing::error!(
            "redis bus delivery is behind and dropped a membership or user push; opening a new \
             session to read membership and revocations again"
        );
    }
    if shared.stats.inbound_dropped.fetch_add(1, Ordering::Relaxed) % 10_000 == 0 {
        tracing::error!("redis bus delivery task is behind; dropping events (seq gaps)");
    }
}

/// The error a session ends with when the server it is on is no longer the master (a failover
/// demoted it): the next attempt asks the sentinels again.
fn not_master(role: &str) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::Io,
        "the server is no longer the master; asking the sentinels again",
        role.to_string(),
    ))
}

/// A session's two connections to the master: `commands` (publishes, scripts, pings) is read on
/// the node's runtime, where its replies wake their callers; `subscriptions` is read on the I/O
/// thread ([`io_thread`]), so what Redis pushes waits in the delivery queue, where the overload
/// word counts it, however busy the runtime is. (Both on the I/O thread halved the events
/// published at saturation: every reply woke its caller from another thread.)
struct Session {
    commands: MultiplexedConnection,
    subscriptions: MultiplexedConnection,
}

/// Opens a session and restores everything the node needs before it is used: scripts, room
/// counter floors, the membership channel, the membership snapshot with the changes the node
/// missed, and only then the watched rooms and users (membership first: the delivery task applies
/// the snapshot before any room event of this session, which comes after it on `inbound`).
async fn open_session(
    shared: &Arc<Shared>,
    master: &Master,
    inbound: &mpsc::Sender<Inbound>,
    gen: u64,
    last_addr: Option<&str>,
    last_replid: &mut Option<String>,
) -> Result<(Session, Option<Instant>), redis::RedisError> {
    let push_tx = inbound.clone();
    let weak = Arc::downgrade(shared);
    // Runs on the connection's reader: must not block, so it only forwards or counts.
    let push_sender = move |info: PushInfo| -> Result<(), ()> {
        let Some(shared) = weak.upgrade() else { return Err(()) };
        forward_push(&shared, &push_tx, gen, info)
    };
    let config = connection_config(shared, push_sender);
    let mut conn = master.client.get_multiplexed_async_connection_with_config(&config).await?;
    let mut subs = io_thread::connect(
        &master.client,
        &config,
        shared.options.connect_timeout + shared.options.response_timeout,
    )
    .await?;
    // A sentinel may still name a master that a failover demoted, or one that came back as a
    // replica: only a master takes writes.
    if master.check_role {
        let role = endpoint::role(&mut conn).await?;
        if role != "master" {
            return Err(not_master(&role));
        }
    }

    load_scripts(shared, &mut conn).await?;

    // A promoted replica may lack the last writes of the master it replaces (replication is
    // asynchronous): room counters behind seqs that clients already hold. A node that watched
    // none of those rooms would publish under them again, and its events would reach the
    // clients that hold those seqs as regressions, dropped. So a failover opens the settle
    // window as a Redis restart does: no room event until every node had time to re-seed. (The
    // boot mark stays: the member log, which it names, is still there to replay.) A failover is
    // a new master under Sentinel, or a server with another replication ID than the last one
    // (`INFO` may be denied to the ACL user: then only the former is seen).
    let replid = replication_id(&mut conn).await;
    // The two connections reach the address one after the other: a failover in between (a
    // managed Redis's name moved to the promoted replica) could put them on different servers.
    if master.check_role && endpoint::role(&mut subs).await? != "master" {
        return Err(not_master("subscriptions on a replica"));
    }
    let subs_replid = replication_id(&mut subs).await;
    if replid.is_some() && subs_replid.is_some() && replid != subs_replid {
        return Err(redis::RedisError::from((
            redis::ErrorKind::Io,
            "the session's two connections reached different servers (a failover in between); retrying",
        )));
    }
    let moved = last_replid.as_ref().is_some_and(|last| replid.as_ref().is_some_and(|id| id != last));
    if moved || (master.check_role && last_addr.is_some_and(|last| last != master.addr)) {
        mark_failover(shared, &mut conn).await?;
    }

    // Re-seed every room this node knows before it publishes again (a restarted Redis starts empty).
    let age_ms = reseed(shared, &mut conn, &known_floors(shared)).await?;
    let settle_until = settle_deadline(shared, age_ms);

    // The members channel first, then the snapshot, so no membership event falls between the two.
    subs.subscribe(shared.names.members_channel).await?;
    restore_membership(shared, &mut conn, inbound, gen).await?;
    reconcile(shared, &mut conn, &mut subs).await?;

    if replid.is_some() {
        *last_replid = replid;
    }
    go_live(shared, gen, Link::One(conn.clone()), settle_until);
    Ok((Session { commands: conn, subscriptions: subs }, settle_until))
}

/// Loads every script (calls go by `EVALSHA`).
pub(super) async fn load_scripts(
    shared: &Shared,
    conn: &mut MultiplexedConnection,
) -> Result<(), redis::RedisError> {
    for code in &shared.scripts.sources {
        redis::cmd("SCRIPT").arg("LOAD").arg(code).query_async::<String>(conn).await?;
    }
    Ok(())
}

/// The server's replication ID (`master_replid` of `INFO replication`); `None` when it cannot
/// be read (an ACL user without `INFO`).
async fn replication_id(conn: &mut MultiplexedConnection) -> Option<String> {
    let info: String = redis::cmd("INFO").arg("replication").query_async(conn).await.ok()?;
    info.lines().find_map(|l| l.strip_prefix("master_replid:")).map(|id| id.trim().to_string())
}

/// Applies the revocations Redis keeps for every user connected to this node (in chunks), as if
/// they had just been heard: each connection compares its own token.
pub(super) async fn catch_up_revocations(
    shared: &Shared,
    conn: &mut MultiplexedConnection,
) -> Result<(), redis::RedisError> {
    let users = shared.topics.watched_users();
    for chunk in users.chunks(CHUNK) {
        let keys: Vec<String> = chunk.iter().map(|u| shared.names.revoked_key(*u)).collect();
        let kept: Vec<Option<u64>> = redis::cmd("MGET").arg(&keys).query_async(conn).await?;
        for (user, before) in chunk.iter().zip(kept) {
            if let Some(before) = before {
                shared.sink.control(Control::Revoke { user: *user, before });
            }
        }
    }
    Ok(())
}

/// Reads the membership snapshot and the member log entries after this node's mark in one script
/// call. On the node's first connect there is no mark: it starts at the snapshot's position.
pub(super) async fn member_snapshot(
    shared: &Shared,
    conn: &mut MultiplexedConnection,
) -> Result<MemberSnapshot, redis::RedisError> {
    let mark = lock(&shared.member_mark).clone();
    let (known_boot, after) = mark.as_ref().map_or((String::new(), 0), |m| (m.boot.clone(), m.gseq));
    let flat: Vec<String> = redis::cmd("EVALSHA")
        .arg(shared.scripts.snapshot.get_hash())
        .arg(5)
        .arg(shared.names.boot)
        .arg(shared.names.member_index)
        .arg(shared.names.gseq)
        .arg(shared.names.member_log)
        .arg(shared.names.removed_index)
        .arg(&shared.names.members_key_parts()[..])
        .arg(known_boot)
        .arg(after)
        .arg(shared.names.removed_key_suffix())
        .arg(shared.options.token_ttl.as_millis().to_string())
        .query_async(conn)
        .await?;
    let mut flat = flat.into_iter();
    let boot = flat.next().unwrap_or_default();
    let number =
        |flat: &mut std::vec::IntoIter<String>| flat.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    let (ver, reach, logged): (u64, u64, usize) =
        (number(&mut flat), number(&mut flat), number(&mut flat) as usize);
    let mut events = Vec::with_capacity(logged.min(10_000));
    for entry in flat.by_ref().take(logged) {
        match DomainEvent::from_json(entry.as_bytes()) {
            Ok((event, Some(gseq))) => events.push((gseq, event)),
            Ok((_, None)) => tracing::warn!("member log entry without seq in redis; skipped"),
            Err(e) => tracing::warn!(error = %e, "undecodable member log entry in redis; skipped"),
        }
    }
    let removed = number(&mut flat) as usize;
    let triples: Vec<String> = flat.by_ref().take(removed.saturating_mul(3)).collect();
    let removals = triples
        .chunks_exact(3)
        .filter_map(|t| Some((t[0].parse().ok()?, t[1].parse().ok()?, t[2].parse().ok()?)))
        .collect();
    let rest: Vec<String> = flat.collect();
    let pairs = rest.chunks_exact(2).filter_map(|p| Some((p[0].parse().ok()?, p[1].parse().ok()?))).collect();
    let missed = match mark {
        Some(_) => Some(Missed { reach, events }),
        None => {
            // The first connect: the node holds no subscription yet, so it has nothing to replay.
            lock(&shared.member_mark).get_or_insert(MemberMark { boot: boot.clone(), gseq: ver });
            None
        }
    };
    Ok(MemberSnapshot { boot, ver, pairs, removals, missed })
}

/// Raises room counters to the given floors (in chunks); returns ms since Redis's state began.
pub(super) async fn reseed(
    shared: &Shared,
    conn: &mut MultiplexedConnection,
    floors: &[(ChatId, u64)],
) -> Result<u64, redis::RedisError> {
    let mut age = u64::MAX;
    let mut chunks: Vec<&[(ChatId, u64)]> = floors.chunks(CHUNK).collect();
    if chunks.is_empty() {
        chunks.push(&[]);
    }
    for chunk in chunks {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(shared.scripts.reseed.get_hash()).arg(1 + chunk.len()).arg(shared.names.boot);
        for (chat, _) in chunk {
            cmd.arg(seq_key(*chat));
        }
        for (_, floor) in chunk {
            cmd.arg(*floor);
        }
        let a: i64 = cmd.query_async(conn).await?;
        age = age.min(u64::try_from(a).unwrap_or(0));
    }
    Ok(age)
}

/// Serves one session until either connection fails; returns why.
async fn run_session(
    shared: &Shared,
    session: Session,
    gen: u64,
    mut settle_until: Option<Instant>,
    check_role: bool,
) -> redis::RedisError {
    let Session { commands: mut conn, subscriptions: mut subs } = session;
    let (mut ping, mut touch) = session_timers(shared);
    loop {
        tokio::select! {
            _ = shared.topics.changed() => {
                if let Err(e) = reconcile(shared, &mut conn, &mut subs).await {
                    return e;
                }
            }
            _ = touch.tick() => {
                if let Err(e) = touch_watched(shared, &mut conn).await {
                    return e;
                }
            }
            _ = ping.tick() => {
                // Under Sentinel the liveness check also asks the role, so a master demoted
                // while this connection stayed up (`+switch-master` without a crash) is left
                // within a ping interval.
                let pong = tokio::time::timeout(shared.options.ping_timeout, async {
                    // Both connections: a subscription connection that died silently would
                    // lose events without a word.
                    redis::cmd("PING").query_async::<String>(&mut subs).await?;
                    if check_role {
                        endpoint::role(&mut conn).await
                    } else {
                        redis::cmd("PING").query_async::<String>(&mut conn).await.map(|_| "master".into())
                    }
                })
                .await;
                match pong {
                    Ok(Ok(role)) if role == "master" => {}
                    Ok(Ok(role)) => return not_master(&role),
                    Ok(Err(e)) => return e,
                    Err(_) => return redis::RedisError::from((redis::ErrorKind::Io, "PING timed out")),
                }
            }
            () = until_lost(shared, gen, &mut settle_until) => {
                return redis::RedisError::from((redis::ErrorKind::Io, "connection closed"));
            }
        }
    }
}

/// Refreshes the expiry of the counters of every room this node watches (in chunks).
async fn touch_watched(shared: &Shared, conn: &mut MultiplexedConnection) -> Result<(), redis::RedisError> {
    let rooms = shared.topics.watched_rooms();
    let ttl = shared.options.history_ttl.as_millis().to_string();
    for chunk in rooms.chunks(CHUNK) {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(shared.scripts.touch.get_hash()).arg(chunk.len());
        for chat in chunk {
            cmd.arg(seq_key(*chat));
        }
        cmd.arg(&ttl).query_async::<i64>(conn).await?;
    }
    Ok(())
}

/// Brings Redis subscriptions in line with local interest, and re-seeds regressed rooms: issues
/// the commands of each [`Topics::plan`](super::topics::Topics::plan) and reports their
/// confirmations, until a plan needs no subscription change.
async fn reconcile(
    shared: &Shared,
    conn: &mut MultiplexedConnection,
    subs: &mut MultiplexedConnection,
) -> Result<(), redis::RedisError> {
    loop {
        let plan = shared.topics.plan();
        if !plan.reseed.is_empty() {
            reseed(shared, conn, &floors_of(shared, &plan.reseed)).await?;
        }
        if plan.settled() {
            return Ok(());
        }
        for chunk in plan.unsubscribe.chunks(CHUNK) {
            let channels: Vec<String> = chunk.iter().map(|t| channel(*t)).collect();
            subs.unsubscribe(&channels).await?;
            shared.topics.unsubscribed(chunk);
        }
        for chunk in plan.subscribe.chunks(CHUNK) {
            let channels: Vec<String> = chunk.iter().map(|t| channel(*t)).collect();
            subs.subscribe(&channels).await?;
            shared.topics.subscribed(chunk);
        }
    }
}
