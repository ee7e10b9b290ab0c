//! Turns a client's byte stream into complete WebSocket messages: decodes
//! frames, reassembles fragments with a bound on the total size, and keeps
//! bytes only while a frame is incomplete (nothing is allocated while idle).
//! Each byte is copied a bounded number of times however the stream is cut,
//! so a frame trickled one byte per read costs what it weighs. A message
//! compressed with permessage-deflate is inflated once whole, with the same
//! limit applied to its inflated size.

use super::deflate::{self, InflateError};
use super::frame::{self, DecodeError, OpCode};

/// A complete client message or control frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    Text(Vec<u8>),
    Binary,
    Ping(Vec<u8>),
    Pong,
    /// The client's close frame; its status code, if it sent one.
    Close(Option<u16>),
}

/// Per-connection reassembly state: one pointer while idle, the buffers only
/// while a frame or a fragmented message is incomplete.
#[derive(Default)]
pub struct Assembler {
    state: Option<Box<Partial>>,
    /// Bytes moved inside the partial buffer, for the linearity test.
    #[cfg(test)]
    moved: usize,
}

#[derive(Default)]
struct Partial {
    /// Bytes of a frame that has not fully arrived; empty between frames.
    partial: Vec<u8>,
    /// The message being reassembled from fragments, and its opcode.
    fragments: Vec<u8>,
    fragment_op: Option<OpCode>,
    /// The message being reassembled is compressed (its first frame had RSV1).
    fragment_compressed: bool,
    /// The last `ingest` stopped at the bound on messages waiting: complete
    /// frames may be buffered, to be decoded once those are taken. (Here,
    /// not in `Assembler`: an idle connection holds one pointer.)
    held_back: bool,
}

impl Assembler {
    /// Consumes freshly read bytes, appending complete messages to `out`;
    /// `max` bounds one message (its fragments together, and again once
    /// inflated). `deflate`: the connection negotiated permessage-deflate,
    /// so a message may be compressed (RSV1 on its first frame).
    ///
    /// Decoding stops once the messages in `out` hold `max` bytes or more;
    /// [`Assembler::held_back`] then says so, and a later call (with no new
    /// bytes, once `out` was taken) goes on where this one stopped.
    pub fn ingest(
        &mut self,
        data: &[u8],
        max: usize,
        deflate: bool,
        out: &mut Vec<Inbound>,
    ) -> Result<(), DecodeError> {
        let held: usize = out.iter().map(Inbound::held).sum();
        // Full only when something waits: with nothing waiting the next
        // message is always decoded (progress, whatever `max`).
        let mut room = Room { left: max.saturating_sub(held), full: held > 0 && held >= max };
        // A stack value while nothing is pending: no allocation per read.
        let mut state = self.state.take().map_or_else(Partial::default, |boxed| *boxed);
        if state.partial.is_empty() {
            let used = if room.full { 0 } else { state.decode_all(data, max, deflate, &mut room, out)? };
            state.partial.extend_from_slice(&data[used..]);
        } else {
            state.partial.extend_from_slice(data);
            let mut buf = std::mem::take(&mut state.partial);
            let used = if room.full { 0 } else { state.decode_all(&buf, max, deflate, &mut room, out)? };
            // Only what follows a completed frame moves (less than a frame),
            // never the incomplete frame on each read.
            if used > 0 {
                #[cfg(test)]
                {
                    self.moved += buf.len() - used;
                }
                buf.drain(..used);
            }
            state.partial = buf;
        }
        state.held_back = room.full && !state.partial.is_empty();
        if !state.partial.is_empty() || state.fragment_op.is_some() {
            self.state = Some(Box::new(state));
        }
        Ok(())
    }

    /// Bytes already read may hold complete messages that were left
    /// undecoded because enough were waiting (see [`Assembler::ingest`]):
    /// call `ingest` again, with no new bytes, once those are taken.
    pub fn held_back(&self) -> bool {
        self.state.as_ref().is_some_and(|state| state.held_back)
    }
}

/// What the messages decoded by one `ingest` may still hold.
struct Room {
    left: usize,
    /// Spent: decoding stopped (or never started).
    full: bool,
}

impl Inbound {
    /// Bytes the message holds while it waits to be answered.
    fn held(&self) -> usize {
        match self {
            Inbound::Text(payload) | Inbound::Ping(payload) => payload.len(),
            _ => 0,
        }
    }
}

impl Partial {
    /// Decodes complete frames from the front of `buf` until it runs out or
    /// the messages decoded fill `room`; returns the bytes used.
    fn decode_all(
        &mut self,
        mut buf: &[u8],
        max: usize,
        deflate: bool,
        room: &mut Room,
        out: &mut Vec<Inbound>,
    ) -> Result<usize, DecodeError> {
        let total = buf.len();
        while let Some((f, used)) = frame::decode(buf, max)? {
            buf = &buf[used..];
            let before = out.len();
            // RSV1 marks a compressed message on its first frame only, and
            // only where compression was negotiated (RFC 7692 6.1).
            if f.rsv1 && (!deflate || f.op == OpCode::Continuation) {
                return Err(DecodeError::UnexpectedRsv1);
            }
            match f.op {
                OpCode::Ping => out.push(Inbound::Ping(f.payload)),
                OpCode::Pong => out.push(Inbound::Pong),
                OpCode::Close => {
                    let code =
                        (f.payload.len() >= 2).then(|| u16::from_be_bytes([f.payload[0], f.payload[1]]));
                    out.push(Inbound::Close(code));
                    return Ok(total - buf.len());
                }
                OpCode::Text | OpCode::Binary => {
                    if self.fragment_op.is_some() {
                        // A new data frame while a fragmented one is open.
                        return Err(DecodeError::Reserved);
                    }
                    if f.fin {
                        out.push(message(f.op, f.rsv1, f.payload, max)?);
                    } else {
                        self.fragment_op = Some(f.op);
                        self.fragment_compressed = f.rsv1;
                        self.fragments = f.payload;
                    }
                }
                OpCode::Continuation => {
                    let Some(op) = self.fragment_op else { return Err(DecodeError::Reserved) };
                    // The limit applies to the whole message, not each fragment.
                    let size = self.fragments.len() + f.payload.len();
                    if size > max {
                        return Err(DecodeError::TooBig(size as u64));
                    }
                    self.fragments.extend_from_slice(&f.payload);
                    if f.fin {
                        self.fragment_op = None;
                        let payload = std::mem::take(&mut self.fragments);
                        out.push(message(op, std::mem::take(&mut self.fragment_compressed), payload, max)?);
                    }
                }
            }
            // Each message is at most `max` however few bytes it came in
            // (compressed): stop once those waiting hold that much.
            if let Some(added) = out.get(before).map(Inbound::held).filter(|n| *n > 0) {
                room.left = room.left.saturating_sub(added);
                if room.left == 0 {
                    room.full = true;
                    break;
                }
            }
        }
        Ok(total - buf.len())
    }
}

/// A complete message, inflated first when `compressed`; a text message
/// must be UTF-8 (RFC 6455 8.1).
fn message(op: OpCode, compressed: bool, payload: Vec<u8>, max: usize) -> Result<Inbound, DecodeError> {
    let payload = match compressed {
        true => deflate::inflate(payload, max).map_err(|e| match e {
            InflateError::TooBig(n) => DecodeError::TooBig(n),
            InflateError::Corrupt => DecodeError::BadDeflate,
        })?,
        false => payload,
    };
    match op {
        OpCode::Text if std::str::from_utf8(&payload).is_err() => Err(DecodeError::InvalidUtf8),
        OpCode::Text => Ok(Inbound::Text(payload)),
        _ => Ok(Inbound::Binary),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
        frame::masked(first, payload, [9, 8, 7, 6])
    }

    #[test]
    fn reassembles_split_reads_and_fragments() {
        let mut stream = masked(0x01, b"{\"type\":");
        stream.extend(masked(0x89, b"hi"));
        stream.extend(masked(0x80, b"\"ping\"}"));
        stream.extend(masked(0x82, b"bin"));
        stream.extend(masked(0x88, &1000u16.to_be_bytes()));
        let mut a = Assembler::default();
        let mut out = Vec::new();
        // Feed one byte at a time: every split point must work.
        for b in &stream {
            a.ingest(std::slice::from_ref(b), 100, false, &mut out).unwrap();
        }
        assert_eq!(
            out,
            vec![
                Inbound::Ping(b"hi".to_vec()),
                Inbound::Text(b"{\"type\":\"ping\"}".to_vec()),
                Inbound::Binary,
                Inbound::Close(Some(1000))
            ]
        );
        assert!(a.state.is_none(), "nothing is kept between messages");
    }

    /// Issue: a 64 KB frame trickled one byte per read was copied whole on
    /// every read (gigabytes). Now no byte of an incomplete frame moves.
    #[test]
    fn a_trickled_frame_costs_what_it_weighs() {
        let payload = vec![b'x'; 65_000];
        let stream = frame::masked(0x81, &payload, [9, 8, 7, 6]);
        let mut a = Assembler::default();
        let mut out = Vec::new();
        for b in &stream {
            a.ingest(std::slice::from_ref(b), 65_536, false, &mut out).unwrap();
        }
        assert_eq!(out, vec![Inbound::Text(payload)]);
        assert_eq!(a.moved, 0, "bytes of the incomplete frame were moved on reads");
        assert!(a.state.is_none());
    }

    #[test]
    fn bounds_the_total_of_a_fragmented_message() {
        let mut a = Assembler::default();
        let mut out = Vec::new();
        a.ingest(&masked(0x01, &[b'a'; 60]), 100, false, &mut out).unwrap();
        let err = a.ingest(&masked(0x00, &[b'a'; 60]), 100, false, &mut out).unwrap_err();
        assert_eq!(err.close_code().code(), 1009);
    }

    #[test]
    fn a_text_message_must_be_utf8_whole_even_split_across_fragments() {
        let mut a = Assembler::default();
        let mut out = Vec::new();
        // "é" split between two fragments is fine once whole.
        a.ingest(&masked(0x01, &[0xc3]), 100, false, &mut out).unwrap();
        a.ingest(&masked(0x80, &[0xa9]), 100, false, &mut out).unwrap();
        assert_eq!(out, vec![Inbound::Text("é".as_bytes().to_vec())]);
        let err = a.ingest(&masked(0x81, &[0xff, 0xfe]), 100, false, &mut out).unwrap_err();
        assert_eq!(err.close_code().code(), 1007);
    }

    #[test]
    fn inflates_compressed_messages_whole_even_fragmented() {
        let text = br#"{"type":"ping","pad":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}"#;
        let z = deflate::deflate_payload(text);
        let (a, b) = z.split_at(z.len() / 2);
        let mut stream = masked(0xC1, &z);
        // Fragmented: RSV1 on the first frame only.
        stream.extend(masked(0x41, a));
        stream.extend(masked(0x89, b"hi"));
        stream.extend(masked(0x80, b));
        let mut a = Assembler::default();
        let mut out = Vec::new();
        for byte in &stream {
            a.ingest(std::slice::from_ref(byte), 100, true, &mut out).unwrap();
        }
        let text = Inbound::Text(text.to_vec());
        assert_eq!(out, vec![text.clone(), Inbound::Ping(b"hi".to_vec()), text]);
        assert!(a.state.is_none(), "nothing is kept between messages");
    }

    /// Attack review: five compressed messages in one read were all
    /// inflated at once, however large each became. Decoding now stops once
    /// those waiting hold `max` bytes, and goes on when they are taken.
    #[test]
    fn holds_back_what_would_inflate_past_one_limit_until_taken() {
        let text = [b' '; 60];
        let z = deflate::deflate_payload(&text);
        let stream: Vec<u8> = (0..5).flat_map(|_| masked(0xC1, &z)).collect();
        let mut a = Assembler::default();
        let mut out = Vec::new();
        a.ingest(&stream, 100, true, &mut out).unwrap();
        assert_eq!(out.len(), 2, "60 + 60 bytes reach the limit of 100");
        assert!(a.held_back());
        // Nothing more is decoded while those wait, not even new bytes.
        a.ingest(&masked(0x89, b"hi"), 100, true, &mut out).unwrap();
        assert_eq!(out.len(), 2);
        let mut taken = std::mem::take(&mut out);
        while a.held_back() {
            a.ingest(&[], 100, true, &mut out).unwrap();
            taken.append(&mut out);
        }
        let mut want = vec![Inbound::Text(text.to_vec()); 5];
        want.push(Inbound::Ping(b"hi".to_vec()));
        assert_eq!(taken, want, "every message, in order");
        assert!(a.state.is_none(), "nothing is kept between messages");
    }

    #[test]
    fn refuses_rsv1_where_compression_is_not_allowed() {
        let z = deflate::deflate_payload(b"{}");
        let code = |stream: &[u8], deflate| {
            Assembler::default()
                .ingest(stream, 100, deflate, &mut Vec::new())
                .unwrap_err()
                .close_code()
                .code()
        };
        assert_eq!(code(&masked(0xC1, &z), false), 1002, "not negotiated");
        let mut on_continuation = masked(0x01, b"{");
        on_continuation.extend(masked(0xC0, b"}"));
        assert_eq!(code(&on_continuation, true), 1002, "RSV1 on a continuation");
        assert_eq!(code(&masked(0xC9, b""), true), 1002, "RSV1 on a ping");
        assert_eq!(code(&masked(0xC1, &[0xff; 8]), true), 1007, "not deflate data");
        let bomb = deflate::deflate_payload(&[b' '; 100_000]);
        assert_eq!(code(&masked(0xC1, &bomb), true), 1009, "inflates past the limit");
    }

    #[test]
    fn refuses_a_stray_continuation() {
        let mut a = Assembler::default();
        assert!(a.ingest(&masked(0x80, b"x"), 100, false, &mut Vec::new()).is_err());
    }
}
