//! The in-process bus: one node, no network. Assigns room `seq` locally and
//! delivers synchronously inside `publish`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use dashmap::DashMap;

use super::{seq_origin, BoxFuture, Bus, BusError, Deliver, Ephemeral, Health, Topic};
use crate::protocol::event::DomainEvent;
use crate::protocol::ChatId;
use crate::sync::lock;

/// Stripes of the publish lock: rooms sharing one serialize their publishes.
const STRIPES: usize = 64;

/// The embedded default bus.
pub struct MemoryBus {
    /// Per-room sequence counters, kept while the node holds the room (it
    /// has a subscriber or history). A room forgotten after its history
    /// expired, or lost with a restart, starts again at a new
    /// [`seq_origin`], above every `seq` of its earlier life: a client that
    /// still remembers one is told `recovered:false` with the new position.
    seqs: DashMap<ChatId, u64>,
    /// The highest counter this bus forgot: a new counter starts above it
    /// too, so the origin holds even for a room faster than the clock.
    forgotten: AtomicU64,
    /// Counters found idle by the last [`Bus::forget_idle`]: one is forgotten
    /// only when found idle twice in a row, so a position just handed out
    /// (`head` of a room no one holds yet) survives until its first event.
    idle: Mutex<HashSet<ChatId>>,
    /// Held across assigning a room's `seq` and delivering the event, which
    /// keeps each room's frames in `seq` order when several publishers race.
    /// Striped by room rather than one lock per room: a room then costs its
    /// counter alone.
    stripes: Box<[Mutex<()>]>,
    sink: Arc<dyn Deliver>,
}

impl MemoryBus {
    pub fn new(sink: Arc<dyn Deliver>) -> MemoryBus {
        MemoryBus {
            seqs: DashMap::new(),
            forgotten: AtomicU64::new(0),
            idle: Mutex::default(),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            sink,
        }
    }

    fn stripe(&self, chat: ChatId) -> MutexGuard<'_, ()> {
        let index = (chat.as_u64_pair().1 as usize) % self.stripes.len();
        lock(&self.stripes[index])
    }

    /// Where a room's new counter starts.
    fn origin(&self) -> u64 {
        seq_origin(SystemTime::now(), self.forgotten.load(Ordering::Relaxed).saturating_add(1))
    }

    /// Publishes synchronously; the in-process bus cannot fail.
    pub fn publish_now(&self, events: &[DomainEvent]) {
        for event in events {
            match event.room() {
                Some(chat) => {
                    let _ordered = self.stripe(chat);
                    let seq = {
                        let mut counter = self.seqs.entry(chat).or_insert_with(|| self.origin());
                        *counter = counter.saturating_add(1);
                        *counter
                    };
                    self.sink.deliver(event, Some(seq));
                }
                None => self.sink.deliver(event, None),
            }
        }
    }
}

impl Bus for MemoryBus {
    fn publish(&self, events: Vec<DomainEvent>) -> BoxFuture<'_, Result<(), BusError>> {
        self.publish_now(&events);
        Box::pin(std::future::ready(Ok(())))
    }

    fn presence(&self, event: Ephemeral) -> BoxFuture<'_, Result<bool, BusError>> {
        // One node: the registry decided already; every subscriber is here.
        let skip = match event {
            Ephemeral::Typing { from, .. } => from,
            _ => 0,
        };
        self.sink.ephemeral(event, skip);
        Box::pin(std::future::ready(Ok(true)))
    }

    fn watch(&self, _topic: Topic) -> BoxFuture<'_, Result<(), BusError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn unwatch(&self, _topic: Topic) {}

    fn forget_idle(&self, active: &dyn Fn(ChatId) -> bool) {
        let now: HashSet<ChatId> = self.seqs.iter().map(|e| *e.key()).filter(|chat| !active(*chat)).collect();
        let before = std::mem::replace(&mut *lock(&self.idle), now.clone());
        for chat in now.into_iter().filter(|chat| before.contains(chat)) {
            // Checked again under the room's stripe: a publish in flight
            // holds it until its room exists, so its counter is never lost.
            let _ordered = self.stripe(chat);
            if !active(chat) {
                if let Some((_, seq)) = self.seqs.remove(&chat) {
                    self.forgotten.fetch_max(seq, Ordering::Relaxed);
                }
            }
        }
    }

    fn gauges(&self) -> Vec<(&'static str, &'static str, u64)> {
        vec![("room_counters", "Rooms whose seq counter this node keeps.", self.seqs.len() as u64)]
    }

    fn head(&self, chat: ChatId) -> BoxFuture<'_, Result<u64, BusError>> {
        // Read under the room's stripe: every event up to the head has then
        // been delivered (into this node's history) too. A room without a
        // counter gets one now, so its first event follows the position
        // its subscriber is told. This bus keeps no events of its own.
        let head = {
            let _ordered = self.stripe(chat);
            *self.seqs.entry(chat).or_insert_with(|| self.origin())
        };
        Box::pin(std::future::ready(Ok(head)))
    }

    fn health(&self) -> Health {
        Health::Ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nowhere;

    impl Deliver for Nowhere {
        fn deliver(&self, _event: &DomainEvent, _seq: Option<u64>) {}
    }

    /// A position handed out for a room no one holds yet must survive the
    /// next sweep (seen under load: a sweep between a client reading the
    /// position and the first publish restarted the counter, and the
    /// client's `since` got `recovered:false`); a counter idle for two
    /// sweeps in a row is forgotten.
    #[tokio::test]
    async fn a_counter_is_forgotten_only_when_idle_at_two_sweeps_in_a_row() -> Result<(), BusError> {
        let bus = MemoryBus::new(Arc::new(Nowhere));
        let chat = ChatId::from_u128(7);
        let head = bus.head(chat).await?;
        bus.forget_idle(&|_| false);
        assert_eq!(bus.head(chat).await?, head, "kept at its first idle sweep");
        bus.forget_idle(&|_| false);
        assert!(bus.seqs.get(&chat).is_none(), "forgotten at its second");
        assert!(bus.head(chat).await? > head, "a new counter starts above the forgotten one");
        Ok(())
    }
}
