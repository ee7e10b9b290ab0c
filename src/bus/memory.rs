//! The in-process bus: one node, no network. Assigns room `seq` locally and
//! delivers synchronously inside `publish`.

use std::sync::{Arc, Mutex};

use dashmap::DashMap;

use super::{BoxFuture, Bus, BusError, Deliver, Health, Recovery, Topic};
use crate::protocol::event::DomainEvent;
use crate::protocol::ChatId;

/// The embedded default bus.
pub struct MemoryBus {
    /// Per-room sequence counters. They outlive empty rooms so `seq` never
    /// restarts while the process lives. The mutex is held across assigning
    /// and delivering, which keeps each room's frames in `seq` order when
    /// several publishers race.
    seqs: DashMap<ChatId, Arc<Mutex<u64>>>,
    sink: Arc<dyn Deliver>,
}

impl MemoryBus {
    pub fn new(sink: Arc<dyn Deliver>) -> MemoryBus {
        MemoryBus { seqs: DashMap::new(), sink }
    }

    /// Publishes synchronously; the in-process bus cannot fail.
    pub fn publish_now(&self, events: &[DomainEvent]) {
        for event in events {
            match event.room() {
                Some(chat) => {
                    // Clone the counter out so the map shard is not held while delivering.
                    let cell = self.seqs.entry(chat).or_default().clone();
                    let mut seq = lock(&cell);
                    *seq += 1;
                    self.sink.deliver(event, Some(*seq));
                }
                None => self.sink.deliver(event, None),
            }
        }
    }
}

fn lock(cell: &Mutex<u64>) -> std::sync::MutexGuard<'_, u64> {
    cell.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Bus for MemoryBus {
    fn publish(&self, events: Vec<DomainEvent>) -> BoxFuture<'_, Result<(), BusError>> {
        self.publish_now(&events);
        Box::pin(std::future::ready(Ok(())))
    }

    fn watch(&self, _topic: Topic) -> BoxFuture<'_, Result<(), BusError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn unwatch(&self, _topic: Topic) {}

    fn recover(&self, chat: ChatId, _since: Option<u64>) -> BoxFuture<'_, Result<Recovery, BusError>> {
        // Read under the room's mutex: every event up to the head has then
        // been delivered (into this node's history) too. This bus keeps no
        // events of its own: the node's room history is all there is.
        let head = self.seqs.get(&chat).map(|c| c.clone()).map_or(0, |cell| *lock(&cell));
        Box::pin(std::future::ready(Ok(Recovery { head, events: None })))
    }

    fn health(&self) -> Health {
        Health::Ok
    }
}
