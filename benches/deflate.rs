//! Criterion benches of permessage-deflate, which chose its library:
//! compressing one 300-byte chat event frame with flate2 on zlib-rs (what
//! Herald links) against miniz_oxide (flate2's default backend), each at
//! levels 1, 2 and 6 with a reused compressor; compress once per room vs once
//! per recipient; and inflating a client's message. Prints the compressed
//! sizes by payload size once, which chose the default threshold.

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
    let agreed = Some(Agreed { server_max_window_bits: 15 });
    let mut group = c.benchmark_group("deflate_100_recipients");
    group.throughput(Throughput::Elements(100));
    group.bench_function("once_shared", |b| {
        b.iter(|| {
            let wire = Wire::new(frame.clone());
            let out: Vec<_> = (0..100).map(|_| wire.for_peer(agreed, 128, |_, _| {}).clone()).collect();
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

criterion_group!(benches, library, once_per_room, inflate);
criterion_main!(benches);
