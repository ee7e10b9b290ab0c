//! Unit tests of the twins, the kept-window chain and bounded inflation
//! (the parent declares this module under `#[cfg(test)]`).

use super::*;
use crate::protocol::frame::OpCode;

const EVENT: &str = r#"{"type":"message.new","chat_id":"6f1c2b8e-4a0d-4c8e-9b7a-2d5e8f3a1c90","seq":1733562000000123,"data":{"id":"m-1","author":"1b9d6bcd-bbfd-4b2d-9b5d-ab8dfbbd4bed","text":"See you at the station at six, the train leaves at quarter past.","sent_at":"2026-12-07T10:00:00Z"}}"#;

#[test]
fn a_compressed_frame_inflates_to_the_plain_payload() {
    let plain = frame::encode(OpCode::Text, EVENT.as_bytes());
    let twin = compress_frame(&plain).expect("JSON compresses");
    assert_eq!(twin[0], 0x80 | RSV1 | 0x01, "FIN, RSV1, text");
    let payload = frame::payload(&twin);
    assert!(payload.len() < EVENT.len(), "{} >= {}", payload.len(), EVENT.len());
    assert!(!payload.ends_with(&TAIL), "the sync-flush tail is left off");
    assert_eq!(inflate(payload.to_vec(), 65_536).unwrap(), EVENT.as_bytes());
    // The compressor is reset between frames: the same frame again is
    // the same bytes (no context carried over).
    assert_eq!(compress_frame(&plain).unwrap(), twin);
}

#[test]
fn incompressible_frames_stay_plain() {
    // xorshift64: bytes with nothing for deflate to find.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let noise: Vec<u8> = (0..300)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    assert_eq!(compress_frame(&frame::encode(OpCode::Binary, &noise)), None);
    assert_eq!(compress_frame(&[]), None);
}

#[test]
fn a_wire_compresses_once_and_only_for_peers_that_agreed() {
    let wire = Wire::new(frame::encode(OpCode::Text, EVENT.as_bytes()));
    let full = Some(Agreed { server_max_window_bits: 15, context: false });
    let (mut calls, mut last) = (0, 0);
    assert_eq!(wire.for_peer(None, 0, &mut last, |_, _| calls += 1), wire.plain());
    assert_eq!(
        wire.for_peer(full, 10_000, &mut last, |_, _| calls += 1),
        wire.plain(),
        "under the threshold"
    );
    let full_window = Agreed { server_max_window_bits: 15, context: false };
    assert_eq!(full_window.max_payload(), usize::MAX, "any length fits the full window");
    let small_window = Some(Agreed { server_max_window_bits: 8, context: true });
    assert_eq!(
        wire.for_peer(small_window, 0, &mut last, |_, _| calls += 1),
        wire.plain(),
        "longer than its window"
    );
    assert_eq!((calls, last), (0, 0), "plain frames leave the window as it was");
    let a = wire.for_peer(full, 128, &mut last, |_, _| calls += 1).clone();
    let b = wire.for_peer(full, 128, &mut last, |_, _| calls += 1).clone();
    assert_eq!(calls, 1, "compressed once");
    assert_eq!(last, wire.id());
    assert_eq!(a[0] & RSV1, RSV1);
    assert_eq!(a.as_ptr(), b.as_ptr(), "the same bytes, shared");
}

/// A client keeping its window (context takeover) inflates each frame
/// after the last one it inflated: it must see the same events whichever
/// twin each frame went out as, and the twin after the previous frame
/// is smaller than the frame alone.
#[test]
fn frames_after_their_predecessor_refer_to_it_and_inflate_in_a_kept_window() {
    let events: Vec<String> = (0..6).map(|i| EVENT.replace("m-1", &format!("m-{i}"))).collect();
    let mut wires: Vec<Wire> = Vec::new();
    for e in &events {
        let plain = frame::encode(OpCode::Text, e.as_bytes());
        wires.push(match wires.last() {
            Some(prev) => Wire::after(plain, prev),
            None => Wire::new(plain),
        });
    }
    let ctx = Some(Agreed { server_max_window_bits: 15, context: true });
    let mut inflater = Decompress::new(false);
    let mut last = 0;
    let mut sizes = Vec::new();
    // Frame 3 skipped (another room's frame went out between): frame 4
    // must then go standalone, and 5 after 4 again.
    for (i, wire) in wires.iter().enumerate().filter(|(i, _)| *i != 3) {
        let sent = wire.for_peer(ctx, 0, &mut last, |_, _| {}).clone();
        assert_eq!(sent[0] & RSV1, RSV1);
        let mut input = frame::payload(&sent).to_vec();
        input.extend_from_slice(&TAIL);
        let mut out = Vec::with_capacity(4096);
        inflater
            .decompress_vec(&input, &mut out, FlushDecompress::Sync)
            .expect("inflates in the kept window");
        assert_eq!(out, events[i].as_bytes(), "frame {i}");
        sizes.push((i, frame::payload(&sent).len()));
    }
    let standalone = frame::payload(&compress_frame(wires[1].plain()).unwrap()).len();
    let size = |i| sizes.iter().find(|s| s.0 == i).unwrap().1;
    assert!(size(1) < standalone / 2, "{} after previous against {standalone} alone", size(1));
    assert_eq!(
        size(4),
        frame::payload(&compress_frame(wires[4].plain()).unwrap()).len(),
        "after a gap: alone"
    );
    assert!(size(5) < standalone / 2);
    // A client without the context always gets the standalone twin.
    let mut other = 0;
    let alone = wires[2].for_peer(
        Some(Agreed { server_max_window_bits: 15, context: false }),
        0,
        &mut other,
        |_, _| {},
    );
    assert_eq!(frame::payload(alone).len(), frame::payload(&compress_frame(wires[2].plain()).unwrap()).len());
}

/// What each frame held (ring, history) weighs besides its bytes: the
/// plain frame, its id, a pointer to the previous frame's id and tail,
/// a slot for the twins. Held per frame of history, so kept in view
/// (a warm two-person room's one frame is half its subscribers' cost).
#[test]
fn a_frame_s_fixed_cost_stays_in_view() {
    let size = std::mem::size_of::<Twin>();
    eprintln!("Twin: {size} bytes (+16 for the Arc's counts)");
    assert!(size <= 64, "Twin grew to {size} bytes");
}

/// Only the last 32 KiB of a huge previous frame can be referred to:
/// the twin after it still inflates in a 32 KiB window.
#[test]
fn the_dictionary_is_the_tail_of_a_huge_previous_frame() {
    let huge: Vec<u8> = (0..100_000u32).flat_map(|i| format!("{i:06},").into_bytes()).collect();
    let first = Wire::new(frame::encode(OpCode::Text, &huge));
    // Its last 500 bytes again, then padding enough to be linked.
    let next: Vec<u8> = [&huge[huge.len() - 500..], &vec![b' '; huge.len() / 4]].concat();
    let second = Wire::after(frame::encode(OpCode::Text, &next), &first);
    assert_eq!(second.0.prev.as_ref().unwrap().1.len(), WINDOW);
    let ctx = Some(Agreed { server_max_window_bits: 15, context: true });
    let mut inflater = Decompress::new_with_window_bits(false, 15);
    let mut last = 0;
    for (wire, want) in [(&first, &huge), (&second, &next)] {
        let sent = wire.for_peer(ctx, 0, &mut last, |_, _| {}).clone();
        let mut input = frame::payload(&sent).to_vec();
        input.extend_from_slice(&TAIL);
        let mut out = Vec::with_capacity(want.len() + 64);
        inflater.decompress_vec(&input, &mut out, FlushDecompress::Sync).expect("inflates");
        assert_eq!(&out, want);
    }
    let after = frame::payload(second.for_peer(ctx, 0, &mut first.id(), |_, _| {})).len();
    let alone = frame::payload(&compress_frame(second.plain()).unwrap()).len();
    assert!(after + 100 < alone, "{after} after the huge frame, {alone} alone");
}

/// Attack review: a link shares its previous frame's buffer (or held a
/// copy of its last 32 KiB), which history does not count once it lets
/// that frame go. A publisher that sent a huge event then a tiny one to
/// each of many rooms, then enough to make the node-wide budget shed
/// the huge ones, had the tiny ones keep 32 KiB each alive uncounted
/// (hundreds of times `rooms.history_bytes`). A frame links only to a
/// predecessor at most [`LINK_RATIO`] times its size.
#[test]
fn a_small_frame_keeps_no_much_larger_predecessor_alive() {
    let huge = Wire::new(frame::encode(OpCode::Text, &vec![b'x'; 100_000]));
    let tiny = Wire::after(frame::encode(OpCode::Text, EVENT.as_bytes()), &huge);
    assert!(tiny.0.prev.is_none(), "not linked to a predecessor 300 times its size");
    let long = Wire::new(frame::encode(OpCode::Text, EVENT.repeat(3).as_bytes()));
    let short = Wire::after(frame::encode(OpCode::Text, EVENT.as_bytes()), &long);
    assert!(short.0.prev.is_some(), "a chat event after a message three times as long refers to it");
}

/// Attack review: whatever a connection is sent (three rooms' chains
/// interleaved, frames it never gets, links dropped, sizes from a few
/// bytes to three windows, repetitive and random bytes), every
/// compressed frame inflates to its payload in the one window it
/// keeps: no twin refers to bytes that window does not end with.
#[test]
fn every_twin_inflates_in_a_kept_window_whatever_came_before() {
    let mut x = 0x1234_5678_9abc_def1u64;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let ctx = Some(Agreed { server_max_window_bits: 15, context: true });
    let (mut inflater, mut last) = (Decompress::new(false), 0);
    let mut chains: [Option<Wire>; 3] = [None, None, None];
    for step in 0..600 {
        let room = (rnd() % 3) as usize;
        let size = match rnd() % 8 {
            0 => (rnd() % 100_000) as usize,
            1 => WINDOW - 300 + (rnd() % 600) as usize,
            _ => (rnd() % 3_000) as usize,
        };
        let kind = rnd() % 3;
        let payload: Vec<u8> = (0..size)
            .map(|i| match kind {
                0 => (rnd() & 0xff) as u8,
                1 => b"0123456789abcdef"[((i / 5) ^ step) % 16],
                _ => EVENT.as_bytes()[i % EVENT.len()],
            })
            .collect();
        let plain = frame::encode(OpCode::Text, &payload);
        let wire = match &chains[room] {
            Some(prev) if rnd() % 5 != 0 => Wire::after(plain, prev),
            _ => Wire::new(plain),
        };
        chains[room] = Some(wire.clone());
        if rnd() % 7 == 0 {
            continue;
        }
        let sent = wire.for_peer(ctx, 0, &mut last, |_, _| {}).clone();
        if sent[0] & RSV1 == 0 {
            continue;
        }
        let mut input = frame::payload(&sent).to_vec();
        input.extend_from_slice(&TAIL);
        let mut out = Vec::with_capacity(size + 1024);
        inflater.decompress_vec(&input, &mut out, FlushDecompress::Sync).expect("inflates");
        assert!(out == payload, "step {step}: {size} bytes of kind {kind}");
    }
}

#[test]
fn inflation_stops_at_the_limit() {
    let bomb = deflate_payload(&vec![b'a'; 1 << 20]);
    assert!(bomb.len() < 2_000, "{} bytes", bomb.len());
    assert_eq!(inflate(bomb.clone(), 65_536), Err(InflateError::TooBig(65_537)));
    assert_eq!(inflate(bomb, 1 << 20).map(|v| v.len()), Ok(1 << 20), "exactly the limit is fine");
    assert_eq!(inflate(deflate_payload(b""), 0), Ok(Vec::new()));
    assert_eq!(inflate(vec![0xff, 0xff, 0xff], 100), Err(InflateError::Corrupt));
}
