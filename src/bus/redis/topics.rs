//! The topic subscription state machine: which topics this node wants from Redis (local interest,
//! counted by `watch` / `unwatch`) and where each one's subscription on the current connection
//! stands. It does no IO: the supervisor asks it for a [`Plan`], issues the `SUBSCRIBE` /
//! `UNSUBSCRIBE` commands the plan names, and reports each confirmation back.
//!
//! A topic's [`Sub`] goes `Off -> On` when its `SUBSCRIBE` is confirmed, `On -> Leaving` when the
//! supervisor sends its `UNSUBSCRIBE`, `Leaving -> Off` when that is confirmed, and back to `Off`
//! from anywhere when the connection is lost. A `watch` resolves at once only while its topic is
//! `On`; otherwise it waits for the supervisor's next confirmed `SUBSCRIBE`. A topic is forgotten
//! once nobody watches it and it is `Off`.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use tokio::sync::futures::Notified;
use tokio::sync::{oneshot, Notify};

use crate::bus::{BusError, Topic};
use crate::protocol::{ChatId, UserId};
use crate::sync::lock;

/// The answer a waiting `watch` gets from the supervisor.
type Waiter = oneshot::Sender<Result<(), BusError>>;

/// Local interest in one topic.
#[derive(Default)]
struct TopicState {
    /// Local subscribers (`watch` minus `unwatch`).
    count: usize,
    /// Where the current connection's subscription to it stands.
    sub: Sub,
    /// `watch` calls waiting for a confirmed `SUBSCRIBE`; the `watch` future holds each receiver,
    /// and the supervisor answers (dropping a sender answers [`BusError::Stopped`]).
    waiters: Vec<Waiter>,
}

/// One topic's subscription on the current connection. Only the supervisor changes it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Sub {
    /// Not subscribed, or a `SUBSCRIBE` is in flight and not yet confirmed.
    #[default]
    Off,
    /// A `SUBSCRIBE` is confirmed: deliveries flow.
    On,
    /// An `UNSUBSCRIBE` is in flight: deliveries may stop at any moment, so a `watch` now waits
    /// for the `SUBSCRIBE` the supervisor issues once the `UNSUBSCRIBE` is confirmed.
    Leaving,
}

#[derive(Default)]
struct State {
    map: HashMap<Topic, TopicState>,
    /// Topics whose wanted and confirmed state may differ; only the supervisor drains it.
    dirty: HashSet<Topic>,
    /// Rooms whose Redis counter must be re-seeded from the node's floors (a regression was seen).
    reseed: HashSet<ChatId>,
}

/// The state machine, shared by the bus handle (`watch` / `unwatch`), the delivery task (re-seed
/// requests) and the supervisor (everything else).
#[derive(Default)]
pub(super) struct Topics {
    state: Mutex<State>,
    /// Wakes the supervisor when there is something to reconcile; every change that needs a
    /// Redis command notifies it.
    kick: Notify,
}

/// What the supervisor must do next, drained from the dirty topics in one step.
pub(super) struct Plan {
    /// Topics watched here and not subscribed: `SUBSCRIBE`, then [`Topics::subscribed`].
    pub(super) subscribe: Vec<Topic>,
    /// Topics nobody watches any more, now `Leaving`: `UNSUBSCRIBE`, then [`Topics::unsubscribed`].
    pub(super) unsubscribe: Vec<Topic>,
    /// Rooms whose Redis counter must be re-seeded.
    pub(super) reseed: Vec<ChatId>,
}

impl Plan {
    /// True when no subscription needs changing (re-seeding aside).
    pub(super) fn settled(&self) -> bool {
        self.subscribe.is_empty() && self.unsubscribe.is_empty()
    }
}

impl Topics {
    /// One more local subscriber of `topic`. `None` when deliveries for it flow already;
    /// otherwise the receiver the supervisor answers once its `SUBSCRIBE` is confirmed (or the
    /// connection is lost). The count is taken at once: a caller that gives up before the answer
    /// takes it back with [`WatchGuard`].
    pub(super) fn watch(&self, topic: Topic) -> Option<oneshot::Receiver<Result<(), BusError>>> {
        let rx = {
            let mut state = lock(&self.state);
            let State { map, dirty, .. } = &mut *state;
            let entry = map.entry(topic).or_default();
            entry.count += 1;
            if entry.sub == Sub::On {
                return None;
            }
            let (tx, rx) = oneshot::channel();
            entry.waiters.push(tx);
            dirty.insert(topic);
            rx
        };
        self.kick.notify_one();
        Some(rx)
    }

    /// One local subscriber of `topic` fewer; the last one makes the supervisor unsubscribe.
    pub(super) fn unwatch(&self, topic: Topic) {
        let mut state = lock(&self.state);
        let State { map, dirty, .. } = &mut *state;
        let Some(entry) = map.get_mut(&topic) else {
            tracing::warn!(?topic, "unwatch without a matching watch; ignored");
            return;
        };
        entry.count = entry.count.saturating_sub(1);
        if entry.count == 0 {
            dirty.insert(topic);
            drop(state);
            self.kick.notify_one();
        }
    }

    /// Asks the supervisor to re-seed `room`'s Redis counter from this node's floor.
    pub(super) fn reseed(&self, room: ChatId) {
        lock(&self.state).reseed.insert(room);
        self.kick.notify_one();
    }

    /// Resolves when the supervisor has something to reconcile.
    pub(super) fn changed(&self) -> Notified<'_> {
        self.kick.notified()
    }

    /// The connection is gone: every subscription is `Off`, waiting watches fail with
    /// [`BusError::Unreachable`], topics still watched are resubscribed by the next connection's
    /// first reconcile, and the others are forgotten.
    pub(super) fn connection_lost(&self) {
        let mut state = lock(&self.state);
        let State { map, dirty, .. } = &mut *state;
        map.retain(|topic, entry| {
            entry.sub = Sub::Off;
            for waiter in entry.waiters.drain(..) {
                let _ = waiter.send(Err(BusError::Unreachable));
            }
            if entry.count > 0 {
                dirty.insert(*topic);
            }
            entry.count > 0
        });
    }

    /// A new connection: every known topic is reconciled by its first plan.
    pub(super) fn resubscribe_all(&self) {
        let mut state = lock(&self.state);
        let State { map, dirty, .. } = &mut *state;
        dirty.extend(map.keys().copied());
    }

    /// Drains the dirty topics and re-seed requests into the commands they need. Topics that need
    /// nothing are settled here: a forgotten one is removed, and an `On` one answers its waiters.
    /// Only the supervisor calls it, and it reports every command of one plan before asking for
    /// the next, so commands for a topic are never in flight twice; watches and unwatches that
    /// happen meanwhile mark the topic dirty again for the next plan.
    pub(super) fn plan(&self) -> Plan {
        let mut plan = Plan { subscribe: Vec::new(), unsubscribe: Vec::new(), reseed: Vec::new() };
        let mut state = lock(&self.state);
        let State { map, dirty, reseed } = &mut *state;
        plan.reseed = reseed.drain().collect();
        for topic in dirty.drain() {
            let Some(entry) = map.get_mut(&topic) else { continue };
            match (entry.count > 0, entry.sub) {
                (true, Sub::Off) => plan.subscribe.push(topic),
                (false, Sub::On) => {
                    // Marked under the lock, so no `watch` trusts this subscription any more.
                    entry.sub = Sub::Leaving;
                    plan.unsubscribe.push(topic);
                }
                (false, Sub::Off) => {
                    map.remove(&topic);
                }
                (true, Sub::On) => {
                    for waiter in entry.waiters.drain(..) {
                        let _ = waiter.send(Ok(()));
                    }
                }
                // Only `plan` sets `Leaving`, and the supervisor settles it before the next plan.
                (_, Sub::Leaving) => {}
            }
        }
        plan
    }

    /// Redis confirmed the `UNSUBSCRIBE` of `topics` (from [`Plan::unsubscribe`]).
    pub(super) fn unsubscribed(&self, topics: &[Topic]) {
        let mut state = lock(&self.state);
        let State { map, dirty, .. } = &mut *state;
        for topic in topics {
            if let Some(entry) = map.get_mut(topic) {
                entry.sub = Sub::Off;
                if entry.count == 0 {
                    map.remove(topic);
                } else {
                    // Watched again while the UNSUBSCRIBE was in flight: those watches wait for
                    // the SUBSCRIBE of the next plan.
                    dirty.insert(*topic);
                }
            }
        }
    }

    /// Redis confirmed the `SUBSCRIBE` of `topics` (from [`Plan::subscribe`]): their watches
    /// resolve.
    pub(super) fn subscribed(&self, topics: &[Topic]) {
        let mut state = lock(&self.state);
        let State { map, dirty, .. } = &mut *state;
        for topic in topics {
            if let Some(entry) = map.get_mut(topic) {
                entry.sub = Sub::On;
                for waiter in entry.waiters.drain(..) {
                    let _ = waiter.send(Ok(()));
                }
                if entry.count == 0 {
                    // Unwatched while the SUBSCRIBE was in flight.
                    dirty.insert(*topic);
                }
            }
        }
    }

    /// The users connected to this node now (their user topics are watched).
    pub(super) fn watched_users(&self) -> Vec<UserId> {
        lock(&self.state)
            .map
            .iter()
            .filter(|(_, entry)| entry.count > 0)
            .filter_map(|(topic, _)| match topic {
                Topic::User(user) => Some(*user),
                Topic::Room(_) => None,
            })
            .collect()
    }

    /// The rooms this node watches now.
    pub(super) fn watched_rooms(&self) -> Vec<ChatId> {
        lock(&self.state)
            .map
            .iter()
            .filter(|(_, entry)| entry.count > 0)
            .filter_map(|(topic, _)| match topic {
                Topic::Room(chat) => Some(*chat),
                Topic::User(_) => None,
            })
            .collect()
    }
}

/// Takes back an unconfirmed watch's count when dropped: an error, a timeout or a cancelled
/// caller all end the watch, so its caller never calls `unwatch` for it.
pub(super) struct WatchGuard<'a> {
    topics: &'a Topics,
    /// `None` once the watch is confirmed and the count belongs to the caller.
    topic: Option<Topic>,
}

impl<'a> WatchGuard<'a> {
    pub(super) fn new(topics: &'a Topics, topic: Topic) -> WatchGuard<'a> {
        WatchGuard { topics, topic: Some(topic) }
    }

    /// The watch is confirmed: the caller now owns its count (and will `unwatch` it).
    pub(super) fn keep(mut self) {
        self.topic = None;
    }
}

impl Drop for WatchGuard<'_> {
    fn drop(&mut self) {
        if let Some(topic) = self.topic {
            self.topics.unwatch(topic);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room() -> Topic {
        Topic::Room(uuid::Uuid::new_v4())
    }

    #[test]
    fn a_watch_waits_for_its_subscribe_and_later_ones_do_not() {
        let topics = Topics::default();
        let topic = room();
        let mut first = topics.watch(topic).expect("waits for the SUBSCRIBE");
        let plan = topics.plan();
        assert_eq!((plan.subscribe.as_slice(), plan.unsubscribe.len()), (&[topic][..], 0));
        assert!(first.try_recv().is_err(), "not answered before the confirmation");
        topics.subscribed(&plan.subscribe);
        assert_eq!(first.try_recv(), Ok(Ok(())));
        assert!(topics.watch(topic).is_none(), "deliveries flow already");
        assert!(topics.plan().settled());
        assert_eq!(topics.watched_rooms().len(), 1);
    }

    #[test]
    fn the_last_unwatch_unsubscribes_and_a_watch_meanwhile_waits_for_the_next_subscribe() {
        let topics = Topics::default();
        let topic = room();
        let _ = topics.watch(topic);
        topics.subscribed(&topics.plan().subscribe);
        topics.unwatch(topic);
        let plan = topics.plan();
        assert_eq!((plan.subscribe.len(), plan.unsubscribe.as_slice()), (0, &[topic][..]));
        let mut again = topics.watch(topic).expect("a leaving subscription is not trusted");
        topics.unsubscribed(&plan.unsubscribe);
        let plan = topics.plan();
        assert_eq!(plan.subscribe, vec![topic]);
        topics.subscribed(&plan.subscribe);
        assert_eq!(again.try_recv(), Ok(Ok(())));
    }

    #[test]
    fn a_lost_connection_fails_waiters_and_keeps_only_watched_topics() {
        let topics = Topics::default();
        let (kept, dropped) = (room(), room());
        let _ = topics.watch(kept);
        topics.subscribed(&topics.plan().subscribe);
        let mut waiting = topics.watch(dropped).expect("waits");
        topics.unwatch(dropped);
        topics.connection_lost();
        assert_eq!(waiting.try_recv(), Ok(Err(BusError::Unreachable)));
        topics.resubscribe_all();
        assert_eq!(topics.plan().subscribe, vec![kept], "resubscribed, and the unwatched one forgotten");
    }

    #[test]
    fn an_unconfirmed_watch_dropped_takes_its_count_back() {
        let topics = Topics::default();
        let topic = room();
        let _rx = topics.watch(topic);
        drop(WatchGuard::new(&topics, topic));
        let plan = topics.plan();
        assert!(plan.settled(), "nothing to subscribe for a watch given up");
        assert!(topics.watched_rooms().is_empty());
    }
}
