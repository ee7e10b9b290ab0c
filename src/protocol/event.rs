//! Domain events published by backend services (PROTOCOL.md section 5):
//! parsing, validation, which types are known or passed through ([`known`],
//! the ingress's one decision, with the operator's [`Passthrough`] globs) and
//! the JSON form the Redis bus carries between nodes.
//!
//! Who receives an event is not decided here: `route.rs` builds on this
//! file (it also gives [`DomainEvent`] its `room()`), never the reverse.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{ChatId, UserId};

/// The domain event types Herald routes; anything else is [`EventKind::Unknown`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    MessageSent,
    ChatUpdated,
    TaskStatusChanged,
    NotificationCreated,
    MemberAdded,
    MemberRemoved,
    /// A custom type matching `events.passthrough`: delivered as published,
    /// under its own `type` ([`DomainEvent::name`]).
    Passthrough,
    /// Counted and ignored, never fatal.
    Unknown,
}

impl EventKind {
    /// Maps the wire `type` to a kind.
    pub fn from_wire(ty: &str) -> EventKind {
        match ty {
            "message.sent" => EventKind::MessageSent,
            "chat.updated" => EventKind::ChatUpdated,
            "task.status_changed" => EventKind::TaskStatusChanged,
            "notification.created" => EventKind::NotificationCreated,
            "chat.member_added" => EventKind::MemberAdded,
            "chat.member_removed" => EventKind::MemberRemoved,
            _ => EventKind::Unknown,
        }
    }

    /// The domain event's wire `type`.
    pub fn wire_name(self) -> &'static str {
        match self {
            EventKind::MessageSent => "message.sent",
            EventKind::ChatUpdated => "chat.updated",
            EventKind::TaskStatusChanged => "task.status_changed",
            EventKind::NotificationCreated => "notification.created",
            EventKind::MemberAdded => "chat.member_added",
            EventKind::MemberRemoved => "chat.member_removed",
            EventKind::Passthrough => "passthrough",
            EventKind::Unknown => "unknown",
        }
    }

    /// The client message `type` this event becomes, if it reaches clients.
    pub fn client_type(self) -> Option<&'static str> {
        match self {
            EventKind::MessageSent => Some("message.new"),
            EventKind::ChatUpdated => Some("chat.updated"),
            EventKind::TaskStatusChanged => Some("task.updated"),
            EventKind::NotificationCreated => Some("notification.new"),
            EventKind::MemberAdded
            | EventKind::MemberRemoved
            | EventKind::Passthrough
            | EventKind::Unknown => None,
        }
    }
}

/// Every `type` a client can receive from Herald itself (its replies and the
/// four mapped event types) and every known domain type. A custom type never
/// takes one of these names, so a published event cannot pass for a Herald
/// reply such as `subscribed` or `error`: [`Passthrough::compile`] refuses a
/// glob that matches one, and [`known`] never passes one through.
pub const RESERVED_TYPES: [&str; 18] = [
    "subscribed",
    "unsubscribed",
    "error",
    "pong",
    "message.new",
    "chat.updated",
    "task.updated",
    "notification.new",
    "message.sent",
    "task.status_changed",
    "notification.created",
    "chat.member_added",
    "chat.member_removed",
    "ping",
    "presence",
    "presence.join",
    "presence.leave",
    "typing",
];

/// Longest custom `type` passed through, in bytes.
pub const MAX_TYPE_LEN: usize = 64;

/// A custom type's characters: lowercase ASCII letters, digits, `.`, `_`, `-`.
fn is_type_byte(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
}

/// The operator's `events.passthrough` globs, compiled once (checked when the
/// config is validated, built once per node). `*` matches any run of
/// characters, everything else itself.
#[derive(Debug, Clone, Default)]
pub struct Passthrough {
    globs: Vec<Box<str>>,
}

/// Why a passthrough glob is refused at config validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GlobError {
    #[error("`{0}` must be 1 to {MAX_TYPE_LEN} bytes of a-z 0-9 . _ - and *")]
    Chars(String),
    #[error("`{glob}` matches `{reserved}`, a type Herald itself sends or maps")]
    Reserved { glob: String, reserved: &'static str },
}

impl Passthrough {
    /// Compiles the globs, refusing one of other characters or one that
    /// matches a [`RESERVED_TYPES`] name.
    pub fn compile(globs: &[String]) -> Result<Passthrough, GlobError> {
        for glob in globs {
            let sane = !glob.is_empty()
                && glob.len() <= MAX_TYPE_LEN
                && glob.bytes().all(|b| b == b'*' || is_type_byte(b));
            if !sane {
                return Err(GlobError::Chars(glob.clone()));
            }
            if let Some(reserved) = RESERVED_TYPES.iter().find(|r| glob_matches(glob, r)) {
                return Err(GlobError::Reserved { glob: glob.clone(), reserved });
            }
        }
        Ok(Passthrough { globs: globs.iter().map(|g| g.as_str().into()).collect() })
    }

    /// True when an event of `ty`, not a known type, is passed through.
    pub fn matches(&self, ty: &str) -> bool {
        !RESERVED_TYPES.contains(&ty) && self.globs.iter().any(|g| glob_matches(g, ty))
    }
}

/// `*` matches any run of bytes (also none); every other byte itself.
fn glob_matches(glob: &str, text: &str) -> bool {
    let (glob, text) = (glob.as_bytes(), text.as_bytes());
    let (mut g, mut t) = (0, 0);
    // Where the last `*` was and the text position it is tried to cover up to.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if g < glob.len() && glob[g] == b'*' {
            star = Some((g, t));
            g += 1;
        } else if g < glob.len() && glob[g] == text[t] {
            g += 1;
            t += 1;
        } else if let Some((sg, st)) = star {
            g = sg + 1;
            t = st + 1;
            star = Some((sg, st + 1));
        } else {
            return false;
        }
    }
    glob[g..].iter().all(|b| *b == b'*')
}

/// A validated domain event. `data` is kept as the publisher's exact bytes.
#[derive(Debug, Clone)]
pub struct DomainEvent {
    pub kind: EventKind,
    pub chat_id: Option<ChatId>,
    pub user_id: Option<UserId>,
    pub user_ids: Vec<UserId>,
    /// Opaque payload, byte-for-byte as published; `None` for events without one.
    pub data: Option<Box<RawValue>>,
    /// The wire `type` of a type Herald does not map ([`EventKind::Passthrough`]
    /// and [`EventKind::Unknown`]); `None` for the known types.
    pub name: Option<Box<str>>,
}

/// Why an event was refused; the ingress reports it with the event's index.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("not a JSON event object: {0}")]
    Malformed(String),
    #[error("`{ty}` needs field `{field}`")]
    MissingField { ty: &'static str, field: &'static str },
    #[error("`task.status_changed` needs `chat_id` or `user_ids`")]
    NoTaskTarget,
    #[error("passthrough type `{0}` must be at most 64 bytes of a-z 0-9 . _ -")]
    BadCustomType(String),
    #[error("passthrough type `{0}` needs exactly one of `chat_id` and `user_id`, and no `user_ids`")]
    CustomTarget(String),
    #[error("passthrough type `{0}` needs field `data`")]
    CustomData(String),
}

/// The wire shape, shared by parsing and by the Redis bus's re-encoding.
#[derive(Deserialize, Serialize)]
struct Wire<'a> {
    #[serde(rename = "type", borrow)]
    ty: std::borrow::Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    chat_id: Option<ChatId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    user_id: Option<UserId>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    user_ids: Vec<UserId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    data: Option<Box<RawValue>>,
    /// Set by the Redis bus only: the room sequence assigned in Redis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    /// Set by the Redis bus only: the publishing node passed this type
    /// through ([`known`] decided it there; no node decides again).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    passthrough: bool,
}

/// Checks a custom event's shape: a sane type, exactly one target, data.
fn check_custom(ty: &str, e: &DomainEvent) -> Result<(), EventError> {
    if ty.is_empty() || ty.len() > MAX_TYPE_LEN || !ty.bytes().all(is_type_byte) {
        return Err(EventError::BadCustomType(ty.chars().take(MAX_TYPE_LEN + 1).collect()));
    }
    if e.chat_id.is_some() == e.user_id.is_some() || !e.user_ids.is_empty() {
        return Err(EventError::CustomTarget(ty.to_string()));
    }
    if e.data.as_ref().is_none_or(|d| d.get() == "null") {
        return Err(EventError::CustomData(ty.to_string()));
    }
    Ok(())
}

impl DomainEvent {
    /// The client message `type` this event becomes, if it reaches clients:
    /// the mapped name, or a passthrough type's own.
    pub fn client_type(&self) -> Option<&str> {
        match self.kind {
            EventKind::Passthrough => self.name.as_deref(),
            kind => kind.client_type(),
        }
    }

    /// The event's wire `type`.
    pub fn wire_type(&self) -> &str {
        match (self.kind, &self.name) {
            (EventKind::Passthrough | EventKind::Unknown, Some(name)) => name,
            (kind, _) => kind.wire_name(),
        }
    }

    /// `bus` is true for the Redis bus's form, whose `seq` and `passthrough`
    /// are Herald's own; a publisher's are ignored.
    fn from_wire(w: Wire<'_>, bus: bool) -> Result<(DomainEvent, Option<u64>), EventError> {
        let kind = EventKind::from_wire(&w.ty);
        let need = |ok: bool, field: &'static str| {
            if ok {
                Ok(())
            } else {
                Err(EventError::MissingField { ty: kind.wire_name(), field })
            }
        };
        // `data: null` counts as missing: clients are promised an object.
        let has_data = w.data.as_ref().is_some_and(|d| d.get() != "null");
        match kind {
            EventKind::MessageSent | EventKind::ChatUpdated => {
                need(w.chat_id.is_some(), "chat_id")?;
                need(has_data, "data")?;
            }
            EventKind::TaskStatusChanged => {
                if w.chat_id.is_none() && w.user_ids.is_empty() {
                    return Err(EventError::NoTaskTarget);
                }
                need(has_data, "data")?;
            }
            EventKind::NotificationCreated => {
                need(w.user_id.is_some(), "user_id")?;
                need(has_data, "data")?;
            }
            EventKind::MemberAdded | EventKind::MemberRemoved => {
                need(w.chat_id.is_some(), "chat_id")?;
                need(w.user_id.is_some(), "user_id")?;
            }
            EventKind::Passthrough | EventKind::Unknown => {}
        }
        let name = (kind == EventKind::Unknown).then(|| Box::<str>::from(w.ty.as_ref()));
        // A custom type's shape is checked once it is known to pass through.
        let mut event = DomainEvent {
            kind,
            chat_id: w.chat_id,
            user_id: w.user_id,
            user_ids: w.user_ids,
            data: w.data,
            name,
        };
        if bus && w.passthrough && kind == EventKind::Unknown {
            check_custom(&w.ty, &event)?;
            event.kind = EventKind::Passthrough;
        }
        Ok((event, if bus { w.seq } else { None }))
    }

    /// Serializes the event (with an optional assigned `seq`) for the Redis bus.
    pub fn to_json(&self, seq: Option<u64>) -> String {
        let wire = Wire {
            ty: std::borrow::Cow::Borrowed(self.wire_type()),
            chat_id: self.chat_id,
            user_id: self.user_id,
            user_ids: self.user_ids.clone(),
            data: self.data.clone(),
            seq,
            passthrough: self.kind == EventKind::Passthrough,
        };
        // ok: serializing plain data with string keys cannot fail.
        serde_json::to_string(&wire).unwrap_or_default()
    }

    /// Parses one event as the Redis bus carries it, with its `seq` if assigned.
    pub fn from_json(bytes: &[u8]) -> Result<(DomainEvent, Option<u64>), EventError> {
        let text = std::str::from_utf8(bytes).map_err(|e| EventError::Malformed(e.to_string()))?;
        let w: Wire<'_> = serde_json::from_str(text).map_err(|e| EventError::Malformed(e.to_string()))?;
        DomainEvent::from_wire(w, true)
    }
}

/// A publish body failed validation; no event of the batch is accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("body is not a JSON event object or array of them: {0}")]
    Body(String),
    #[error("event {index}: {source}")]
    Event { index: usize, source: EventError },
}

/// A publish batch with its unknown types set aside ([`known`]).
#[derive(Debug)]
pub struct Known {
    /// The events of known or passthrough type, in the order published: what goes on to the bus.
    pub events: Vec<DomainEvent>,
    /// How many were of unknown type.
    pub ignored: usize,
    /// The first event of unknown type: its index in the batch and its `type`
    /// (for `api.reject_unknown`).
    pub first_unknown: Option<(usize, Box<str>)>,
}

/// Decides each event's type once: known (mapped), passed through (matching
/// `passthrough`, and then checked: a sane type, exactly one of `chat_id` and
/// `user_id`, `data`), or unknown, set aside, counted and ignored, never fatal
/// (PROTOCOL.md section 5). The one place this is decided: every ingress calls
/// it before the bus, and nothing after the bus checks again (the Redis form
/// carries the decision). A malformed passthrough event refuses the batch.
pub fn known(events: Vec<DomainEvent>, passthrough: &Passthrough) -> Result<Known, BatchError> {
    let total = events.len();
    let mut first_unknown = None;
    let mut kept = Vec::with_capacity(total);
    for (index, mut event) in events.into_iter().enumerate() {
        if event.kind == EventKind::Unknown {
            let ty = event.name.as_deref().unwrap_or_default();
            if !passthrough.matches(ty) {
                if first_unknown.is_none() {
                    first_unknown = Some((index, ty.into()));
                }
                continue;
            }
            check_custom(ty, &event).map_err(|source| BatchError::Event { index, source })?;
            event.kind = EventKind::Passthrough;
        }
        kept.push(event);
    }
    Ok(Known { ignored: total - kept.len(), events: kept, first_unknown })
}

/// Parses a `POST /api/events` body: one event object or an array of them.
/// Publisher-supplied `seq` fields are ignored: sequencing is Herald's.
pub fn parse_batch(body: &[u8]) -> Result<Vec<DomainEvent>, BatchError> {
    // serde_json skips an unknown field's string without checking its UTF-8,
    // so a body with invalid UTF-8 there was accepted; JSON is UTF-8 text
    // (found by fuzzing the client commands, which shared the flaw).
    std::str::from_utf8(body).map_err(|e| BatchError::Body(format!("not UTF-8: {e}")))?;
    let first_non_ws = body.iter().find(|b| !b.is_ascii_whitespace());
    let raws: Vec<&[u8]> = match first_non_ws {
        Some(b'[') => {
            let items: Vec<&RawValue> =
                serde_json::from_slice(body).map_err(|e| BatchError::Body(e.to_string()))?;
            items.into_iter().map(|r| r.get().as_bytes()).collect()
        }
        Some(b'{') => vec![body],
        _ => return Err(BatchError::Body("expected a JSON object or array".into())),
    };
    raws.into_iter()
        .enumerate()
        .map(|(index, raw)| {
            let w: Wire<'_> = serde_json::from_slice(raw)
                .map_err(|e| BatchError::Event { index, source: EventError::Malformed(e.to_string()) })?;
            DomainEvent::from_wire(w, false)
                .map(|(ev, _)| ev)
                .map_err(|source| BatchError::Event { index, source })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    const CHAT: &str = "7d1b3c2a-0f7e-4a55-9a55-1b2c3d4e5f60";

    #[test]
    fn keeps_data_byte_for_byte() -> TestResult {
        let body =
            format!(r#"{{"type":"message.sent","chat_id":"{CHAT}","data":{{"b":1.50,"a":"\u00e9"}}}}"#);
        let events = parse_batch(body.as_bytes())?;
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].kind, EventKind::MessageSent);
        assert_eq!(events[0].data.as_ref().ok_or("no data")?.get(), r#"{"b":1.50,"a":"\u00e9"}"#);
        Ok(())
    }

    #[test]
    fn parses_arrays_and_names_the_first_bad_event() -> TestResult {
        let ok = format!(r#"{{"type":"chat.updated","chat_id":"{CHAT}","data":{{"name":"x"}}}}"#);
        let batch = format!("[{ok},{ok}]");
        assert_eq!(parse_batch(batch.as_bytes())?.len(), 2);
        let bad = format!(r#"[{ok},{{"type":"message.sent","data":{{}}}}]"#);
        match parse_batch(bad.as_bytes()) {
            Err(BatchError::Event {
                index: 1,
                source: EventError::MissingField { field: "chat_id", .. },
            }) => {}
            other => panic!("unexpected {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn rejects_malformed_bodies() {
        for body in ["", "nope", "42", "[1]", "{", r#"{"type":"message.sent","chat_id":"bad","data":{}}"#] {
            assert!(parse_batch(body.as_bytes()).is_err(), "accepted {body:?}");
        }
    }

    #[test]
    fn unknown_types_parse_as_unknown() -> TestResult {
        let events = parse_batch(br#"{"type":"invoice.paid","data":{}}"#)?;
        assert_eq!(events[0].kind, EventKind::Unknown);
        Ok(())
    }

    #[test]
    fn known_sets_unknown_types_aside_and_keeps_the_order() -> TestResult {
        let body = format!(
            r#"[{{"type":"future.thing"}},{{"type":"message.sent","chat_id":"{CHAT}","data":{{"n":1}}}},{{"type":"chat.poked"}},{{"type":"chat.updated","chat_id":"{CHAT}","data":{{}}}}]"#
        );
        let Known { events, ignored, first_unknown } =
            known(parse_batch(body.as_bytes())?, &Passthrough::default())?;
        assert_eq!(first_unknown, Some((0, "future.thing".into())));
        assert_eq!(ignored, 2);
        let kinds: Vec<EventKind> = events.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, [EventKind::MessageSent, EventKind::ChatUpdated]);
        Ok(())
    }

    #[test]
    fn round_trips_through_the_bus_form() -> TestResult {
        let body = format!(
            r#"{{"type":"task.status_changed","chat_id":"{CHAT}","user_ids":["{CHAT}"],"data":{{"s":"done"}}}}"#
        );
        let ev = parse_batch(body.as_bytes())?.remove(0);
        let (back, seq) = DomainEvent::from_json(ev.to_json(Some(7)).as_bytes())?;
        assert_eq!(seq, Some(7));
        assert_eq!(back.kind, EventKind::TaskStatusChanged);
        assert_eq!(back.user_ids, ev.user_ids);
        assert_eq!(back.data.ok_or("no data")?.get(), r#"{"s":"done"}"#);
        Ok(())
    }

    #[test]
    fn globs_match_any_run_and_never_reserved_types() -> TestResult {
        for (glob, text, want) in [
            ("reaction.*", "reaction.added", true),
            ("reaction.*", "reaction.", true),
            ("reaction.*", "reactions.x", false),
            ("*.read", "receipt.read", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
        ] {
            assert_eq!(glob_matches(glob, text), want, "{glob} ~ {text}");
        }
        assert!(Passthrough::compile(&["*".into()]).is_err());
        assert!(Passthrough::compile(&["notification.*".into()]).is_err());
        assert!(Passthrough::compile(&["Reaction".into()]).is_err());
        let pass = Passthrough::compile(&["reaction.*".into()])?;
        assert!(pass.matches("reaction.added") && !pass.matches("receipt.read"));
        Ok(())
    }

    #[test]
    fn the_bus_form_carries_the_passthrough_decision_and_a_publisher_cannot_forge_it() -> TestResult {
        let pass = Passthrough::compile(&["reaction.*".into()])?;
        let body = format!(r#"{{"type":"reaction.added","chat_id":"{CHAT}","data":{{"e":1}}}}"#);
        let ev = known(parse_batch(body.as_bytes())?, &pass)?.events.remove(0);
        assert_eq!((ev.kind, ev.client_type()), (EventKind::Passthrough, Some("reaction.added")));
        let (back, seq) = DomainEvent::from_json(ev.to_json(Some(9)).as_bytes())?;
        assert_eq!(
            (back.kind, back.client_type(), seq),
            (EventKind::Passthrough, Some("reaction.added"), Some(9))
        );
        // A publisher's own `passthrough` and `seq` fields are ignored.
        let forged =
            format!(r#"{{"type":"subscribed","chat_id":"{CHAT}","data":{{}},"passthrough":true,"seq":3}}"#);
        let events = parse_batch(forged.as_bytes())?;
        assert_eq!(events[0].kind, EventKind::Unknown);
        assert_eq!(known(events, &pass)?.ignored, 1);
        Ok(())
    }

    /// Found with fuzzing: invalid UTF-8 in an unknown field was accepted,
    /// at the ingress and on the bus.
    #[test]
    fn refuses_invalid_utf8_even_in_an_unknown_field() {
        let mut body =
            format!(r#"{{"type":"chat.updated","chat_id":"{CHAT}","data":{{}},"x":""#).into_bytes();
        body.extend_from_slice(b"\xff\"}");
        assert!(matches!(parse_batch(&body), Err(BatchError::Body(_))));
        assert!(matches!(DomainEvent::from_json(&body), Err(EventError::Malformed(_))));
    }
}
