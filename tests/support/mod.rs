//! Test support: start a real Herald node on 127.0.0.1:0, real WebSocket
//! clients (tokio-tungstenite, independent of Herald's own codec), a small
//! HTTP client, token minting, a metrics reader, the helpers several test
//! files share (ids, in-process publishing, reading seqs, a room's position,
//! a stalled reader) and the `herald` binary as a child process.
#![allow(dead_code, unreachable_pub)]

pub mod redis;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use herald::config::{Config, Membership};
use herald::protocol::event::parse_batch;
use herald::protocol::{ChatId, UserId};
use herald::server::{Publisher, Server};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

pub const SECRET: &str = "test-secret-0123456789abcdef";
pub const API_KEY: &str = "test-api-key-0123456789";
/// How long a test waits for something that should happen.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// A configuration for tests: port 0, known secrets, open membership.
pub fn config() -> Config {
    let mut c = Config::default();
    c.server.listen = "127.0.0.1:0".parse().unwrap();
    c.server.shutdown_grace = Duration::from_secs(3);
    c.auth.jwt_secret = Some(SECRET.into());
    c.auth.membership = Membership::Open;
    c.api.keys = vec![API_KEY.into()];
    c
}

/// A running node.
pub struct Gateway {
    pub addr: SocketAddr,
    /// The internal listener (`server.internal_listen`), when configured.
    pub internal: Option<SocketAddr>,
    pub publisher: Publisher,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

pub async fn start(config: Config) -> Gateway {
    config.validate().expect("test config is valid");
    let server = Server::bind(config).await.expect("server binds");
    let (addr, internal) = (server.local_addr(), server.internal_addr());
    let publisher = server.publisher();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.run(shutdown.clone()));
    Gateway { addr, internal, publisher, shutdown, task: Some(task) }
}

pub fn token(user: UserId, chats: &[ChatId]) -> String {
    herald::auth::mint_hs256(SECRET, user, chats, Duration::from_secs(3600))
}

/// A token with an explicit `iat` (`None`: without the claim), valid for an hour.
pub fn token_at(user: UserId, chats: &[ChatId], iat: Option<u64>) -> String {
    let claims =
        herald::auth::Claims { sub: user, exp: herald::auth::now_secs() + 3600, chats: chats.to_vec(), iat };
    let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).expect("HS256 signs")
}

/// `POST <path>` to `addr` with `body` and `key` as the API key (if any);
/// status and JSON reply (`Null` when not JSON).
pub async fn api_post(addr: SocketAddr, path: &str, body: &str, key: Option<&str>) -> (u16, Value) {
    let auth = key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    let (status, _, body) = exchange(
        addr,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: test\r\n{auth}Content-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// A fresh random user id.
pub fn user() -> UserId {
    UserId::new_v4()
}

/// A fresh random chat id.
pub fn chat() -> ChatId {
    ChatId::new_v4()
}

impl Gateway {
    pub fn ws_url(&self, token: &str) -> String {
        format!("ws://{}/ws?token={token}", self.addr)
    }

    /// Connects a user (open membership unless the config says otherwise).
    pub async fn connect(&self, user: UserId, chats: &[ChatId]) -> Client {
        self.connect_token(&token(user, chats)).await
    }

    pub async fn connect_token(&self, token: &str) -> Client {
        Client::connect(self.addr, token).await
    }

    /// Attempts an upgrade with a custom request; returns the HTTP refusal.
    pub async fn refused(&self, request: tungstenite::handshake::client::Request) -> (u16, Value) {
        refusal(request).await.unwrap_or_else(|| panic!("upgrade unexpectedly succeeded"))
    }

    /// POSTs a publish body with the test API key.
    pub async fn publish(&self, body: &str) -> (u16, Value) {
        self.publish_with_key(body, Some(API_KEY)).await
    }

    pub async fn publish_with_key(&self, body: &str, key: Option<&str>) -> (u16, Value) {
        let (status, _, body) = self.post_events(body, key).await;
        (status, serde_json::from_str(&body).unwrap_or(Value::Null))
    }

    /// POSTs a publish body; returns status, response head and body.
    pub async fn post_events(&self, body: &str, key: Option<&str>) -> (u16, String, String) {
        post_events(self.addr, body, key).await
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        self.http(&format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")).await
    }

    /// Sends a raw HTTP/1.1 request and returns status and body.
    pub async fn http(&self, request: &str) -> (u16, String) {
        let (status, _, body) = self.exchange(request).await;
        (status, body)
    }

    /// Sends a raw HTTP/1.1 request; returns status, response head and body.
    pub async fn exchange(&self, request: &str) -> (u16, String, String) {
        exchange(self.addr, request).await
    }

    /// Reads one unlabelled metric (`herald_<name>`) from `/metrics`.
    pub async fn metric(&self, name: &str) -> f64 {
        self.sample(&format!("herald_{name} ")).await
    }

    /// Reads one labelled sample, e.g. `herald_closes_total{code="4001"}`.
    pub async fn labelled(&self, name: &str, label: &str, value: &str) -> f64 {
        self.sample(&format!("herald_{name}{{{label}=\"{value}\"}} ")).await
    }

    async fn sample(&self, prefix: &str) -> f64 {
        let (_, text) = self.get("/metrics").await;
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("metric {prefix} not found in:\n{text}"))
    }

    /// Waits until a metric reaches `want`.
    pub async fn wait_metric(&self, name: &str, want: f64) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let got = self.metric(name).await;
            if got == want {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "metric {name} stayed {got}, wanted {want}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Graceful shutdown; waits for the node to finish draining.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(PATIENCE, task).await.expect("drains in time").expect("server task");
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A WebSocket test client.
pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Client {
    /// Connects to the node at `addr` (e.g. one started as a process) with `token`.
    pub async fn connect(addr: SocketAddr, token: &str) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws?token={token}"))
            .await
            .expect("upgrade succeeds");
        Client { ws }
    }

    pub async fn send(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.expect("send");
    }

    pub async fn send_json(&mut self, v: Value) {
        self.send(&v.to_string()).await;
    }

    /// Next text message as JSON, skipping pings; panics on close or timeout.
    pub async fn recv(&mut self) -> Value {
        serde_json::from_str(&self.recv_text().await).expect("server sends JSON")
    }

    pub async fn recv_text(&mut self) -> String {
        loop {
            let msg = tokio::time::timeout(PATIENCE, self.ws.next())
                .await
                .expect("message in time")
                .expect("stream open")
                .expect("valid frame");
            match msg {
                Message::Text(t) => return t.to_string(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected text, got {other:?}"),
            }
        }
    }

    /// Subscribes and waits for the `subscribed` reply; returns the room's
    /// position (`seq`) it carries.
    pub async fn subscribe(&mut self, chat: ChatId) -> u64 {
        self.send_json(serde_json::json!({"type":"subscribe","chat_id":chat})).await;
        let reply = self.recv().await;
        let seq = reply["seq"].as_u64().unwrap_or_else(|| panic!("subscribed without seq: {reply}"));
        assert_eq!(reply, serde_json::json!({"type":"subscribed","chat_id":chat,"seq":seq}));
        seq
    }

    /// Subscribes with `since`; returns the room's position and whether the
    /// server recovered (its `recovered` field).
    pub async fn subscribe_since(&mut self, chat: ChatId, since: u64) -> (u64, bool) {
        self.send_json(serde_json::json!({"type":"subscribe","chat_id":chat,"since":since})).await;
        let reply = self.recv().await;
        assert_eq!(reply["type"], "subscribed", "{reply}");
        assert_eq!(reply["chat_id"], chat.to_string(), "{reply}");
        let seq = reply["seq"].as_u64().unwrap_or_else(|| panic!("subscribed without seq: {reply}"));
        let recovered = reply["recovered"].as_bool().unwrap_or_else(|| panic!("no recovered: {reply}"));
        (seq, recovered)
    }

    /// Proves that nothing else is on its way to this client: publishes two
    /// marker events, one after the other has arrived, to `marker_room`
    /// (which the client must be subscribed to), and asserts that nothing but
    /// the markers arrived. Anything the node had queued for this client
    /// before the first marker (in any room or its mailbox) is written no
    /// later than that marker's write, so before the second marker.
    pub async fn expect_nothing_else(&mut self, gw: &Gateway, marker_room: ChatId) {
        for n in 0..2 {
            let marker = serde_json::json!({"marker": n});
            let (status, _) = gw.publish(&message_sent(marker_room, &marker)).await;
            assert_eq!(status, 202, "marker published");
            let got = self.recv().await;
            assert_eq!(
                (&got["chat_id"], &got["data"]),
                (&Value::String(marker_room.to_string()), &marker),
                "expected nothing before marker {n}, got {got}"
            );
        }
    }

    /// Reads until the server's close frame; returns its code (None if the
    /// connection ended without one). Data frames before it are counted.
    pub async fn closed(&mut self) -> (Option<u16>, usize) {
        let mut seen = 0;
        loop {
            match tokio::time::timeout(PATIENCE * 3, self.ws.next()).await.expect("close in time") {
                Some(Ok(Message::Close(frame))) => return (frame.map(|f| u16::from(f.code)), seen),
                Some(Ok(Message::Text(_) | Message::Binary(_))) => seen += 1,
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return (None, seen),
            }
        }
    }
}

/// Sends a raw HTTP/1.1 request to `addr`; returns status, response head
/// and body (an error after the response, a reset, keeps what was read).
pub async fn exchange(addr: SocketAddr, request: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write request");
    let mut raw = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut raw)).await.expect("response in time").ok();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status, head.to_string(), body.to_string())
}

/// POSTs a publish body to `addr` (with `key` as the API key, if any);
/// returns status, response head and body.
pub async fn post_events(addr: SocketAddr, body: &str, key: Option<&str>) -> (u16, String, String) {
    let auth = key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    exchange(
        addr,
        &format!(
            "POST /api/events HTTP/1.1\r\nHost: test\r\n{auth}Content-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .await
}

/// `POST /api/events` to any address (a node started as a process) with an
/// API key; status and JSON reply.
pub async fn publish_to(addr: SocketAddr, key: &str, body: &str) -> (u16, Value) {
    let (status, _, body) = post_events(addr, body, Some(key)).await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// Attempts an upgrade: `None` if it succeeded, else the HTTP status and
/// JSON body (`Null` if the body is not JSON).
pub async fn refusal(request: impl IntoClientRequest + Unpin) -> Option<(u16, Value)> {
    match tokio_tungstenite::connect_async(request).await {
        Ok(_) => None,
        Err(tungstenite::Error::Http(resp)) => {
            let body = resp.body().as_deref().unwrap_or_default();
            Some((resp.status().as_u16(), serde_json::from_slice(body).unwrap_or(Value::Null)))
        }
        Err(e) => panic!("unexpected error {e}"),
    }
}

/// Publishes `n` events to `chat` through the in-process publisher.
pub async fn publish(gw: &Gateway, chat: ChatId, n: usize, data: &Value) {
    for _ in 0..n {
        let events = parse_batch(message_sent(chat, data).as_bytes()).expect("valid event");
        gw.publisher.publish(events).await.expect("published");
    }
}

/// Reads room events until `last`; returns their seqs.
pub async fn seqs_until(c: &mut Client, last: u64) -> Vec<u64> {
    let mut seqs = Vec::new();
    while seqs.last() != Some(&last) {
        let v = c.recv().await;
        seqs.push(v["seq"].as_u64().unwrap_or_else(|| panic!("expected a room event, got {v}")));
    }
    seqs
}

/// The room's position, as a subscriber without `since` on the node at
/// `addr` is told it; the subscriber leaves again at once, so the room keeps
/// no subscriber of it. Its token names `chat` (for `membership: token`).
pub async fn position(addr: SocketAddr, chat: ChatId) -> u64 {
    position_from(addr, chat, None).await
}

/// [`position`], the probe's upgrade carrying `origin` when given (a node
/// with `allowed_origins` refuses one without).
pub async fn position_from(addr: SocketAddr, chat: ChatId, origin: Option<&str>) -> u64 {
    let url = format!("ws://{addr}/ws?token={}", token(user(), &[chat]));
    let mut request = url.into_client_request().expect("a valid request");
    if let Some(origin) = origin {
        request.headers_mut().insert("Origin", origin.parse().expect("a valid header"));
    }
    let (ws, _) = tokio_tungstenite::connect_async(request).await.expect("upgrade succeeds");
    let mut probe = Client { ws };
    let head = probe.subscribe(chat).await;
    probe.send_json(json!({"type":"unsubscribe","chat_id":chat})).await;
    assert_eq!(probe.recv().await, json!({"type":"unsubscribed","chat_id":chat}));
    probe.ws.close(None).await.ok();
    head
}

/// A raw reader subscribed to `room` that reads nothing more until told:
/// its 4 KB receive buffer fills at once. Returns it with the room's
/// position its `subscribed` reply carried.
pub async fn stalled_reader(gw: &Gateway, room: ChatId) -> (RawClient, u64) {
    let mut reader = RawClient::connect_small(gw.addr, &token(user(), &[]), 4096).await;
    reader.send_frame(0x81, json!({"type":"subscribe","chat_id":room}).to_string().as_bytes()).await;
    let reply = reader.read_json().await.expect("subscribed");
    assert_eq!(reply["type"], "subscribed", "{reply}");
    let head = reply["seq"].as_u64().unwrap_or_else(|| panic!("subscribed without seq: {reply}"));
    (reader, head)
}

/// One publish of `n` events of about `size` bytes each to `room`.
pub fn batch(room: ChatId, n: usize, size: usize) -> String {
    let blob = "b".repeat(size);
    let events: Vec<Value> =
        (0..n).map(|_| json!({"type":"message.sent","chat_id":room,"data":{"blob":blob}})).collect();
    Value::Array(events).to_string()
}

/// Reads `count` room events and checks they are seq `head + 1..=head + count` in order.
pub async fn read_events(reader: &mut RawClient, head: u64, count: u64) {
    for want in head + 1..=head + count {
        let event = reader.read_json().await.expect("an event, not a close");
        assert_eq!(event["seq"].as_u64(), Some(want), "{}", event["type"]);
    }
}

/// Posts `body` to `gw` up to `attempts` times, `pause` apart (none when zero), until the node
/// pushes back with 429; any other status than 202 fails the test. Returns how many events were
/// accepted before that, and the refusal's head and body if it came.
pub async fn post_until_pushed_back(
    gw: &Gateway,
    body: &str,
    attempts: usize,
    pause: Duration,
) -> (u64, Option<(String, String)>) {
    let mut accepted = 0;
    for _ in 0..attempts {
        let (status, head, reply) = gw.post_events(body, Some(API_KEY)).await;
        match status {
            202 => {
                accepted +=
                    serde_json::from_str::<Value>(&reply).expect("JSON")["accepted"].as_u64().unwrap_or(0)
            }
            429 => return (accepted, Some((head, reply))),
            other => panic!("unexpected {other}: {reply}"),
        }
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
    (accepted, None)
}

/// A close code as tungstenite names it, for messages.
pub fn code(c: u16) -> CloseCode {
    CloseCode::from(c)
}

/// A `message.sent` publish body for `chat` with `data`.
pub fn message_sent(chat: ChatId, data: &Value) -> String {
    serde_json::json!({"type":"message.sent","chat_id":chat,"data":data}).to_string()
}

/// A hand-driven WebSocket client for what a well-behaved library will not
/// send: silence, unmasked or fragmented frames, raw bytes.
pub struct RawClient {
    pub stream: TcpStream,
}

impl RawClient {
    pub async fn connect(addr: SocketAddr, token: &str) -> RawClient {
        RawClient::handshake(TcpStream::connect(addr).await.expect("connect"), token).await
    }

    /// Connects with a small socket receive buffer: a reader the server can
    /// stall by writing more than that while the client does not read.
    pub async fn connect_small(addr: SocketAddr, token: &str, recv_buffer: u32) -> RawClient {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(recv_buffer).expect("SO_RCVBUF");
        RawClient::handshake(socket.connect(addr).await.expect("connect"), token).await
    }

    async fn handshake(stream: TcpStream, token: &str) -> RawClient {
        let (client, head) = RawClient::handshake_with(stream, token, "").await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        client
    }

    /// Sends the upgrade request with `extra` header lines (each ending in
    /// CRLF) and reads the answer's head, whatever its status.
    pub async fn handshake_with(mut stream: TcpStream, token: &str, extra: &str) -> (RawClient, String) {
        let req = format!(
            "GET /ws?token={token} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        );
        stream.write_all(req.as_bytes()).await.expect("write handshake");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).await.expect("read handshake");
            head.push(byte[0]);
        }
        (RawClient { stream }, String::from_utf8_lossy(&head).into_owned())
    }

    /// Sends one masked frame with the given first header byte.
    pub async fn send_frame(&mut self, first: u8, payload: &[u8]) {
        self.stream.write_all(&masked_frame(first, payload)).await.expect("send frame");
    }

    /// Reads one server frame: (first header byte, payload).
    pub async fn read_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        let mut head = [0u8; 2];
        tokio::time::timeout(PATIENCE, self.stream.read_exact(&mut head))
            .await
            .expect("frame in time")
            .ok()?;
        let len = match head[1] & 0x7f {
            126 => {
                let mut n = [0u8; 2];
                self.stream.read_exact(&mut n).await.ok()?;
                u16::from_be_bytes(n) as usize
            }
            127 => {
                let mut n = [0u8; 8];
                self.stream.read_exact(&mut n).await.ok()?;
                u64::from_be_bytes(n) as usize
            }
            n => n as usize,
        };
        let mut payload = vec![0u8; len];
        self.stream.read_exact(&mut payload).await.ok()?;
        Some((head[0], payload))
    }

    /// Reads one text frame as JSON; None at a close frame or the end.
    pub async fn read_json(&mut self) -> Option<Value> {
        loop {
            let (first, payload) = self.read_frame().await?;
            match first & 0x0f {
                0x1 => return Some(serde_json::from_slice(&payload).expect("text frames are JSON")),
                0x8 => return None,
                _ => {}
            }
        }
    }

    /// Reads frames until a close frame; returns its code.
    pub async fn read_close(&mut self) -> Option<u16> {
        loop {
            let (first, payload) = self.read_frame().await?;
            if first & 0x0f == 0x8 {
                return (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
            }
        }
    }

    /// True once the server has closed the TCP connection (EOF or reset).
    pub async fn wait_eof(&mut self, within: Duration) -> bool {
        let mut buf = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut buf)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
            }
        }
    }
}

/// A client frame: masked, as RFC 6455 requires.
pub fn masked_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    herald::protocol::frame::masked(first, payload, [0x37, 0xfa, 0x21, 0x3d])
}

// ---- the `herald` binary as a child process ---------------------------------

/// The `herald` binary with a clean environment: only what a test sets.
pub fn herald() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
    cmd.env_clear().stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    cmd
}

/// Runs a command to completion: (success, stdout, stderr).
pub async fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = tokio::time::timeout(PATIENCE, cmd.output()).await.expect("exits in time").expect("runs");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

/// A loopback address nobody listens on (a moment ago).
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr")
}

/// The value printed after `label` on a line of `output` (a banner), if any.
pub fn printed(output: &str, label: &str) -> Option<String> {
    output.lines().find_map(|l| l.trim_start().strip_prefix(label)).map(|v| v.trim().to_string())
}

/// Waits until a child node answers `/healthz` with 200 and `{"status":"ok"}`;
/// panics with its stderr if it exits first.
pub async fn wait_healthy(child: &mut Child, addr: SocketAddr) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(status) = child.try_wait().expect("child status") {
            let mut err = String::new();
            child.stderr.take().expect("stderr").read_to_string(&mut err).await.ok();
            panic!("herald exited early with {status}: {err}");
        }
        // A port can answer before the node serves it (or another process can hold it a
        // moment): keep asking until the answer is right or the patience runs out.
        let mut last = None;
        if TcpStream::connect(addr).await.is_ok() {
            let (status, _, body) =
                exchange(addr, "GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").await;
            let got = (status, serde_json::from_str::<Value>(&body).ok());
            if got == (200, Some(json!({"status":"ok"}))) {
                return;
            }
            last = Some(got);
        }
        assert!(tokio::time::Instant::now() < deadline, "herald did not start serving on {addr}: {last:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `node -e script` with npm's `ws` on its module path (`.ci/run` installs it into
/// `target/node-ws`); the real Node client the compression tests run.
pub fn node_ws(script: &str) -> tokio::process::Command {
    let modules = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/node-ws/node_modules");
    assert!(modules.join("ws").exists(), "npm install --prefix target/node-ws ws@8 (see .ci/run)");
    let mut cmd = tokio::process::Command::new("node");
    cmd.env("NODE_PATH", modules).arg("-e").arg(script);
    cmd
}

/// A client program's stdout, one JSON value per line.
pub type ClientLines = tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>;

/// Starts a real client program (`node -e`, `python3 -c`) with `args`. It prints the negotiated
/// extensions first, which must be permessage-deflate with the server's context kept, then one
/// line per message it receives.
pub async fn spawn_deflating_client(
    program: &mut tokio::process::Command,
    args: &[String],
) -> (tokio::process::Child, ClientLines) {
    use tokio::io::AsyncBufReadExt;
    let mut child = program
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start the client program");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let hello = next_line(&mut lines).await;
    let extensions = hello["extensions"].as_str().unwrap_or_default().to_string();
    assert!(extensions.starts_with("permessage-deflate"), "negotiated: {hello}");
    assert!(!extensions.contains("server_no_context_takeover"), "context kept: {hello}");
    (child, lines)
}

/// The client program's next line, within [`PATIENCE`].
pub async fn next_line(lines: &mut ClientLines) -> Value {
    let line = tokio::time::timeout(PATIENCE, lines.next_line()).await.expect("a line in time");
    let line = line.expect("read stdout").expect("the client is still running (it closed on a bad frame?)");
    serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line:.200}"))
}
