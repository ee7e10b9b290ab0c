//! Client -> server commands (PROTOCOL.md section 2) and their parsing.

use std::borrow::Cow;

use serde::Deserialize;

use super::ChatId;
use crate::error::ErrorCode;

/// One parsed client command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Join a room; `since` is the last `seq` the client saw; `presence`:
    /// also receive the room's `presence.join` / `presence.leave`.
    Subscribe { chat_id: ChatId, since: Option<u64>, presence: bool },
    /// Who is in a room (users with a connection subscribed to it).
    Presence { chat_id: ChatId },
    /// The user is typing in a room it is subscribed to.
    Typing { chat_id: ChatId },
    /// Leave a room.
    Unsubscribe { chat_id: ChatId },
    /// Application-level keepalive, answered with `pong`.
    Ping,
}

/// Why a text frame is not a valid command; maps to the contract's error codes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// Not JSON, not an object, a missing field or a bad UUID: `bad_request`.
    #[error("{0}")]
    BadRequest(&'static str),
    /// A well-formed command of a type this server does not know: `unknown_type`.
    #[error("unknown command type")]
    UnknownType,
}

impl CommandError {
    /// The contract's `code` for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            CommandError::BadRequest(_) => ErrorCode::BadRequest,
            CommandError::UnknownType => ErrorCode::UnknownType,
        }
    }
}

/// The loose shape every command shares; fields are checked per type after.
#[derive(Deserialize)]
struct Loose<'a> {
    #[serde(rename = "type", borrow)]
    ty: Option<Cow<'a, str>>,
    #[serde(borrow)]
    chat_id: Option<Cow<'a, str>>,
    since: Option<u64>,
    presence: Option<bool>,
}

/// Parses one text frame into a command.
///
/// serde_json is used rather than simd-json: commands are tens of bytes, where
/// serde_json measured faster (see the `parse` group in `benches/hot_paths.rs`).
pub fn parse(text: &[u8]) -> Result<Command, CommandError> {
    // serde_json skips an ignored field's string without checking its UTF-8,
    // so a frame with invalid UTF-8 in an unknown field was accepted; the
    // contract's JSON is UTF-8 text (found by fuzzing).
    let text =
        std::str::from_utf8(text).map_err(|_| CommandError::BadRequest("command is not UTF-8 text"))?;
    let loose: Loose<'_> = serde_json::from_str(text)
        .map_err(|_| CommandError::BadRequest("command is not a JSON object of the documented shape"))?;
    let ty = loose.ty.as_deref().ok_or(CommandError::BadRequest("missing field `type`"))?;
    let chat_id = || -> Result<ChatId, CommandError> {
        let raw = loose.chat_id.as_deref().ok_or(CommandError::BadRequest("missing field `chat_id`"))?;
        ChatId::try_parse(raw).map_err(|_| CommandError::BadRequest("`chat_id` is not a UUID"))
    };
    match ty {
        "subscribe" => Ok(Command::Subscribe {
            chat_id: chat_id()?,
            since: loose.since,
            presence: loose.presence.unwrap_or(false),
        }),
        "presence" => Ok(Command::Presence { chat_id: chat_id()? }),
        "typing" => Ok(Command::Typing { chat_id: chat_id()? }),
        "unsubscribe" => Ok(Command::Unsubscribe { chat_id: chat_id()? }),
        "ping" => Ok(Command::Ping),
        _ => Err(CommandError::UnknownType),
    }
}

/// Whether `text` names a presence command (`presence` or `typing`),
/// whatever else is wrong with it: under `presence.enabled: false` those
/// answer `unknown_type`, as if they did not exist, not `bad_request`.
pub fn names_presence_command(text: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct TypeOnly<'a> {
        #[serde(rename = "type", borrow)]
        ty: Option<Cow<'a, str>>,
    }
    let Ok(text) = std::str::from_utf8(text) else { return false };
    serde_json::from_str::<TypeOnly<'_>>(text)
        .ok()
        .and_then(|t| t.ty)
        .is_some_and(|ty| ty == "presence" || ty == "typing")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: Result<Command, &str>) {
        let got = parse(input.as_bytes()).map_err(|e| e.code().as_str());
        assert_eq!(got, expected, "input: {input}");
    }

    const ID: &str = "7d1b3c2a-0f7e-4a55-9a55-1b2c3d4e5f60";

    #[test]
    fn parses_every_command() {
        let id = ChatId::parse_str(ID).unwrap();
        check(
            &format!(r#"{{"type":"subscribe","chat_id":"{ID}"}}"#),
            Ok(Command::Subscribe { chat_id: id, since: None, presence: false }),
        );
        check(
            &format!(r#"{{"type":"subscribe","chat_id":"{ID}","since":41}}"#),
            Ok(Command::Subscribe { chat_id: id, since: Some(41), presence: false }),
        );
        check(
            &format!(r#"{{"type":"subscribe","chat_id":"{ID}","presence":true}}"#),
            Ok(Command::Subscribe { chat_id: id, since: None, presence: true }),
        );
        check(&format!(r#"{{"type":"presence","chat_id":"{ID}"}}"#), Ok(Command::Presence { chat_id: id }));
        check(&format!(r#"{{"type":"typing","chat_id":"{ID}"}}"#), Ok(Command::Typing { chat_id: id }));
        check(r#"{"type":"typing"}"#, Err("bad_request"));
        check(&format!(r#"{{"type":"subscribe","chat_id":"{ID}","presence":"yes"}}"#), Err("bad_request"));
        check(
            &format!(r#"{{"chat_id":"{ID}","type":"unsubscribe"}}"#),
            Ok(Command::Unsubscribe { chat_id: id }),
        );
        check(r#"{"type":"ping"}"#, Ok(Command::Ping));
    }

    #[test]
    fn rejects_bad_commands_with_the_contract_codes() {
        check("not json", Err("bad_request"));
        check("[1,2]", Err("bad_request"));
        check(r#"{"chat_id":"x"}"#, Err("bad_request"));
        check(r#"{"type":"subscribe"}"#, Err("bad_request"));
        check(r#"{"type":"subscribe","chat_id":"not-a-uuid"}"#, Err("bad_request"));
        check(r#"{"type":"subscribe","chat_id":42}"#, Err("bad_request"));
        check(
            r#"{"type":"subscribe","chat_id":"7d1b3c2a-0f7e-4a55-9a55-1b2c3d4e5f60","since":-1}"#,
            Err("bad_request"),
        );
        check(r#"{"type":"dance"}"#, Err("unknown_type"));
    }

    /// Fuzzing found: invalid UTF-8 inside an ignored field was accepted.
    #[test]
    fn refuses_invalid_utf8_even_in_an_ignored_field() {
        let got = parse(b"{\"x\":\"\xff\",\"type\":\"ping\"}").map_err(|e| e.code().as_str());
        assert_eq!(got, Err("bad_request"));
    }
}
