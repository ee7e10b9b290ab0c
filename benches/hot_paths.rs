//! Criterion benches of Herald's hot paths, each against the obvious
//! alternative: encode once vs per recipient, registry fan-out at 1 / 100 /
//! 10,000 subscribers, subscribe churn from several threads, command parsing
//! with serde_json vs simd-json, JWT verification, the write path's counters
//! (striped per thread vs one shared atomic) and the admission check a
//! publish makes.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use herald::alarms::{Alarms, Stamp};
use herald::auth::{mint_hs256, Verifier};
use herald::config::AuthConfig;
use herald::mailbox::Mailbox;
use herald::protocol::{client, server, ChatId, UserId};
use herald::rooms::{HistoryLimits, Joined, Rooms};

const DATA: &str = r#"{"id":"0d6a8c59-3c1e-4b8e-9d3e-5f3b2a1c0e9f","content":"Hello, how is the release going?","sender_id":"6f1d2c3b-4a5e-4f60-8a7b-9c0d1e2f3a4b","created_at":"2026-01-15T10:30:00Z"}"#;

const LIMITS: HistoryLimits = HistoryLimits { size: 100, ttl: Duration::from_secs(300), bytes: 64 << 20 };

fn encode(c: &mut Criterion) {
    let chat = ChatId::from_u128(42);
    let mut group = c.benchmark_group("encode_100_recipients");
    group.throughput(Throughput::Elements(100));
    group.bench_function("once_shared", |b| {
        b.iter(|| {
            let frame = server::room_event("message.new", chat, 7, black_box(DATA));
            let copies: Vec<Bytes> = (0..100).map(|_| frame.clone()).collect();
            black_box(copies)
        })
    });
    group.bench_function("per_recipient_serde", |b| {
        b.iter(|| {
            let copies: Vec<Vec<u8>> = (0..100)
                .map(|_| {
                    let data: &serde_json::value::RawValue = serde_json::from_str(black_box(DATA)).unwrap();
                    serde_json::to_vec(&serde_json::json!({
                        "type": "message.new", "chat_id": chat, "seq": 7, "data": data
                    }))
                    .unwrap()
                })
                .collect();
            black_box(copies)
        })
    });
    group.finish();
}

fn fanout(c: &mut Criterion) {
    let mut group = c.benchmark_group("room_fanout");
    for subscribers in [1usize, 100, 10_000] {
        let rooms = Rooms::new(1024, LIMITS);
        let chat = ChatId::from_u128(1);
        // Each subscriber counted in the node's backlog, as a placed
        // connection is: every publish charges it (the admission signal).
        let mailbox = Arc::new(Mailbox::new(8));
        let joined: Vec<_> = (0..subscribers)
            .map(|_| {
                let (room, joined) = rooms.join(chat, UserId::from_u128(1), &mailbox);
                room.count_reader(0);
                (room, joined)
            })
            .collect();
        // The room's first event makes its ring and everyone's receiver; a
        // room of at most 8 subscribers has none: they read history.
        rooms.publish(chat, 1, server::room_event("message.new", chat, 1, DATA));
        let room = rooms.get(chat).expect("joined");
        let mut receivers: Vec<_> = joined
            .into_iter()
            .filter_map(|(room, joined)| match joined {
                Joined::Live(rx) => Some(rx),
                Joined::Waiting(ticket) => room.take_receiver(ticket),
            })
            .collect();
        assert!(receivers.len() == subscribers || (receivers.is_empty() && subscribers <= 8));
        for rx in &mut receivers {
            black_box(rx.try_recv().ok());
        }
        let readers = if receivers.is_empty() { subscribers } else { 0 };
        let mut seq = 1;
        let frame = server::room_event("message.new", chat, 1, DATA);
        group.throughput(Throughput::Elements(subscribers as u64));
        // One publish (backlog charge + history push + ring send, or nudges),
        // then every subscriber takes its copy: the whole per-event cost.
        group.bench_with_input(
            BenchmarkId::new("send_and_receive_all", subscribers),
            &subscribers,
            |b, _| {
                b.iter(|| {
                    seq += 1;
                    rooms.publish(chat, seq, frame.clone());
                    for rx in receivers.iter_mut() {
                        black_box(rx.try_recv().ok());
                    }
                    for _ in 0..readers {
                        black_box(room.read_after(seq - 1, 1, usize::MAX, |f| drop(black_box(f))).ok());
                    }
                })
            },
        ); // The hub alternative: one queue per client, the sender loops over them.
        let (senders, mut queues): (Vec<_>, Vec<_>) =
            (0..subscribers).map(|_| tokio::sync::mpsc::channel::<Bytes>(1024)).unzip();
        group.bench_with_input(BenchmarkId::new("per_client_queues", subscribers), &subscribers, |b, _| {
            b.iter(|| {
                for tx in &senders {
                    let _ = tx.try_send(frame.clone());
                }
                for rx in queues.iter_mut() {
                    black_box(rx.try_recv().ok());
                }
            })
        });
    }
    group.finish();
}

/// The catch-up path: a reader behind its room's ring reads a page of
/// frames from history (one lock, one reference-count bump per frame).
fn catch_up(c: &mut Criterion) {
    let mut group = c.benchmark_group("history");
    let rooms = Rooms::new(16, LIMITS);
    let chat = ChatId::from_u128(1);
    let frame = server::room_event("message.new", chat, 1, DATA);
    for seq in 1..=100 {
        rooms.publish(chat, seq, frame.clone());
    }
    let Some(room) = rooms.get(chat) else { return };
    group.throughput(Throughput::Elements(64));
    group.bench_function("read_64_after", |b| {
        b.iter(|| {
            let mut n = 0usize;
            let read = room.read_after(black_box(30), 64, usize::MAX, |f| n += f.len());
            black_box((read, n))
        })
    });
    group.finish();
}

fn churn(c: &mut Criterion) {
    let mut group = c.benchmark_group("subscribe_churn");
    let threads = 4;
    let per_thread = 1000;
    group.throughput(Throughput::Elements((threads * per_thread) as u64));
    group.sample_size(20);
    group.bench_function("join_leave_4_threads_16_rooms", |b| {
        let rooms = Arc::new(Rooms::new(64, LIMITS));
        b.iter(|| {
            std::thread::scope(|s| {
                for t in 0..threads {
                    let rooms = &rooms;
                    s.spawn(move || {
                        let mailbox = Arc::new(Mailbox::new(8));
                        for i in 0..per_thread {
                            let chat = ChatId::from_u128(((t * 7 + i) % 16) as u128);
                            // Joining and leaving as a subscription does (its drop).
                            match rooms.join(chat, UserId::from_u128(1), &mailbox) {
                                (room, Joined::Waiting(ticket)) => room.stop_waiting(ticket),
                                (_, Joined::Live(rx)) => drop(rx),
                            }
                            rooms.leave(chat);
                        }
                    });
                }
            })
        })
    });
    group.bench_function("mutex_hashmap_4_threads_16_rooms", |b| {
        // The alternative: one lock around every room.
        type Map = std::collections::HashMap<ChatId, tokio::sync::broadcast::Sender<Bytes>>;
        let rooms = std::sync::Mutex::new(Map::new());
        b.iter(|| {
            std::thread::scope(|s| {
                for t in 0..threads {
                    let rooms = &rooms;
                    s.spawn(move || {
                        for i in 0..per_thread {
                            let chat = ChatId::from_u128(((t * 7 + i) % 16) as u128);
                            let rx = rooms
                                .lock()
                                .unwrap()
                                .entry(chat)
                                .or_insert_with(|| tokio::sync::broadcast::channel(64).0)
                                .subscribe();
                            drop(rx);
                            let mut map = rooms.lock().unwrap();
                            if map.get(&chat).is_some_and(|tx| tx.receiver_count() == 0) {
                                map.remove(&chat);
                            }
                        }
                    });
                }
            })
        })
    });
    group.finish();
}

fn counters(c: &mut Criterion) {
    let mut group = c.benchmark_group("write_path_counter");
    let (threads, per_thread) = (2, 100_000);
    group.throughput(Throughput::Elements((threads * per_thread) as u64));
    group.sample_size(20);
    group.bench_function("striped_2_threads", |b| {
        let counter = herald::striped::Striped::default();
        b.iter(|| {
            std::thread::scope(|s| {
                for _ in 0..threads {
                    s.spawn(|| (0..per_thread).for_each(|_| counter.add(1)));
                }
            })
        })
    });
    group.bench_function("one_atomic_2_threads", |b| {
        let counter = std::sync::atomic::AtomicU64::new(0);
        b.iter(|| {
            std::thread::scope(|s| {
                for _ in 0..threads {
                    s.spawn(|| {
                        (0..per_thread).for_each(|_| {
                            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        })
                    });
                }
            })
        })
    });
    group.finish();
    let backlog = herald::backlog::Backlog::for_reach(100, 512);
    for _ in 0..5_000 {
        backlog.joined(3);
    }
    c.bench_function("admission_check", |b| b.iter(|| black_box(backlog.over())));
    // What each connection wake pays for the latency figures: the lag sample
    // (load sensor) and `herald_delivery_latency_seconds`; then the histogram alone.
    let lag = herald::node::Lag::default();
    let ages = [Duration::from_micros(300), Duration::from_millis(7), Duration::from_millis(180)];
    let mut i = 0;
    c.bench_function("lag_record_with_histogram", |b| {
        b.iter(|| {
            i = (i + 1) % ages.len();
            lag.record(black_box(ages[i]))
        })
    });
    let histogram = herald::striped::Histogram::default();
    c.bench_function("histogram_observe", |b| {
        b.iter(|| {
            i = (i + 1) % ages.len();
            histogram.observe(black_box(ages[i]))
        })
    });
}

fn parse(c: &mut Criterion) {
    let cmd = br#"{"type":"subscribe","chat_id":"7d1b3c2a-0f7e-4a55-9a55-1b2c3d4e5f60","since":41}"#;
    let mut group = c.benchmark_group("parse_subscribe");
    group.bench_function("serde_json", |b| b.iter(|| black_box(client::parse(black_box(cmd)))));
    #[derive(serde::Deserialize)]
    struct Loose<'a> {
        #[serde(rename = "type", borrow)]
        _ty: Option<&'a str>,
        #[serde(borrow)]
        chat_id: Option<&'a str>,
        _since: Option<u64>,
    }
    group.bench_function("simd_json", |b| {
        let mut scratch = cmd.to_vec();
        b.iter(|| {
            scratch.copy_from_slice(cmd);
            let loose: Loose<'_> = simd_json::serde::from_slice(&mut scratch).unwrap();
            black_box(loose.chat_id.map(ChatId::try_parse))
        })
    });
    group.finish();

    // A large publish batch (100 events of ~200 bytes, ~24 KB): the full
    // ingress parse (serde_json: validation and `data` kept as raw JSON)
    // against simd-json's best case, a bare DOM of the same body with no
    // validation and no event built (it cannot keep `data` as serde_json's
    // `RawValue`, so using it would add a re-serialization on top).
    let events: Vec<serde_json::Value> = (0..100)
        .map(|i| {
            serde_json::json!({"type":"message.sent","chat_id":ChatId::from_u128(i % 10),
                "data":{"id":i,"author":"user-1234","content":"x".repeat(120),"tags":["a","b"]}})
        })
        .collect();
    let body = serde_json::to_vec(&events).unwrap();
    let mut group = c.benchmark_group("parse_batch_100");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("serde_json_parse_batch", |b| {
        b.iter(|| black_box(herald::protocol::event::parse_batch(black_box(&body))).map(|v| v.len()))
    });
    group.bench_function("simd_json_dom_only", |b| {
        let mut scratch = body.clone();
        b.iter(|| {
            scratch.copy_from_slice(&body);
            black_box(simd_json::to_borrowed_value(&mut scratch).is_ok())
        })
    });
    group.finish();
}

fn jwt(c: &mut Criterion) {
    let secret = "bench-secret-0123456789abcdef";
    let verifier =
        Verifier::from_config(&AuthConfig { jwt_secret: Some(secret.into()), ..Default::default() }).unwrap();
    let token = mint_hs256(secret, UserId::from_u128(9), &[ChatId::from_u128(1)], Duration::from_secs(3600));
    c.bench_function("jwt_verify_hs256", |b| {
        b.iter(|| black_box(verifier.verify(black_box(&token)).is_ok()))
    });
}

/// Connection deadlines: 10,000 connections arm their next ping and the
/// node's alarm task rings them all (one ping round of an idle node), on a
/// paused clock so only the work is timed. The alternative it replaced, a
/// tokio `Sleep` per connection, cost 112 bytes in every task instead.
fn alarms(c: &mut Criterion) {
    const CONNS: usize = 10_000;
    let mut group = c.benchmark_group("alarms");
    group.throughput(Throughput::Elements(CONNS as u64));
    group.sample_size(20);
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build();
    let Ok(rt) = rt else { return };
    let alarms = rt.block_on(async { Alarms::start() });
    let mailboxes: Vec<_> = (0..CONNS).map(|_| Arc::new(Mailbox::new(8))).collect();
    group.bench_function("arm_and_ring_10k_connections", |b| {
        b.iter(|| {
            rt.block_on(async {
                let at = Stamp::now() + Duration::from_secs(30);
                for mailbox in &mailboxes {
                    alarms.set(at, mailbox);
                }
                tokio::time::sleep(Duration::from_secs(31)).await;
            });
            assert!(mailboxes.iter().all(|m| m.take_alarm()), "every alarm rang");
        })
    });
    alarms.close();
    group.finish();
}

criterion_group!(benches, encode, fanout, catch_up, churn, counters, parse, jwt, alarms);
criterion_main!(benches);
