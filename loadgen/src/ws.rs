//! One WebSocket client connection over a plain `TcpStream`: the upgrade handshake, subscribing,
//! and a reusable read buffer parsed frame by frame. Pings are answered with masked pongs.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context as _};
use base64::Engine as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};
use uuid::Uuid;

use crate::deflate;
use crate::frame::{self, Parsed, OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT};
use crate::msg::{self, ServerMsg, Subscribed};
use crate::target::Target;

/// Largest message the client accepts; Herald's frames are far smaller.
const MAX_PAYLOAD: usize = 4 << 20;
/// Largest HTTP response head accepted during the handshake.
const MAX_HANDSHAKE: usize = 16 << 10;
/// How long to wait for the server's close reply when we end a connection.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// What one parsed frame means to the caller; pings and pongs are handled inside.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Incoming<'a> {
    Text(&'a [u8]),
    Binary,
    Close(u16),
    /// A compressed text message left uninflated by [`WsClient::sample_inflation`]: its bytes
    /// were read and counted, its content is unknown.
    Uninflated,
}

/// A connected, upgraded client socket with its buffers.
pub(crate) struct WsClient {
    stream: TcpStream,
    /// Received bytes; `buf[start..end]` is not parsed yet.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Length of the frame at `start` once its header is known and it is incomplete.
    need: Option<usize>,
    /// Fragments of a data message in progress (empty almost always).
    frag: Vec<u8>,
    frag_active: bool,
    /// The message in `frag` is compressed.
    frag_compressed: bool,
    /// The handshake agreed to permessage-deflate.
    compressed: bool,
    /// The inflate window kept across messages when the server keeps its
    /// context (it did not answer `server_no_context_takeover`): about
    /// 40 KiB per connection, as in any client that keeps it.
    window: Option<Box<flate2::Decompress>>,
    /// The last compressed message, inflated (empty unless compression was agreed).
    inflated: Vec<u8>,
    /// Inflate one compressed text message in this many (1: all of them).
    inflate_every: u64,
    /// Unfragmented compressed text messages seen, to pick the sampled ones.
    compressed_seen: u64,
    /// Frames queued for sending (pongs, close); written by [`WsClient::flush_out`].
    out: Vec<u8>,
    /// Server pings answered since the last [`WsClient::take_pings`].
    pings: u64,
    /// Every `subscribe` asks for presence events (`--presence`).
    pub(crate) presence: bool,
}

impl WsClient {
    /// Opens TCP (bound to `source` when given, with SO_RCVBUF `recv_buffer` when given, set
    /// before connecting so the advertised window honours it), upgrades `GET /ws?token=...`, and
    /// checks for 101. With `mss`, the socket advertises that MSS (TCP_MAXSEG): the server's
    /// kernel sizes its send buffer for this socket by it, so a small one makes the server's own
    /// queue meet a reader that does not keep up within seconds, not after megabytes.
    pub(crate) async fn connect(
        target: &Target,
        source: Option<IpAddr>,
        token: &str,
        buf_size: usize,
        recv_buffer: Option<u32>,
        mss: Option<u32>,
    ) -> anyhow::Result<WsClient> {
        let domain = if target.addr.is_ipv4() { socket2::Domain::IPV4 } else { socket2::Domain::IPV6 };
        let raw = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))
            .context("socket")?;
        if let Some(mss) = mss {
            raw.set_tcp_mss(mss).context("TCP_MAXSEG")?;
        }
        raw.set_nonblocking(true).context("O_NONBLOCK")?;
        let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(raw));
        if let Some(bytes) = recv_buffer {
            socket.set_recv_buffer_size(bytes).context("SO_RCVBUF")?;
        }
        if let Some(ip) = source {
            socket.bind(SocketAddr::new(ip, 0)).with_context(|| format!("bind to source {ip}"))?;
        }
        let mut stream = socket.connect(target.addr).await.context("tcp connect")?;
        stream.set_nodelay(true).context("TCP_NODELAY")?;

        let mut key = [0u8; 16];
        getrandom::fill(&mut key).map_err(|e| anyhow::anyhow!("random key: {e}"))?;
        let key = base64::engine::general_purpose::STANDARD.encode(key);
        let offer = if deflate::enabled() {
            format!("Sec-WebSocket-Extensions: {}\r\n", deflate::offer())
        } else {
            String::new()
        };
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n",
            target.ws_path(token),
            target.host
        );
        stream.write_all(request.as_bytes()).await.context("sending upgrade request")?;

        let mut buf = vec![0u8; buf_size.max(1024)];
        let mut end = 0;
        let head_len = loop {
            if let Some(i) = memchr::memmem::find(&buf[..end], b"\r\n\r\n") {
                break i + 4;
            }
            if end == buf.len() {
                if buf.len() >= MAX_HANDSHAKE {
                    bail!("handshake: response head too large");
                }
                buf.resize(buf.len() * 2, 0);
            }
            let n = stream.read(&mut buf[end..]).await.context("handshake read")?;
            if n == 0 {
                bail!("handshake: server closed before answering");
            }
            end += n;
        };
        let status = handshake_status(&buf[..head_len]).context("handshake: malformed status line")?;
        if status != 101 {
            bail!("handshake: HTTP {status}");
        }
        deflate::count(end);
        let head = String::from_utf8_lossy(&buf[..head_len]).to_ascii_lowercase();
        let extensions = head.lines().find(|l| l.starts_with("sec-websocket-extensions: permessage-deflate"));
        let compressed = extensions.is_some();
        let window = extensions
            .filter(|e| !e.contains("server_no_context_takeover"))
            .map(|_| Box::new(flate2::Decompress::new(false)));
        Ok(WsClient {
            stream,
            buf,
            start: head_len,
            end,
            need: None,
            frag: Vec::new(),
            frag_active: false,
            frag_compressed: false,
            compressed,
            window,
            inflated: Vec::new(),
            inflate_every: 1,
            compressed_seen: 0,
            out: Vec::new(),
            pings: 0,
            presence: false,
        })
    }

    /// Queues a masked text frame; call [`WsClient::flush_out`] to send it.
    pub(crate) fn queue_text(&mut self, text: &[u8]) {
        self.queue_frame(OP_TEXT, text);
    }

    /// Queues `subscribe` to `chat` (resuming after `since` when given); the answer comes later.
    pub(crate) fn queue_subscribe(&mut self, chat: &Uuid, since: Option<u64>) {
        let presence = if self.presence { r#","presence":true"# } else { "" };
        let text = match since {
            Some(n) => format!(r#"{{"type":"subscribe","chat_id":"{chat}","since":{n}{presence}}}"#),
            None => format!(r#"{{"type":"subscribe","chat_id":"{chat}"{presence}}}"#),
        };
        self.queue_text(text.as_bytes());
    }

    /// Queues `typing` in `chat` (the room's id as the server writes it), and counts it.
    pub(crate) fn queue_typing(&mut self, chat: &str) {
        self.queue_text(format!(r#"{{"type":"typing","chat_id":"{chat}"}}"#).as_bytes());
        crate::msg::TYPING_SENT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Queues `unsubscribe` from `chat`.
    pub(crate) fn queue_unsubscribe(&mut self, chat: &Uuid) {
        self.queue_text(format!(r#"{{"type":"unsubscribe","chat_id":"{chat}"}}"#).as_bytes());
    }

    /// Queues a masked frame of any opcode, as an abusive client would send it: `payload` is not
    /// checked (a text frame need not be UTF-8, a ping may be repeated without end).
    pub(crate) fn queue_frame(&mut self, opcode: u8, payload: &[u8]) {
        frame::encode_masked(opcode, payload, frame::new_mask(), &mut self.out);
    }

    /// Reads at most `max` more bytes (a reader that trickles); returns 0 at end of stream.
    pub(crate) async fn fill_at_most(&mut self, max: usize) -> std::io::Result<usize> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.buf.len() - self.end < max {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            let size = (self.end + max).max(self.buf.len()).max(self.need.unwrap_or(0));
            self.buf.resize(size, 0);
        }
        let n = self.stream.read(&mut self.buf[self.end..self.end + max]).await?;
        deflate::count(n);
        self.end += n;
        Ok(n)
    }

    /// Writes queued frames.
    pub(crate) async fn flush_out(&mut self) -> std::io::Result<()> {
        if !self.out.is_empty() {
            self.stream.write_all(&self.out).await?;
            self.out.clear();
        }
        Ok(())
    }

    /// Subscribes to `chat` (resuming after `since` when given) and waits for `subscribed`. Other
    /// frames before it are ignored; frames after it (a recovery replay) stay buffered for
    /// [`WsClient::next_incoming`].
    pub(crate) async fn subscribe(&mut self, chat: &Uuid, since: Option<u64>) -> anyhow::Result<Subscribed> {
        self.queue_subscribe(chat, since);
        self.flush_out().await.context("subscribe: write")?;
        loop {
            while let Some(incoming) = self.next_incoming().context("subscribe")? {
                match incoming {
                    Incoming::Text(p) => match msg::classify(p) {
                        ServerMsg::Subscribed(answer) => return Ok(answer),
                        ServerMsg::Error(code) => bail!("subscribe refused: {}", msg::lossy(code)),
                        _ => {}
                    },
                    Incoming::Binary | Incoming::Uninflated => {}
                    Incoming::Close(code) => bail!("subscribe: server closed with {code}"),
                }
            }
            self.flush_out().await.context("subscribe: write")?;
            if self.fill().await.context("subscribe: read")? == 0 {
                bail!("subscribe: server closed the connection");
            }
        }
    }

    /// Reads more bytes into the buffer (cancel-safe: a cancelled read loses nothing).
    /// Returns 0 at end of stream.
    pub(crate) async fn fill(&mut self) -> std::io::Result<usize> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        let want = self.need.unwrap_or(0);
        if self.end == self.buf.len() || self.start + want > self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.end == self.buf.len() || want > self.buf.len() {
                let size = (self.buf.len() * 2).max(want);
                self.buf.resize(size, 0);
            }
        }
        let n = self.stream.read(&mut self.buf[self.end..]).await?;
        deflate::count(n);
        self.end += n;
        Ok(n)
    }

    /// From now on inflate only the first of every `every` unfragmented compressed text messages
    /// and hand the others back as [`Incoming::Uninflated`] (counted, not read): a load generator
    /// that inflates every delivery on the server's cores slows its reading, and with it the
    /// server's batching, so a compressed run would measure the client's inflation.
    pub(crate) fn sample_inflation(&mut self, every: u32) {
        // With the context kept every compressed message must be inflated,
        // or the window would miss what later ones refer to (loadgen asks
        // for `server_no_context_takeover` when sampling; a server that
        // keeps its context anyway gets every message inflated).
        if self.window.is_some() {
            return;
        }
        self.inflate_every = u64::from(every.max(1));
        self.compressed_seen = 0;
    }

    /// The next frame already in the buffer, or `None` when more bytes are needed. Pings queue a
    /// pong in the out buffer; pongs are dropped; fragments are reassembled.
    pub(crate) fn next_incoming(&mut self) -> Result<Option<Incoming<'_>>, frame::FrameError> {
        loop {
            let header = match frame::parse(&self.buf[self.start..self.end], MAX_PAYLOAD)? {
                Parsed::Frame(h) => h,
                Parsed::Incomplete { need } => {
                    self.need = need;
                    return Ok(None);
                }
            };
            self.need = None;
            let payload = self.start + header.header_len..self.start + header.frame_len();
            self.start += header.frame_len();
            if header.rsv1 && (!self.compressed || header.opcode == OP_CONT) {
                return Err(frame::FrameError::ReservedBits);
            }
            match header.opcode {
                OP_PING => {
                    self.pings += 1;
                    frame::encode_masked(OP_PONG, &self.buf[payload], frame::new_mask(), &mut self.out);
                }
                OP_PONG => {}
                OP_CLOSE => return Ok(Some(Incoming::Close(frame::close_code(&self.buf[payload])))),
                OP_TEXT if header.fin && header.rsv1 => {
                    self.compressed_seen += 1;
                    if (self.compressed_seen - 1) % self.inflate_every != 0 {
                        return Ok(Some(Incoming::Uninflated));
                    }
                    let window = self.window.as_deref_mut();
                    if !deflate::inflate(window, &self.buf[payload], MAX_PAYLOAD, &mut self.inflated) {
                        return Err(frame::FrameError::TooLarge(MAX_PAYLOAD as u64 + 1));
                    }
                    return Ok(Some(Incoming::Text(&self.inflated)));
                }
                OP_TEXT if header.fin => return Ok(Some(Incoming::Text(&self.buf[payload]))),
                OP_BINARY if header.fin => return Ok(Some(Incoming::Binary)),
                OP_TEXT | OP_BINARY => {
                    self.frag.clear();
                    self.frag.extend_from_slice(&self.buf[payload]);
                    self.frag_active = header.opcode == OP_TEXT;
                    self.frag_compressed = header.rsv1;
                }
                _ => {
                    // OP_CONT: parse() admits no other opcode.
                    debug_assert_eq!(header.opcode, OP_CONT);
                    if self.frag.len() + payload.len() > MAX_PAYLOAD {
                        return Err(frame::FrameError::TooLarge((self.frag.len() + payload.len()) as u64));
                    }
                    self.frag.extend_from_slice(&self.buf[payload]);
                    if header.fin && self.frag_active && self.frag_compressed {
                        let window = self.window.as_deref_mut();
                        if !deflate::inflate(window, &self.frag, MAX_PAYLOAD, &mut self.inflated) {
                            return Err(frame::FrameError::TooLarge(MAX_PAYLOAD as u64 + 1));
                        }
                        return Ok(Some(Incoming::Text(&self.inflated)));
                    }
                    if header.fin {
                        return Ok(Some(if self.frag_active {
                            Incoming::Text(&self.frag)
                        } else {
                            Incoming::Binary
                        }));
                    }
                }
            }
        }
    }

    /// Starts the closing handshake with 1000 and waits briefly for the server's close or EOF.
    pub(crate) async fn close(mut self) {
        frame::encode_masked(OP_CLOSE, &1000u16.to_be_bytes(), frame::new_mask(), &mut self.out);
        let _ = tokio::time::timeout(CLOSE_WAIT, async {
            if self.flush_out().await.is_err() {
                return;
            }
            loop {
                loop {
                    match self.next_incoming() {
                        Ok(Some(Incoming::Close(_))) | Err(_) => return,
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                    }
                }
                if !matches!(self.fill().await, Ok(n) if n > 0) {
                    return;
                }
            }
        })
        .await;
    }

    /// Echoes the server's close (RFC 6455, 5.5.1) without waiting for anything.
    pub(crate) async fn answer_close(mut self, code: u16) {
        frame::encode_masked(OP_CLOSE, &code.to_be_bytes(), frame::new_mask(), &mut self.out);
        let _ = tokio::time::timeout(CLOSE_WAIT, self.flush_out()).await;
    }

    /// Server pings answered since the last call.
    pub(crate) fn take_pings(&mut self) -> u64 {
        std::mem::take(&mut self.pings)
    }

    /// Whether frames are waiting to be written.
    pub(crate) fn has_output(&self) -> bool {
        !self.out.is_empty()
    }
}

/// The status code of an HTTP/1.x response head.
fn handshake_status(head: &[u8]) -> Option<u16> {
    let line = head.split(|b| *b == b'\n').next()?;
    let mut parts = line.split(|b| *b == b' ');
    let version = parts.next()?;
    if !version.starts_with(b"HTTP/1.") {
        return None;
    }
    std::str::from_utf8(parts.next()?).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn status_lines() {
        assert_eq!(handshake_status(b"HTTP/1.1 101 Switching Protocols\r\n\r\n"), Some(101));
        assert_eq!(handshake_status(b"HTTP/1.1 401 Unauthorized\r\nx: y\r\n\r\n"), Some(401));
        assert_eq!(handshake_status(b"SSH-2.0\r\n\r\n"), None);
    }

    /// A fake server: answers the upgrade, then writes `script` in small pieces.
    async fn fake_server(script: Vec<u8>) -> (Target, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                s.read_exact(&mut byte).await.expect("request");
                head.push(byte[0]);
            }
            let mut reply = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n".to_vec();
            reply.extend_from_slice(&script);
            for chunk in reply.chunks(7) {
                s.write_all(chunk).await.expect("write");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let mut rest = Vec::new();
            let _ = tokio::time::timeout(Duration::from_millis(300), s.read_to_end(&mut rest)).await;
            head.extend_from_slice(&rest);
            head
        });
        (Target { addr, host: addr.to_string(), prefix: String::new() }, task)
    }

    fn server_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
        if payload.len() < 126 {
            out.push(payload.len() as u8);
        } else {
            out.push(126);
            out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        out.extend_from_slice(payload);
        out
    }

    #[tokio::test]
    async fn reads_frames_across_partial_reads_and_answers_pings() {
        let big = vec![b'z'; 3000];
        let mut script = server_frame(true, OP_TEXT, br#"{"type":"subscribed","chat_id":"c"}"#);
        script.extend(server_frame(true, OP_PING, b"p1"));
        script.extend(server_frame(false, OP_TEXT, b"hel"));
        script.extend(server_frame(true, OP_PONG, b""));
        script.extend(server_frame(true, OP_CONT, b"lo"));
        script.extend(server_frame(true, OP_TEXT, &big));
        script.extend(server_frame(true, OP_CLOSE, &4008u16.to_be_bytes()));
        let (target, server) = fake_server(script).await;

        let mut c = WsClient::connect(&target, None, "tok", 64, None, None).await.expect("connect");
        c.subscribe(&Uuid::nil(), None).await.expect("subscribed");
        let mut texts = Vec::new();
        let code = 'outer: loop {
            while let Some(inc) = c.next_incoming().expect("valid frames") {
                match inc {
                    Incoming::Text(t) => texts.push(t.to_vec()),
                    Incoming::Binary | Incoming::Uninflated => {}
                    Incoming::Close(code) => break 'outer code,
                }
            }
            c.flush_out().await.expect("pong written");
            assert!(c.fill().await.expect("read") > 0, "server still sending");
        };
        assert_eq!(code, 4008);
        assert_eq!(texts, vec![b"hello".to_vec(), big]);
        c.answer_close(code).await;

        let sent = server.await.expect("server task");
        assert!(sent.starts_with(b"GET /ws?token=tok HTTP/1.1\r\n"));
        let text = String::from_utf8_lossy(&sent);
        assert!(text.contains("Sec-WebSocket-Version: 13"));
        // After the request head: masked subscribe, masked pong "p1", masked close 4008.
        let frames = &sent[sent.windows(4).position(|w| w == b"\r\n\r\n").expect("head") + 4..];
        assert_eq!(frames[0], 0x81);
        assert_eq!(frames[1] & 0x80, 0x80);
        let sub_len = usize::from(frames[1] & 0x7F);
        let pong = &frames[2 + 4 + sub_len..];
        assert_eq!(pong[0], 0x8A);
        assert_eq!(pong[1], 0x80 | 2);
        let unmasked: Vec<u8> = pong[6..8].iter().enumerate().map(|(i, b)| b ^ pong[2 + i]).collect();
        assert_eq!(unmasked, b"p1");
        assert_eq!(pong[8], 0x88);
    }

    #[tokio::test]
    async fn refused_upgrade_reports_the_status() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 2\r\n\r\n{}").await;
        });
        let target = Target { addr, host: addr.to_string(), prefix: String::new() };
        let err = WsClient::connect(&target, None, "bad", 1024, None, None).await.err().expect("refused");
        assert_eq!(err.to_string(), "handshake: HTTP 401");
    }
}
