//! Calibration only (not part of Herald): a minimal single-threaded mio server
//! speaking just enough of Herald's protocol for loadgen, to find this machine's
//! floor for one send per delivery.
use base64::Engine;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use std::collections::HashMap;
use std::io::{Read, Write};

struct Conn { s: TcpStream, buf: Vec<u8>, ws: bool, room: Option<String> }

fn main() {
    let addr = std::env::args().nth(1).unwrap_or("127.0.0.1:18080".into()).parse().unwrap();
    let mut poll = Poll::new().unwrap();
    let mut l = TcpListener::bind(addr).unwrap();
    poll.registry().register(&mut l, Token(0), Interest::READABLE).unwrap();
    let mut conns: HashMap<usize, Conn> = HashMap::new();
    let mut rooms: HashMap<String, Vec<usize>> = HashMap::new();
    let mut seqs: HashMap<String, u64> = HashMap::new();
    let mut next = 1usize;
    let mut events = Events::with_capacity(4096);
    let mut tmp = vec![0u8; 65536];
    loop {
        poll.poll(&mut events, None).unwrap();
        for ev in events.iter() {
            if ev.token() == Token(0) {
                while let Ok((mut s, _)) = l.accept() {
                    s.set_nodelay(true).ok();
                    poll.registry().register(&mut s, Token(next), Interest::READABLE).unwrap();
                    conns.insert(next, Conn { s, buf: Vec::new(), ws: false, room: None });
                    next += 1;
                }
                continue;
            }
            let id = ev.token().0;
            let mut closed = false;
            let mut publish: Vec<(String, String)> = Vec::new();
            if let Some(c) = conns.get_mut(&id) {
                loop {
                    match c.s.read(&mut tmp) {
                        Ok(0) => { closed = true; break }
                        Ok(n) => c.buf.extend_from_slice(&tmp[..n]),
                        Err(_) => break,
                    }
                }
                loop {
                    if !c.ws {
                        let Some(end) = memchr::memmem::find(&c.buf, b"\r\n\r\n") else { break };
                        let head = String::from_utf8_lossy(&c.buf[..end]).to_string();
                        if head.starts_with("GET") {
                            let key = head.lines().find_map(|l| l.strip_prefix("Sec-WebSocket-Key: ").or(l.strip_prefix("sec-websocket-key: "))).unwrap_or("").trim().to_string();
                            let mut h = sha1_smol::Sha1::new();
                            h.update(key.as_bytes());
                            h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
                            let acc = base64::engine::general_purpose::STANDARD.encode(h.digest().bytes());
                            let _ = c.s.write_all(format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {acc}\r\n\r\n").as_bytes());
                            c.buf.drain(..end + 4);
                            c.ws = true;
                            continue;
                        }
                        let len: usize = head.lines().find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length: ").map(|v| v.trim().parse().unwrap_or(0))).unwrap_or(0);
                        if c.buf.len() < end + 4 + len { break }
                        let body = String::from_utf8_lossy(&c.buf[end + 4..end + 4 + len]).to_string();
                        c.buf.drain(..end + 4 + len);
                        let chat = body.split("\"chat_id\":\"").nth(1).map(|r| r[..36].to_string()).unwrap_or_default();
                        let data = body.split("\"data\":").nth(1).map(|r| r[..r.len() - 1].to_string()).unwrap_or_default();
                        publish.push((chat, data));
                        let _ = c.s.write_all(b"HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\ncontent-length: 14\r\n\r\n{\"accepted\":1}");
                        continue;
                    }
                    if c.buf.len() < 2 { break }
                    let len = (c.buf[1] & 0x7f) as usize;
                    if len >= 126 || c.buf.len() < 6 + len { break }
                    let mask = [c.buf[2], c.buf[3], c.buf[4], c.buf[5]];
                    let payload: Vec<u8> = c.buf[6..6 + len].iter().enumerate().map(|(i, b)| b ^ mask[i % 4]).collect();
                    let op = c.buf[0] & 0x0f;
                    c.buf.drain(..6 + len);
                    if op == 1 {
                        let text = String::from_utf8_lossy(&payload);
                        if let Some(chat) = text.split("\"chat_id\":\"").nth(1).map(|r| r[..36].to_string()) {
                            let reply = format!("{{\"type\":\"subscribed\",\"chat_id\":\"{chat}\"}}");
                            let mut f = vec![0x81, reply.len() as u8];
                            f.extend_from_slice(reply.as_bytes());
                            let _ = c.s.write_all(&f);
                            c.room = Some(chat.clone());
                            rooms.entry(chat).or_default().push(id);
                        }
                    } else if op == 8 { closed = true; break }
                }
            }
            for (chat, data) in publish {
                let seq = { let s = seqs.entry(chat.clone()).or_default(); *s += 1; *s };
                let payload = format!("{{\"type\":\"message.new\",\"chat_id\":\"{chat}\",\"seq\":{seq},\"data\":{data}}}");
                let mut frame = vec![0x81u8];
                if payload.len() < 126 { frame.push(payload.len() as u8) } else { frame.push(126); frame.extend_from_slice(&(payload.len() as u16).to_be_bytes()) }
                frame.extend_from_slice(payload.as_bytes());
                if let Some(ids) = rooms.get(&chat) {
                    for sid in ids { if let Some(sc) = conns.get_mut(sid) { let _ = sc.s.write(&frame); } }
                }
            }
            if closed {
                if let Some(mut c) = conns.remove(&id) {
                    let _ = poll.registry().deregister(&mut c.s);
                    if let Some(r) = c.room { if let Some(v) = rooms.get_mut(&r) { v.retain(|x| *x != id) } }
                }
            }
        }
    }
}
