//! `--compress`: offering permessage-deflate (RFC 7692) in the handshake,
//! inflating compressed server messages, and counting the bytes every
//! client read off the wire, so a run reports wire bytes per delivery.
//!
//! Process-wide, set once from the command line before any connection
//! opens: every client of a run offers the same, and one counter for all
//! of them is what the report divides.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use flate2::{Decompress, FlushDecompress, Status};

/// What a client offers: the shape Python's `websockets` and Node's `ws` send.
pub(crate) const OFFER: &str = "permessage-deflate; client_max_window_bits";
/// What a client offers with `--inflate-every N` (N > 1): frames that each
/// inflate alone, so skipping some leaves the others readable.
pub(crate) const OFFER_STANDALONE: &str =
    "permessage-deflate; server_no_context_takeover; client_max_window_bits";

static ENABLED: AtomicBool = AtomicBool::new(false);
static STANDALONE: AtomicBool = AtomicBool::new(false);
static WIRE_BYTES: AtomicU64 = AtomicU64::new(0);

/// Makes every client of this run offer compression.
pub(crate) fn enable(on: bool) {
    ENABLED.store(on, Relaxed);
}

pub(crate) fn enabled() -> bool {
    ENABLED.load(Relaxed)
}

/// Makes every client ask for `server_no_context_takeover` (`--inflate-every`).
pub(crate) fn ask_standalone(on: bool) {
    STANDALONE.store(on, Relaxed);
}

/// The offer every client of this run sends.
pub(crate) fn offer() -> &'static str {
    if STANDALONE.load(Relaxed) {
        OFFER_STANDALONE
    } else {
        OFFER
    }
}

/// Counts bytes a client read from its socket.
pub(crate) fn count(n: usize) {
    WIRE_BYTES.fetch_add(n as u64, Relaxed);
}

/// Bytes every client read from its socket so far (handshakes included).
pub(crate) fn wire_bytes() -> u64 {
    WIRE_BYTES.load(Relaxed)
}

/// `n` bytes of chat-like text: what compression meets in real messages
/// (a run of one letter would flatter it), the same in every run.
pub(crate) fn prose(n: usize) -> String {
    const TEXT: &str = "Morning all, the release candidate is up on staging; please check the login flow \
                        and the new upload dialog before lunch, and tell me if anything looks off. ";
    TEXT.chars().cycle().take(n).collect()
}

thread_local! {
    /// One inflater per thread, reset per message, for connections whose
    /// server answered `server_no_context_takeover` (no message needs
    /// another's window): a fresh one per message cost more than the rest
    /// of a delivery and made the load generator the bottleneck.
    static INFLATER: RefCell<Decompress> = RefCell::new(Decompress::new(false));
}

/// Inflates one compressed message into `out` (cleared first), at most
/// `max` bytes; `false` when it is not valid deflate data or is larger.
/// `window`: the connection's own inflater when the server keeps its
/// context (RFC 7692 context takeover): never reset, so each message may
/// refer to the ones before it; every compressed message must go through it.
pub(crate) fn inflate(
    window: Option<&mut Decompress>,
    payload: &[u8],
    max: usize,
    out: &mut Vec<u8>,
) -> bool {
    match window {
        Some(window) => inflate_with(window, payload, max, out),
        None => INFLATER.with(|cell| {
            let mut inflater = cell.borrow_mut();
            inflater.reset(false);
            inflate_with(&mut inflater, payload, max, out)
        }),
    }
}

fn inflate_with(inflater: &mut Decompress, payload: &[u8], max: usize, out: &mut Vec<u8>) -> bool {
    const TAIL: [u8; 4] = [0, 0, 0xff, 0xff];
    out.clear();
    for input in [payload, &TAIL[..]] {
        let start = inflater.total_in();
        loop {
            if out.len() == out.capacity() {
                out.reserve(out.capacity().max(1024));
            }
            let used = (inflater.total_in() - start) as usize;
            let status = inflater.decompress_vec(&input[used..], out, FlushDecompress::Sync);
            if out.len() > max {
                return false;
            }
            match status {
                Ok(Status::StreamEnd) => return true,
                Ok(_)
                    if (inflater.total_in() - start) as usize == input.len()
                        && out.len() < out.capacity() =>
                {
                    break
                }
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compress, Compression, FlushCompress};

    #[test]
    fn inflates_what_a_server_compressed() {
        let text = br#"{"type":"message.new","data":{"content":"hello hello hello hello hello"}}"#;
        let mut c = Compress::new(Compression::new(1), false);
        let mut z = Vec::with_capacity(256);
        c.compress_vec(text, &mut z, FlushCompress::Sync).expect("compress");
        assert!(z.ends_with(&[0, 0, 0xff, 0xff]));
        z.truncate(z.len() - 4);
        let mut out = Vec::new();
        assert!(inflate(None, &z, 1 << 20, &mut out));
        assert_eq!(out, text);
        assert!(!inflate(None, &z, 10, &mut out), "over the limit");
        assert!(!inflate(None, &[0xff; 8], 1 << 20, &mut out), "not deflate data");
    }

    #[test]
    fn a_kept_window_inflates_messages_that_refer_to_earlier_ones() {
        let text = br#"{"type":"message.new","data":{"content":"the same words again and again"}}"#;
        let mut c = Compress::new(Compression::new(6), false);
        let mut window = Decompress::new(false);
        let mut sizes = Vec::new();
        for _ in 0..3 {
            let mut z = Vec::with_capacity(256);
            c.compress_vec(text, &mut z, FlushCompress::Sync).expect("compress");
            z.truncate(z.len() - 4);
            sizes.push(z.len());
            let mut out = Vec::new();
            assert!(inflate(Some(&mut window), &z, 1 << 20, &mut out));
            assert_eq!(out, text);
        }
        assert!(sizes[1] < sizes[0] / 2, "{sizes:?}: the second refers to the first");
    }
}
