//! Criterion benches of permessage-deflate, which chose its library:
//! compressing one 300-byte chat event frame with flate2 on zlib-rs (what
//! Herald links) against miniz_oxide (flate2's default backend), each at
//! levels 1, 2 and 6 with a reused compressor; compress once per room vs once
//! per recipient; and inflating a client's message. Prints the compressed
//! sizes by payload size once, which chose the default threshold, and the
//! sizes of three event shapes (loadgen's, and chat with English text and
//! random ids) at every level, strategy and memory level, and compressed
//! against the room's previous event (what context takeover could reach),
//! which chose the level, and the memLevel by sizes at four payload lengths.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use flate2::{Compress, Compression, FlushCompress};
use herald::protocol::deflate::{self, Agreed, Wire};
use herald::protocol::{frame, server, ChatId};
use miniz_oxide::deflate::core::{compress, create_comp_flags_from_zip_params, CompressorOxide, TDEFLFlush};

/// A chat event's `data` padded so the whole frame is about 300 bytes.
fn event(payload_len: usize) -> bytes::Bytes {
    let base = r#"{"id":"0d6a8c59-3c1e-4b8e-9d3e-5f3b2a1c0e9f","sender_id":"6f1d2c3b-4a5e-4f60-8a7b-9c0d1e2f3a4b","created_at":"2026-01-15T10:30:00Z","content":""#;
    let words = "Hello, how is the release going? The build is green and the notes are nearly done. ";
    let frame = server::room_event(
        "message.new",
        ChatId::from_u128(42),
        1_733_562_000_000_123,
        &format!("{base}\"}}"),
    );
    let pad = payload_len.saturating_sub(frame::payload(&frame).len());
    let content: String = words.chars().cycle().take(pad).collect();
    server::room_event(
        "message.new",
        ChatId::from_u128(42),
        1_733_562_000_000_123,
        &format!("{base}{content}\"}}"),
    )
}

/// Compresses one payload with a reused state; returns the output size.
type Compressor = Box<dyn FnMut(&[u8]) -> usize>;

fn flate2_zlib_rs(level: u32) -> impl FnMut(&[u8]) -> usize {
    let mut c = Compress::new(Compression::new(level), false);
    let mut out = Vec::with_capacity(4096);
    move |input| {
        c.reset();
        out.clear();
        let _ = c.compress_vec(input, &mut out, FlushCompress::Sync);
        out.len()
    }
}

fn miniz(level: u8) -> impl FnMut(&[u8]) -> usize {
    let mut c = CompressorOxide::new(create_comp_flags_from_zip_params(i32::from(level), -15, 0));
    let mut out = vec![0u8; 4096];
    move |input| {
        c.reset();
        let (_, _, used) = compress(&mut c, input, &mut out, TDEFLFlush::Sync);
        used
    }
}

fn library(c: &mut Criterion) {
    let frame = event(300);
    let payload = frame::payload(&frame).to_vec();
    let mut group = c.benchmark_group("deflate_300B_event");
    group.throughput(Throughput::Elements(1));
    let mut candidates: Vec<(&str, Compressor)> = vec![
        ("flate2_zlib_rs_level2", Box::new(flate2_zlib_rs(2))),
        ("flate2_zlib_rs_level1", Box::new(flate2_zlib_rs(1))),
        ("flate2_zlib_rs_level6", Box::new(flate2_zlib_rs(6))),
        ("miniz_oxide_level1", Box::new(miniz(1))),
        ("miniz_oxide_level2", Box::new(miniz(2))),
        ("miniz_oxide_level6", Box::new(miniz(6))),
    ];
    for (name, f) in &mut candidates {
        eprintln!("{name}: {} payload bytes -> {} (with the 4-byte sync tail)", payload.len(), f(&payload));
        group.bench_function(*name, |b| b.iter(|| black_box(f(black_box(&payload)))));
    }
    group.finish();
}

fn once_per_room(c: &mut Criterion) {
    for len in [64, 96, 128, 160, 192, 256, 300, 512, 1024] {
        let f = event(len);
        let z = deflate::compress_frame(&f).map_or(f.len(), |z| z.len());
        eprintln!("frame of {} bytes (payload {len}) -> {z} bytes compressed", f.len());
    }
    let frame = event(300);
    let agreed = Some(Agreed { server_max_window_bits: 15, context: false });
    let mut group = c.benchmark_group("deflate_100_recipients");
    group.throughput(Throughput::Elements(100));
    group.bench_function("once_shared", |b| {
        b.iter(|| {
            let wire = Wire::new(frame.clone());
            let out: Vec<_> =
                (0..100).map(|_| wire.for_peer(agreed, 128, &mut 0, |_, _| {}).clone()).collect();
            black_box(out)
        })
    });
    group.bench_function("per_recipient", |b| {
        b.iter(|| {
            let out: Vec<_> = (0..100).map(|_| deflate::compress_frame(black_box(&frame))).collect();
            black_box(out)
        })
    });
    group.finish();
}

fn inflate(c: &mut Criterion) {
    let command =
        br#"{"type":"subscribe","chat_id":"0d6a8c59-3c1e-4b8e-9d3e-5f3b2a1c0e9f","since":1733562000000123}"#;
    let z = deflate::deflate_payload(command);
    c.bench_function("inflate_client_command", |b| {
        b.iter(|| black_box(deflate::inflate(black_box(z.clone()), 65_536)))
    });
}

/// xorshift64: ids with nothing for deflate to find, as random UUIDs have.
fn uuid(x: &mut u64) -> String {
    let mut hex = String::new();
    for _ in 0..2 {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        hex.push_str(&format!("{:016x}", *x));
    }
    format!("{}-{}-4{}-a{}-{}", &hex[0..8], &hex[8..12], &hex[13..16], &hex[17..20], &hex[20..32])
}

const LINES: &[&str] = &[
    "Morning! Did anyone get a chance to look at the deploy notes before standup?",
    "Yes, I read them last night. The migration step looks fine but we should double-check the rollback.",
    "I can take the rollback test after lunch, just ping me when staging is free.",
    "Staging is free now, go ahead. I'll keep an eye on the error dashboards.",
    "Thanks. Also, the customer from yesterday wrote back, they are happy with the fix.",
    "Great news! Let's close the ticket then and mention it in the weekly summary.",
    "Quick question: are we still meeting at three, or did that move to tomorrow?",
    "It moved to tomorrow at ten, Sarah sent an updated invite this morning.",
    "ok cool",
    "Can someone review my pull request? It's the one that renames the config keys.",
    "On it. Looks good so far, one small comment about the default timeout.",
    "Lunch at the usual place? I'm starving after that meeting.",
];

/// 200 consecutive payloads of one room, as Herald frames them, in three
/// shapes: `loadgen fanout`'s event (`--content-bytes` 16 and 200: ids that
/// share their run's half, a publish time and run id in `data`, prose that
/// repeats) and a chat event (random v4 ids, four senders, one line of
/// English each, ~315 bytes).
fn shapes() -> Vec<(&'static str, Vec<Vec<u8>>)> {
    let chat = ChatId::from_u128(0x6c6f_6164_6765_4e00_8000_0000_0000_0003);
    let seq = |i: usize| 1_765_100_000_000_000 + i as u64 * 10 + 1;
    let payload = |i: usize, data: &str| {
        frame::payload(&server::room_event("message.new", chat, seq(i), data)).to_vec()
    };
    let loadgen = |text_len: usize| -> Vec<Vec<u8>> {
        let prose = "Morning all, the release candidate is up on staging; please check the login flow \
                     and the new upload dialog before lunch, and tell me if anything looks off. ";
        let text: String = prose.chars().cycle().take(text_len).collect();
        let run: u64 = 0x7c3a_91e4_5b2d_0f86;
        let half = format!("{:08x}-{:04x}-{:04x}", run >> 32, (run >> 16) & 0xffff, run & 0xffff);
        (0..200)
            .map(|i| {
                let ts = 1_765_100_000_123_456_789u64 + i as u64 * 1_234_567;
                payload(i, &format!(r#"{{"id":"{half}-0000-{i:012x}","content":"{text}","sender_id":"{half}-ffff-ffffffffffff","created_at":"2026-01-15T10:30:00Z","ts":{ts},"run":{run}}}"#))
            })
            .collect()
    };
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let senders: Vec<String> = (0..4).map(|_| uuid(&mut x)).collect();
    let chat_events = (0..200)
        .map(|i| {
            let (text, sender) = (LINES[(i * 7 + i / 3) % LINES.len()], &senders[(i * 5 + i / 2) % 4]);
            let at = format!("2026-12-07T10:{:02}:{:02}Z", 10 + i / 20, 30 + (i * 17) % 29);
            payload(
                i,
                &format!(
                    r#"{{"id":"{}","content":"{text}","sender_id":"{sender}","created_at":"{at}"}}"#,
                    uuid(&mut x)
                ),
            )
        })
        .collect();
    vec![("loadgen, 16 B text", loadgen(16)), ("loadgen, 200 B text", loadgen(200)), ("chat", chat_events)]
}

/// One payload compressed alone (`dictionary`: after the room's previous
/// event) with a reused state; the size without the sync-flush tail.
fn deflated_len(d: &mut zlib_rs::Deflate, dictionary: Option<&[u8]>, input: &[u8], out: &mut [u8]) -> usize {
    d.reset();
    if let Some(dictionary) = dictionary {
        let _ = d.set_dictionary(dictionary);
    }
    let _ = d.compress(input, out, zlib_rs::DeflateFlush::SyncFlush);
    (d.total_out() as usize).saturating_sub(4).min(input.len())
}

fn zlib(level: i32, strategy: zlib_rs::Strategy, window_bits: i32, mem_level: i32) -> zlib_rs::Deflate {
    zlib_rs::Deflate::new_with_config(zlib_rs::DeflateConfig {
        level,
        window_bits: -window_bits,
        mem_level,
        strategy,
        ..zlib_rs::DeflateConfig::default()
    })
}

fn levels(c: &mut Criterion) {
    use zlib_rs::Strategy::{Default, Filtered, Fixed, HuffmanOnly, Rle};
    let shapes = shapes();
    let mut out = vec![0u8; 8192];
    let mut configs: Vec<(String, i32, zlib_rs::Strategy, i32, i32)> =
        (1..=9).map(|l| (format!("level {l}"), l, Default, 15, 8)).collect();
    for (name, s) in [("filtered", Filtered), ("fixed", Fixed), ("rle", Rle), ("huffman only", HuffmanOnly)] {
        configs.push((format!("level 2, {name}"), 2, s, 15, 8));
    }
    for (w, m) in [(9, 8), (12, 8), (15, 1), (15, 4), (15, 9)] {
        configs.push((format!("level 2, window {w}, memLevel {m}"), 2, Default, w, m));
    }
    for (shape, events) in &shapes {
        let plain: usize = events.iter().map(Vec::len).sum();
        for (i, (name, level, strategy, w, m)) in configs.iter().enumerate() {
            let mut d = zlib(*level, *strategy, *w, *m);
            let alone: usize = events.iter().map(|e| deflated_len(&mut d, None, e, &mut out)).sum();
            eprintln!(
                "{shape}: {name}: {:.1} -> {:.1} bytes ({:.3})",
                plain as f64 / 200.0,
                alone as f64 / 200.0,
                alone as f64 / plain as f64
            );
            if i == 1 {
                let after: usize = events
                    .windows(2)
                    .map(|pair| deflated_len(&mut d, Some(&pair[0]), &pair[1], &mut out))
                    .sum();
                let plain_after = plain - events[0].len();
                eprintln!(
                    "{shape}: level 2 after the previous event: {:.3}",
                    after as f64 / plain_after as f64
                );
            }
        }
    }
    // memLevel by event size: what the smaller symbol buffer costs long frames.
    let mut big = vec![0u8; 70_000];
    for len in [300, 1024, 8192, 32_768] {
        let frame = event(len);
        let payload = frame::payload(&frame);
        let sizes: Vec<String> = [4, 6, 8]
            .iter()
            .map(|m| {
                format!(
                    "memLevel {m}: {}",
                    deflated_len(&mut zlib(2, Default, 15, *m), None, payload, &mut big)
                )
            })
            .collect();
        eprintln!("payload {len}: {}", sizes.join(", "));
    }
    let chat = &shapes[2].1;
    let mut group = c.benchmark_group("deflate_chat_event");
    group.throughput(Throughput::Elements(1));
    for (level, mem) in [(1, 8), (2, 8), (6, 8), (2, 4)] {
        let mut d = zlib(level, Default, 15, mem);
        let mut k = 0;
        group.bench_function(format!("level{level}_memlevel{mem}"), |b| {
            b.iter(|| {
                k = (k + 1) % chat.len();
                black_box(deflated_len(&mut d, None, &chat[k], &mut out))
            })
        });
    }
    let mut d = zlib(2, Default, 15, 8);
    group.bench_function("reset_only_memlevel8", |b| b.iter(|| d.reset()));
    let mut d4 = zlib(2, Default, 15, 4);
    group.bench_function("reset_only_memlevel4", |b| b.iter(|| d4.reset()));
    let mut k = 0;
    group.bench_function("level2_after_previous", |b| {
        b.iter(|| {
            k = k % (chat.len() - 1) + 1;
            black_box(deflated_len(&mut d, Some(&chat[k - 1]), &chat[k], &mut out))
        })
    });
    // Herald's own path (memLevel 4): a room frame's standalone twin, and
    // its twin after the room's previous frame (the context kept).
    let frames: Vec<bytes::Bytes> = chat.iter().map(|p| frame::encode(frame::OpCode::Text, p)).collect();
    let kept = Some(Agreed { server_max_window_bits: 15, context: true });
    let (mut plain, mut alone, mut after) = (0, 0, 0);
    for pair in frames.windows(2) {
        let prev = Wire::new(pair[0].clone());
        let wire = Wire::after(pair[1].clone(), &prev);
        plain += frame::payload(&pair[1]).len();
        alone += frame::payload(wire.for_peer(kept, 0, &mut 0, |_, _| {})).len();
        after += frame::payload(wire.for_peer(kept, 0, &mut prev.id(), |_, _| {})).len();
    }
    eprintln!(
        "chat, Herald's twins: alone {:.3}, after the previous frame {:.3} of {plain} payload bytes",
        alone as f64 / plain as f64,
        after as f64 / plain as f64
    );
    let mut k = 0;
    group.bench_function("herald_twin_alone", |b| {
        b.iter(|| {
            k = (k + 1) % frames.len();
            let wire = Wire::new(frames[k].clone());
            black_box(wire.for_peer(kept, 0, &mut 0, |_, _| {}).len())
        })
    });
    let mut k = 0;
    group.bench_function("herald_twin_after_previous", |b| {
        b.iter(|| {
            k = k % (frames.len() - 1) + 1;
            let prev = Wire::new(frames[k - 1].clone());
            let wire = Wire::after(frames[k].clone(), &prev);
            black_box(wire.for_peer(kept, 0, &mut prev.id(), |_, _| {}).len())
        })
    });
    group.finish();
}

criterion_group!(benches, library, once_per_room, inflate, levels);
criterion_main!(benches);
