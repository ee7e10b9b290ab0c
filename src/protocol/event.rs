//! Domain events published by backend services (PROTOCOL.md section 5):
//! parsing, validation, which types are known ([`known`], the ingress's one
//! decision) and the JSON form the Redis bus carries between nodes.
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
            EventKind::MemberAdded | EventKind::MemberRemoved | EventKind::Unknown => None,
        }
    }
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
}

impl DomainEvent {
    fn from_wire(w: Wire<'_>) -> Result<(DomainEvent, Option<u64>), EventError> {
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
            EventKind::Unknown => {}
        }
        let event =
            DomainEvent { kind, chat_id: w.chat_id, user_id: w.user_id, user_ids: w.user_ids, data: w.data };
        Ok((event, w.seq))
    }

    /// Serializes the event (with an optional assigned `seq`) for the Redis bus.
    pub fn to_json(&self, seq: Option<u64>) -> String {
        let wire = Wire {
            ty: std::borrow::Cow::Borrowed(self.kind.wire_name()),
            chat_id: self.chat_id,
            user_id: self.user_id,
            user_ids: self.user_ids.clone(),
            data: self.data.clone(),
            seq,
        };
        // ok: serializing plain data with string keys cannot fail.
        serde_json::to_string(&wire).unwrap_or_default()
    }

    /// Parses one event as the Redis bus carries it, with its `seq` if assigned.
    pub fn from_json(bytes: &[u8]) -> Result<(DomainEvent, Option<u64>), EventError> {
        let text = std::str::from_utf8(bytes).map_err(|e| EventError::Malformed(e.to_string()))?;
        let w: Wire<'_> = serde_json::from_str(text).map_err(|e| EventError::Malformed(e.to_string()))?;
        DomainEvent::from_wire(w)
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
    /// The events of known type, in the order published: what goes on to the bus.
    pub events: Vec<DomainEvent>,
    /// How many were of unknown type.
    pub ignored: usize,
}

/// Sets aside the events of unknown type, which are counted and ignored,
/// never fatal (PROTOCOL.md section 5). The one place this is decided: every
/// ingress calls it before the bus, and nothing after the bus checks again.
pub fn known(mut events: Vec<DomainEvent>) -> Known {
    let total = events.len();
    events.retain(|e| e.kind != EventKind::Unknown);
    Known { ignored: total - events.len(), events }
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
            DomainEvent::from_wire(w).map(|(ev, _)| ev).map_err(|source| BatchError::Event { index, source })
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
        let Known { events, ignored } = known(parse_batch(body.as_bytes())?);
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
