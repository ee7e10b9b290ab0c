//! WebSocket frame codec for the client side (RFC 6455): parse the server's unmasked frames and
//! encode masked client frames. No IO and no clock, so it is tested without a runtime.

use std::fmt;

/// Continuation of a fragmented data message.
pub(crate) const OP_CONT: u8 = 0x0;
/// UTF-8 text message.
pub(crate) const OP_TEXT: u8 = 0x1;
/// Binary message.
pub(crate) const OP_BINARY: u8 = 0x2;
/// Close; the payload starts with a 2-byte big-endian close code.
pub(crate) const OP_CLOSE: u8 = 0x8;
/// Ping; must be answered with a pong carrying the same payload.
pub(crate) const OP_PING: u8 = 0x9;
/// Pong.
pub(crate) const OP_PONG: u8 = 0xA;

/// Close code reported when a close frame carries no code (RFC 6455, 7.1.5).
pub(crate) const CLOSE_NO_STATUS: u16 = 1005;
/// Close code reported when the connection ended without a close frame (RFC 6455, 7.1.5).
pub(crate) const CLOSE_ABNORMAL: u16 = 1006;

/// Header of one complete frame found at the front of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) fin: bool,
    /// RSV1: a compressed message starts here (permessage-deflate).
    pub(crate) rsv1: bool,
    pub(crate) opcode: u8,
    /// Bytes of header before the payload (2, 4 or 10 for unmasked frames).
    pub(crate) header_len: usize,
    pub(crate) payload_len: usize,
}

impl Header {
    /// Total bytes the frame occupies in the buffer.
    pub(crate) fn frame_len(&self) -> usize {
        self.header_len + self.payload_len
    }
}

/// What the front of a buffer holds. Incomplete is an expected outcome, not an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Parsed {
    /// A whole frame is available.
    Frame(Header),
    /// More bytes are needed; `need` is the whole frame's length once the header is readable.
    Incomplete { need: Option<usize> },
}

/// A frame the client must not accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FrameError {
    /// Server frames must not be masked (RFC 6455, 5.1).
    Masked,
    /// RSV bits set without a negotiated extension.
    ReservedBits,
    /// Opcode 3-7 or 11-15.
    BadOpcode(u8),
    /// Control frame that is fragmented or longer than 125 bytes.
    BadControl,
    /// Payload longer than the client accepts.
    TooLarge(u64),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Masked => write!(f, "server sent a masked frame"),
            FrameError::ReservedBits => write!(f, "frame has reserved bits set"),
            FrameError::BadOpcode(op) => write!(f, "reserved opcode {op:#x}"),
            FrameError::BadControl => write!(f, "fragmented or oversized control frame"),
            FrameError::TooLarge(n) => write!(f, "frame payload of {n} bytes is too large"),
        }
    }
}

impl std::error::Error for FrameError {}

/// Parses the frame at the front of `buf`, accepting payloads up to `max_payload` bytes.
pub(crate) fn parse(buf: &[u8], max_payload: usize) -> Result<Parsed, FrameError> {
    if buf.len() < 2 {
        return Ok(Parsed::Incomplete { need: None });
    }
    let (b0, b1) = (buf[0], buf[1]);
    let fin = b0 & 0x80 != 0;
    // RSV1 is permessage-deflate's; the others mean nothing negotiated.
    if b0 & 0x30 != 0 {
        return Err(FrameError::ReservedBits);
    }
    let rsv1 = b0 & 0x40 != 0;
    let opcode = b0 & 0x0F;
    match opcode {
        OP_CONT | OP_TEXT | OP_BINARY => {}
        OP_CLOSE | OP_PING | OP_PONG => {
            if !fin || b1 & 0x7F > 125 {
                return Err(FrameError::BadControl);
            }
        }
        other => return Err(FrameError::BadOpcode(other)),
    }
    if b1 & 0x80 != 0 {
        return Err(FrameError::Masked);
    }
    let (header_len, len) = match b1 & 0x7F {
        126 => {
            let Some(ext) = buf.get(2..4) else {
                return Ok(Parsed::Incomplete { need: None });
            };
            (4, u64::from(u16::from_be_bytes([ext[0], ext[1]])))
        }
        127 => {
            let Some(ext) = buf.get(2..10) else {
                return Ok(Parsed::Incomplete { need: None });
            };
            let mut be = [0u8; 8];
            be.copy_from_slice(ext);
            (10, u64::from_be_bytes(be))
        }
        short => (2, u64::from(short)),
    };
    if len > max_payload as u64 {
        return Err(FrameError::TooLarge(len));
    }
    // Fits in usize: bounded by max_payload above.
    let payload_len = len as usize;
    let header = Header { fin, rsv1, opcode, header_len, payload_len };
    if buf.len() < header.frame_len() {
        return Ok(Parsed::Incomplete { need: Some(header.frame_len()) });
    }
    Ok(Parsed::Frame(header))
}

/// Appends one final (FIN) client frame to `out`, masked with `mask` as clients must (RFC 6455, 5.3).
pub(crate) fn encode_masked(opcode: u8, payload: &[u8], mask: [u8; 4], out: &mut Vec<u8>) {
    out.push(0x80 | (opcode & 0x0F));
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= usize::from(u16::MAX) {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
}

/// The close code carried by a close frame's payload.
pub(crate) fn close_code(payload: &[u8]) -> u16 {
    match payload {
        [hi, lo, ..] => u16::from_be_bytes([*hi, *lo]),
        _ => CLOSE_NO_STATUS,
    }
}

/// Four unpredictable mask bytes, as RFC 6455 asks; falls back to the clock if the OS has no entropy.
pub(crate) fn new_mask() -> [u8; 4] {
    let mut m = [0u8; 4];
    if getrandom::fill(&mut m).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0x5a5a_5a5a);
        m = nanos.to_le_bytes();
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodes an unmasked server frame, the shape the parser must accept.
    fn server_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let len = payload.len();
        if len < 126 {
            out.push(len as u8);
        } else if len <= 65535 {
            out.push(126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        out.extend_from_slice(payload);
        out
    }

    /// Parses a whole frame, then checks every strict prefix is Incomplete (partial reads).
    fn check(fin: bool, opcode: u8, payload_len: usize, header_len: usize) {
        let payload: Vec<u8> = (0..payload_len).map(|i| (i % 251) as u8).collect();
        let bytes = server_frame(fin, opcode, &payload);
        let want = Header { fin, rsv1: false, opcode, header_len, payload_len };
        assert_eq!(parse(&bytes, 1 << 20), Ok(Parsed::Frame(want)));
        assert_eq!(&bytes[header_len..want.frame_len()], &payload[..]);
        // Trailing bytes of the next frame do not change the answer.
        let mut more = bytes.clone();
        more.extend_from_slice(&[0x81, 0x00]);
        assert_eq!(parse(&more, 1 << 20), Ok(Parsed::Frame(want)));
        let cuts: Vec<usize> = if bytes.len() < 300 {
            (0..bytes.len()).collect()
        } else {
            vec![0, 1, header_len - 1, header_len, header_len + 1, bytes.len() - 1]
        };
        for cut in cuts {
            let got = parse(&bytes[..cut], 1 << 20).expect("prefix parses");
            let need = if cut < header_len { None } else { Some(want.frame_len()) };
            assert_eq!(got, Parsed::Incomplete { need }, "cut at {cut}");
        }
    }

    #[test]
    fn parses_every_length_class_and_partial_buffers() {
        check(true, OP_TEXT, 0, 2);
        check(true, OP_TEXT, 1, 2);
        check(true, OP_TEXT, 125, 2);
        check(true, OP_TEXT, 126, 4);
        check(true, OP_BINARY, 65535, 4);
        check(true, OP_TEXT, 65536, 10);
        check(false, OP_TEXT, 10, 2);
        check(true, OP_CONT, 10, 2);
        check(true, OP_PING, 125, 2);
        check(true, OP_CLOSE, 2, 2);
    }

    #[test]
    fn rejects_frames_a_server_must_not_send() {
        assert_eq!(parse(&[0x81, 0x80, 1, 2, 3, 4], 1024), Err(FrameError::Masked));
        assert_eq!(parse(&[0xA1, 0x00], 1024), Err(FrameError::ReservedBits), "RSV2");
        // RSV1 is permessage-deflate's: parsed, and judged by the connection.
        assert!(matches!(parse(&[0xC1, 0x00], 1024), Ok(Parsed::Frame(Header { rsv1: true, .. }))));
        assert_eq!(parse(&[0x83, 0x00], 1024), Err(FrameError::BadOpcode(3)));
        assert_eq!(parse(&[0x09, 0x00], 1024), Err(FrameError::BadControl));
        assert_eq!(parse(&[0x89, 126, 0, 126], 1024), Err(FrameError::BadControl));
        assert_eq!(parse(&server_frame(true, OP_TEXT, &[0; 2000]), 1024), Err(FrameError::TooLarge(2000)));
        let mut huge = vec![0x82, 127];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(parse(&huge, 1024), Err(FrameError::TooLarge(u64::MAX)));
    }

    /// Undoes a client frame's mask so tests can compare what the server will read.
    fn unmask(frame: &[u8]) -> (u8, Vec<u8>) {
        assert_eq!(frame[0] & 0x80, 0x80, "FIN set");
        assert_eq!(frame[1] & 0x80, 0x80, "client frames are masked");
        let (len, at) = match frame[1] & 0x7F {
            126 => (usize::from(u16::from_be_bytes([frame[2], frame[3]])), 4),
            127 => {
                let mut be = [0u8; 8];
                be.copy_from_slice(&frame[2..10]);
                (u64::from_be_bytes(be) as usize, 10)
            }
            n => (usize::from(n), 2),
        };
        let mask = &frame[at..at + 4];
        let body = &frame[at + 4..];
        assert_eq!(body.len(), len);
        (frame[0] & 0x0F, body.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]).collect())
    }

    #[test]
    fn masked_pong_echoes_the_ping_payload() {
        let ping = server_frame(true, OP_PING, b"keepalive-42");
        let Ok(Parsed::Frame(h)) = parse(&ping, 1024) else { panic!("ping parses") };
        let mut out = Vec::new();
        encode_masked(OP_PONG, &ping[h.header_len..h.frame_len()], [0xde, 0xad, 0xbe, 0xef], &mut out);
        assert_eq!(out.len(), 2 + 4 + 12);
        assert_ne!(&out[6..], b"keepalive-42", "payload is masked on the wire");
        assert_eq!(unmask(&out), (OP_PONG, b"keepalive-42".to_vec()));
        // The server rejects masked frames, and so does our own parser: it is a client frame.
        assert_eq!(parse(&out, 1024), Err(FrameError::Masked));
    }

    #[test]
    fn masked_encoding_uses_all_length_classes() {
        for len in [0usize, 125, 126, 65535, 65536] {
            let payload = vec![b'a'; len];
            let mut out = Vec::new();
            encode_masked(OP_TEXT, &payload, new_mask(), &mut out);
            assert_eq!(unmask(&out), (OP_TEXT, payload));
        }
    }

    #[test]
    fn close_codes() {
        assert_eq!(close_code(&[0x0F, 0xA8, b'b', b'y', b'e']), 4008);
        assert_eq!(close_code(&[0x03, 0xE8]), 1000);
        assert_eq!(close_code(&[]), CLOSE_NO_STATUS);
    }
}
