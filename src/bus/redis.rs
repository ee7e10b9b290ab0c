//! Redis pub/sub bus (multi-node). Placeholder until the Redis backend lands.

use std::sync::Arc;

use super::{BoxFuture, Bus, BusError, Deliver, Health, Topic};
use crate::config::BusConfig;
use crate::protocol::event::DomainEvent;

/// The multi-node bus.
pub struct RedisBus;

impl RedisBus {
    pub async fn connect(_config: &BusConfig, _sink: Arc<dyn Deliver>) -> Result<RedisBus, BusError> {
        Err(BusError::Unavailable("the Redis bus is not built yet".into()))
    }
}

impl Bus for RedisBus {
    fn publish(&self, _events: Vec<DomainEvent>) -> BoxFuture<'_, Result<(), BusError>> {
        Box::pin(std::future::ready(Err(BusError::Unavailable("not built".into()))))
    }
    fn watch(&self, _topic: Topic) -> BoxFuture<'_, Result<(), BusError>> {
        Box::pin(std::future::ready(Err(BusError::Unavailable("not built".into()))))
    }
    fn unwatch(&self, _topic: Topic) {}
    fn health(&self) -> Health {
        Health::Degraded("not built")
    }
}
