//! The wire contract (`PROTOCOL.md`) as types and byte encoders: client
//! commands, domain events and who receives them, server messages,
//! WebSocket framing, permessage-deflate, and the reassembly of a client's
//! byte stream.
//!
//! Nothing here does IO, awaits or reads a clock, so codec tests and benches
//! need no runtime.
//!
//! Imports inside point one way: `server` (the frames an event becomes)
//! builds on `route` (who receives it), which builds on `event` (what it
//! is); `server` and `assemble` build on `frame`, `assemble` and
//! `extension` on `deflate` (permessage-deflate), which builds on `frame`.
//! Nothing imports back.

pub mod assemble;
pub mod client;
pub mod deflate;
pub mod event;
pub mod extension;
pub mod frame;
pub mod route;
pub mod server;

/// A chat room's id (lowercase hyphenated UUID on the wire).
pub type ChatId = uuid::Uuid;
/// A user's id: the JWT `sub`.
pub type UserId = uuid::Uuid;
