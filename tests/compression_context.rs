//! permessage-deflate with the compression context kept (RFC 7692 context
//! takeover, Herald's default) over real sockets: a client that keeps its
//! inflate window receives every event intact and in order across rooms,
//! frames that follow their room's previous frame are smaller than alone,
//! recoveries replay them, a client that asks for
//! `server_no_context_takeover` gets frames that each inflate alone, one
//! with a 1 KiB window gets standalone frames that fit it, and Python's
//! `websockets` and Node's `ws` (ignored unless installed) keep one window
//! across a room's live events and another room's recovery.

mod support;

use std::net::SocketAddr;

use flate2::{Decompress, FlushDecompress};
use herald::protocol::{deflate, ChatId, UserId};
use serde_json::{json, Value};
use support::{next_line, RawClient};
use tokio::net::TcpStream;

const RSV1: u8 = 0x40;

/// A raw client with the inflate window RFC 7692 asks of it when the server
/// keeps its context: every compressed message is inflated in one stream.
struct Client {
    raw: RawClient,
    window: Decompress,
}

impl Client {
    async fn open(addr: SocketAddr, offer: &str) -> (Client, String) {
        Client::open_on(TcpStream::connect(addr).await.expect("connect"), offer).await
    }

    /// With a small socket receive buffer: a reader the server can stall.
    async fn open_small(addr: SocketAddr, offer: &str) -> (Client, String) {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        Client::open_on(socket.connect(addr).await.expect("connect"), offer).await
    }

    async fn open_on(stream: TcpStream, offer: &str) -> (Client, String) {
        let token = support::token(UserId::new_v4(), &[]);
        let (raw, head) =
            RawClient::handshake_with(stream, &token, &format!("Sec-WebSocket-Extensions: {offer}\r\n"))
                .await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let answer = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("sec-websocket-extensions").then(|| value.trim().to_string())
            })
            .expect("compression agreed");
        (Client { raw, window: Decompress::new(false) }, answer)
    }

    /// The next text message: (its payload's size on the wire, compressed?, JSON).
    async fn next(&mut self) -> (usize, bool, Value) {
        loop {
            let (first, payload) = self.raw.read_frame().await.expect("a frame");
            match first & 0x0f {
                0x1 => {
                    let compressed = first & RSV1 != 0;
                    let wire = payload.len();
                    let text = if compressed { self.inflate(payload) } else { payload };
                    return (wire, compressed, serde_json::from_slice(&text).expect("JSON"));
                }
                0x8 => panic!("closed: {payload:?}"),
                _ => {}
            }
        }
    }

    fn inflate(&mut self, mut payload: Vec<u8>) -> Vec<u8> {
        payload.extend_from_slice(&[0, 0, 0xff, 0xff]);
        let mut out = Vec::with_capacity(1 << 20);
        let before = self.window.total_in();
        self.window
            .decompress_vec(&payload, &mut out, FlushDecompress::Sync)
            .expect("inflates in the kept window");
        assert_eq!((self.window.total_in() - before) as usize, payload.len(), "whole message inflated");
        out
    }

    async fn subscribe(&mut self, chat: ChatId, since: Option<u64>) -> u64 {
        let mut cmd = json!({"type":"subscribe","chat_id":chat});
        if let Some(since) = since {
            cmd["since"] = json!(since);
        }
        self.raw.send_frame(0x81, cmd.to_string().as_bytes()).await;
        let (_, _, reply) = self.next().await;
        assert_eq!(reply["type"], "subscribed", "{reply}");
        reply["seq"].as_u64().expect("seq")
    }
}

/// A chat message of about 300 bytes, differing by `n`.
fn chat(n: u64) -> Value {
    json!({"id": format!("m-{n}"), "author": "1b9d6bcd-bbfd-4b2d-9b5d-ab8dfbbd4bed",
           "text": format!("Message {n}: see you at the station at six, the train leaves at quarter past."),
           "sent_at": "2026-12-07T10:00:00Z"})
}

#[tokio::test]
async fn the_context_is_kept_unless_asked_and_consecutive_frames_shrink() {
    let gw = support::start(support::config()).await;
    let (mut c, answer) = Client::open(gw.addr, "permessage-deflate; client_max_window_bits").await;
    assert_eq!(answer, "permessage-deflate; client_no_context_takeover", "context kept");
    let chat_id = ChatId::new_v4();
    let head = c.subscribe(chat_id, None).await;
    let n = 20;
    for i in 0..n {
        support::publish(&gw, chat_id, 1, &chat(i)).await;
    }
    let mut sizes = Vec::new();
    for i in 0..n {
        let (wire, compressed, v) = c.next().await;
        assert!(compressed, "event {i}");
        assert_eq!((v["seq"].as_u64(), &v["data"]), (Some(head + 1 + i), &chat(i)), "intact and in order");
        sizes.push(wire);
    }
    // The first had nothing before it; each next one refers to its predecessor.
    for (i, size) in sizes.iter().enumerate().skip(1) {
        assert!(size * 2 < sizes[0], "event {i}: {size} bytes after its predecessor, {} alone", sizes[0]);
    }
    // Recovery from `since` replays the same chain to a new client.
    let (mut late, _) = Client::open(gw.addr, "permessage-deflate").await;
    late.subscribe(chat_id, Some(head)).await;
    for i in 0..n {
        let (wire, _, v) = late.next().await;
        assert_eq!((v["seq"].as_u64(), &v["data"]), (Some(head + 1 + i), &chat(i)), "replayed in order");
        assert_eq!(wire, sizes[i as usize], "the same twins, made once");
    }
    assert_eq!(gw.metric("compressed_frames_total").await, n as f64, "each frame compressed once");
    gw.stop().await;
}

#[tokio::test]
async fn interleaved_rooms_and_small_events_keep_every_window_in_step() {
    let gw = support::start(support::config()).await;
    let (mut c, _) = Client::open(gw.addr, "permessage-deflate").await;
    let (mut one, _) = Client::open(gw.addr, "permessage-deflate").await;
    let (a, b) = (ChatId::new_v4(), ChatId::new_v4());
    c.subscribe(a, None).await;
    c.subscribe(b, None).await;
    one.subscribe(a, None).await;
    // Events over and under the threshold (the small ones go out plain and
    // leave the window as it was), alternating between rooms in runs.
    let plan: Vec<(ChatId, Value)> = (0..40u64)
        .map(|i| {
            let room = if (i / 3) % 2 == 0 { a } else { b };
            let data = if i % 5 == 4 { json!({"n": i}) } else { chat(i) };
            (room, data)
        })
        .collect();
    for (room, data) in &plan {
        support::publish(&gw, *room, 1, data).await;
    }
    // Order holds within a room (rooms are independent streams); every
    // message inflated in the one window either way.
    let mut small_seen = false;
    let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
    for _ in &plan {
        let (_, compressed, v) = c.next().await;
        small_seen |= !compressed;
        if v["chat_id"] == json!(a) { &mut got_a } else { &mut got_b }.push(v["data"].clone());
    }
    let want = |room| plan.iter().filter(|(r, _)| *r == room).map(|(_, d)| d.clone()).collect::<Vec<_>>();
    assert_eq!(got_a, want(a), "room a intact and in order");
    assert_eq!(got_b, want(b), "room b intact and in order");
    for (i, data) in want(a).iter().enumerate() {
        let (_, _, v) = one.next().await;
        assert_eq!(&v["data"], data, "event {i}, one room");
    }
    assert!(small_seen, "small events went out plain");
    gw.stop().await;
}

#[tokio::test]
async fn a_client_that_asks_for_no_context_takeover_gets_frames_that_stand_alone() {
    let gw = support::start(support::config()).await;
    let (mut c, answer) = Client::open(gw.addr, "permessage-deflate; server_no_context_takeover").await;
    assert_eq!(answer, "permessage-deflate; server_no_context_takeover; client_no_context_takeover");
    // And a kept-context client in the same room, so the twins after the
    // previous frame exist and must not reach the first one.
    let (mut kept, _) = Client::open(gw.addr, "permessage-deflate").await;
    let chat_id = ChatId::new_v4();
    c.subscribe(chat_id, None).await;
    kept.subscribe(chat_id, None).await;
    for i in 0..10 {
        support::publish(&gw, chat_id, 1, &chat(i)).await;
    }
    for i in 0..10 {
        let (_, _, v) = kept.next().await;
        assert_eq!(&v["data"], &chat(i));
        let (first, payload) = loop {
            let (first, payload) = c.raw.read_frame().await.expect("a frame");
            if first & 0x0f == 0x1 {
                break (first, payload);
            }
        };
        assert_eq!(first & RSV1, RSV1);
        // Inflated alone, with a fresh inflater: no context needed.
        let v: Value =
            serde_json::from_slice(&deflate::inflate(payload, 1 << 20).expect("stands alone")).expect("JSON");
        assert_eq!(&v["data"], &chat(i), "event {i}");
    }
    let mut config = support::config();
    config.websocket.compression_context = false;
    let off = support::start(config).await;
    let (_c, answer) = Client::open(off.addr, "permessage-deflate").await;
    assert_eq!(
        answer, "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
        "turned off"
    );
    off.stop().await;
    gw.stop().await;
}

/// A recovery on a node that never watched the room reads the room's
/// history from Redis: those frames are chained after each other too, and
/// a kept-context client inflates every one of them in its window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn a_recovery_from_redis_history_replays_chained_frames() {
    let redis = support::redis::RedisServer::start();
    let (a, b) = support::redis::two_nodes(&redis, herald::config::Membership::Open).await;
    let chat_id = ChatId::new_v4();
    let (mut on_a, _) = Client::open(a.addr, "permessage-deflate").await;
    let head = on_a.subscribe(chat_id, None).await;
    let n = 12;
    for i in 0..n {
        let (status, _) = a.publish(&support::message_sent(chat_id, &chat(i))).await;
        assert_eq!(status, 202);
    }
    let mut live = Vec::new();
    for _ in 0..n {
        live.push(on_a.next().await);
    }
    // B never watched this room: its history comes from Redis.
    let (mut on_b, _) = Client::open(b.addr, "permessage-deflate").await;
    on_b.subscribe(chat_id, Some(head)).await;
    let mut sizes = Vec::new();
    for i in 0..n {
        let (wire, compressed, v) = on_b.next().await;
        assert!(compressed, "event {i}");
        assert_eq!((v["seq"].as_u64(), &v["data"]), (Some(head + 1 + i), &chat(i)), "recovered in order");
        assert_eq!(&v, &live[i as usize].2, "the same event as live on A");
        sizes.push(wire);
    }
    for (i, size) in sizes.iter().enumerate().skip(1) {
        assert!(size * 2 < sizes[0], "event {i}: {size} bytes after its predecessor, {} alone", sizes[0]);
    }
    assert_eq!(b.labelled("recoveries_total", "result", "recovered").await, 1.0);
}

/// `n` bytes of hex from a xorshift seeded by `seed`: about half of it is
/// left after deflate, so a stalled reader's backlog stays large compressed.
fn hex(seed: u64, n: usize) -> String {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n / 16)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            format!("{x:016x}")
        })
        .collect()
}

/// A kept-context client that stops reading while its room runs past the
/// live ring: when it reads again, the catch-up from history continues its
/// chain (each frame after the one it was sent before), and every event
/// inflates in its window, in order.
#[tokio::test]
async fn a_kept_context_reader_that_stalls_catches_up_in_its_window() {
    let mut config = support::config();
    config.rooms.buffer = 4;
    config.rooms.history_size = 5_000;
    config.websocket.write_wait = std::time::Duration::from_secs(60);
    let gw = support::start(config).await;
    let chat_id = ChatId::new_v4();
    let (mut slow, answer) = Client::open_small(gw.addr, "permessage-deflate").await;
    assert_eq!(answer, "permessage-deflate; client_no_context_takeover");
    let head = slow.subscribe(chat_id, None).await;
    // 1,500 events of 4 KB: about 3 MB compressed, more than socket buffers
    // and the connection's own queue hold for a client that does not read.
    let n = 1_500u64;
    for i in 0..n {
        support::publish(&gw, chat_id, 1, &json!({"blob": hex(i, 4096)})).await;
    }
    for i in 0..n {
        let (_, _, v) = slow.next().await;
        assert_eq!(
            (v["seq"].as_u64(), &v["data"]),
            (Some(head + 1 + i), &json!({"blob": hex(i, 4096)})),
            "event {i}"
        );
    }
    assert!(gw.metric("catchups_total").await >= 1.0, "the stalled reader fell behind the ring");
    assert_eq!(gw.metric("slow_consumers_dropped_total").await, 0.0);
    gw.stop().await;
}

/// The event `i` of a plan that mixes every shape a kept window meets:
/// small events that go out plain, chat events, events just under and
/// over the 32 KiB window, and a large one of which only a part is
/// repetitive.
fn mixed(i: u64) -> Value {
    match i % 6 {
        0 => json!({"n": i}),
        1 | 4 => chat(i),
        2 => json!({"text": format!("{i} ").repeat(32_700 / (2 + i.to_string().len()))}),
        3 => json!({"blob": hex(i, 70_000)}),
        _ => json!({"text": chat(i).to_string().repeat(120)}),
    }
}

/// Subscribes to room `a`, prints each message on a line; once it has
/// printed `k` events of `a`, subscribes to room `b` from `since` (a
/// recovery replayed between `a`'s live events).
const PYTHON_CLIENT: &str = r#"
import asyncio, json, sys
from websockets.asyncio.client import connect

async def main(url, a, b, since, k):
    async with connect(url, compression="deflate", max_size=None) as ws:
        print(json.dumps({"extensions": ws.response.headers.get("Sec-WebSocket-Extensions")}), flush=True)
        await ws.send(json.dumps({"type": "subscribe", "chat_id": a}))
        seen = 0
        while True:
            msg = await ws.recv()
            print(msg, flush=True)
            v = json.loads(msg)
            if v.get("chat_id") == a and "seq" in v and v.get("type") != "subscribed":
                seen += 1
                if seen == k:
                    await ws.send(json.dumps({"type": "subscribe", "chat_id": b, "since": since}))

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])))
"#;

const NODE_CLIENT: &str = r#"
const WebSocket = require('ws');
const [url, a, b, since, k] = process.argv.slice(1);
const ws = new WebSocket(url, { perMessageDeflate: true, maxPayload: 0 });
let seen = 0;
ws.on('open', () => {
  console.log(JSON.stringify({ extensions: ws.extensions }));
  ws.send(JSON.stringify({ type: 'subscribe', chat_id: a }));
});
ws.on('message', (data) => {
  const text = data.toString();
  console.log(text);
  const v = JSON.parse(text);
  if (v.chat_id === a && v.seq !== undefined && v.type !== 'subscribed' && ++seen === Number(k)) {
    ws.send(JSON.stringify({ type: 'subscribe', chat_id: b, since: Number(since) }));
  }
});
ws.on('close', (code) => { console.error('closed', code); process.exit(1); });
ws.on('error', (e) => { console.error(e); process.exit(1); });
"#;

/// A strict real client (its zlib checks every distance against the
/// window it kept) receives a mixed plan in one window: live events of one
/// room, then a recovery of another replayed from history while the first
/// goes on live, every shape from plain to over 32 KiB.
async fn a_strict_client_keeps_its_window_across_rooms_and_a_recovery(mut program: tokio::process::Command) {
    let gw = support::start(support::config()).await;
    let (a, b) = (ChatId::new_v4(), ChatId::new_v4());
    let (mut probe, _) = Client::open(gw.addr, "permessage-deflate").await;
    let since = probe.subscribe(b, None).await;
    let k = 12u64;
    let url = gw.ws_url(&support::token(UserId::new_v4(), &[]));
    let args = [url, a.to_string(), b.to_string(), since.to_string(), k.to_string()];
    let (child, mut lines) = support::spawn_deflating_client(&mut program, &args).await;
    assert_eq!(next_line(&mut lines).await["type"], "subscribed");
    // Room b's events wait in its history; room a's first k go out live.
    let n = 18u64;
    for i in 0..n {
        support::publish(&gw, b, 1, &mixed(i)).await;
    }
    for i in 0..k {
        support::publish(&gw, a, 1, &mixed(i)).await;
    }
    let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
    while (got_a.len() as u64) < k {
        let v = next_line(&mut lines).await;
        assert_eq!(v["chat_id"], json!(a), "{v:.200}");
        got_a.push(v["data"].clone());
    }
    // The client subscribes to b now: its replay goes out between a's
    // live events, and b's own live ones follow it.
    for i in k..2 * k {
        support::publish(&gw, a, 1, &mixed(i)).await;
    }
    for i in n..n + 6 {
        support::publish(&gw, b, 1, &mixed(i)).await;
    }
    let mut recovered = None;
    while (got_a.len() as u64) < 2 * k || (got_b.len() as u64) < n + 6 {
        let v = next_line(&mut lines).await;
        if v["type"] == "subscribed" {
            recovered = Some(v["recovered"].clone());
        } else if v["chat_id"] == json!(a) {
            got_a.push(v["data"].clone());
        } else {
            assert_eq!(v["chat_id"], json!(b), "{v:.200}");
            got_b.push(v["data"].clone());
        }
    }
    assert_eq!(recovered, Some(json!(true)), "b recovered from history");
    for (i, data) in got_a.iter().enumerate() {
        assert!(data == &mixed(i as u64), "room a, event {i}");
    }
    for (i, data) in got_b.iter().enumerate() {
        assert!(data == &mixed(i as u64), "room b, event {i}");
    }
    assert!(gw.metric("compressed_frames_total").await > 0.0);
    drop(child);
    drop(probe);
    gw.stop().await;
}

#[tokio::test]
#[ignore = "needs python3 with websockets (.ci/run installs it)"]
async fn pythons_websockets_keeps_its_window_across_rooms_and_a_recovery() {
    let mut cmd = tokio::process::Command::new("python3");
    cmd.arg("-c").arg(PYTHON_CLIENT);
    a_strict_client_keeps_its_window_across_rooms_and_a_recovery(cmd).await;
}

#[tokio::test]
#[ignore = "needs node with npm's ws in target/node-ws (.ci/run installs it)"]
async fn nodes_ws_keeps_its_window_across_rooms_and_a_recovery() {
    let cmd = support::node_ws(NODE_CLIENT);
    a_strict_client_keeps_its_window_across_rooms_and_a_recovery(cmd).await;
}

/// A client asking for `server_max_window_bits=10` with the context kept
/// keeps a 1 KiB window across messages: every payload that fits it goes
/// out compressed, standalone (a frame after its predecessor could refer
/// further back than 1 KiB, which the RFC forbids, though zlib's inflater
/// tolerates it while the bytes are still in its buffers), and inflates in
/// that window.
#[tokio::test]
async fn a_client_with_a_small_window_is_never_sent_a_frame_after_its_predecessor() {
    let gw = support::start(support::config()).await;
    let chat_id = ChatId::new_v4();
    let (mut c, answer) = Client::open(gw.addr, "permessage-deflate; server_max_window_bits=10").await;
    assert_eq!(answer, "permessage-deflate; client_no_context_takeover; server_max_window_bits=10");
    c.window = Decompress::new_with_window_bits(false, 10);
    c.subscribe(chat_id, None).await;
    // Under 1 KiB each; an odd event ends with what its predecessor starts
    // with, more than 1 KiB back.
    let event = |i: u64| match i % 2 {
        0 => json!({"x": hex(i / 2, 384), "y": hex(1_000 + i, 384)}),
        _ => json!({"y": hex(1_000 + i, 384), "x": hex(i / 2, 384)}),
    };
    let n = 30;
    for i in 0..n {
        support::publish(&gw, chat_id, 1, &event(i)).await;
    }
    let mut compressed = 0;
    for i in 0..n {
        let (_, deflated, v) = c.next().await;
        compressed += u32::from(deflated);
        assert_eq!(v["data"], event(i), "event {i}");
    }
    assert_eq!(compressed, n as u32, "every one fits the window");
    gw.stop().await;
}
