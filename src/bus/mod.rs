//! The event bus: how accepted domain events reach every node's broadcaster.
//!
//! Ingress hands events to [`Bus::publish`]; the bus assigns each room event
//! its `seq` and calls [`Deliver::deliver`] on every node, once per event,
//! in `seq` order per room. The bus knows nothing of rooms, sockets or frames.

pub mod memory;
pub mod redis;

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::protocol::event::{DomainEvent, EventKind};
use crate::protocol::{ChatId, UserId};

/// A boxed future, so `dyn Bus` can be shared by every task.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a node has local interest in; a multi-node bus subscribes per topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Topic {
    Room(ChatId),
    User(UserId),
}

/// The bus's view of its own health, for `/healthz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Ok,
    /// Events cannot be published right now (e.g. Redis unreachable).
    Degraded(&'static str),
}

/// Why a publish or a watch did not happen, or the bus could not start.
///
/// Ingress answers 503 with this `Display` text, so every message is fixed and written for the
/// publisher; the backend's own error text goes to the logs only.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// The backend cannot be reached (down, or the node is reconnecting).
    #[error("bus unavailable: redis unreachable")]
    Unreachable,
    /// Redis lost its state recently; room events wait until every node has re-seeded `seq`.
    #[error("bus unavailable: redis lost its state recently; room seq is being re-seeded, retry shortly")]
    Settling,
    /// The backend did not answer in time (a publish, or the confirmation of a watch).
    #[error("bus unavailable: redis did not answer in time")]
    Timeout,
    /// The backend answered with an error or an unexpected reply.
    #[error("bus unavailable: redis refused the request")]
    Rejected,
    /// The bus's tasks are gone (the node is stopping).
    #[error("bus unavailable: the bus has stopped")]
    Stopped,
    /// The `bus` configuration cannot be used (an unusable URL or CA file, a password Redis
    /// refused, a certificate not trusted); only [`redis::RedisBus::connect`] returns it, at
    /// startup. `reason` never holds a password.
    #[error("config key `{key}`: {reason}")]
    Config { key: &'static str, reason: String },
}

/// One labelled counter family: (name, help, label name, (label value, value) per sample).
pub type LabelledCounter = (&'static str, &'static str, &'static str, Vec<(String, u64)>);

/// An operator's instruction about one user (`POST /api/users/{id}/...`),
/// carried to the nodes that must act on it. Not a domain event: it has no
/// `seq`, no history, and never reaches a client as a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Close every connection of the user with 4003.
    Disconnect(UserId),
    /// Refuse the user's tokens issued before `before` (Unix seconds), and
    /// close the connections holding one with 4003.
    Revoke { user: UserId, before: u64 },
}

/// The JSON form of a [`Control`] on the Redis bus. Its first key is
/// `control`, which no domain event has, so a receiver tells the two apart
/// by the prefix alone.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ControlWire {
    control: String,
    user_id: UserId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    before: Option<u64>,
}

/// What every control message on a channel starts with.
const CONTROL_PREFIX: &[u8] = br#"{"control":"#;

impl Control {
    /// The user it is about.
    pub fn user(&self) -> UserId {
        match *self {
            Control::Disconnect(user) | Control::Revoke { user, .. } => user,
        }
    }

    pub fn to_json(&self) -> String {
        let wire = match *self {
            Control::Disconnect(user) => {
                ControlWire { control: "disconnect".into(), user_id: user, before: None }
            }
            Control::Revoke { user, before } => {
                ControlWire { control: "revoke".into(), user_id: user, before: Some(before) }
            }
        };
        // ok: plain data with string keys cannot fail to serialize.
        serde_json::to_string(&wire).unwrap_or_default()
    }

    /// `None` when `bytes` is not a control message; `Some(Err)` when it
    /// is one this node cannot read (a newer node's kind).
    pub fn from_json(bytes: &[u8]) -> Option<Result<Control, String>> {
        if !bytes.starts_with(CONTROL_PREFIX) {
            return None;
        }
        let wire: ControlWire = match serde_json::from_slice(bytes) {
            Ok(wire) => wire,
            Err(e) => return Some(Err(e.to_string())),
        };
        Some(match (wire.control.as_str(), wire.before) {
            ("disconnect", None) => Ok(Control::Disconnect(wire.user_id)),
            ("revoke", Some(before)) => Ok(Control::Revoke { user: wire.user_id, before }),
            (other, _) => Err(format!("unknown control `{other}`")),
        })
    }
}

/// A presence or typing announcement (PROTOCOL.md section 4): no `seq`, no
/// history, delivered to the room's subscribers on every node that has any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ephemeral {
    /// The user's first subscription to the room in the deployment.
    Join { chat: ChatId, user: UserId },
    /// The user's last subscription to the room ended (after `presence.leave_delay`).
    Leave { chat: ChatId, user: UserId },
    /// The user is typing; `from` is the sending connection's
    /// [`crate::mailbox::Mailbox::token`], which does not receive it.
    Typing { chat: ChatId, user: UserId, from: u64 },
}

impl Ephemeral {
    pub fn chat(&self) -> ChatId {
        match *self {
            Ephemeral::Join { chat, .. } | Ephemeral::Leave { chat, .. } | Ephemeral::Typing { chat, .. } => {
                chat
            }
        }
    }
}

/// Room events a bus keeps of its own (Redis's room history), read for a
/// recovery the node's history cannot serve.
#[derive(Debug, Default)]
pub struct Kept {
    /// The room's position when they were read.
    pub head: u64,
    /// Events with `seq` in `(since, head]` the bus still holds, oldest
    /// first; they may start later than `since + 1` or have gaps (the
    /// caller checks).
    pub events: Vec<KeptEvent>,
}

/// One event of [`Kept`].
#[derive(Debug)]
pub struct KeptEvent {
    pub seq: u64,
    /// How long ago the bus took it.
    pub age: Duration,
    pub event: DomainEvent,
}

/// Where a room's `seq` counter starts when a bus makes it: the current
/// Unix time in microseconds, never below `floor`. A room forgotten (its
/// history expired, the node or Redis restarted empty) and made again
/// therefore never repeats a `seq` of its earlier life, so a client's old
/// `since` can never be mistaken for a position of the new one (PROTOCOL.md
/// section 3.1). Microseconds stay below 2^53 (exact in JavaScript) until
/// the year 2255, and a room would need more than one event per
/// microsecond for its whole life to run into its next life's origin.
pub fn seq_origin(now: SystemTime, floor: u64) -> u64 {
    let micros =
        now.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    micros.max(floor)
}

/// The receiving side of the bus: the broadcaster. The memory bus calls it
/// inside `publish`, on the publisher's task; the Redis bus from its delivery
/// task. Either way it must not block (it encodes once and hands frames to
/// the registries).
pub trait Deliver: Send + Sync + 'static {
    /// One event, with the room `seq` the bus assigned (room events only).
    fn deliver(&self, event: &DomainEvent, seq: Option<u64>);

    /// The copy of `event` addressed to `user` alone, as it reached this node on that user's own
    /// channel: only the user's frame, for `user` only (never the room's frame). Redis Cluster
    /// publishes each user's copy on the user's shard, so copies of one event arrive from several
    /// shards in any order; delivering each to its one user needs no dedupe and loses none. The
    /// default hands the whole event to [`Deliver::deliver`] (for sinks that do not route).
    fn deliver_to_user(&self, event: &DomainEvent, seq: Option<u64>, user: UserId) {
        let _ = user;
        self.deliver(event, seq);
    }

    /// The complete membership as the bus holds it (a multi-node bus loads
    /// it on every connect): every pair not in it is no longer a member.
    /// The Redis bus first delivers, through [`Deliver::deliver`] and in
    /// order, the membership events the node missed while it was cut off.
    /// The default delivers each pair as an addition.
    /// An operator's instruction about a user, applied on this node.
    fn control(&self, _msg: Control) {}

    /// A presence or typing announcement for this node's subscribers of its
    /// room; `skip` is the token of a local connection that must not
    /// receive it (a typing's sender), 0 for none.
    fn ephemeral(&self, _event: Ephemeral, _skip: u64) {}

    /// Every removal the bus remembers, (chat, user, removed at in Unix
    /// seconds), loaded on every connect of a multi-node bus after
    /// [`Deliver::membership_snapshot`]: the node's removals become exactly these.
    fn removals_snapshot(&self, _removals: Vec<(ChatId, UserId, u64)>) {}

    fn membership_snapshot(&self, pairs: Vec<(ChatId, UserId)>) {
        for (chat, user) in pairs {
            let event = DomainEvent {
                kind: EventKind::MemberAdded,
                chat_id: Some(chat),
                user_id: Some(user),
                user_ids: Vec::new(),
                data: None,
                name: None,
            };
            self.deliver(&event, None);
        }
    }
}

/// This node's overload as it shares it with the other nodes: the rooms
/// whose readers it cannot keep up with (its admission signal,
/// [`crate::node::Node::admit`]). Empty: not overloaded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hot {
    /// Every room: the node is overloaded by more rooms than it names.
    pub all: bool,
    /// The rooms with readers here that carry events, at most a few hundred.
    pub rooms: Vec<ChatId>,
}

impl Hot {
    /// Rooms a report names at most: a node hot in more names every room.
    pub const MAX_ROOMS: usize = 256;

    /// Not overloaded.
    pub fn is_empty(&self) -> bool {
        !self.all && self.rooms.is_empty()
    }
}

/// Overload shared across nodes (a multi-node bus): a node fed through the
/// bus cannot push back on publishers connected to another node, so it
/// reports its hot rooms here and every ingress asks before it accepts.
pub trait Pressure: Send + Sync {
    /// How to read this node's overload: the bus calls `hot` every few ms on
    /// a thread of its own, so a node too busy to run its own tasks on time
    /// still warns the others on time. Cheap while the node is not overloaded.
    fn source(&self, hot: Box<dyn Fn() -> Hot + Send + Sync>);

    /// True while another node reports `chat` hot: its publishers are pushed
    /// back here as if this node were overloaded. Lapses on its own within a
    /// second of the last word from the bus, so a stale or lying signal never
    /// holds publishing back for longer.
    fn pressed(&self, chat: ChatId) -> bool;

    /// Gauges and counters for `/metrics`: (name without `herald_`, type, help, value).
    fn metrics(&self) -> Vec<(&'static str, &'static str, &'static str, u64)>;
}

/// An event bus backend.
pub trait Bus: Send + Sync + 'static {
    /// Where overload is shared with the other nodes (`None`: one node, the memory bus).
    fn pressure(&self) -> Option<&dyn Pressure> {
        None
    }

    /// Hands a batch to the bus. `Ok` means every event was accepted for
    /// delivery; on `Err` the caller must not report the batch as accepted.
    /// An event of unknown type reaches this node's [`Deliver`] only (which
    /// counts it), never another node.
    fn publish(&self, events: Vec<DomainEvent>) -> BoxFuture<'_, Result<(), BusError>>;

    /// One more local subscriber of `topic` (called per subscription, the
    /// bus keeps the count). Resolves once deliveries for it are flowing, so
    /// a client told `subscribed` misses nothing published afterwards.
    fn watch(&self, topic: Topic) -> BoxFuture<'_, Result<(), BusError>>;

    /// One local subscriber of `topic` fewer; at zero the bus may stop
    /// receiving that topic.
    fn unwatch(&self, topic: Topic);

    /// The room's position: the last `seq` assigned, or for a room without
    /// a counter yet the [`seq_origin`] its new counter starts from (made
    /// now, so the room's first event is the position plus one). Called
    /// after [`Bus::watch`] resolved, so every event after the position
    /// reaches this node's broadcaster.
    fn head(&self, chat: ChatId) -> BoxFuture<'_, Result<u64, BusError>>;

    /// Carries an operator's instruction to the other nodes that must act on
    /// it (the caller applies it on this node itself): a disconnect to the
    /// nodes where the user is connected, a revocation to every node, and
    /// a revocation kept for `auth.max_token_ttl` where the bus keeps state.
    /// The memory bus has no other node.
    fn control(&self, _msg: Control) -> BoxFuture<'_, Result<(), BusError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    /// The revocation the bus keeps for `user` (the `before` of
    /// [`Control::Revoke`]), for an upgrade this node knows none for. `None`
    /// where the node's own [`crate::bans::Bans`] is all there is (memory).
    fn revoked(&self, _user: UserId) -> BoxFuture<'_, Result<Option<u64>, BusError>> {
        Box::pin(std::future::ready(Ok(None)))
    }

    /// The room's events after `since` that the bus keeps of its own
    /// (`None` when it keeps none: the node's room history is all there
    /// is). Only the range after `since` is read.
    fn kept(&self, _chat: ChatId, _since: u64) -> BoxFuture<'_, Result<Option<Kept>, BusError>> {
        Box::pin(std::future::ready(Ok(None)))
    }

    /// Announces a presence change or a typing event to every node's
    /// subscribers of its room. A join or leave the bus decides on for the
    /// deployment (Redis: only when no other node holds the user) may come
    /// to nothing. For a typing event: `Ok(false)` when the bus dropped it
    /// (another node sent one for the user within `presence.typing_interval`).
    fn presence(&self, event: Ephemeral) -> BoxFuture<'_, Result<bool, BusError>>;

    /// The room's present users on every node, sorted, each once; `None`
    /// where this node's registry is all there is (memory).
    fn present(&self, _chat: ChatId) -> BoxFuture<'_, Result<Option<Vec<UserId>>, BusError>> {
        Box::pin(std::future::ready(Ok(None)))
    }

    /// Confirms this node's present users (per room) to the bus, which
    /// forgets a node's users once it stopped confirming them for
    /// `presence.node_ttl` (and announces their leaves). Called every third of it.
    fn refresh_presence(&self, _rooms: Vec<(ChatId, Vec<UserId>)>) -> BoxFuture<'_, Result<(), BusError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    /// This node is stopping (gracefully): its users in `rooms` leave `within`
    /// from now unless they are back on another node by then (a deploy moving
    /// clients produces neither leaves nor joins). Without it a stopped node's
    /// users would linger for `presence.node_ttl`.
    fn depart_presence(
        &self,
        _rooms: Vec<(ChatId, Vec<UserId>)>,
        _within: Duration,
    ) -> BoxFuture<'_, Result<(), BusError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    /// Drops per-room state kept for rooms `active` no longer names (the
    /// node holds a room while it has a subscriber or history), so
    /// publishers cannot grow it without bound. Called by the node's sweeper.
    fn forget_idle(&self, _active: &dyn Fn(ChatId) -> bool) {}

    /// Backend gauges for `/metrics`: (name without the `herald_` prefix, help, value).
    fn gauges(&self) -> Vec<(&'static str, &'static str, u64)> {
        Vec::new()
    }

    /// Current health, for `/healthz` and `/metrics`.
    fn health(&self) -> Health;

    /// Backend counters for `/metrics`: (name without the `herald_` prefix, help, value).
    fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        Vec::new()
    }

    /// Backend counters with one label for `/metrics`: (name without the `herald_` prefix,
    /// help, the label's name, (label value, value) per sample). The Redis bus counts per
    /// endpoint (`host:port`, never a URL or password); the values are bounded in number.
    fn labelled_counters(&self) -> Vec<LabelledCounter> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_messages_round_trip_and_are_told_from_events() {
        let user = UserId::from_u128(5);
        for msg in [Control::Disconnect(user), Control::Revoke { user, before: 1_700_000_000 }] {
            assert_eq!(Control::from_json(msg.to_json().as_bytes()), Some(Ok(msg)));
        }
        assert!(Control::from_json(br#"{"type":"chat.updated"}"#).is_none());
        let newer = format!(r#"{{"control":"mute","user_id":"{user}"}}"#);
        assert!(matches!(Control::from_json(newer.as_bytes()), Some(Err(_))));
    }
}
