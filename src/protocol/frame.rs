//! RFC 6455 framing without IO: encoding server frames (unmasked, so one
//! encoding serves every socket) and decoding masked client frames from a
//! byte slice, so the connection keeps no read buffer while idle.

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::CloseCode;

/// WebSocket opcodes Herald handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl OpCode {
    fn from_bits(bits: u8) -> Option<OpCode> {
        Some(match bits {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }

    fn bits(self) -> u8 {
        match self {
            OpCode::Continuation => 0x0,
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xA,
        }
    }

    /// Control frames may not be fragmented and carry at most 125 bytes.
    pub fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }
}

/// Largest header a server frame needs: 2 + 8 length bytes, no mask.
pub const MAX_HEAD: usize = 10;

fn put_head(buf: &mut impl BufMut, op: OpCode, len: usize) {
    buf.put_u8(0x80 | op.bits());
    if len < 126 {
        buf.put_u8(len as u8);
    } else if len <= u16::MAX as usize {
        buf.put_u8(126);
        buf.put_u16(len as u16);
    } else {
        buf.put_u8(127);
        buf.put_u64(len as u64);
    }
}

/// Encodes a complete final server frame (unmasked).
pub fn encode(op: OpCode, payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(MAX_HEAD + payload.len());
    put_head(&mut buf, op, payload.len());
    buf.put_slice(payload);
    buf.freeze()
}

/// Encodes a client frame: `first` is the whole first header byte (FIN, RSV
/// and opcode, so tests and tools can also send malformed ones), the payload
/// masked with `mask` as RFC 6455 requires of clients. Herald itself never
/// sends one; its tests, fuzzers and tools do.
pub fn masked(first: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAX_HEAD + 4 + payload.len());
    out.push(first);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= u16::MAX as usize => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Builds a text frame whose payload is written by `write`, reserving room
/// for the header first so the payload is never copied.
pub fn text_with(capacity: usize, write: impl FnOnce(&mut Vec<u8>)) -> Bytes {
    let mut buf = Vec::with_capacity(MAX_HEAD + capacity);
    buf.resize(MAX_HEAD, 0);
    write(&mut buf);
    with_head(0x80 | OpCode::Text.bits(), buf)
}

/// Turns `buf`, a payload behind [`MAX_HEAD`] reserved bytes, into a final
/// frame whose first header byte is `first` (FIN, RSV bits and opcode).
pub fn with_head(first: u8, buf: Vec<u8>) -> Bytes {
    let mut buf = buf;
    let len = buf.len().saturating_sub(MAX_HEAD);
    let head_len = if len < 126 {
        2
    } else if len <= u16::MAX as usize {
        4
    } else {
        10
    };
    let start = MAX_HEAD - head_len;
    let mut head = &mut buf[start..MAX_HEAD];
    put_head(&mut head, OpCode::Text, len);
    buf[start] = first;
    Bytes::from(buf).slice(start..)
}

/// The payload of a complete server frame (as [`encode`] and [`text_with`]
/// build them: unmasked, header and payload whole), e.g. a room frame's JSON.
pub fn payload(frame: &[u8]) -> &[u8] {
    let start = match frame.get(1).map(|b| b & 0x7F) {
        None => return &[],
        Some(126) => 4,
        Some(127) => 10,
        Some(_) => 2,
    };
    frame.get(start..).unwrap_or_default()
}

/// A close frame with a status code and a short reason.
pub fn close(code: u16, reason: &str) -> Bytes {
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    // Control payloads are limited to 125 bytes.
    payload.extend_from_slice(&reason.as_bytes()[..reason.len().min(123)]);
    encode(OpCode::Close, &payload)
}

/// One decoded client frame; `payload` is already unmasked.
#[derive(Debug, PartialEq, Eq)]
pub struct Decoded {
    pub fin: bool,
    /// RSV1: the message this frame starts is compressed (RFC 7692); the
    /// reassembler decides whether the connection allows it.
    pub rsv1: bool,
    pub op: OpCode,
    pub payload: Vec<u8>,
}

/// Why the client's byte stream is not acceptable; each maps to a close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame of {0} bytes exceeds max_message_size")]
    TooBig(u64),
    #[error("client frames must be masked")]
    Unmasked,
    #[error("reserved bits or unknown opcode")]
    Reserved,
    #[error("fragmented or oversized control frame")]
    BadControl,
    #[error("text message is not UTF-8")]
    InvalidUtf8,
    #[error("compressed frame on a connection that did not negotiate compression, or on a continuation")]
    UnexpectedRsv1,
    #[error("compressed message is not valid deflate data")]
    BadDeflate,
}

impl DecodeError {
    /// The RFC 6455 close code for this error.
    pub fn close_code(self) -> CloseCode {
        match self {
            DecodeError::TooBig(_) => CloseCode::TooBig,
            DecodeError::InvalidUtf8 | DecodeError::BadDeflate => CloseCode::InvalidData,
            DecodeError::Unmasked
            | DecodeError::Reserved
            | DecodeError::BadControl
            | DecodeError::UnexpectedRsv1 => CloseCode::ProtocolError,
        }
    }
}

/// Decodes one frame from the front of `buf`. `Ok(None)` means more bytes are
/// needed; `Ok(Some((frame, used)))` consumed `used` bytes. A frame larger than
/// `max_payload` is refused from its header alone, before its bytes arrive.
pub fn decode(buf: &[u8], max_payload: usize) -> Result<Option<(Decoded, usize)>, DecodeError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    // RSV2 and RSV3 mean nothing Herald negotiates.
    if b0 & 0x30 != 0 {
        return Err(DecodeError::Reserved);
    }
    let op = OpCode::from_bits(b0 & 0x0F).ok_or(DecodeError::Reserved)?;
    let fin = b0 & 0x80 != 0;
    let rsv1 = b0 & 0x40 != 0;
    if rsv1 && op.is_control() {
        // Control frames are never compressed (RFC 7692 6.1).
        return Err(DecodeError::Reserved);
    }
    if b1 & 0x80 == 0 {
        return Err(DecodeError::Unmasked);
    }
    let (len, mut at) = match b1 & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut n = [0u8; 8];
            n.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(n), 10)
        }
        n => (u64::from(n), 2),
    };
    if op.is_control() && (!fin || len > 125) {
        return Err(DecodeError::BadControl);
    }
    if len > max_payload as u64 {
        return Err(DecodeError::TooBig(len));
    }
    let len = len as usize;
    // Compared with what remains rather than as `at + 4 + len`: with a limit
    // near `usize::MAX` (the config accepts any positive size) a header may
    // claim a length whose sum overflows (found by fuzzing).
    if buf.len() - at < 4 || buf.len() - at - 4 < len {
        return Ok(None);
    }
    let mask = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
    at += 4;
    let payload = buf[at..at + len].iter().enumerate().map(|(i, b)| b ^ mask[i & 3]).collect();
    Ok(Some((Decoded { fin, rsv1, op, payload }, at + len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
        super::masked(first, payload, [1, 2, 3, 4])
    }

    #[test]
    fn server_frames_have_minimal_headers() {
        assert_eq!(&encode(OpCode::Text, b"hi")[..], b"\x81\x02hi");
        let mid = vec![b'a'; 300];
        let f = encode(OpCode::Text, &mid);
        assert_eq!(&f[..4], &[0x81, 126, 1, 44]);
        let big = vec![b'a'; 70_000];
        let f = encode(OpCode::Binary, &big);
        assert_eq!(f[1], 127);
        assert_eq!(f.len(), 10 + 70_000);
        for len in [0usize, 125, 126, 65535, 65536] {
            let payload = vec![b'x'; len];
            let a = encode(OpCode::Text, &payload);
            let b = text_with(len, |buf| buf.extend_from_slice(&payload));
            assert_eq!(a, b, "len {len}");
        }
        assert_eq!(&close(4008, "slow")[..], b"\x88\x06\x0f\xa8slow");
        for len in [0usize, 125, 126, 65535, 65536] {
            let payload = vec![b'x'; len];
            assert_eq!(super::payload(&encode(OpCode::Text, &payload)), &payload[..], "len {len}");
        }
    }

    #[test]
    fn decodes_masked_frames_of_every_length_class() {
        for len in [0usize, 5, 125, 126, 1000, 65535, 65536, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let bytes = masked(0x81, &payload);
            let (frame, used) = decode(&bytes, 1 << 20).unwrap().unwrap();
            assert_eq!(used, bytes.len());
            assert_eq!(frame, Decoded { fin: true, rsv1: false, op: OpCode::Text, payload });
            // Every strict prefix asks for more bytes.
            for cut in [0, 1, bytes.len() / 2, bytes.len() - 1] {
                assert_eq!(decode(&bytes[..cut], 1 << 20), Ok(None), "len {len} cut {cut}");
            }
        }
    }

    #[test]
    fn refuses_bad_frames() {
        assert_eq!(decode(b"\x81\x02hi", 100), Err(DecodeError::Unmasked));
        assert_eq!(decode(&masked(0xA1, b"x"), 100), Err(DecodeError::Reserved), "RSV2");
        assert_eq!(decode(&masked(0x91, b"x"), 100), Err(DecodeError::Reserved), "RSV3");
        assert_eq!(decode(&masked(0xC9, b"x"), 100), Err(DecodeError::Reserved), "RSV1 on a ping");
        assert!(decode(&masked(0xC1, b"x"), 100).unwrap().unwrap().0.rsv1, "RSV1 is the reassembler's call");
        assert_eq!(decode(&masked(0x83, b"x"), 100), Err(DecodeError::Reserved));
        assert_eq!(decode(&masked(0x09, b"x"), 100), Err(DecodeError::BadControl));
        // Too big is known from the header alone.
        let big = masked(0x81, &[0; 200]);
        assert_eq!(decode(&big[..4], 100), Err(DecodeError::TooBig(200)));
        assert_eq!(DecodeError::TooBig(1).close_code().code(), 1009);
    }

    /// Fuzzing found: a 64-bit length near `u64::MAX` under a limit of
    /// `usize::MAX` overflowed `at + 4 + len` (a panic in debug builds, a
    /// slice panic in release). It only asks for more bytes now.
    #[test]
    fn a_huge_length_under_a_huge_limit_waits_for_bytes() {
        let mut head = vec![0x81, 0x80 | 127];
        head.extend_from_slice(&u64::MAX.to_be_bytes());
        head.extend_from_slice(&[1, 2, 3, 4, b'x']);
        assert_eq!(decode(&head, usize::MAX), Ok(None));
        assert_eq!(decode(&head, usize::MAX - 1), Err(DecodeError::TooBig(u64::MAX)));
    }
}
