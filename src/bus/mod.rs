//! The event bus: how accepted domain events reach every node's broadcaster.
//!
//! Ingress hands events to [`Bus::publish`]; the bus assigns each room event
//! its `seq` and calls [`Deliver::deliver`] on every node, once per event,
//! in `seq` order per room. The bus knows nothing of rooms, sockets or frames.

pub mod memory;
pub mod redis;

use std::future::Future;
use std::pin::Pin;

use crate::protocol::event::DomainEvent;
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

/// Why a publish or a watch did not happen. Ingress answers 503 for these.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus unavailable: {0}")]
    Unavailable(String),
}

/// A room's position and the events the bus holds after a `since`.
#[derive(Debug, Default)]
pub struct Recovery {
    /// The last `seq` assigned to the room (0: none yet).
    pub head: u64,
    /// Every event with `seq` in `(since, head]`, in order, with its `seq`;
    /// `None` when the bus does not hold them all.
    pub events: Option<Vec<(u64, DomainEvent)>>,
}

/// The receiving side of the bus: the broadcaster. Called from bus tasks; it
/// must not block (it encodes once and hands frames to the registries).
pub trait Deliver: Send + Sync + 'static {
    /// One event, with the room `seq` the bus assigned (room events only).
    fn deliver(&self, event: &DomainEvent, seq: Option<u64>);
}

/// An event bus backend.
pub trait Bus: Send + Sync + 'static {
    /// Hands a batch to the bus. `Ok` means every event was accepted for
    /// delivery; on `Err` the caller must not report the batch as accepted.
    fn publish(&self, events: Vec<DomainEvent>) -> BoxFuture<'_, Result<(), BusError>>;

    /// One more local subscriber of `topic` (called per subscription, the
    /// bus keeps the count). Resolves once deliveries for it are flowing, so
    /// a client told `subscribed` misses nothing published afterwards.
    fn watch(&self, topic: Topic) -> BoxFuture<'_, Result<(), BusError>>;

    /// One local subscriber of `topic` fewer; at zero the bus may stop
    /// receiving that topic.
    fn unwatch(&self, topic: Topic);

    /// The room's position (the last `seq` assigned, 0 for none) and, when
    /// `since` is given, the room's events after it that the bus itself keeps
    /// (`None` when it keeps none of its own, or no longer all of them).
    /// Called after [`Bus::watch`] resolved, so every event after the
    /// position reaches this node's broadcaster.
    fn recover(&self, chat: ChatId, since: Option<u64>) -> BoxFuture<'_, Result<Recovery, BusError>>;

    /// Current health, for `/healthz` and `/metrics`.
    fn health(&self) -> Health;

    /// Backend counters for `/metrics`: (name without the `herald_` prefix, help, value).
    fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        Vec::new()
    }
}
