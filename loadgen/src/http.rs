//! A minimal keep-alive HTTP/1.1 client for `POST /api/events`: one request outstanding per
//! connection, request and response buffers reused, `Content-Length` bodies only.

use anyhow::{bail, Context as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::target::Target;

/// Largest response head or body accepted.
const MAX_RESPONSE: usize = 1 << 20;

/// The parts of a response head the publisher needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Head {
    pub(crate) status: u16,
    pub(crate) head_len: usize,
    pub(crate) content_length: Option<usize>,
    pub(crate) chunked: bool,
    /// The server will close the connection after this response.
    pub(crate) close: bool,
    /// `Retry-After` in seconds (a 429 or 503 asks the client to wait).
    pub(crate) retry_after: Option<u64>,
}

/// Parses a response head at the front of `buf`; `Ok(None)` when it is not complete yet.
pub(crate) fn parse_head(buf: &[u8]) -> anyhow::Result<Option<Head>> {
    let Some(end) = memchr::memmem::find(buf, b"\r\n\r\n") else {
        if buf.len() > MAX_RESPONSE {
            bail!("response head too large");
        }
        return Ok(None);
    };
    let text = std::str::from_utf8(&buf[..end]).context("response head is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        bail!("not an HTTP/1 response: {status_line:?}");
    }
    let status: u16 =
        parts.next().unwrap_or("").parse().with_context(|| format!("bad status {status_line:?}"))?;
    let mut head = Head {
        status,
        head_len: end + 4,
        content_length: None,
        chunked: false,
        close: version == "HTTP/1.0",
        retry_after: None,
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            head.content_length =
                Some(value.parse().with_context(|| format!("bad content-length {value:?}"))?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            head.chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("connection") {
            head.close = value.eq_ignore_ascii_case("close");
        } else if name.eq_ignore_ascii_case("retry-after") {
            // Seconds only; an HTTP date is not worth parsing here.
            head.retry_after = value.parse().ok();
        }
    }
    Ok(Some(head))
}

/// `N` from a `{"accepted":N}` body.
pub(crate) fn accepted_count(body: &[u8]) -> Option<u64> {
    let key = b"\"accepted\":";
    let at = memchr::memmem::find(body, key)? + key.len();
    let digits: &[u8] = &body[at..];
    let digits = &digits[digits.iter().take_while(|b| **b == b' ').count()..];
    let len = digits.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&digits[..len]).ok()?.parse().ok()
}

/// One keep-alive connection to the server.
pub(crate) struct HttpConn {
    stream: TcpStream,
    req: Vec<u8>,
    buf: Vec<u8>,
    /// Bytes of `buf` holding the last response (head + body), dropped on the next request.
    used: usize,
    end: usize,
}

/// A response; `body` borrows the connection's buffer.
#[derive(Debug)]
pub(crate) struct Response<'a> {
    pub(crate) status: u16,
    pub(crate) body: &'a [u8],
    /// The connection cannot be reused.
    pub(crate) close: bool,
    pub(crate) retry_after: Option<u64>,
}

impl HttpConn {
    pub(crate) async fn connect(target: &Target) -> anyhow::Result<HttpConn> {
        let stream = TcpStream::connect(target.addr).await.context("publisher connect")?;
        stream.set_nodelay(true).context("TCP_NODELAY")?;
        Ok(HttpConn { stream, req: Vec::with_capacity(4096), buf: vec![0; 4096], used: 0, end: 0 })
    }

    /// Sends `POST path` with a JSON body and reads the whole response.
    pub(crate) async fn post_json(
        &mut self,
        host: &str,
        path: &str,
        bearer: &str,
        body: &[u8],
    ) -> anyhow::Result<Response<'_>> {
        use std::io::Write as _;
        // Drop the previous response; keep bytes that arrived after it (there should be none).
        self.buf.copy_within(self.used..self.end, 0);
        self.end -= self.used;
        self.used = 0;

        self.req.clear();
        write!(
            self.req,
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {bearer}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )?;
        self.req.extend_from_slice(body);
        self.exchange().await
    }

    /// Sends `GET path` and reads the whole response (used for `/metrics`).
    pub(crate) async fn get(&mut self, host: &str, path: &str) -> anyhow::Result<Response<'_>> {
        use std::io::Write as _;
        self.buf.copy_within(self.used..self.end, 0);
        self.end -= self.used;
        self.used = 0;
        self.req.clear();
        write!(self.req, "GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n")?;
        self.exchange().await
    }

    /// Writes the request in `req` and reads its response into `buf`.
    async fn exchange(&mut self) -> anyhow::Result<Response<'_>> {
        self.stream.write_all(&self.req).await.context("sending request")?;

        let head = loop {
            if let Some(head) = parse_head(&self.buf[..self.end])? {
                break head;
            }
            if self.read_more().await? == 0 {
                bail!("connection closed before the response");
            }
        };
        if head.chunked {
            bail!("chunked responses are not supported");
        }
        let body_len = match head.content_length {
            Some(n) if n <= MAX_RESPONSE => n,
            Some(n) => bail!("response body of {n} bytes is too large"),
            None if head.status == 204 || head.status == 304 => 0,
            None => {
                // No length: the body runs to the end of the connection.
                while self.read_more().await? > 0 {}
                self.end - head.head_len
            }
        };
        let total = head.head_len + body_len;
        while self.end < total {
            if self.read_more().await? == 0 {
                bail!("connection closed inside the response body");
            }
        }
        self.used = total;
        let close = head.close || head.content_length.is_none();
        Ok(Response {
            status: head.status,
            body: &self.buf[head.head_len..total],
            close,
            retry_after: head.retry_after,
        })
    }

    /// Reads into the buffer, growing it when full; 0 means the server closed.
    async fn read_more(&mut self) -> anyhow::Result<usize> {
        if self.end == self.buf.len() {
            if self.buf.len() >= MAX_RESPONSE + 8192 {
                bail!("response too large");
            }
            self.buf.resize(self.buf.len() * 2, 0);
        }
        let n = self.stream.read(&mut self.buf[self.end..]).await.context("reading response")?;
        self.end += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn a_close_before_the_answer_is_an_error_not_a_spin() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(b"HTTP/1.1 202 Acc").await;
        });
        let target = Target { addr, host: addr.to_string(), prefix: String::new() };
        let mut c = HttpConn::connect(&target).await.expect("connect");
        let answer = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            c.post_json(&target.host, "/api/events", "k", b"{}"),
        )
        .await
        .expect("returns promptly");
        assert_eq!(
            answer.err().map(|e| e.to_string()).as_deref(),
            Some("connection closed before the response")
        );
    }

    #[test]
    fn parses_response_heads() {
        let r = b"HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\nContent-Length: 14\r\n\r\n{\"accepted\":3}";
        let head = parse_head(r).expect("valid").expect("complete");
        assert_eq!(
            head,
            Head {
                status: 202,
                head_len: r.len() - 14,
                content_length: Some(14),
                chunked: false,
                close: false,
                retry_after: None
            }
        );
        assert_eq!(accepted_count(&r[head.head_len..]), Some(3));
        assert_eq!(parse_head(b"HTTP/1.1 202 Acc").expect("valid"), None);
        let c = parse_head(b"HTTP/1.1 503 x\r\nConnection: close\r\n\r\n").expect("valid").expect("complete");
        let pushed =
            parse_head(b"HTTP/1.1 429 x\r\nRetry-After: 2\r\n\r\n").expect("valid").expect("complete");
        assert_eq!((pushed.status, pushed.retry_after), (429, Some(2)));
        assert!(c.close);
        assert!(parse_head(b"garbage\r\n\r\n").is_err());
        assert_eq!(accepted_count(b"{\"accepted\": 12}"), Some(12));
        assert_eq!(accepted_count(b"{\"error\":\"x\"}"), None);
    }

    #[tokio::test]
    async fn keep_alive_round_trips() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            for reply in [
                &b"HTTP/1.1 202 Accepted\r\ncontent-length: 14\r\n\r\n{\"accepted\":1}"[..],
                &b"HTTP/1.1 400 Bad Request\r\ncontent-length: 13\r\n\r\n{\"error\":\"x\"}"[..],
            ] {
                // Wait for one whole request (head + 2-byte body).
                loop {
                    if let Some(i) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        if seen.len() >= i + 4 + 2 {
                            seen.drain(..i + 6);
                            break;
                        }
                    }
                    let n = s.read(&mut buf).await.expect("read");
                    seen.extend_from_slice(&buf[..n]);
                }
                s.write_all(reply).await.expect("write");
            }
        });
        let target = Target { addr, host: addr.to_string(), prefix: String::new() };
        let mut c = HttpConn::connect(&target).await.expect("connect");
        let r = c.post_json(&target.host, "/api/events", "k", b"{}").await.expect("first");
        assert_eq!((r.status, accepted_count(r.body)), (202, Some(1)));
        let r = c.post_json(&target.host, "/api/events", "k", b"{}").await.expect("second");
        assert_eq!((r.status, r.body), (400, &b"{\"error\":\"x\"}"[..]));
    }
}
