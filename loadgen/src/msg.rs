//! Cheap reading of server text frames: the message type, for `message.new` the `chat_id`, `seq`
//! and the loadgen stamp (`ts`, `run`) inside `data`, and for `subscribed` the room position and
//! the recovery answer, without a JSON parser on the hot path.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::LazyLock;

use memchr::memmem::Finder;

static DATA: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"data\":"));
static TYPE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"type\":\""));
static CHAT: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"chat_id\":\""));
static SEQ: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"seq\":"));
static TS: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"ts\":"));
static RUN: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"run\":"));
static CODE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"code\":\""));
static RECOVERED: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"recovered\":"));

/// `presence.join` / `presence.leave` frames this process read (any connection, any mode).
pub(crate) static PRESENCE_RECEIVED: AtomicU64 = AtomicU64::new(0);
/// `typing` frames this process read.
pub(crate) static TYPING_RECEIVED: AtomicU64 = AtomicU64::new(0);
/// `typing` commands this process sent (`--presence` in fanout and soak).
pub(crate) static TYPING_SENT: AtomicU64 = AtomicU64::new(0);

/// A `message.new` delivery as far as the load generator cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Delivery<'a> {
    pub(crate) chat_id: &'a [u8],
    pub(crate) seq: u64,
    /// Publish time in unix nanoseconds, when the event came from a load generator.
    pub(crate) ts: Option<u64>,
    /// Id of the loadgen run that published it.
    pub(crate) run: Option<u64>,
}

/// A `subscribed` answer: the room's position, and with `since` whether the gap was recovered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Subscribed {
    /// The room's last `seq` when the subscription took effect (absent from older servers).
    pub(crate) seq: Option<u64>,
    /// Present only when the `subscribe` carried `since`.
    pub(crate) recovered: Option<bool>,
}

/// What one server text frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ServerMsg<'a> {
    Delivery(Delivery<'a>),
    /// A room event without a readable `seq`, or `message.new` missing fields.
    Malformed,
    Subscribed(Subscribed),
    Pong,
    /// `{"type":"error",...}` with its `code`.
    Error(&'a [u8]),
    /// Any other type (`chat.updated`, `unsubscribed`, ...).
    Other,
}

/// Classifies a server text frame. The envelope (everything before `"data":`) is searched for
/// `type`, `chat_id` and `seq`, and `data` for `ts` and `run`, so publisher-chosen data cannot
/// spoof the envelope.
pub(crate) fn classify(payload: &[u8]) -> ServerMsg<'_> {
    let data_at = DATA.find(payload).unwrap_or(payload.len());
    let (head, data) = payload.split_at(data_at);
    let Some(kind) = string_after(&TYPE, head) else {
        return ServerMsg::Other;
    };
    match kind {
        b"message.new" => {
            let (Some(chat_id), Some(seq)) = (string_after(&CHAT, head), number_after(&SEQ, head)) else {
                return ServerMsg::Malformed;
            };
            ServerMsg::Delivery(Delivery {
                chat_id,
                seq,
                ts: number_after(&TS, data),
                run: number_after(&RUN, data),
            })
        }
        b"subscribed" => ServerMsg::Subscribed(Subscribed {
            seq: number_after(&SEQ, head),
            recovered: bool_after(&RECOVERED, head),
        }),
        b"pong" => ServerMsg::Pong,
        b"presence.join" | b"presence.leave" => {
            PRESENCE_RECEIVED.fetch_add(1, Relaxed);
            ServerMsg::Other
        }
        b"typing" => {
            TYPING_RECEIVED.fetch_add(1, Relaxed);
            ServerMsg::Other
        }
        b"error" => ServerMsg::Error(string_after(&CODE, payload).unwrap_or(b"?")),
        _ => ServerMsg::Other,
    }
}

/// The string value that follows `key` (which ends with the opening quote).
fn string_after<'a>(key: &Finder<'_>, hay: &'a [u8]) -> Option<&'a [u8]> {
    let start = key.find(hay)? + key.needle().len();
    let rest = &hay[start..];
    let end = memchr::memchr(b'"', rest)?;
    Some(&rest[..end])
}

/// The unsigned integer that follows `key` (which ends with the colon), after optional spaces.
fn number_after(key: &Finder<'_>, hay: &[u8]) -> Option<u64> {
    let start = key.find(hay)? + key.needle().len();
    let digits = hay[start..].iter().skip_while(|b| **b == b' ');
    let mut value: u64 = 0;
    let mut any = false;
    for b in digits {
        if !b.is_ascii_digit() {
            break;
        }
        value = value.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
        any = true;
    }
    any.then_some(value)
}

/// The `true` or `false` that follows `key` (which ends with the colon), after optional spaces.
fn bool_after(key: &Finder<'_>, hay: &[u8]) -> Option<bool> {
    let start = key.find(hay)? + key.needle().len();
    let rest = &hay[start..];
    let rest = &rest[rest.iter().take_while(|b| **b == b' ').count()..];
    if rest.starts_with(b"true") {
        Some(true)
    } else if rest.starts_with(b"false") {
        Some(false)
    } else {
        None
    }
}

/// Reads a string field of a small control message; used off the hot path (error texts).
pub(crate) fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHAT_ID: &str = "6c6f6164-6765-4e00-8000-000000000003";

    #[test]
    fn reads_a_loadgen_delivery() {
        let frame = format!(
            r#"{{"type":"message.new","chat_id":"{CHAT_ID}","seq":42,"data":{{"id":"x","content":"x","sender_id":"y","created_at":"2026-01-15T10:30:00Z","ts":1768473000123456789,"run":77}}}}"#
        );
        assert_eq!(
            classify(frame.as_bytes()),
            ServerMsg::Delivery(Delivery {
                chat_id: CHAT_ID.as_bytes(),
                seq: 42,
                ts: Some(1_768_473_000_123_456_789),
                run: Some(77),
            })
        );
    }

    #[test]
    fn data_cannot_spoof_the_envelope_and_foreign_events_have_no_stamp() {
        let frame = format!(
            r#"{{"type":"message.new","chat_id":"{CHAT_ID}","seq": 7,"data":{{"seq":999,"type":"pong","parts":5}}}}"#
        );
        assert_eq!(
            classify(frame.as_bytes()),
            ServerMsg::Delivery(Delivery { chat_id: CHAT_ID.as_bytes(), seq: 7, ts: None, run: None })
        );
    }

    #[test]
    fn control_replies() {
        assert_eq!(
            classify(br#"{"type":"subscribed","chat_id":"a"}"#),
            ServerMsg::Subscribed(Subscribed::default())
        );
        assert_eq!(
            classify(br#"{"type":"subscribed","chat_id":"a","seq":57,"recovered":true}"#),
            ServerMsg::Subscribed(Subscribed { seq: Some(57), recovered: Some(true) })
        );
        assert_eq!(
            classify(br#"{"type":"subscribed","chat_id":"a","seq":0,"recovered": false}"#),
            ServerMsg::Subscribed(Subscribed { seq: Some(0), recovered: Some(false) })
        );
        assert_eq!(classify(br#"{"type":"pong"}"#), ServerMsg::Pong);
        assert_eq!(
            classify(br#"{"type":"error","code":"forbidden","message":"no","chat_id":"a"}"#),
            ServerMsg::Error(b"forbidden")
        );
        assert_eq!(classify(br#"{"type":"chat.updated","chat_id":"a","seq":3,"data":{}}"#), ServerMsg::Other);
        assert_eq!(classify(b"not json"), ServerMsg::Other);
    }

    #[test]
    fn malformed_deliveries() {
        assert_eq!(
            classify(br#"{"type":"message.new","chat_id":"a","data":{"seq":1}}"#),
            ServerMsg::Malformed
        );
        assert_eq!(
            classify(br#"{"type":"message.new","chat_id":"a","seq":-1,"data":{}}"#),
            ServerMsg::Malformed
        );
        assert_eq!(
            classify(br#"{"type":"message.new","chat_id":"a","seq":99999999999999999999999,"data":{}}"#),
            ServerMsg::Malformed
        );
        assert_eq!(classify(br#"{"type":"message.new","chat_id":"a","seq":"#), ServerMsg::Malformed);
    }
}
