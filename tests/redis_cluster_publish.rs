//! Many publishes in flight at once on Redis Cluster: two nodes publish multi-room requests
//! concurrently (the publisher keeps several pipelines in flight per node); every room's events
//! reach both nodes once each, in `seq` order with no gap, and each request's events keep their
//! order.

#[path = "support/redis_cluster.rs"]
mod cluster;
#[path = "support/redis_scale.rs"]
mod scale;
mod support;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cluster::Cluster;
use herald::bus::redis::RedisBus;
use herald::bus::{Bus, Deliver, Topic};
use herald::config::{BusConfig, BusKind};
use herald::protocol::event::{parse_batch, DomainEvent};
use herald::protocol::ChatId;
use scale::query;
use serde_json::{json, Value};
use support::{chat, PATIENCE};
use tokio::time::{sleep, Instant};

/// Room events a sink got: (room, seq, publishing task, its `n`).
#[derive(Default)]
struct Recorder(Mutex<Vec<(ChatId, u64, u64, u64)>>);

impl Deliver for Recorder {
    fn deliver(&self, event: &DomainEvent, seq: Option<u64>) {
        let (Some(room), Some(seq), Some(data)) = (event.chat_id, seq, event.data.as_ref()) else { return };
        let data: Value = serde_json::from_str(data.get()).expect("the test's own payload");
        let field = |name: &str| data[name].as_u64().expect("a number");
        self.0.lock().expect("lock").push((room, seq, field("t"), field("n")));
    }
}

impl Recorder {
    /// Waits until `n` room events arrived; returns them.
    async fn wait(&self, n: usize) -> Vec<(ChatId, u64, u64, u64)> {
        let deadline = Instant::now() + PATIENCE * 2;
        loop {
            let got = self.0.lock().expect("lock").clone();
            if got.len() >= n {
                return got;
            }
            assert!(Instant::now() < deadline, "waited for {n} events, got {}", got.len());
            sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn bus_node(cluster: &Cluster) -> (Arc<RedisBus>, Arc<Recorder>) {
    let sink = Arc::new(Recorder::default());
    let config =
        BusConfig { kind: BusKind::RedisCluster, redis_cluster_urls: cluster.urls(), ..BusConfig::default() };
    let bus = RedisBus::connect(&config, sink.clone()).await.expect("connect");
    (Arc::new(bus), sink)
}

/// One room per primary.
async fn room_per_shard(cluster: &Cluster) -> Vec<ChatId> {
    let mut ports = HashSet::new();
    let mut rooms = Vec::new();
    while rooms.len() < 3 {
        let room = chat();
        if ports.insert(cluster.primary_of(&format!("herald:{{{room}}}:room")).await) {
            rooms.push(room);
        }
    }
    rooms
}

const TASKS: u64 = 16;
const REQUESTS: u64 = 25;
/// Events per room per request.
const PER_ROOM: u64 = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn concurrent_multi_room_publishes_from_two_nodes_arrive_in_seq_order_once_each() {
    let cluster = Cluster::start(0).await;
    // A fresh cluster counts as long settled (else room events wait out the settle window).
    let port = cluster.primary_of("herald:{herald}:boot").await;
    let _: () = query(&Cluster::client(port), &["SET", "herald:{herald}:boot", "0"]).await;
    let nodes = [bus_node(&cluster).await, bus_node(&cluster).await];
    let rooms = room_per_shard(&cluster).await;
    let mut heads = HashMap::new();
    for (bus, _) in &nodes {
        for room in &rooms {
            bus.watch(Topic::Room(*room)).await.expect("watch");
            heads.insert(*room, bus.head(*room).await.expect("head"));
        }
    }
    // Every task publishes through either node, each request to every shard; many requests
    // are in flight on each node at once.
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let bus = nodes[(t % 2) as usize].0.clone();
            let rooms = rooms.clone();
            tokio::spawn(async move {
                for r in 0..REQUESTS {
                    let mut events = Vec::new();
                    for k in 0..PER_ROOM {
                        for room in &rooms {
                            let n = r * PER_ROOM + k;
                            events.push(json!({"type":"message.sent","chat_id":room,"data":{"t":t,"n":n}}));
                        }
                    }
                    let batch = parse_batch(Value::Array(events).to_string().as_bytes()).expect("valid");
                    bus.publish(batch).await.expect("publish taken");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("publisher task");
    }
    let per_room = TASKS * REQUESTS * PER_ROOM;
    for (_, sink) in &nodes {
        let got = sink.wait((per_room * 3) as usize).await;
        assert_eq!(got.len() as u64, per_room * 3, "nothing delivered twice");
        for room in &rooms {
            let mine: Vec<_> = got.iter().filter(|e| e.0 == *room).collect();
            let seqs: Vec<u64> = mine.iter().map(|e| e.1).collect();
            assert_eq!(
                seqs,
                (heads[room] + 1..=heads[room] + per_room).collect::<Vec<_>>(),
                "no gap, in order"
            );
            // Each task's events (a request's, then its next request's) keep their order.
            for t in 0..TASKS {
                let ns: Vec<u64> = mine.iter().filter(|e| e.2 == t).map(|e| e.3).collect();
                assert_eq!(ns, (0..REQUESTS * PER_ROOM).collect::<Vec<_>>(), "task {t} in room {room}");
            }
        }
    }
}
