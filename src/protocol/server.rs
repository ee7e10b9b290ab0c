//! Server -> client messages (PROTOCOL.md sections 2-5), the frames domain
//! events become among them, each encoded straight into a complete WebSocket
//! text frame so it can be shared by every recipient.

use bytes::Bytes;
use std::io::Write;

use super::event::DomainEvent;
use super::frame;
use super::route::{self, Route};
use super::ChatId;

/// The frame `event` becomes in its room with `seq`, or `None` when it goes
/// to no room. The one place an event becomes a room frame: the broadcaster
/// sends it live and recovery replays it from the bus's own history, so a
/// replayed event is the same bytes the live one was.
pub fn room_frame(event: &DomainEvent, seq: u64) -> Option<Bytes> {
    let (ty, chat) = (event.client_type()?, route::room(event)?);
    Some(room_event(ty, chat, seq, data(event)))
}

/// The one frame every user `route` names receives (each once), or `None`
/// when it names none. Per-user events carry no `seq`; the chat the frame
/// names is the route's to decide.
pub fn user_frame(event: &DomainEvent, route: &Route<'_>) -> Option<Bytes> {
    if route.users.is_empty() {
        return None;
    }
    Some(user_event(event.client_type()?, route.user_chat, data(event)))
}

/// Bytes of a room event besides its type and data, at most (a `seq` of 20
/// digits): reserved exactly, since a frame that outgrew its buffer would
/// double it, and a room's history holds the frame as allocated.
const ROOM_EVENT_FIXED: usize = r#"{"type":"","chat_id":"","seq":,"data":}"#.len() + 36 + 20;
/// The same for a per-user event (with a `chat_id`).
const USER_EVENT_FIXED: usize = r#"{"type":"","chat_id":"","data":}"#.len() + 36;

/// `{"type":"<ty>","chat_id":"<id>","seq":<n>,"data":<raw>}` as a frame.
/// Room events are encoded once per event, whatever the room's size.
pub fn room_event(ty: &str, chat_id: ChatId, seq: u64, data: &str) -> Bytes {
    frame::text_with(ROOM_EVENT_FIXED + ty.len() + data.len(), |buf| {
        buf.extend_from_slice(br#"{"type":""#);
        buf.extend_from_slice(ty.as_bytes());
        buf.extend_from_slice(br#"","chat_id":""#);
        push_uuid(buf, chat_id);
        buf.extend_from_slice(br#"","seq":"#);
        let _ = write!(buf, "{seq}");
        buf.extend_from_slice(br#","data":"#);
        buf.extend_from_slice(data.as_bytes());
        buf.push(b'}');
    })
}

/// `{"type":"<ty>"[,"chat_id":"<id>"],"data":<raw>}`: a per-user event,
/// which carries no `seq`; `chat_id` is included when the event has one.
pub fn user_event(ty: &str, chat_id: Option<ChatId>, data: &str) -> Bytes {
    frame::text_with(USER_EVENT_FIXED + ty.len() + data.len(), |buf| {
        buf.extend_from_slice(br#"{"type":""#);
        buf.extend_from_slice(ty.as_bytes());
        if let Some(chat_id) = chat_id {
            buf.extend_from_slice(br#"","chat_id":""#);
            push_uuid(buf, chat_id);
        }
        buf.extend_from_slice(br#"","data":"#);
        buf.extend_from_slice(data.as_bytes());
        buf.push(b'}');
    })
}

/// `{"type":"subscribed","chat_id":"<id>","seq":<n>[,"recovered":<bool>]}`:
/// the room's position when the subscription took effect, and whether the
/// events after `since` follow (only when the client sent `since`).
pub fn subscribed(chat_id: ChatId, seq: u64, recovered: Option<bool>) -> Bytes {
    let extra = match recovered {
        None => format!(r#","seq":{seq}"#),
        Some(r) => format!(r#","seq":{seq},"recovered":{r}"#),
    };
    with_chat("subscribed", chat_id, &extra)
}

/// `{"type":"unsubscribed","chat_id":"<id>"}`
pub fn unsubscribed(chat_id: ChatId) -> Bytes {
    with_chat("unsubscribed", chat_id, "")
}

/// `{"type":"unsubscribed","chat_id":"<id>","reason":"removed"}`
pub fn removed(chat_id: ChatId) -> Bytes {
    with_chat("unsubscribed", chat_id, r#","reason":"removed""#)
}

/// `{"type":"presence.join"|"presence.leave"|"typing","chat_id":"<id>","user_id":"<id>"}`:
/// an ephemeral room event (no `seq`, no history), encoded once per event.
pub fn ephemeral(ty: &str, chat_id: ChatId, user_id: super::UserId) -> Bytes {
    frame::text_with(128, |buf| {
        buf.extend_from_slice(br#"{"type":""#);
        buf.extend_from_slice(ty.as_bytes());
        buf.extend_from_slice(br#"","chat_id":""#);
        push_uuid(buf, chat_id);
        buf.extend_from_slice(br#"","user_id":""#);
        push_uuid(buf, user_id);
        buf.extend_from_slice(br#""}"#);
    })
}

/// `{"type":"presence","chat_id":"<id>","users":[...][,"truncated":true]}`
pub fn presence(chat_id: ChatId, users: &[super::UserId], truncated: bool) -> Bytes {
    frame::text_with(96 + users.len() * 39, |buf| {
        buf.extend_from_slice(br#"{"type":"presence","chat_id":""#);
        push_uuid(buf, chat_id);
        buf.extend_from_slice(br#"","users":["#);
        for (i, user) in users.iter().enumerate() {
            if i > 0 {
                buf.push(b',');
            }
            buf.push(b'"');
            push_uuid(buf, *user);
            buf.push(b'"');
        }
        buf.push(b']');
        if truncated {
            buf.extend_from_slice(br#","truncated":true"#);
        }
        buf.push(b'}');
    })
}

/// `{"type":"pong"}`
pub fn pong() -> Bytes {
    frame::encode(frame::OpCode::Text, br#"{"type":"pong"}"#)
}

/// `{"type":"error","code":..,"message":..[,"chat_id":..]}`
pub fn error(code: &str, message: &str, chat_id: Option<ChatId>) -> Bytes {
    #[derive(serde::Serialize)]
    struct Error<'a> {
        #[serde(rename = "type")]
        ty: &'static str,
        code: &'a str,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        chat_id: Option<ChatId>,
    }
    let body = Error { ty: "error", code, message, chat_id };
    frame::text_with(96 + message.len(), |buf| {
        // ok: a struct of strings always serializes.
        let _ = serde_json::to_writer(&mut *buf, &body);
    })
}

fn with_chat(ty: &str, chat_id: ChatId, extra: &str) -> Bytes {
    frame::text_with(64 + extra.len(), |buf| {
        buf.extend_from_slice(br#"{"type":""#);
        buf.extend_from_slice(ty.as_bytes());
        buf.extend_from_slice(br#"","chat_id":""#);
        push_uuid(buf, chat_id);
        buf.push(b'"');
        buf.extend_from_slice(extra.as_bytes());
        buf.push(b'}');
    })
}

/// The event's `data` as published. Every event that reaches a client has
/// it (validation requires it), so the `null` is never sent.
fn data(event: &DomainEvent) -> &str {
    event.data.as_ref().map_or("null", |d| d.get())
}

fn push_uuid(buf: &mut Vec<u8>, id: ChatId) {
    let mut tmp = uuid::Uuid::encode_buffer();
    buf.extend_from_slice(id.hyphenated().encode_lower(&mut tmp).as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(frame: &Bytes) -> serde_json::Value {
        let (decoded_len, start) = match frame[1] {
            126 => (u16::from_be_bytes([frame[2], frame[3]]) as usize, 4),
            n => (n as usize, 2),
        };
        assert_eq!(frame[0], 0x81);
        assert_eq!(frame.len(), start + decoded_len);
        serde_json::from_slice(&frame[start..]).unwrap()
    }

    #[test]
    fn encodes_the_contract_shapes() {
        let id = ChatId::parse_str("7d1b3c2a-0f7e-4a55-9a55-1b2c3d4e5f60").unwrap();
        let v = payload(&room_event("message.new", id, 42, r#"{"content":"Hello!"}"#));
        assert_eq!(
            v,
            serde_json::json!({"type":"message.new","chat_id":id.to_string(),"seq":42,"data":{"content":"Hello!"}})
        );
        assert_eq!(
            payload(&user_event("notification.new", None, "{}")),
            serde_json::json!({"type":"notification.new","data":{}})
        );
        assert_eq!(
            payload(&subscribed(id, 57, None)),
            serde_json::json!({"type":"subscribed","chat_id":id.to_string(),"seq":57})
        );
        assert_eq!(
            payload(&subscribed(id, 57, Some(false))),
            serde_json::json!({"type":"subscribed","chat_id":id.to_string(),"seq":57,"recovered":false})
        );
        assert_eq!(
            payload(&removed(id)),
            serde_json::json!({"type":"unsubscribed","chat_id":id.to_string(),"reason":"removed"})
        );
        assert_eq!(payload(&pong()), serde_json::json!({"type":"pong"}));
        assert_eq!(
            payload(&error("forbidden", "not \"a\" member", Some(id))),
            serde_json::json!({"type":"error","code":"forbidden","message":"not \"a\" member","chat_id":id.to_string()})
        );
    }

    /// The buffer reserved for an event is never outgrown (which would
    /// double it, and history holds frames as allocated).
    #[test]
    fn events_fit_the_bytes_reserved_for_them() {
        let id = ChatId::parse_str("7d1b3c2a-0f7e-4a55-9a55-1b2c3d4e5f60").unwrap();
        let (ty, data) = ("message.new", r#"{"b":1}"#);
        let extra = ty.len() + data.len() + 2; // + the 2-byte head of a short frame
        assert_eq!(room_event(ty, id, u64::MAX, data).len(), ROOM_EVENT_FIXED + extra);
        assert_eq!(user_event(ty, Some(id), data).len(), USER_EVENT_FIXED + extra);
    }

    #[test]
    fn a_room_frame_is_the_room_event_of_the_events_that_go_to_a_room() {
        let id = ChatId::parse_str("7d1b3c2a-0f7e-4a55-9a55-1b2c3d4e5f60").unwrap();
        let one = |json: String| crate::protocol::event::parse_batch(json.as_bytes()).unwrap().remove(0);
        let sent = one(format!(r#"{{"type":"message.sent","chat_id":"{id}","data":{{"b":1.50}}}}"#));
        assert_eq!(room_frame(&sent, 42), Some(room_event("message.new", id, 42, r#"{"b":1.50}"#)));
        let note = one(format!(
            r#"{{"type":"notification.created","chat_id":"{id}","user_id":"{id}","data":{{}}}}"#
        ));
        assert_eq!(room_frame(&note, 42), None, "a notification goes to no room, even naming a chat");
    }

    #[test]
    fn a_user_frame_names_the_chat_the_route_gives_it() {
        let id = ChatId::parse_str("7d1b3c2a-0f7e-4a55-9a55-1b2c3d4e5f60").unwrap();
        let one = |json: String| crate::protocol::event::parse_batch(json.as_bytes()).unwrap().remove(0);
        let frame = |event: &DomainEvent| user_frame(event, &route::route(event)).map(|f| payload(&f));
        let task = one(format!(
            r#"{{"type":"task.status_changed","chat_id":"{id}","user_ids":["{id}"],"data":{{"s":1}}}}"#
        ));
        assert_eq!(
            frame(&task),
            Some(serde_json::json!({"type":"task.updated","chat_id":id.to_string(),"data":{"s":1}}))
        );
        let note = one(format!(
            r#"{{"type":"notification.created","chat_id":"{id}","user_id":"{id}","data":{{}}}}"#
        ));
        assert_eq!(frame(&note), Some(serde_json::json!({"type":"notification.new","data":{}})));
        let sent = one(format!(r#"{{"type":"message.sent","chat_id":"{id}","data":{{}}}}"#));
        assert_eq!(frame(&sent), None, "names no user");
    }
}
