//! Test support: start a real Herald node on 127.0.0.1:0, real WebSocket
//! clients (tokio-tungstenite, independent of Herald's own codec), a small
//! HTTP client, token minting and a metrics reader.
#![allow(dead_code, unreachable_pub)]

pub mod redis;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use herald::config::{Config, Membership};
use herald::protocol::{ChatId, UserId};
use herald::server::{Publisher, Server};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
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
    pub publisher: Publisher,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

pub async fn start(config: Config) -> Gateway {
    config.validate().expect("test config is valid");
    let server = Server::bind(config).await.expect("server binds");
    let addr = server.local_addr();
    let publisher = server.publisher();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.run(shutdown.clone()));
    Gateway { addr, publisher, shutdown, task: Some(task) }
}

pub fn token(user: UserId, chats: &[ChatId]) -> String {
    herald::auth::mint_hs256(SECRET, user, chats, Duration::from_secs(3600))
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
        let (ws, _) = tokio_tungstenite::connect_async(self.ws_url(token)).await.expect("upgrade succeeds");
        Client { ws }
    }

    /// Attempts an upgrade with a custom request; returns the HTTP refusal.
    pub async fn refused(&self, request: tungstenite::handshake::client::Request) -> (u16, Value) {
        match tokio_tungstenite::connect_async(request).await {
            Ok(_) => panic!("upgrade unexpectedly succeeded"),
            Err(tungstenite::Error::Http(resp)) => {
                let body = resp.body().clone().unwrap_or_default();
                (resp.status().as_u16(), serde_json::from_slice(&body).unwrap_or(Value::Null))
            }
            Err(e) => panic!("unexpected error {e}"),
        }
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
        let auth = key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
        self.exchange(&format!(
            "POST /api/events HTTP/1.1\r\nHost: test\r\n{auth}Content-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ))
        .await
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
        let mut stream = TcpStream::connect(self.addr).await.expect("connect");
        stream.write_all(request.as_bytes()).await.expect("write request");
        let mut raw = Vec::new();
        tokio::time::timeout(PATIENCE, stream.read_to_end(&mut raw)).await.expect("response in time").ok();
        let text = String::from_utf8_lossy(&raw).into_owned();
        let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        (status, head.to_string(), body.to_string())
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

    async fn handshake(mut stream: TcpStream, token: &str) -> RawClient {
        let req = format!(
            "GET /ws?token={token} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).await.expect("write handshake");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).await.expect("read handshake");
            head.push(byte[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
        RawClient { stream }
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
