//! permessage-deflate (RFC 7692) without IO: a server frame's compressed
//! twin, made at most once and shared by every connection that negotiated
//! compression, and the bounded inflation of a client's compressed message.
//!
//! Unless the client asks for `server_no_context_takeover`, Herald keeps its
//! context (RFC 7692 lets it): a room frame has, besides its standalone
//! twin, an "after previous" twin compressed with the room's previous frame
//! as preset dictionary, valid for a connection whose last compressed
//! message was exactly that frame (ids tell, never pointers). Both twins
//! are made at most once per room and shared; no connection keeps a
//! compressor, only the id of the last frame it was sent compressed. Herald
//! asks `client_no_context_takeover`, so a client message is inflated on
//! its own and no connection keeps an inflater between messages.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use zlib_rs::{Deflate, DeflateConfig, DeflateFlush};

use super::frame::{self, MAX_HEAD};

/// The empty stored block a sync flush ends with: RFC 7692 7.2.1 leaves it
/// off the wire, and the receiver appends it again before inflating.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// zlib level 2: on chat-sized events levels 2 to 9 give the same sizes
/// (within 2.5%), and 2 is the cheapest of them; level 1 (zlib-rs's
/// fixed-Huffman "quick" strategy) is 19-24% larger (`benches/deflate.rs`,
/// BENCHMARKS.md "Compression").
const LEVEL: i32 = 2;

/// zlib's memLevel sizes the symbol buffer (2^(memLevel+6) symbols, 3 bytes
/// each) that zlib-rs clears whole at every reset and after every block:
/// twice per frame. The default 8 clears 48 KiB each time, for a frame of a
/// few hundred symbols; 4 (1,024 symbols) gives chat events the same bytes
/// and clears 3 KiB. A frame of more symbols is cut into more blocks, each
/// with its own code tables (the bench's payloads up to 32 KiB still gave
/// the same bytes: `benches/deflate.rs`).
const MEM_LEVEL: i32 = 4;

/// The first header byte's RSV1 bit: "this message is compressed".
pub const RSV1: u8 = 0x40;

/// The LZ77 window of `server_max_window_bits=15`: a preset dictionary
/// longer than this could not be referenced, so only its tail is kept.
const WINDOW: usize = 1 << 15;

/// Ids of frames, unique for the process's life (0: "none yet"). Never a
/// pointer: a freed frame's allocation reused by a new one would let a
/// connection believe its client's window holds bytes it never received.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// How much larger than a frame its previous frame may be for the frame to
/// link to it. A link keeps the previous frame's buffer alive as long as
/// the frame, and history counts only frames it holds: a small frame after
/// a huge one, kept after history let the huge one go (the oldest frame of
/// each of many rooms, once the node-wide byte budget shed their
/// predecessors), held 32 KiB its budget never saw. Bounded by this ratio,
/// what history holds uncounted is at most four times what it counts; a
/// frame far smaller than its predecessor goes standalone (a chat event
/// after a long message of up to four times its size still refers to it).
const LINK_RATIO: usize = 4;

/// What one connection agreed to; present only when it negotiated
/// permessage-deflate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreed {
    /// The client's `server_max_window_bits` (15 when it set none).
    pub server_max_window_bits: u8,
    /// Herald keeps its compression context (it did not answer
    /// `server_no_context_takeover`): the client keeps its inflate window
    /// across messages, so a frame may refer to the one sent before it.
    pub context: bool,
}

impl Agreed {
    /// Largest payload this connection may receive compressed. Each frame
    /// is compressed alone, so no back-reference reaches further than its
    /// own length: a payload no longer than the client's window (2^bits)
    /// is valid for that window whatever window compressed it. Longer ones
    /// go out uncompressed, which RFC 7692 allows per message. The full
    /// window (15, also when the client set none) is the compressor's own:
    /// any length is valid for it.
    pub fn max_payload(self) -> usize {
        match self.server_max_window_bits {
            bits @ ..=14 => 1usize << bits,
            _ => usize::MAX,
        }
    }
}

/// A server frame as every recipient shares it: the plain frame, and its
/// compressed twin, made the first time a connection that negotiated
/// compression needs it (then never again, whoever asks: the room, its
/// history and recoveries all hold this one pointer).
#[derive(Debug, Clone)]
pub struct Wire(Arc<Twin>);

#[derive(Debug)]
struct Twin {
    /// Unique per frame ([`NEXT_ID`]).
    id: u64,
    plain: Bytes,
    /// The room's previous frame: its id and at most the last 32 KiB of
    /// its payload (sharing that frame's buffer; never the previous `Wire`,
    /// so no chain keeps a room's past alive). Boxed, as are the twins: a
    /// frame that starts a room or is never compressed (a quiet room's
    /// one frame of history, a node nobody asks to compress for) pays a
    /// pointer for each, not their size.
    prev: Option<Box<(u64, Bytes)>>,
    /// Made the first time a connection that agreed to compression needs
    /// this frame.
    twins: OnceLock<Box<Twins>>,
}

#[derive(Debug, Default)]
struct Twins {
    /// `None` once tried when compressing did not make the frame smaller.
    deflated: OnceLock<Option<Bytes>>,
    /// Compressed with `prev`'s payload as preset dictionary: valid only
    /// for a client whose window ends with that payload.
    after_prev: OnceLock<Option<Bytes>>,
}

impl Wire {
    pub fn new(plain: Bytes) -> Wire {
        Wire::with_prev(plain, None)
    }

    /// A room frame published right after `prev` (the room's previous
    /// frame, `seq` one less). Linked only when `prev` is at most
    /// [`LINK_RATIO`] times this frame's size: the link shares `prev`'s
    /// buffer, which history does not count once it has let `prev` go.
    pub fn after(plain: Bytes, prev: &Wire) -> Wire {
        if prev.0.plain.len() > plain.len().saturating_mul(LINK_RATIO) {
            return Wire::new(plain);
        }
        let whole = frame::payload(&prev.0.plain);
        // Only the last 32 KiB can be referred to; sharing the buffer (held
        // by history anyway) costs no copy.
        let tail = whole.len().saturating_sub(WINDOW);
        let start = prev.0.plain.len() - whole.len() + tail;
        Wire::with_prev(plain, Some(Box::new((prev.0.id, prev.0.plain.slice(start..)))))
    }

    fn with_prev(plain: Bytes, prev: Option<Box<(u64, Bytes)>>) -> Wire {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        Wire(Arc::new(Twin { id, plain, prev, twins: OnceLock::new() }))
    }

    /// This frame's unique id.
    pub fn id(&self) -> u64 {
        self.0.id
    }

    /// The uncompressed frame.
    pub fn plain(&self) -> &Bytes {
        &self.0.plain
    }

    /// Bytes of the uncompressed frame: what limits and budgets count.
    pub fn len(&self) -> usize {
        self.0.plain.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.plain.is_empty()
    }

    /// The frame a connection is sent: compressed when it `agreed` to
    /// compression, the payload is at least `threshold` bytes and fits its
    /// window, and compression made it smaller; plain otherwise.
    /// `last` is the id of the last frame the connection was sent
    /// compressed (0: none): when it is this frame's predecessor and the
    /// context is kept in the full window, the "after previous" twin goes
    /// out. `last` becomes this frame's id when it goes out compressed
    /// (plain messages do not enter the client's window, RFC 7692 6.2.3).
    /// `compressed(before, after)` is called by each call that compresses
    /// (payload bytes in, frame payload bytes out): at most twice a frame.
    pub fn for_peer(
        &self,
        agreed: Option<Agreed>,
        threshold: usize,
        last: &mut u64,
        mut compressed: impl FnMut(usize, usize),
    ) -> &Bytes {
        let plain = &self.0.plain;
        let Some(agreed) = agreed else { return plain };
        let len = frame::payload(plain).len();
        if len < threshold || len > agreed.max_payload() {
            return plain;
        }
        let mut made = |twin: Option<Bytes>| {
            if let Some(twin) = &twin {
                compressed(len, frame::payload(twin).len());
            }
            twin
        };
        let twins = self.0.twins.get_or_init(Box::default);
        let after = match self.0.prev.as_deref() {
            Some((prev, dictionary))
                if agreed.context && agreed.server_max_window_bits >= 15 && *prev == *last =>
            {
                twins.after_prev.get_or_init(|| made(compress_after(plain, dictionary))).as_ref()
            }
            _ => None,
        };
        let twin = after.or_else(|| twins.deflated.get_or_init(|| made(compress_frame(plain))).as_ref());
        match twin {
            Some(twin) => {
                *last = self.0.id;
                twin
            }
            None => plain,
        }
    }
}

/// Reads as the plain frame, so code that only counts or parses frames
/// (history limits, the history API) does not care which it holds.
impl std::ops::Deref for Wire {
    type Target = Bytes;

    fn deref(&self) -> &Bytes {
        &self.0.plain
    }
}

thread_local! {
    /// One compressor per worker thread, reset before each frame: its state
    /// (a few hundred KiB) is paid per thread, never per connection or room.
    /// zlib-rs's own API, which flate2 wraps without memLevel.
    static DEFLATER: RefCell<Option<Deflate>> = const { RefCell::new(None) };
}

fn new_deflater() -> Deflate {
    // Raw deflate (negative window bits: no zlib header), the full window.
    Deflate::new_with_config(DeflateConfig {
        level: LEVEL,
        window_bits: -15,
        mem_level: MEM_LEVEL,
        ..DeflateConfig::default()
    })
}

/// Compresses a complete unmasked server frame (as `frame::encode` builds
/// them) into a frame with RSV1 set; `None` when it would not be smaller.
/// The sync flush never sets BFINAL, so the frame also continues a kept
/// context.
pub fn compress_frame(plain: &[u8]) -> Option<Bytes> {
    compress_with(plain, &[])
}

/// As [`compress_frame`], with `dictionary` (at most 32 KiB: the tail of
/// the payload the client inflated last) as what came before.
fn compress_after(plain: &[u8], dictionary: &[u8]) -> Option<Bytes> {
    compress_with(plain, dictionary)
}

fn compress_with(plain: &[u8], dictionary: &[u8]) -> Option<Bytes> {
    let first = *plain.first()?;
    let payload = frame::payload(plain);
    // Room for the header and no more than the payload itself: output that
    // fills it is no smaller than the input, so it is not worth finishing.
    let mut buf = vec![0; MAX_HEAD + payload.len() + TAIL.len()];
    let room = buf.len() - MAX_HEAD;
    let written = DEFLATER.with(|cell| {
        let mut cell = cell.borrow_mut();
        let deflater = cell.get_or_insert_with(new_deflater);
        deflater.reset();
        if !dictionary.is_empty() && deflater.set_dictionary(dictionary).is_err() {
            return None;
        }
        let status = deflater.compress(payload, &mut buf[MAX_HEAD..], DeflateFlush::SyncFlush);
        let written = usize::try_from(deflater.total_out()).unwrap_or(usize::MAX);
        let done = matches!(status, Ok(zlib_rs::Status::Ok | zlib_rs::Status::BufError))
            && deflater.total_in() == payload.len() as u64
            && written < room;
        done.then_some(written)
    });
    buf.truncate(MAX_HEAD + written?);
    if !buf.ends_with(&TAIL) {
        return None;
    }
    buf.truncate(buf.len() - TAIL.len());
    if buf.len() - MAX_HEAD >= payload.len() {
        return None;
    }
    // The buffer was sized for the plain payload; the twin is kept (in
    // history too) as long as the frame, so it keeps only what it weighs.
    buf.shrink_to_fit();
    Some(frame::with_head(first | RSV1, buf))
}

/// Why a compressed client message could not be inflated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    /// Inflated past the limit (a deflate bomb, or just too big); the
    /// bytes inflated so far, at most the limit plus one.
    #[error("inflated message exceeds max_message_size")]
    TooBig(u64),
    #[error("compressed message is not valid deflate data")]
    Corrupt,
}

/// Inflates one compressed message (its fragments' payloads together, the
/// sync-flush tail left off as RFC 7692 says). Never holds more than
/// `max + 1` inflated bytes: a bomb stops at the limit, not at its size.
pub fn inflate(mut compressed: Vec<u8>, max: usize) -> Result<Vec<u8>, InflateError> {
    compressed.extend_from_slice(&TAIL);
    let cap = max.saturating_add(1);
    let mut out = Vec::with_capacity(compressed.len().saturating_mul(4).max(64).min(cap));
    let mut inflater = Decompress::new(false);
    loop {
        if out.len() == out.capacity() {
            if out.len() > max {
                return Err(InflateError::TooBig(out.len() as u64));
            }
            // Doubling, capped one byte past the limit: that byte tells
            // "exactly max" from "more than max".
            out.reserve_exact(out.len().max(256).min(cap - out.len()));
        }
        let (in_before, out_before) = (inflater.total_in(), inflater.total_out());
        let rest = compressed.get(in_before as usize..).unwrap_or_default();
        let status = inflater
            .decompress_vec(rest, &mut out, FlushDecompress::Sync)
            .map_err(|_| InflateError::Corrupt)?;
        if out.len() > max {
            return Err(InflateError::TooBig(out.len() as u64));
        }
        // A final block ends the message; anything after it is ignored, as
        // the RFC's receivers do.
        if status == Status::StreamEnd {
            return Ok(out);
        }
        let room_left = out.len() < out.capacity();
        if inflater.total_in() as usize == compressed.len() && room_left {
            return Ok(out);
        }
        let progressed = inflater.total_in() != in_before || inflater.total_out() != out_before;
        if !progressed && room_left {
            return Err(InflateError::Corrupt);
        }
    }
}

/// Compresses a message payload as a client would (raw deflate, sync
/// flush, the tail left off), for tests, fuzzing and tools.
pub fn deflate_payload(payload: &[u8]) -> Vec<u8> {
    let mut deflater = Compress::new(Compression::new(6), false);
    let mut out = Vec::with_capacity(payload.len() + 64);
    loop {
        let rest = &payload[deflater.total_in() as usize..];
        if deflater.compress_vec(rest, &mut out, FlushCompress::Sync).is_err() {
            return Vec::new();
        }
        if deflater.total_in() as usize == payload.len() && out.len() < out.capacity() {
            break;
        }
        out.reserve(out.capacity().max(64));
    }
    if out.ends_with(&TAIL) {
        out.truncate(out.len() - TAIL.len());
    }
    out
}

#[cfg(test)]
mod tests;
