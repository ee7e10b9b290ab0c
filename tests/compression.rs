//! permessage-deflate (RFC 7692) over real sockets: the handshake's answer
//! to each offer shape, RSV1 above the threshold only, each room frame
//! compressed once for all its subscribers (history replays included),
//! compressed client messages inflated, deflate bombs (1009) and RSV1 where
//! it is not allowed (1002); then real clients that compress by default:
//! Python's `websockets` and Node's `ws` (ignored unless installed; `.ci/run`
//! installs both), receiving every event in order.

mod support;

use std::net::SocketAddr;

use herald::protocol::deflate;
use herald::protocol::{ChatId, UserId};
use serde_json::{json, Value};
use support::{next_line, RawClient};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const RSV1: u8 = 0x40;

/// Opens a WebSocket by hand with these `Sec-WebSocket-Extensions` lines;
/// returns the client and the answer's extensions header, if any.
async fn handshake(addr: SocketAddr, token: &str, offers: &[&str]) -> (RawClient, Option<String>) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let extensions: String = offers.iter().map(|o| format!("Sec-WebSocket-Extensions: {o}\r\n")).collect();
    let (client, head) = RawClient::handshake_with(stream, token, &extensions).await;
    assert!(head.starts_with("HTTP/1.1 101"), "an offer never fails the handshake: {head}");
    let answer = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("sec-websocket-extensions").then(|| value.trim().to_string())
    });
    (client, answer)
}

async fn deflating(addr: SocketAddr, user: UserId) -> RawClient {
    let (client, answer) = handshake(addr, &support::token(user, &[]), &["permessage-deflate"]).await;
    assert!(answer.is_some(), "compression is on by default");
    client
}

/// Reads the next text message: (was it compressed, its JSON).
async fn next_json(c: &mut RawClient) -> (bool, Value) {
    loop {
        let (first, payload) = c.read_frame().await.expect("a frame");
        match first & 0x0f {
            0x1 => {
                assert_eq!(first & 0x80, 0x80, "server messages are single frames");
                let compressed = first & RSV1 != 0;
                let text =
                    if compressed { deflate::inflate(payload, 1 << 20).expect("inflates") } else { payload };
                return (compressed, serde_json::from_slice(&text).expect("JSON"));
            }
            0x8 => panic!("closed: {payload:?}"),
            _ => {}
        }
    }
}

/// Reads the next text frame as sent: (first header byte, payload).
async fn next_text_frame(c: &mut RawClient) -> (u8, Vec<u8>) {
    loop {
        let (first, payload) = c.read_frame().await.expect("a frame");
        if first & 0x0f == 0x1 {
            return (first, payload);
        }
    }
}

async fn subscribe(c: &mut RawClient, chat: ChatId, since: Option<u64>) -> u64 {
    let mut cmd = json!({"type":"subscribe","chat_id":chat});
    if let Some(since) = since {
        cmd["since"] = json!(since);
    }
    c.send_frame(0x81, cmd.to_string().as_bytes()).await;
    let (_, reply) = next_json(c).await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    reply["seq"].as_u64().expect("seq")
}

/// Event data whose frame is well above the default threshold (128 bytes).
fn big(n: u64) -> Value {
    json!({"n": n, "content": "See you at the station at six; the train leaves at quarter past, platform four. ".repeat(3)})
}

#[tokio::test]
async fn the_handshake_answers_each_offer_shape_as_rfc_7692_says() {
    let gw = support::start(support::config()).await;
    let token = support::token(UserId::new_v4(), &[]);
    // The context is kept unless the offer asks for server_no_context_takeover.
    let base = "permessage-deflate; client_no_context_takeover";
    let asked = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
    let with_bits = format!("{base}; server_max_window_bits=10");
    let cases: Vec<(Vec<&str>, Option<&str>)> = vec![
        (vec![], None),
        (vec!["permessage-deflate"], Some(base)),
        // Chromium's offer: client_max_window_bits without a value.
        (vec!["permessage-deflate; client_max_window_bits"], Some(base)),
        (vec!["permessage-deflate; client_max_window_bits=9"], Some(base)),
        (vec!["permessage-deflate; server_no_context_takeover; client_no_context_takeover"], Some(asked)),
        (vec!["permessage-deflate; server_max_window_bits=10"], Some(&with_bits)),
        // Declined: values out of range or missing, unknown or repeated parameters.
        (vec!["permessage-deflate; server_max_window_bits"], None),
        (vec!["permessage-deflate; server_max_window_bits=16"], None),
        (vec!["permessage-deflate; client_max_window_bits=7"], None),
        (vec!["permessage-deflate; mystery=1"], None),
        (vec!["permessage-deflate; server_no_context_takeover; server_no_context_takeover"], None),
        (vec!["x-webkit-deflate-frame"], None),
        // The first offer Herald can honour wins, across offers and header lines.
        (
            vec![
                "permessage-deflate; server_max_window_bits=4, permessage-deflate; server_max_window_bits=10",
            ],
            Some(&with_bits),
        ),
        (vec!["permessage-deflate; bogus", "permessage-deflate"], Some(base)),
    ];
    for (offers, want) in cases {
        let (_client, answer) = handshake(gw.addr, &token, &offers).await;
        assert_eq!(answer.as_deref(), want, "offers {offers:?}");
    }

    let mut config = support::config();
    config.websocket.compression = false;
    let off = support::start(config).await;
    let (_client, answer) = handshake(off.addr, &token, &["permessage-deflate"]).await;
    assert_eq!(answer, None, "websocket.compression: false declines every offer");
    off.stop().await;
    gw.stop().await;
}

#[tokio::test]
async fn frames_above_the_threshold_are_compressed_once_for_every_subscriber() {
    let gw = support::start(support::config()).await;
    let chat = ChatId::new_v4();
    let mut a = deflating(gw.addr, UserId::new_v4()).await;
    let mut b = deflating(gw.addr, UserId::new_v4()).await;
    let mut plain = RawClient::connect(gw.addr, &support::token(UserId::new_v4(), &[])).await;
    let head = subscribe(&mut a, chat, None).await;
    subscribe(&mut b, chat, None).await;
    subscribe(&mut plain, chat, None).await;
    assert_eq!(gw.metric("compression_connections").await, 2.0);

    support::publish(&gw, chat, 1, &json!({"n": 1})).await;
    support::publish(&gw, chat, 1, &big(2)).await;
    // Below the threshold: plain for everyone.
    let small_a = next_text_frame(&mut a).await;
    assert_eq!(small_a.0, 0x81, "a small frame goes out without RSV1");
    assert_eq!(next_text_frame(&mut b).await, small_a);
    assert_eq!(next_text_frame(&mut plain).await, small_a);
    // Above it: RSV1 for those that negotiated, the same bytes for both.
    let big_a = next_text_frame(&mut a).await;
    assert_eq!(big_a.0, 0x80 | RSV1 | 0x1, "a large frame goes out compressed");
    assert_eq!(next_text_frame(&mut b).await, big_a, "one compression, shared");
    let big_plain = next_text_frame(&mut plain).await;
    assert_eq!(big_plain.0, 0x81, "never RSV1 without negotiation");
    let inflated = deflate::inflate(big_a.1.clone(), 1 << 20).expect("valid raw deflate");
    assert_eq!(inflated, big_plain.1, "decompresses to exactly the plain frame");
    assert!(big_a.1.len() * 2 <= big_plain.1.len(), "{} vs {} bytes", big_a.1.len(), big_plain.1.len());
    let value: Value = serde_json::from_slice(&inflated).expect("JSON");
    assert_eq!((value["seq"].as_u64(), &value["data"]), (Some(head + 2), &big(2)));

    // A recovery replays history: the very same compressed frame, not a new compression.
    let mut late = deflating(gw.addr, UserId::new_v4()).await;
    subscribe(&mut late, chat, Some(head)).await;
    assert_eq!(next_text_frame(&mut late).await, small_a);
    assert_eq!(next_text_frame(&mut late).await, big_a);
    assert_eq!(gw.metric("compressed_frames_total").await, 1.0, "compressed once for four deliveries");
    let (before, after) =
        (gw.metric("compression_bytes_in_total").await, gw.metric("compression_bytes_out_total").await);
    assert_eq!((before, after), (big_plain.1.len() as f64, big_a.1.len() as f64));
    gw.stop().await;
}

#[tokio::test]
async fn a_catch_up_longer_than_one_history_read_is_compressed_whole_and_in_order() {
    let gw = support::start(support::config()).await;
    let chat = ChatId::new_v4();
    // A plain subscriber keeps the room; nobody compresses while it fills.
    let mut plain = RawClient::connect(gw.addr, &support::token(UserId::new_v4(), &[])).await;
    let head = subscribe(&mut plain, chat, None).await;
    // More than two of the reads a catch-up takes from history at a time
    // (each compressed after the room's lock is released).
    let n = 70;
    for i in 0..n {
        support::publish(&gw, chat, 1, &big(i)).await;
    }
    let mut late = deflating(gw.addr, UserId::new_v4()).await;
    subscribe(&mut late, chat, Some(head)).await;
    // The context is kept: consecutive frames refer to each other, so the
    // client inflates them in one window, as RFC 7692 asks of it.
    let mut window = flate2::Decompress::new(false);
    for i in 0..n {
        let (first, mut payload) = next_text_frame(&mut late).await;
        assert_eq!(first, 0x80 | RSV1 | 0x1, "event {i} compressed");
        payload.extend_from_slice(&[0, 0, 0xff, 0xff]);
        let mut text = Vec::with_capacity(1 << 16);
        window.decompress_vec(&payload, &mut text, flate2::FlushDecompress::Sync).expect("deflate");
        let value: Value = serde_json::from_slice(&text).expect("JSON");
        assert_eq!((value["seq"].as_u64(), &value["data"]), (Some(head + 1 + i), &big(i)), "in order");
    }
    assert_eq!(gw.metric("compressed_frames_total").await, n as f64, "each compressed once, by the catch-up");
    gw.stop().await;
}

#[tokio::test]
async fn compressed_client_messages_are_inflated_whole_even_fragmented() {
    let gw = support::start(support::config()).await;
    let chat = ChatId::new_v4();
    let mut c = deflating(gw.addr, UserId::new_v4()).await;
    let cmd = json!({"type":"subscribe","chat_id":chat}).to_string();
    c.send_frame(0xC1, &deflate::deflate_payload(cmd.as_bytes())).await;
    assert_eq!(next_json(&mut c).await.1["type"], "subscribed");
    // Fragmented: RSV1 on the first frame only, a ping in between.
    let z = deflate::deflate_payload(br#"{"type":"ping"}"#);
    let (first, rest) = z.split_at(z.len() / 2);
    c.send_frame(0x41, first).await;
    c.send_frame(0x89, b"hi").await;
    c.send_frame(0x80, rest).await;
    assert_eq!(next_json(&mut c).await.1, json!({"type":"pong"}));
    gw.stop().await;
}

/// The peak resident size of this process since the last reset, and the
/// current one at the reset.
fn reset_peak() -> u64 {
    std::fs::write("/proc/self/clear_refs", "5").expect("reset VmHWM");
    status_kb("VmRSS")
}

fn status_kb(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':')?.trim().strip_suffix(" kB")?.parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/self/status"))
}

#[tokio::test]
async fn a_deflate_bomb_is_closed_with_1009_before_it_is_inflated() {
    let gw = support::start(support::config()).await;
    // 48 MiB of zeros in under 64 KiB: a message within max_message_size
    // (65536) on the wire, 768 times it inflated.
    let bomb = deflate::deflate_payload(&vec![0u8; 48 << 20]);
    assert!(bomb.len() < 65_536, "{} bytes", bomb.len());
    let mut c = deflating(gw.addr, UserId::new_v4()).await;
    let frame = support::masked_frame(0xC1, &bomb);
    // The node runs in this process: its peak memory while it reads the
    // bomb is this process's.
    let before = reset_peak();
    c.stream.write_all(&frame).await.expect("send the bomb");
    assert_eq!(c.read_close().await, Some(1009));
    let peak = status_kb("VmHWM");
    assert!(peak < before + 16 * 1024, "peak RSS grew by {} KiB while reading the bomb", peak - before);
    gw.stop().await;
}

#[tokio::test]
async fn rsv1_where_compression_is_not_allowed_is_closed_with_1002() {
    let gw = support::start(support::config()).await;
    let token = support::token(UserId::new_v4(), &[]);
    let ping = deflate::deflate_payload(br#"{"type":"ping"}"#);
    // Not negotiated.
    let mut plain = RawClient::connect(gw.addr, &token).await;
    plain.send_frame(0xC1, &ping).await;
    assert_eq!(plain.read_close().await, Some(1002));
    // Negotiated, but on a control frame, or on a continuation.
    let mut control = deflating(gw.addr, UserId::new_v4()).await;
    control.send_frame(0xC9, b"").await;
    assert_eq!(control.read_close().await, Some(1002));
    let mut continuation = deflating(gw.addr, UserId::new_v4()).await;
    continuation.send_frame(0x01, b"{").await;
    continuation.send_frame(0xC0, b"}").await;
    assert_eq!(continuation.read_close().await, Some(1002));
    // Not deflate data at all: 1007, like invalid UTF-8.
    let mut garbage = deflating(gw.addr, UserId::new_v4()).await;
    garbage.send_frame(0xC1, &[0xff; 16]).await;
    assert_eq!(garbage.read_close().await, Some(1007));
    gw.stop().await;
}

/// Runs a client program that prints the negotiated extensions, then each
/// message it receives, one per line; publishes `n` events (runs of three
/// above the threshold between small ones, so most refer to their
/// predecessor in the context the client keeps) once it has subscribed,
/// and checks it received every one, decompressed and in order.
async fn a_real_client_receives_every_event(mut program: tokio::process::Command) {
    let gw = support::start(support::config()).await;
    let chat = ChatId::new_v4();
    let url = gw.ws_url(&support::token(UserId::new_v4(), &[]));
    let (child, mut lines) = support::spawn_deflating_client(&mut program, &[url, chat.to_string()]).await;
    let subscribed = next_line(&mut lines).await;
    assert_eq!(subscribed["type"], "subscribed", "{subscribed}");
    let head = subscribed["seq"].as_u64().expect("seq");
    let n = 20u64;
    for i in 1..=n {
        let data = if i % 4 != 1 { big(i) } else { json!({"n": i}) };
        support::publish(&gw, chat, 1, &data).await;
    }
    for i in 1..=n {
        let event = next_line(&mut lines).await;
        let data = if i % 4 != 1 { big(i) } else { json!({"n": i}) };
        assert_eq!((event["seq"].as_u64(), &event["data"]), (Some(head + i), &data), "event {i}");
    }
    assert_eq!(gw.metric("compression_connections").await, 1.0);
    assert_eq!(gw.metric("compressed_frames_total").await, (n - n / 4) as f64);
    drop(child);
    gw.stop().await;
}

const PYTHON_CLIENT: &str = r#"
import asyncio, json, sys
from websockets.asyncio.client import connect

async def main(url, chat, n):
    # compression="deflate" is the default: stated so the test says what it tests.
    async with connect(url, compression="deflate") as ws:
        print(json.dumps({"extensions": ws.response.headers.get("Sec-WebSocket-Extensions")}), flush=True)
        await ws.send(json.dumps({"type": "subscribe", "chat_id": chat}))
        while True:
            print(await ws.recv(), flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2], 20))
"#;

#[tokio::test]
#[ignore = "needs python3 with websockets (.ci/run installs it)"]
async fn pythons_websockets_client_receives_every_event_decompressed_and_in_order() {
    let mut cmd = tokio::process::Command::new("python3");
    cmd.arg("-c").arg(PYTHON_CLIENT);
    a_real_client_receives_every_event(cmd).await;
}

const NODE_CLIENT: &str = r#"
const WebSocket = require('ws');
const [url, chat] = process.argv.slice(1);
// perMessageDeflate: true is ws's default: stated so the test says what it tests.
const ws = new WebSocket(url, { perMessageDeflate: true });
ws.on('open', () => {
  console.log(JSON.stringify({ extensions: ws.extensions }));
  ws.send(JSON.stringify({ type: 'subscribe', chat_id: chat }));
});
ws.on('message', (data) => console.log(data.toString()));
ws.on('error', (e) => { console.error(e); process.exit(1); });
"#;

#[tokio::test]
#[ignore = "needs node with npm's ws in target/node-ws (.ci/run installs it)"]
async fn nodes_ws_client_receives_every_event_decompressed_and_in_order() {
    let cmd = support::node_ws(NODE_CLIENT);
    a_real_client_receives_every_event(cmd).await;
}

/// Attack review: many small bombs, each within `max_message_size`
/// inflated. A read loop that kept reading while fewer than 64 messages
/// waited held every one of them inflated at once: about 1 KiB on the wire
/// became 1 MiB held, 64 times over, before the first was answered. The
/// messages decoded and not yet answered now hold at most about one
/// `max_message_size` of inflated bytes beyond the message being read.
#[tokio::test]
async fn many_small_bombs_are_not_all_held_inflated_at_once() {
    let mut config = support::config();
    config.websocket.max_message_size = 1 << 20;
    let gw = support::start(config).await;
    let mut c = deflating(gw.addr, UserId::new_v4()).await;
    // A valid command inflating to just under the limit: a ping with a pad.
    let ping = format!(r#"{{"type":"ping","pad":"{}"}}"#, " ".repeat((1 << 20) - 64));
    let z = deflate::deflate_payload(ping.as_bytes());
    assert!(z.len() < 2_048, "{} bytes", z.len());
    // Within the command burst (100): every one is answered.
    let n = 80;
    let stream: Vec<u8> = (0..n).flat_map(|_| support::masked_frame(0xC1, &z)).collect();
    drop(ping);
    let before = reset_peak();
    c.stream.write_all(&stream).await.expect("send the pings");
    for i in 0..n {
        assert_eq!(next_json(&mut c).await.1, json!({"type":"pong"}), "ping {i}");
    }
    let peak = status_kb("VmHWM");
    // 80 MiB inflated in all; 64 of them held at once was 64 MiB.
    assert!(
        peak < before + 16 * 1024,
        "peak RSS grew by {} KiB reading {n} KiB",
        peak - before,
        n = stream.len() / 1024
    );
    gw.stop().await;
}

/// Attack review: a connection that set no `server_max_window_bits` was
/// treated as one with a 2^15-byte limit, so no event over 32 KiB was ever
/// compressed, for anyone. The full window takes any length (it is the
/// compressor's own); only a smaller window the client asked for does not.
#[tokio::test]
async fn events_over_32_kib_are_compressed_unless_the_client_set_a_smaller_window() {
    let gw = support::start(support::config()).await;
    let chat = ChatId::new_v4();
    let mut full = deflating(gw.addr, UserId::new_v4()).await;
    let offer = ["permessage-deflate; server_max_window_bits=15"];
    let (mut fifteen, _) = handshake(gw.addr, &support::token(UserId::new_v4(), &[]), &offer).await;
    let offer = ["permessage-deflate; server_max_window_bits=14"];
    let (mut fourteen, _) = handshake(gw.addr, &support::token(UserId::new_v4(), &[]), &offer).await;
    for c in [&mut full, &mut fifteen, &mut fourteen] {
        subscribe(c, chat, None).await;
    }
    let data = json!({"content": "The quarterly report is attached; see section four. ".repeat(800)});
    support::publish(&gw, chat, 1, &data).await;
    let (first, payload) = next_text_frame(&mut full).await;
    assert_eq!(first, 0x80 | RSV1 | 0x1, "a 40 KiB event goes out compressed");
    let plain = deflate::inflate(payload.clone(), 1 << 20).expect("inflates");
    assert!(plain.len() > 40_000, "{} bytes", plain.len());
    assert_eq!(next_text_frame(&mut fifteen).await, (first, payload), "15 is the full window");
    let (first, payload) = next_text_frame(&mut fourteen).await;
    assert_eq!((first, payload), (0x81, plain), "longer than a 2^14-byte window: plain");
    gw.stop().await;
}

/// Attack review: a compressed twin kept the buffer it was compressed into,
/// sized for the plain payload, so history held every compressed event at
/// twice its plain size, however small deflate made it. A twin now holds
/// what it weighs: a compressing subscriber costs the node about what a
/// plain one does.
#[tokio::test]
async fn a_compressed_twin_holds_its_compressed_size_not_the_plain_one() {
    let gw = support::start(support::config()).await;
    // 2 KiB events that deflate to a few dozen bytes.
    let data = json!({"content": "The quarterly report is attached; see section four. ".repeat(40)});
    // What 100 rooms of 100 events (history_size) cost the node, read by
    // one plain subscriber, then by one that agreed to compression (other
    // rooms, the same events): each holds about 20 MiB of plain frames.
    let mut grown = Vec::new();
    let mut plain = 0;
    for compress in [false, true] {
        let mut c = match compress {
            true => deflating(gw.addr, UserId::new_v4()).await,
            false => RawClient::connect(gw.addr, &support::token(UserId::new_v4(), &[])).await,
        };
        let rooms: Vec<ChatId> = (0..100).map(|_| ChatId::new_v4()).collect();
        for chat in &rooms {
            subscribe(&mut c, *chat, None).await;
        }
        let before = status_kb("VmRSS");
        plain = 0;
        for chat in &rooms {
            support::publish(&gw, *chat, 100, &data).await;
            for _ in 0..100 {
                let (first, payload) = next_text_frame(&mut c).await;
                assert_eq!(first & RSV1 != 0, compress, "compressed only where agreed");
                assert!(!compress || payload.len() < 256, "{} bytes", payload.len());
                plain += data.to_string().len();
            }
        }
        grown.push(status_kb("VmRSS").saturating_sub(before));
    }
    let plain_kb = (plain / 1024) as u64;
    // The twins (under 3 MiB with their pointers) and slack; twins as large
    // as the plain frames were 20 MiB.
    assert!(
        grown[1] < grown[0] + plain_kb / 2,
        "RSS grew by {} KiB with compression, {} KiB without, holding {plain_kb} KiB of frames",
        grown[1],
        grown[0]
    );
    gw.stop().await;
}
