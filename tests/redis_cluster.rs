//! Herald on Redis Cluster with sharded pub/sub, against real clusters the tests start: three
//! nodes carry rooms spread over every shard, each room's messages reach only its own shard,
//! and a primary killed or a slot moved mid-stream is followed: every client got every event
//! once and in order, or was told `recovered:false`.

#[path = "support/redis_cluster.rs"]
mod cluster;
#[path = "support/redis_scale.rs"]
mod scale;
mod support;

use std::collections::HashMap;
use std::time::Duration;

use cluster::{
    all_ready, cluster_config, every_event_or_told, publish_killing, three_nodes, tls_cluster_config,
    watching, Cluster,
};
use futures_util::StreamExt;
use herald::cmd::check_config;
use herald::config::Config;
use scale::query;
use serde_json::{json, Value};
use support::redis::{assert_fixed_503, publish_through};
use support::{chat, message_sent, user, Client, Gateway, PATIENCE};
use tokio::time::{sleep, Instant};
use tokio_tungstenite::tungstenite::Message;

/// Calls of `command` (lower case) a primary has run (direct or from scripts).
async fn calls(port: u16, command: &str) -> u64 {
    let stats: String = query(&Cluster::client(port), &["INFO", "commandstats"]).await;
    let prefix = format!("cmdstat_{command}:calls=");
    stats
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// `SPUBLISH` calls a primary has run (direct or from scripts).
async fn spublishes(port: u16) -> u64 {
    calls(port, "spublish").await
}

/// Subscribers of a shard channel on node `port`.
async fn shard_subscribers(port: u16, channel: &str) -> i64 {
    let reply: Vec<redis::Value> = query(&Cluster::client(port), &["PUBSUB", "SHARDNUMSUB", channel]).await;
    match reply.get(1) {
        Some(redis::Value::Int(n)) => *n,
        _ => 0,
    }
}

/// Rooms until every primary serves `per_shard` of them: (room, its primary's port).
async fn rooms_on_every_shard(cluster: &Cluster, per_shard: usize) -> Vec<(uuid::Uuid, u16)> {
    let mut count: HashMap<u16, usize> = HashMap::new();
    let mut rooms = Vec::new();
    while count.len() < 3 || count.values().any(|n| *n < per_shard) {
        let room = chat();
        let port = cluster.primary_of(&format!("herald:{{{room}}}:room")).await;
        let n = count.entry(port).or_default();
        if *n < per_shard {
            *n += 1;
            rooms.push((room, port));
        }
    }
    rooms
}

/// A cluster with `replicas` per primary, marked settled.
async fn settled_cluster(replicas: usize) -> Cluster {
    let cluster = Cluster::start(replicas).await;
    cluster.mark_settled().await;
    cluster
}

/// Reads `message.new` events from `client` until every room has its `count` events; checks
/// each room's seqs only grow and no `n` comes twice.
async fn receive_all(client: &mut Client, rooms: &[uuid::Uuid], count: usize) {
    let mut seen: HashMap<String, (u64, Vec<u64>)> = HashMap::new();
    let deadline = Instant::now() + PATIENCE * 3;
    while seen.values().map(|(_, ns)| ns.len()).sum::<usize>() < rooms.len() * count {
        let v = tokio::time::timeout_at(deadline, client.recv()).await.expect("every event arrives");
        if v["type"] != "message.new" {
            continue;
        }
        let room = v["chat_id"].as_str().expect("chat_id").to_string();
        let (seq, n) = (v["seq"].as_u64().expect("seq"), v["data"]["n"].as_u64().expect("n"));
        let (last, ns) = seen.entry(room).or_default();
        assert!(seq > *last, "seq went back or repeated: {last} then {seq}");
        assert!(!ns.contains(&n), "event {n} delivered twice");
        *last = seq;
        ns.push(n);
    }
    for room in rooms {
        let ns = &seen[&room.to_string()].1;
        assert_eq!(ns.len(), count, "room {room}: {ns:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn three_nodes_carry_rooms_on_every_shard_each_message_only_on_its_own_shard() {
    let cluster = settled_cluster(1).await;
    let reached = check_config::connect(&cluster_config(cluster.urls())).await.expect("reaches every server");
    assert_eq!(reached.lines().filter(|l| l.starts_with("ok")).count(), 6 + 1 + 3, "{reached}");
    // A dead seed first: the next one is asked.
    let mut urls = vec![format!("redis://127.0.0.1:{}", scale::free_port())];
    urls.extend(cluster.urls().into_iter().take(2));
    let (a, b, c) = three_nodes(cluster_config(urls)).await;
    let nodes = [&a, &b, &c];

    let rooms = rooms_on_every_shard(&cluster, 2).await;
    let ids: Vec<uuid::Uuid> = rooms.iter().map(|(r, _)| *r).collect();
    let mut clients = Vec::new();
    for gw in nodes {
        let mut client = gw.connect(user(), &[]).await;
        for room in &ids {
            client.subscribe(*room).await;
        }
        clients.push(client);
    }
    // Every node holds its subscription on the room's own shard only.
    let primaries: Vec<u16> = {
        let mut p: Vec<u16> = rooms.iter().map(|(_, p)| *p).collect();
        p.sort_unstable();
        p.dedup();
        p
    };
    assert_eq!(primaries.len(), 3);
    for (room, owner) in &rooms {
        let channel = herald::bus::redis::channel(herald::bus::Topic::Room(*room));
        for port in &primaries {
            let want = if port == owner { 3 } else { 0 };
            assert_eq!(shard_subscribers(*port, &channel).await, want, "room {room} on {port}");
        }
    }

    let before: Vec<u64> = futures_util::future::join_all(primaries.iter().map(|p| spublishes(*p))).await;
    // Publishers on every node, one event at a time...
    let per_room = 8;
    for n in 1..=per_room as u64 {
        for (i, room) in ids.iter().enumerate() {
            let gw = nodes[(i + n as usize) % 3];
            let (status, reply) = gw.publish(&message_sent(*room, &json!({ "n": n }))).await;
            assert_eq!(status, 202, "{reply}");
        }
    }
    // ...and one batch over every room (every shard): 2xx only once every room's part is taken.
    let batch: Vec<Value> = ids
        .iter()
        .map(|room| json!({"type":"message.sent","chat_id":room,"data":{"n": per_room + 1}}))
        .collect();
    let (status, reply) = a.publish(&Value::Array(batch).to_string()).await;
    assert_eq!(status, 202, "{reply}");
    for client in &mut clients {
        receive_all(client, &ids, per_room + 1).await;
    }
    // Each shard ran exactly its own rooms' events: one SPUBLISH each, nothing for other rooms.
    let after: Vec<u64> = futures_util::future::join_all(primaries.iter().map(|p| spublishes(*p))).await;
    for ((port, before), after) in primaries.iter().zip(before).zip(after) {
        let own = rooms.iter().filter(|(_, p)| p == port).count() as u64 * (per_room as u64 + 1);
        assert_eq!(after - before, own, "primary {port} carried other shards' messages");
    }
    // Recovery with `since` on another node than the one the events were published on.
    let mut late = c.connect(user(), &[]).await;
    let (_, recovered) = late.subscribe_since(ids[0], 1).await;
    assert!(!recovered || late.recv().await["type"] == "message.new");
    for gw in nodes {
        assert_eq!(gw.metric("bus_up").await, 1.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn a_primary_killed_mid_stream_is_followed_with_every_event_or_recovered_false() {
    let mut cluster = settled_cluster(1).await;
    let (a, b, c) = three_nodes(cluster_config(cluster.urls())).await;
    let nodes = [&a, &b, &c];
    // A room on a shard that does not hold the `{herald}` slot, and one on that shard.
    let room = chat();
    let owner = cluster.primary_of(&format!("herald:{{{room}}}:room")).await;
    let (mut clients, head) = watching(&nodes, room).await;
    let (accepted, n) = publish_killing(&mut cluster, &a, room, owner).await;
    assert_ne!(cluster.primary_of(&format!("herald:{{{room}}}:room")).await, owner, "a replica was promoted");
    every_event_or_told(&nodes, &mut clients, room, head, accepted, n).await;
    for gw in nodes {
        assert!(gw.metric("redis_failovers_total").await >= 1.0, "the node followed the failover");
        assert_eq!(gw.metric("bus_up").await, 1.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn a_slot_moved_while_events_flow_is_followed_without_duplicates_or_silent_gaps() {
    let cluster = settled_cluster(0).await;
    let (a, b, c) = three_nodes(cluster_config(cluster.urls())).await;
    let nodes = [&a, &b, &c];
    let room = chat();
    let channel = format!("herald:{{{room}}}:room");
    let owner = cluster.primary_of(&channel).await;
    let target = cluster.nodes.iter().map(|n| n.port).find(|p| *p != owner).expect("another primary");
    let slot: i64 = query(&Cluster::client(owner), &["CLUSTER", "KEYSLOT", &channel]).await;
    let (mut clients, head) = watching(&nodes, room).await;
    // A second room, on another slot, whose slot moves while nobody publishes to it: only Redis
    // dropping the shard subscriptions tells the nodes (no publish meets a MOVED).
    let (quiet, quiet_slot) = loop {
        let quiet = chat();
        let name = format!("herald:{{{quiet}}}:room");
        let quiet_slot: i64 = query(&Cluster::client(owner), &["CLUSTER", "KEYSLOT", &name]).await;
        if quiet_slot != slot {
            break (quiet, quiet_slot);
        }
    };
    let (mut quiet_clients, quiet_head) = watching(&nodes, quiet).await;
    let (accepted, n) =
        publish_through(&a, room, async || cluster.move_slot(slot, owner, target).await, false).await;
    assert_eq!(cluster.primary_of(&channel).await, target, "the slot moved");
    every_event_or_told(&nodes, &mut clients, room, head, accepted, n).await;

    let quiet_name = format!("herald:{{{quiet}}}:room");
    let (quiet_owner, dropped_before) = (cluster.owner_of_slot(quiet_slot).await, dropped(&nodes).await);
    let quiet_target =
        cluster.nodes.iter().map(|n| n.port).find(|p| *p != quiet_owner).expect("another primary");
    cluster.move_slot(quiet_slot, quiet_owner, quiet_target).await;
    let deadline = Instant::now() + PATIENCE * 2;
    while dropped(&nodes).await < dropped_before + 3.0 {
        assert!(Instant::now() < deadline, "a node never noticed its shard subscription dropped");
        sleep(Duration::from_millis(50)).await;
    }
    every_event_or_told(&nodes, &mut quiet_clients, quiet, quiet_head, Vec::new(), 0).await;
    assert_eq!(shard_subscribers(quiet_target, &quiet_name).await, 3, "subscriptions followed the slot");

    // A room nobody watches: only a publish meets its moved slot (MOVED): refused, counted for the
    // slot's new primary, and the next session publishes there.
    let (lonely, lonely_slot) = loop {
        let lonely = chat();
        let name = format!("herald:{{{lonely}}}:seq");
        let lonely_slot: i64 = query(&Cluster::client(owner), &["CLUSTER", "KEYSLOT", &name]).await;
        if lonely_slot != slot && lonely_slot != quiet_slot {
            break (lonely, lonely_slot);
        }
    };
    assert_eq!(a.publish(&message_sent(lonely, &json!({"n": 1}))).await.0, 202);
    let lonely_owner = cluster.owner_of_slot(lonely_slot).await;
    let lonely_target =
        cluster.nodes.iter().map(|n| n.port).find(|p| *p != lonely_owner).expect("another primary");
    cluster.move_slot(lonely_slot, lonely_owner, lonely_target).await;
    let (status, reply) = a.publish(&message_sent(lonely, &json!({"n": 2}))).await;
    assert_eq!(status, 503, "a publish to a moved slot: {reply}");
    support::redis::http_publish_eventually(&a, &message_sent(lonely, &json!({"n": 3}))).await;
    let moved_to = format!("127.0.0.1:{lonely_target}");
    assert!(a.labelled("redis_endpoint_redirects_total", "endpoint", &moved_to).await >= 1.0);
    let history: i64 =
        query(&Cluster::client(lonely_target), &["LLEN", &format!("herald:{{{lonely}}}:history")]).await;
    assert_eq!(history, 2, "the room's history moved with its slot and goes on there");
    // The nodes noticed: the server dropped their shard subscription, or redirected a publish.
    let mut noticed = 0.0;
    for gw in nodes {
        noticed +=
            gw.metric("redis_shard_unsubscribed_total").await + gw.metric("redis_redirects_total").await;
    }
    assert!(noticed >= 1.0, "no node noticed the slot move");
    assert_eq!(shard_subscribers(target, &channel).await, 3, "subscriptions followed the slot");
    assert_eq!(shard_subscribers(owner, &channel).await, 0);
}

/// Shard subscriptions Redis dropped, summed over `nodes`.
async fn dropped(nodes: &[&Gateway]) -> f64 {
    let mut sum = 0.0;
    for gw in nodes {
        sum += gw.metric("redis_shard_unsubscribed_total").await;
    }
    sum
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn a_shard_connection_reset_mid_stream_ends_the_session_with_every_event_or_recovered_false() {
    let cluster = settled_cluster(0).await;
    let (a, b, c) = three_nodes(cluster_config(cluster.urls())).await;
    let nodes = [&a, &b, &c];
    let room = chat();
    let owner = cluster.primary_of(&format!("herald:{{{room}}}:room")).await;
    let (mut clients, head) = watching(&nodes, room).await;
    // Every node's connections to the room's primary are cut (subscriptions and commands).
    let reset = async || {
        for kind in ["pubsub", "normal"] {
            let _: i64 = query(&Cluster::client(owner), &["CLIENT", "KILL", "TYPE", kind]).await;
        }
    };
    let (accepted, n) = publish_through(&a, room, reset, false).await;
    every_event_or_told(&nodes, &mut clients, room, head, accepted, n).await;
    for gw in nodes {
        assert!(gw.metric("redis_reconnects_total").await >= 1.0, "the node opened a new session");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn a_password_wrong_on_one_primary_only_stops_startup_naming_the_key_and_the_node() {
    let cluster = Cluster::start(0).await;
    let last = cluster.nodes[2].port;
    let _: () =
        query(&Cluster::client(last), &["CONFIG", "SET", "requirepass", "only-this-node-has-one"]).await;
    // The first seed answers; the third primary refuses the (absent) password.
    let config = cluster_config(cluster.urls().into_iter().take(1).collect());
    let report = check_config::connect(&config).await.expect_err("one primary refuses").to_string();
    assert!(report.contains(&format!("127.0.0.1:{last}")), "{report}");
    config.validate().expect("valid config");
    let err =
        match tokio::time::timeout(PATIENCE, herald::server::Server::bind(config)).await.expect("in time") {
            Ok(_) => panic!("the node started"),
            Err(e) => e.to_string(),
        };
    assert!(err.contains("bus.redis_cluster_urls") && err.contains("password"), "{err}");
    assert!(err.contains(&format!("127.0.0.1:{last}")), "names the node: {err}");
    assert!(!err.contains("only-this-node-has-one"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn a_server_without_cluster_support_stops_startup_naming_the_key() {
    let redis = support::redis::RedisServer::start();
    let config = cluster_config(vec![redis.url()]);
    config.validate().expect("valid config");
    let err =
        match tokio::time::timeout(PATIENCE, herald::server::Server::bind(config)).await.expect("in time") {
            Ok(_) => panic!("the node started"),
            Err(e) => e.to_string(),
        };
    assert!(err.contains("bus.redis_cluster_urls") && err.contains("not a cluster"), "{err}");
}

/// What a bus handed its sink: (kind, user, room seq, data).
type Got = (herald::protocol::event::EventKind, Option<uuid::Uuid>, Option<u64>, Option<String>);

/// A sink recording deliveries.
#[derive(Default)]
struct Recorder(std::sync::Mutex<Vec<Got>>);

impl herald::bus::Deliver for Recorder {
    fn deliver(&self, event: &herald::protocol::event::DomainEvent, seq: Option<u64>) {
        let data = event.data.as_ref().map(|d| d.get().to_string());
        self.0.lock().expect("lock").push((event.kind, event.user_id, seq, data));
    }

    /// Recorded with the user it was for.
    fn deliver_to_user(
        &self,
        event: &herald::protocol::event::DomainEvent,
        seq: Option<u64>,
        user: uuid::Uuid,
    ) {
        let data = event.data.as_ref().map(|d| d.get().to_string());
        self.0.lock().expect("lock").push((event.kind, Some(user), seq, data));
    }
}

impl Recorder {
    /// Waits until `n` deliveries arrived; returns them.
    async fn wait(&self, n: usize) -> Vec<Got> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let got = self.0.lock().expect("lock").clone();
            if got.len() >= n {
                return got;
            }
            assert!(Instant::now() < deadline, "waited for {n} deliveries, got {got:?}");
            sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A bus on the cluster, with its sink.
async fn bus_node(cluster: &Cluster) -> (herald::bus::redis::RedisBus, std::sync::Arc<Recorder>) {
    let sink = std::sync::Arc::new(Recorder::default());
    let config = cluster_config(cluster.urls()).bus;
    let bus = herald::bus::redis::RedisBus::connect(&config, sink.clone()).await.expect("connect");
    (bus, sink)
}

fn events(json: &str) -> Vec<herald::protocol::event::DomainEvent> {
    herald::protocol::event::parse_batch(json.as_bytes()).expect("valid events")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn user_copies_from_several_shards_and_membership_in_the_herald_slot_arrive_once() {
    use herald::bus::{Bus, Topic};
    use herald::protocol::event::EventKind;
    let cluster = settled_cluster(0).await;
    let ((a, sink_a), (b, sink_b)) = (bus_node(&cluster).await, bus_node(&cluster).await);
    // Users on different shards, so one event's copies come from several shards.
    let (alice, carol, room) = loop {
        let (alice, carol) = (user(), user());
        let (on_a, on_c) = (format!("herald:{{{alice}}}:user"), format!("herald:{{{carol}}}:user"));
        if cluster.primary_of(&on_a).await != cluster.primary_of(&on_c).await {
            break (alice, carol, chat());
        }
    };
    a.watch(Topic::User(alice)).await.expect("watch");
    a.watch(Topic::User(carol)).await.expect("watch");
    a.watch(Topic::Room(room)).await.expect("watch");
    let head = a.head(room).await.expect("head");
    let batch = format!(
        r#"[{{"type":"notification.created","user_id":"{alice}","data":{{"to":"alice"}}}},
           {{"type":"task.status_changed","user_ids":["{alice}","{carol}"],"data":{{"t":1}}}},
           {{"type":"task.status_changed","chat_id":"{room}","user_ids":["{alice}","{carol}"],"data":{{"t":2}}}}]"#
    );
    b.publish(events(&batch)).await.expect("published");
    let marker = format!(r#"{{"type":"notification.created","user_id":"{carol}","data":{{"marker":1}}}}"#);
    b.publish(events(&marker)).await.expect("published");
    // Per user its own copy (from its own shard), and the room's frame from the room's channel.
    let got = sink_a.wait(7).await;
    sleep(Duration::from_millis(300)).await;
    let got_later = sink_a.0.lock().expect("lock").clone();
    assert_eq!(got, got_later, "each copy delivered once although they came from several shards");
    let to = |want: &str| {
        let mut who: Vec<Option<uuid::Uuid>> =
            got.iter().filter(|g| g.3.as_deref() == Some(want)).map(|g| g.1).collect();
        who.sort_unstable();
        who
    };
    let sorted = |mut v: Vec<Option<uuid::Uuid>>| {
        v.sort_unstable();
        v
    };
    assert_eq!(to(r#"{"to":"alice"}"#), [Some(alice)]);
    assert_eq!(to(r#"{"t":1}"#), sorted(vec![Some(alice), Some(carol)]));
    assert_eq!(
        to(r#"{"t":2}"#),
        sorted(vec![None, Some(alice), Some(carol)]),
        "the room's frame and each user's"
    );
    assert_eq!(to(r#"{"marker":1}"#), [Some(carol)]);
    for room_event in got.iter().filter(|g| g.3.as_deref() == Some(r#"{"t":2}"#)) {
        assert_eq!(room_event.2, Some(head + 1), "the room event keeps its room seq");
    }

    // Membership goes through the `{herald}` slot: every node gets it, a later node loads it.
    let (u1, u2) = (user(), user());
    let batch = format!(
        r#"[{{"type":"chat.member_added","chat_id":"{room}","user_id":"{u1}"}},
           {{"type":"chat.member_added","chat_id":"{room}","user_id":"{u2}"}},
           {{"type":"chat.member_removed","chat_id":"{room}","user_id":"{u1}"}}]"#
    );
    a.publish(events(&batch)).await.expect("published");
    let members = |g: &[Got]| {
        g.iter()
            .filter(|g| matches!(g.0, EventKind::MemberAdded | EventKind::MemberRemoved))
            .map(|g| (g.0, g.1))
            .collect::<Vec<_>>()
    };
    let want = vec![
        (EventKind::MemberAdded, Some(u1)),
        (EventKind::MemberAdded, Some(u2)),
        (EventKind::MemberRemoved, Some(u1)),
    ];
    let on_b = sink_b.wait(3).await;
    assert_eq!(members(&on_b), want);
    let (_c, sink_c) = bus_node(&cluster).await;
    let got = sink_c.wait(1).await;
    assert_eq!(members(&got), vec![(EventKind::MemberAdded, Some(u2))], "the snapshot on a later node");
    // Presence and typing run on the room's shard and publish there (SPUBLISH from the script).
    use herald::bus::Ephemeral;
    assert_eq!(a.presence(Ephemeral::Join { chat: room, user: alice }).await, Ok(true));
    assert_eq!(b.present(room).await, Ok(Some(vec![alice])));
    assert_eq!(b.presence(Ephemeral::Typing { chat: room, user: carol, from: 1 }).await, Ok(true));
    b.refresh_presence(vec![(room, vec![carol]), (chat(), vec![carol])]).await.expect("refresh over shards");
    let mut present = b.present(room).await.expect("read").expect("kept");
    present.sort_unstable();
    let mut both = vec![alice, carol];
    both.sort_unstable();
    assert_eq!(present, both);
    let names: Vec<String> = query(
        &Cluster::client(cluster.primary_of("herald:{herald}:boot").await),
        &["KEYS", "herald:{herald}:*"],
    )
    .await;
    assert!(names.iter().any(|k| k == &format!("herald:{{herald}}:members:{room}")), "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn a_batch_over_every_shard_answers_2xx_only_when_every_shard_took_its_part() {
    let cluster = settled_cluster(0).await;
    let a = support::start(cluster_config(cluster.urls())).await;
    all_ready(&[&a]).await;
    let rooms = rooms_on_every_shard(&cluster, 1).await;
    let batch = |n: u64| {
        let events: Vec<Value> = rooms
            .iter()
            .map(|(room, _)| json!({"type":"message.sent","chat_id":room,"data":{"n": n}}))
            .collect();
        Value::Array(events).to_string()
    };
    assert_eq!(a.publish(&batch(1)).await.0, 202);
    // One shard hangs: the batch is not claimed, whatever the other shards took.
    let (stuck, _) = rooms[0];
    let port = cluster.primary_of(&format!("herald:{{{stuck}}}:room")).await;
    let node = cluster.nodes.iter().find(|n| n.port == port).expect("the primary is a node");
    node.signal("STOP");
    let (status, reply) = a.publish(&batch(2)).await;
    node.signal("CONT");
    assert_eq!(status, 503, "a batch a shard never took: {reply}");
    assert_fixed_503(&reply);
    all_ready(&[&a]).await;
    support::redis::http_publish_eventually(&a, &batch(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn unreachable_seeds_start_the_node_degraded_not_refused() {
    // An outage is not a configuration error: the node starts, answers 503, and keeps trying.
    let dead = vec![format!("redis://127.0.0.1:{}", scale::free_port())];
    let a = support::start(cluster_config(dead)).await;
    assert_eq!(a.get("/readyz").await.0, 503);
    assert_eq!(a.metric("bus_up").await, 0.0);
    let (status, reply) = a.publish(&message_sent(chat(), &json!({"n": 1}))).await;
    assert_eq!(status, 503, "{reply}");
    assert_fixed_503(&reply);
    assert!(a.metric("redis_connect_failures_total").await >= 1.0);
}

/// Three users whose channels are on three different shards, and a room on the third one's.
async fn users_on_three_shards(cluster: &Cluster) -> ([uuid::Uuid; 3], [u16; 3], uuid::Uuid) {
    loop {
        let users = [user(), user(), user()];
        let mut ports = [0u16; 3];
        for (u, p) in users.iter().zip(ports.iter_mut()) {
            *p = cluster.primary_of(&format!("herald:{{{u}}}:user")).await;
        }
        if ports[0] == ports[1] || ports[0] == ports[2] || ports[1] == ports[2] {
            continue;
        }
        let room = loop {
            let room = chat();
            if cluster.primary_of(&format!("herald:{{{room}}}:room")).await == ports[2] {
                break room;
            }
        };
        return (users, ports, room);
    }
}

/// Waits until Redis's counter of `room` reaches `seq` (a publish's script ran).
async fn room_seq_reaches(cluster: &Cluster, room: uuid::Uuid, seq: u64) {
    let key = format!("herald:{{{room}}}:seq");
    let port = cluster.primary_of(&key).await;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let at: Option<u64> = query(&Cluster::client(port), &["GET", &key]).await;
        if at.is_some_and(|at| at >= seq) {
            return;
        }
        assert!(Instant::now() < deadline, "the room's counter never reached {seq}");
        sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn a_user_copy_overtaken_by_a_later_one_from_another_shard_still_arrives() {
    use herald::bus::{Bus, Topic};
    let cluster = settled_cluster(0).await;
    // Alice's and Carol's channels on two shards, the room on the third; `a` holds both users but
    // not the room, so their copies are all it gets of the room's events.
    let ([alice, carol, _], [alice_port, _, _], room) = users_on_three_shards(&cluster).await;
    let (a, sink) = bus_node(&cluster).await;
    let ((b, _), (c, _)) = (bus_node(&cluster).await, bus_node(&cluster).await);
    a.watch(Topic::User(alice)).await.expect("watch");
    a.watch(Topic::User(carol)).await.expect("watch");
    let head = b.head(room).await.expect("head");
    let task = move |to: uuid::Uuid, n: u32| {
        events(&format!(
            r#"{{"type":"task.status_changed","chat_id":"{room}","user_ids":["{to}"],"data":{{"n":{n}}}}}"#
        ))
    };
    // Alice's shard holds its writes: the room takes her event (seq head+1), her copy waits.
    let _: () = query(&Cluster::client(alice_port), &["CLIENT", "PAUSE", "3000", "WRITE"]).await;
    let first = tokio::spawn(async move { b.publish(task(alice, 1)).await });
    room_seq_reaches(&cluster, room, head + 1).await;
    // Carol's event (seq head+2) reaches `a` first, from another shard.
    c.publish(task(carol, 2)).await.expect("published");
    sink.wait(1).await;
    first.await.expect("joined").expect("published once the shard resumed");
    let got = sink.wait(2).await;
    let data: Vec<&str> = got.iter().filter_map(|g| g.3.as_deref()).collect();
    assert_eq!(data, [r#"{"n":2}"#, r#"{"n":1}"#], "Alice's event arrives, later than Carol's: {got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn a_user_event_overtaken_by_a_full_window_of_others_still_arrives() {
    use herald::bus::{Bus, Topic};
    let cluster = settled_cluster(0).await;
    // Alice's channel on another shard than the global counter's, so only her copy waits.
    let gseq_port = cluster.primary_of("herald:{herald}:gseq").await;
    let (users, ports, _) = users_on_three_shards(&cluster).await;
    let paused = if ports[0] == gseq_port { 1 } else { 0 };
    let (alice, alice_port, carol) = (users[paused], ports[paused], users[2]);
    let (a, sink) = bus_node(&cluster).await;
    let ((b, _), (c, _)) = (bus_node(&cluster).await, bus_node(&cluster).await);
    a.watch(Topic::User(alice)).await.expect("watch");
    a.watch(Topic::User(carol)).await.expect("watch");
    let note = |to: uuid::Uuid, n: usize| {
        format!(r#"{{"type":"notification.created","user_id":"{to}","data":{{"n":{n}}}}}"#)
    };
    // Alice's notification takes the next global counter; her shard holds its copy.
    let gseq = |port| async move {
        query::<Option<u64>>(&Cluster::client(port), &["GET", "herald:{herald}:gseq"]).await
    };
    let before = gseq(gseq_port).await.unwrap_or(0);
    let _: () = query(&Cluster::client(alice_port), &["CLIENT", "PAUSE", "3000", "WRITE"]).await;
    let first = tokio::spawn(async move { b.publish(events(&format!("[{}]", note(alice, 0)))).await });
    let deadline = Instant::now() + PATIENCE;
    while gseq(gseq_port).await.unwrap_or(0) <= before {
        assert!(Instant::now() < deadline, "the publish script never ran");
        sleep(Duration::from_millis(10)).await;
    }
    // Carol gets more notifications than the node's copy window holds, meanwhile.
    let many = 5000;
    let batch: Vec<String> = (1..=many).map(|n| note(carol, n)).collect();
    c.publish(events(&format!("[{}]", batch.join(",")))).await.expect("published");
    sink.wait(many).await;
    first.await.expect("joined").expect("published once the shard resumed");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let got = sink.0.lock().expect("lock").clone();
        let to_alice = got.iter().filter(|g| g.1 == Some(alice)).count();
        if to_alice > 0 {
            assert_eq!((to_alice, got.len()), (1, many + 1), "every notification once");
            break;
        }
        assert!(Instant::now() < deadline, "Alice's notification never arrived ({} delivered)", got.len());
        sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn the_herald_slot_primary_killed_mid_stream_is_followed_with_membership_and_user_events() {
    let mut cluster = settled_cluster(1).await;
    let (a, b, c) = three_nodes(cluster_config(cluster.urls())).await;
    let nodes = [&a, &b, &c];
    // The room on the shard that holds the global keys, the members channel and the counters.
    let owner = cluster.primary_of("herald:{herald}:boot").await;
    let room = loop {
        let room = chat();
        if cluster.primary_of(&format!("herald:{{{room}}}:room")).await == owner {
            break room;
        }
    };
    let (mut clients, head) = watching(&nodes, room).await;
    let (accepted, n) = publish_killing(&mut cluster, &a, room, owner).await;
    assert_ne!(cluster.primary_of("herald:{herald}:boot").await, owner, "a replica was promoted");
    every_event_or_told(&nodes, &mut clients, room, head, accepted, n).await;
    for gw in nodes {
        assert!(gw.metric("redis_failovers_total").await >= 1.0, "the node followed the failover");
    }
    // The global counter's shard is the new one: user events and membership flow through it.
    let dana = user();
    let mut on_c = c.connect(dana, &[]).await;
    let note = json!({"type":"notification.created","user_id":dana,"data":{"after":"failover"}}).to_string();
    support::redis::http_publish_eventually(&a, &note).await;
    let got = tokio::time::timeout(PATIENCE, on_c.recv()).await.expect("the notification arrives");
    assert_eq!(got["data"]["after"], "failover", "{got}");
    let added = json!({"type":"chat.member_added","chat_id":room,"user_id":dana}).to_string();
    support::redis::http_publish_eventually(&b, &added).await;
    let key = format!("herald:{{herald}}:members:{room}");
    let new_owner = cluster.primary_of("herald:{herald}:boot").await;
    let members: Vec<String> = query(&Cluster::client(new_owner), &["SMEMBERS", &key]).await;
    assert_eq!(members, [dana.to_string()], "membership kept on the promoted primary");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn primaries_announced_without_an_endpoint_are_reached_at_the_seeds_host() {
    // `unknown-endpoint`: CLUSTER SLOTS names no host (NULL), meaning "where you asked".
    let cluster = settled_cluster(0).await;
    for node in &cluster.nodes {
        let _: () = query(
            &Cluster::client(node.port),
            &["CONFIG", "SET", "cluster-preferred-endpoint-type", "unknown-endpoint"],
        )
        .await;
    }
    let a = support::start(cluster_config(cluster.urls())).await;
    all_ready(&[&a]).await;
    let mut client = a.connect(user(), &[]).await;
    let room = chat();
    client.subscribe(room).await;
    support::redis::http_publish_eventually(&a, &message_sent(room, &json!({"n": 1}))).await;
    let got = tokio::time::timeout(PATIENCE, client.recv()).await.expect("the event arrives");
    assert_eq!(got["data"]["n"], 1, "{got}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn a_rooms_events_in_one_request_share_one_call_and_keep_their_order() {
    use herald::bus::{Bus, Topic};
    let cluster = settled_cluster(0).await;
    let (a, sink) = bus_node(&cluster).await;
    let (b, _) = bus_node(&cluster).await;
    // Every node's pressure sync runs a script on its key's primary every 10 ms
    // (and node-wide scripts use the `{herald}` slot): the room must live on
    // another primary, or their calls would count as the publish's.
    let busy =
        [cluster.primary_of("herald:{pressure}").await, cluster.primary_of("herald:{herald}:boot").await];
    let mut room = chat();
    let mut port = cluster.primary_of(&format!("herald:{{{room}}}:room")).await;
    for _ in 0..256 {
        if !busy.contains(&port) {
            break;
        }
        room = chat();
        port = cluster.primary_of(&format!("herald:{{{room}}}:room")).await;
    }
    assert!(!busy.contains(&port), "a room on a primary no periodic script uses");
    a.watch(Topic::Room(room)).await.expect("watch");
    let head = b.head(room).await.expect("head");
    let before = calls(port, "evalsha").await;
    let batch: Vec<String> = (1..=5)
        .map(|n| format!(r#"{{"type":"message.sent","chat_id":"{room}","data":{{"n":{n}}}}}"#))
        .collect();
    b.publish(events(&format!("[{}]", batch.join(",")))).await.expect("published");
    assert_eq!(calls(port, "evalsha").await - before, 1, "one script call for the room's five events");
    let got = sink.wait(5).await;
    let seqs: Vec<Option<u64>> = got.iter().map(|g| g.2).collect();
    let data: Vec<String> = got.iter().filter_map(|g| g.3.clone()).collect();
    assert_eq!(seqs, (1..=5).map(|i| Some(head + i)).collect::<Vec<_>>());
    assert_eq!(data, (1..=5).map(|n| format!(r#"{{"n":{n}}}"#)).collect::<Vec<_>>());
    let kept = b.kept(room, head).await.expect("read").expect("kept");
    let kept_seqs: Vec<u64> = kept.events.iter().map(|e| e.seq).collect();
    assert_eq!(kept_seqs, (1..=5).map(|i| head + i).collect::<Vec<_>>(), "history in order");
}

/// Frames `client` receives until `done` says it has them all, then for a moment more.
async fn frames_until(client: &mut Client, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let mut got = Vec::new();
    while !done(&got) {
        got.push(client.recv().await);
    }
    while let Ok(Some(Ok(Message::Text(t)))) =
        tokio::time::timeout(Duration::from_millis(300), client.ws.next()).await
    {
        got.push(serde_json::from_str(&t).expect("JSON"));
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn a_room_event_for_users_reaches_each_socket_once_per_frame_across_shards() {
    let cluster = settled_cluster(0).await;
    let config = cluster_config(cluster.urls());
    let (a, c) = (support::start(config.clone()).await, support::start(config).await);
    all_ready(&[&a, &c]).await;
    let ([alice, bob, _], _, room) = users_on_three_shards(&cluster).await;
    // Alice watches the room and is named; Bob is named only. Both on `c`, the publisher on `a`.
    let (mut on_alice, mut on_bob) = (c.connect(alice, &[]).await, c.connect(bob, &[]).await);
    on_alice.subscribe(room).await;
    let event = json!({"type":"task.status_changed","chat_id":room,"user_ids":[alice, bob],"data":{"n":1}});
    support::redis::http_publish_eventually(&a, &event.to_string()).await;
    let marker = |to: uuid::Uuid| json!({"type":"notification.created","user_id":to,"data":{"marker":1}});
    assert_eq!(a.publish(&marker(alice).to_string()).await.0, 202);
    assert_eq!(a.publish(&marker(bob).to_string()).await.0, 202);
    let of = |got: &[Value], want: Value| got.iter().filter(|v| v["data"] == want).count();
    let alice_got = frames_until(&mut on_alice, |g| {
        of(g, json!({"marker":1})) == 1 && g.iter().any(|v| v["seq"].is_u64())
    })
    .await;
    let bob_got = frames_until(&mut on_bob, |g| of(g, json!({"marker":1})) == 1).await;
    // Alice: the room's frame (with seq) and her own (without), once each; Bob: his own, once.
    let room_frames = alice_got.iter().filter(|v| v["data"]["n"] == 1 && v["seq"].is_u64()).count();
    let alice_own = alice_got.iter().filter(|v| v["data"]["n"] == 1 && v.get("seq").is_none()).count();
    assert_eq!((room_frames, alice_own), (1, 1), "{alice_got:?}");
    assert_eq!(of(&bob_got, json!({"n":1})), 1, "{bob_got:?}");
}

/// The message `Server::bind` stops with.
async fn startup_error(config: Config) -> String {
    config.validate().expect("valid config");
    match tokio::time::timeout(PATIENCE, herald::server::Server::bind(config)).await.expect("in time") {
        Ok(_) => panic!("the node started"),
        Err(e) => e.to_string(),
    }
}

// Three primaries without replicas keep this test short: the TLS and ACL path is the same for
// every primary; failovers and a slot move over TLS are in `redis_cluster_failover.rs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn two_nodes_on_a_tls_cluster_as_an_acl_user_deliver_every_event_once_in_order() {
    let cluster = Cluster::start_tls(0).await;
    let (ca, other_ca) = cluster.tls.clone().expect("a TLS cluster");
    cluster.mark_settled().await;
    let urls = cluster.urls();
    let config = tls_cluster_config(urls.clone(), Some(&ca));

    // Every seed and every primary `CLUSTER SLOTS` names (its TLS port) answers over TLS.
    let reached = check_config::connect(&config).await.expect("reaches every server");
    assert_eq!(reached.lines().filter(|l| l.starts_with("ok")).count(), 3 + 1 + 3, "{reached}");
    assert!(!reached.contains(scale::PASSWORD), "{reached}");
    for node in &cluster.nodes {
        assert!(
            reached.contains(&format!("primary rediss://herald:***@127.0.0.1:{}", node.port)),
            "{reached}"
        );
    }

    let (a, b) = (support::start(config.clone()).await, support::start(config.clone()).await);
    all_ready(&[&a, &b]).await;
    let rooms = rooms_on_every_shard(&cluster, 2).await;
    let ids: Vec<uuid::Uuid> = rooms.iter().map(|(r, _)| *r).collect();
    let mut clients = Vec::new();
    for gw in [&a, &b] {
        let mut client = gw.connect(user(), &[]).await;
        for room in &ids {
            client.subscribe(*room).await;
        }
        clients.push(client);
    }
    for (room, owner) in &rooms {
        let channel = herald::bus::redis::channel(herald::bus::Topic::Room(*room));
        let reply: Vec<redis::Value> =
            query(&cluster.node(*owner), &["PUBSUB", "SHARDNUMSUB", &channel]).await;
        assert_eq!(reply.get(1), Some(&redis::Value::Int(2)), "room {room} on its primary {owner}");
    }
    // Publishers on both nodes, alternating.
    let per_room = 6;
    for n in 1..=per_room as u64 {
        for (i, room) in ids.iter().enumerate() {
            let gw = [&a, &b][(i + n as usize) % 2];
            let (status, reply) = gw.publish(&message_sent(*room, &json!({ "n": n }))).await;
            assert_eq!(status, 202, "{reply}");
        }
    }
    for client in &mut clients {
        receive_all(client, &ids, per_room).await;
    }
    for gw in [&a, &b] {
        assert_eq!(gw.metric("bus_up").await, 1.0);
        let (_, metrics) = gw.get("/metrics").await;
        assert!(!metrics.contains(scale::PASSWORD), "password in the metrics");
    }

    // An untrusted certificate, a wrong password: startup stops naming the key, never the password.
    let err = startup_error(tls_cluster_config(urls.clone(), Some(&other_ca))).await;
    assert!(err.contains("bus.redis_tls_ca_file") && err.contains("not trusted"), "{err}");
    assert!(!err.contains(scale::PASSWORD), "{err}");
    let err = startup_error(tls_cluster_config(urls.clone(), None)).await;
    assert!(err.contains("bus.redis_cluster_urls") && err.contains("not trusted"), "{err}");
    let wrong: Vec<String> =
        urls.iter().map(|u| u.replace(scale::PASSWORD, "not-the-password-at-all")).collect();
    let err = startup_error(tls_cluster_config(wrong, Some(&ca))).await;
    assert!(err.contains("bus.redis_cluster_urls") && err.contains("password"), "{err}");
    assert!(!err.contains("not-the-password-at-all"), "{err}");

    // Plain `redis://` seeds on the TLS-only ports: each reset is an outage to the node (it
    // starts degraded and keeps trying, as for any unreachable seed), and `--connect` says why.
    let plain: Vec<String> = urls.iter().map(|u| u.replace("rediss://", "redis://")).collect();
    let err = check_config::connect(&tls_cluster_config(plain.clone(), None)).await.map(|_| ()).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("FAILED bus.redis_cluster_urls") && text.contains("use rediss://"), "{text}");
    assert!(!text.contains(scale::PASSWORD), "{text}");
    let c = support::start(tls_cluster_config(plain, None)).await;
    assert_eq!(c.get("/readyz").await.0, 503);
    assert_eq!(c.metric("bus_up").await, 0.0);
}
