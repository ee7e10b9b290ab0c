//! Redis Cluster failovers the other cluster tests do not walk, against real clusters the tests
//! start: a primary killed, a slot moved and a manual failover mid-stream on a cluster reached
//! only over TLS as an ACL user (replication and the cluster bus on TLS too), and a failover to a
//! replica that never got a primary's last writes. Every client gets every accepted event once
//! and in order, or is told `recovered:false`; no client ever gets another event under a `seq`
//! it already had.

#[path = "support/redis_cluster.rs"]
mod cluster;
#[path = "support/redis_scale.rs"]
mod scale;
mod support;

use std::time::Duration;

use cluster::{
    all_ready, cluster_config, every_event_or_told, publish_killing, three_nodes, tls_cluster_config,
    watching, Cluster,
};
use scale::query;
use serde_json::json;
use support::redis::{assert_fixed_503, endpoint_count, follow, publish_through, wait_until, Seen};
use support::{chat, message_sent, user, Client, Gateway};

/// The key whose slot holds `room` (its counter, history and channel share it).
fn room_key(room: uuid::Uuid) -> String {
    format!("herald:{{{room}}}:room")
}

/// `herald_redis_endpoint_sessions_total` of the node at `port`; 0 while not counted.
async fn sessions_at(gw: &Gateway, port: u16) -> f64 {
    endpoint_count(gw, "redis_endpoint_sessions_total", &format!("127.0.0.1:{port}")).await
}

/// `herald_redis_endpoint_failovers_total` of the node at `port`; 0 while not counted.
async fn failovers_to(gw: &Gateway, port: u16) -> f64 {
    endpoint_count(gw, "redis_endpoint_failovers_total", &format!("127.0.0.1:{port}")).await
}

/// Index in `cluster.nodes` of the node on `port`.
fn index_of(cluster: &Cluster, port: u16) -> usize {
    cluster.nodes.iter().position(|n| n.port == port).expect("a node of the cluster")
}

/// Every live replica with the port of its primary.
async fn replicas(cluster: &Cluster) -> Vec<(u16, u16)> {
    let mut out = Vec::new();
    for node in cluster.nodes.iter().filter(|n| n.alive()) {
        if let Some(primary) = cluster.primary_of_replica(node.port).await {
            out.push((node.port, primary));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn a_tls_cluster_as_an_acl_user_is_followed_through_a_primary_kill_a_slot_move_and_a_manual_failover() {
    let mut cluster = Cluster::start_tls(1).await;
    cluster.mark_settled().await;
    let (ca, _) = cluster.tls.clone().expect("a TLS cluster");
    let (a, b, c) = three_nodes(tls_cluster_config(cluster.urls(), Some(&ca))).await;
    let nodes = [&a, &b, &c];

    // A primary killed mid-stream: its replica (linked over TLS as the ACL user) is promoted,
    // every node follows it there over TLS; publishes answer 503 meanwhile, 202 after.
    let room = chat();
    let owner = cluster.primary_of(&room_key(room)).await;
    let (promoted, _) = *replicas(&cluster).await.iter().find(|(_, p)| *p == owner).expect("a replica");
    let (mut clients, head) = watching(&nodes, room).await;
    let (accepted, n) = publish_killing(&mut cluster, &a, room, owner).await;
    assert_eq!(cluster.primary_of(&room_key(room)).await, promoted, "its replica was promoted");
    every_event_or_told(&nodes, &mut clients, room, head, accepted, n).await;
    for gw in nodes {
        assert!(gw.metric("redis_failovers_total").await >= 1.0, "the node followed the failover");
        assert!(sessions_at(gw, promoted).await >= 1.0, "a session on the promoted replica");
        assert!(failovers_to(gw, promoted).await >= 1.0, "counted as a failover to it");
        assert_eq!(gw.metric("bus_up").await, 1.0);
    }

    // Then a slot moved (keys migrated over TLS as the ACL user) while events flow to its room.
    cluster.wait_ok().await;
    let moving = chat();
    let from = cluster.primary_of(&room_key(moving)).await;
    let primaries: Vec<u16> = {
        let replicas: Vec<u16> = replicas(&cluster).await.iter().map(|(r, _)| *r).collect();
        cluster.nodes.iter().filter(|n| n.alive() && !replicas.contains(&n.port)).map(|n| n.port).collect()
    };
    assert_eq!(primaries.len(), 3, "three primaries after the failover: {primaries:?}");
    let to = *primaries.iter().find(|p| **p != from).expect("another primary");
    let slot: i64 = query(&cluster.node(from), &["CLUSTER", "KEYSLOT", &room_key(moving)]).await;
    let (mut clients, head) = watching(&nodes, moving).await;
    let (accepted, n) =
        publish_through(&a, moving, async || cluster.move_slot(slot, from, to).await, false).await;
    assert_eq!(cluster.primary_of(&room_key(moving)).await, to, "the slot moved");
    every_event_or_told(&nodes, &mut clients, moving, head, accepted, n).await;
    let channel = herald::bus::redis::channel(herald::bus::Topic::Room(moving));
    for (port, want) in [(to, 3), (from, 0)] {
        let reply: Vec<redis::Value> = query(&cluster.node(port), &["PUBSUB", "SHARDNUMSUB", &channel]).await;
        assert_eq!(reply.get(1), Some(&redis::Value::Int(want)), "subscriptions on {port} after the move");
    }
    let history: i64 = query(&cluster.node(to), &["LLEN", &format!("herald:{{{moving}}}:history")]).await;
    assert!(history > 0, "the room's history moved with its slot");

    // And a failover without a crash (`CLUSTER FAILOVER`, as for maintenance): the demoted
    // primary stays up, and the nodes leave it for its promoted replica.
    let (replica, demoted) = *replicas(&cluster).await.first().expect("a shard with a replica left");
    let calm = loop {
        let calm = chat();
        if cluster.primary_of(&room_key(calm)).await == demoted {
            break calm;
        }
    };
    let (mut clients, head) = watching(&nodes, calm).await;
    let fail_over = async || {
        let _: () = query(&cluster.node(replica), &["CLUSTER", "FAILOVER"]).await;
        let what = "the replica never took over";
        wait_until(what, Duration::from_secs(20), Duration::from_millis(50), async || {
            cluster.primary_of_replica(replica).await.is_none()
        })
        .await;
    };
    let (accepted, n) = publish_through(&a, calm, fail_over, false).await;
    assert_eq!(cluster.primary_of(&room_key(calm)).await, replica, "the replica took over");
    every_event_or_told(&nodes, &mut clients, calm, head, accepted, n).await;
    let channel = herald::bus::redis::channel(herald::bus::Topic::Room(calm));
    for (port, want) in [(replica, 3), (demoted, 0)] {
        let reply: Vec<redis::Value> = query(&cluster.node(port), &["PUBSUB", "SHARDNUMSUB", &channel]).await;
        assert_eq!(
            reply.get(1),
            Some(&redis::Value::Int(want)),
            "subscriptions on {port} after the failover"
        );
    }
    for gw in nodes {
        assert!(sessions_at(gw, replica).await >= 1.0, "a session on the replica that took over");
        assert!(failovers_to(gw, replica).await >= 1.0, "counted as a failover to it");
        assert_eq!(gw.metric("bus_up").await, 1.0);
        let (_, metrics) = gw.get("/metrics").await;
        assert!(!metrics.contains(scale::PASSWORD), "password in the metrics");
    }
}

/// Reads `message.new` events of `client` until the one with `data.n == last`: (seq, n) of each.
async fn events_until(client: &mut Client, last: u64) -> Vec<(u64, u64)> {
    let mut got = Vec::new();
    loop {
        let v = client.recv().await;
        if v["type"] != "message.new" {
            continue;
        }
        let (seq, n) = (v["seq"].as_u64().expect("seq"), v["data"]["n"].as_u64().expect("n"));
        got.push((seq, n));
        if n == last {
            return got;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn events_a_promoted_replica_lost_never_give_their_seq_to_another_event() {
    // The failover mark is written on another shard than the one that failed over.
    lost_writes_never_reuse_their_seq(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn events_the_global_slots_promoted_replica_lost_never_give_their_seq_to_another_event() {
    // The shard that failed over also holds the global keys: the failover mark goes to the
    // promoted replica itself.
    lost_writes_never_reuse_their_seq(true).await;
}

/// A primary accepts events 2 to 4 of a room that its replica never gets, then crashes; the
/// replica is promoted. Node A (whose client saw them) is held back while node B (which knows
/// nothing of the room) follows first. With `global_shard`, the room shares its shard with the
/// `{herald}` slot.
async fn lost_writes_never_reuse_their_seq(global_shard: bool) {
    let mut cluster = Cluster::start(1).await;
    cluster.mark_settled().await;
    let global = cluster.primary_of("herald:{herald}:boot").await;
    let (room, owner) = loop {
        let room = chat();
        let owner = cluster.primary_of(&room_key(room)).await;
        if (owner == global) == global_shard {
            break (room, owner);
        }
    };
    let all = replicas(&cluster).await;
    let (lagging, _) = *all.iter().find(|(_, p)| *p == owner).expect("the owner's replica");
    // A's only seed is a replica of another shard, so the test can hold A back while B follows.
    let (seed, _) = *all.iter().find(|(_, p)| *p != owner).expect("another shard's replica");
    let a = support::start(cluster_config(vec![format!("redis://127.0.0.1:{seed}")])).await;
    let b = support::start(cluster_config(cluster.urls())).await;
    all_ready(&[&a, &b]).await;

    // Only A's client watches the room: B knows nothing of it.
    let mut on_a = a.connect(user(), &[]).await;
    let head = on_a.subscribe(room).await;
    assert_eq!(a.publish(&message_sent(room, &json!({"n": 1}))).await.0, 202);
    assert_eq!(on_a.recv().await["seq"], head + 1);
    // The replica has event 1; then it hangs and loses its link, and events 2 to 4 reach A's
    // client but never the replica.
    let owner_client = cluster.node(owner);
    scale::replica_caught_up(&owner_client, &cluster.node(lagging)).await;
    let (lagging_at, seed_at, owner_at) =
        (index_of(&cluster, lagging), index_of(&cluster, seed), index_of(&cluster, owner));
    cluster.nodes[lagging_at].signal("STOP");
    let _: () = query(&owner_client, &["CLIENT", "KILL", "TYPE", "replica"]).await;
    for n in 2..=4u64 {
        assert_eq!(a.publish(&message_sent(room, &json!({ "n": n }))).await.0, 202);
        let got = on_a.recv().await;
        assert_eq!((got["seq"].as_u64(), got["data"]["n"].as_u64()), (Some(head + n), Some(n)));
    }
    // A's seed hangs (A cannot read the new slot map), the primary crashes, the replica resumes
    // and is promoted without events 2 to 4.
    cluster.nodes[seed_at].signal("STOP");
    cluster.nodes[owner_at].kill();
    cluster.nodes[lagging_at].signal("CONT");
    let what = "B never followed the failover";
    wait_until(what, Duration::from_secs(30), Duration::from_millis(50), async || {
        sessions_at(&b, lagging).await >= 1.0
    })
    .await;
    let seq_key = format!("herald:{{{room}}}:seq");
    let kept: u64 = query(&cluster.node(lagging), &["GET", &seq_key]).await;
    assert_eq!(kept, head + 1, "the promoted replica lost events 2 to 4");

    // B publishes before A followed: accepted now, its event would take seq head+2, which A's
    // client holds for event 2. It waits out the settle window instead.
    let (early, reply) = b.publish(&message_sent(room, &json!({"n": 5}))).await;
    assert_eq!(early, 503, "B published under a counter the failover set back: {reply}");
    assert_fixed_503(&reply);
    cluster.nodes[seed_at].signal("CONT");
    let what = "A never followed the failover";
    wait_until(what, Duration::from_secs(30), Duration::from_millis(50), async || {
        sessions_at(&a, lagging).await >= 1.0
    })
    .await;
    assert!(a.metric("redis_failovers_total").await >= 1.0 && b.metric("redis_failovers_total").await >= 1.0);
    // (Asked only now: the node `primary_of` asks may be A's hung seed.)
    assert_eq!(cluster.primary_of("herald:{herald}:boot").await == lagging, global_shard);

    // A re-seeded the room's counter with what its client saw: B's next event follows it.
    support::redis::http_publish_eventually(&b, &message_sent(room, &json!({"n": 6}))).await;
    let mut seen = Seen { seqs: vec![head + 4], ns: vec![1, 2, 3, 4], told_gap: false };
    let counter: u64 = query(&cluster.node(lagging), &["GET", &seq_key]).await;
    assert!(counter > head + 4, "event 6 took seq {counter}, which A's client holds for another event");
    follow(&a, &mut on_a, room, head, &mut seen, 6).await;

    // Clients resuming on B from what they had: never another event under a seq they saw;
    // recovered only with exactly the accepted events after it (2 to 4 are gone from Redis).
    let mut since_failover = vec![6];
    for (since, lost) in [(head + 1, vec![2, 3, 4]), (head + 4, vec![])] {
        let mut late = b.connect(user(), &[]).await;
        let (_, recovered) = late.subscribe_since(room, since).await;
        let marker = 100 + since - head;
        assert_eq!(b.publish(&message_sent(room, &json!({ "n": marker }))).await.0, 202);
        since_failover.push(marker);
        let got = events_until(&mut late, marker).await;
        for window in got.windows(2) {
            assert!(window[0].0 < window[1].0, "seq went back or repeated: {got:?}");
        }
        assert!(got.iter().all(|(seq, _)| *seq > since), "an event under a seq the client had: {got:?}");
        if recovered {
            let want: Vec<u64> = lost.iter().chain(&since_failover).copied().collect();
            let ns: Vec<u64> = got.iter().map(|(_, n)| *n).collect();
            assert_eq!(ns, want, "recovered from {since} but not with every event after it");
        }
    }
    // A, which followed last, waits out its own settle window; then both serve.
    all_ready(&[&a, &b]).await;
    for gw in [&a, &b] {
        assert_eq!(gw.metric("bus_up").await, 1.0);
        assert_eq!(gw.metric("redis_membership_log_gaps_total").await, 0.0);
    }
}
