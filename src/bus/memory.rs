//! The in-process bus: one node, no network. Assigns room `seq` locally and
//! delivers synchronously inside `publish`.

use std::sync::{Arc, Mutex};

use dashmap::DashMap;

use super::{BoxFuture, Bus, BusError, Deliver, Health, Recovery, Topic};
use crate::protocol::event::DomainEvent;
use crate::protocol::ChatId;

/// The embedded default bus.
pub struct MemoryBus {
    /// Per-room sequence counters, kept while the node holds the room (it
    /// has a subscriber or history): a room forgotten after its history
    /// expired starts again from 0, and a client that still remembers an
    /// older `seq` is told `recovered:false` with the new position. The
    /// mutex is held across assigning and delivering, which keeps each
    /// room's frames in `seq` order when several publishers race.
    seqs: DashMap<ChatId, Arc<Mutex<u64>>>,
    sink: Arc<dyn Deliver>,
}

impl MemoryBus {
    pub fn new(sink: Arc<dyn Deliver>) -> MemoryBus {
        MemoryBus { seqs: DashMap::new(), sink }
    }

    /// The room's counter, created at 0 when missing. Cloned out so the map
    /// shard is not held while delivering.
    fn counter(&self, chat: ChatId) -> Arc<Mutex<u64>> {
        if let Some(cell) = self.seqs.get(&chat) {
            return cell.clone();
        }
        self.seqs.entry(chat).or_default().clone()
    }

    /// Publishes synchronously; the in-process bus cannot fail.
    pub fn publish_now(&self, events: &[DomainEvent]) {
        for event in events {
            match event.room() {
                Some(chat) => {
                    let cell = self.counter(chat);
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

    fn forget_idle(&self, active: &dyn Fn(ChatId) -> bool) {
        self.seqs.retain(|chat, _| active(*chat));
    }

    fn gauges(&self) -> Vec<(&'static str, &'static str, u64)> {
        vec![("room_counters", "Rooms whose seq counter this node keeps.", self.seqs.len() as u64)]
    }

    fn recover(&self, chat: ChatId, _since: Option<u64>) -> BoxFuture<'_, Result<Recovery, BusError>> {
        // Read under the room's mutex: every event up to the head has then
        // been delivered (into this node's history) too. This bus keeps no
        // events of its own: the node's room history is all there is.
        // The counter is created here for a new room, so the sweeper keeps
        // it from now on (the subscriber's room holds it).
        let head = *lock(&self.counter(chat));
        Box::pin(std::future::ready(Ok(Recovery { head, events: None })))
    }

    fn health(&self) -> Health {
        Health::Ok
    }
}
