//! Presence and typing (PROTOCOL.md sections 2 and 4): who has a connection
//! subscribed to a room, kept on this node per (room, user), never per
//! connection, and the typing rate limit.
//!
//! A connection that subscribes enters its room's presence; the user's first
//! connection there is a join, announced through the bus
//! ([`crate::bus::Bus::presence`]: at once on the memory bus, by a Redis
//! script on the Redis bus, which announces it only when no other node holds
//! the user either). When the user's last subscription here ends, the user
//! stays listed for `presence.leave_delay`; a connection back within it
//! produces neither a leave nor a join, otherwise the leave is announced
//! when the delay runs out ([`run`]).
//!
//! Delivery: an announcement reaches each node's broadcaster, which encodes
//! its frame once and offers it to the mailboxes of the room's users on this
//! node that have a listening subscription (typing: any subscription); each
//! connection keeps it only when it is subscribed to the room (with
//! `"presence":true` for joins and leaves). A connection that asked for no
//! presence events holds nothing for them: its subscription's flags live in
//! padding.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use tokio_util::sync::CancellationToken;

use crate::alarms::Stamp;
use crate::bus::Ephemeral;
use crate::config::PresenceConfig;
use crate::node::Node;
use crate::protocol::{ChatId, UserId};
use crate::sync::lock;

/// One user in one room on this node, in 24 bytes. `conns == 0`: its last
/// subscription ended; it leaves once the leave queued with generation
/// `left` comes due (a leave queued before it came back and left again is
/// void). `listeners` saturates: it only says whether any listens, and one
/// user holds fewer connections on one node than it counts.
#[derive(Debug, Clone, Copy)]
struct Entry {
    user: UserId,
    conns: u32,
    listeners: u16,
    left: u16,
}

/// The node's presence registry. Exists only under `presence.enabled`.
pub struct Registry {
    /// Each room's users, sorted by id (a reply lists them in that order).
    /// Most rooms are small: a sorted vector costs its entries alone.
    rooms: DashMap<ChatId, Vec<Entry>>,
    /// Leaves waiting for `leave_delay`: (due, chat, user, generation), in
    /// the order they come due (the delay is one for the node).
    leaving: Mutex<VecDeque<(Stamp, ChatId, UserId, u16)>>,
    generation: AtomicU16,
    /// When each (room, user) last had a typing event sent on; pruned every interval.
    typed: Mutex<HashMap<(ChatId, UserId), Stamp>>,
    /// Orders joins after the leaves being announced: [`Registry::due`] takes
    /// a user out before its leave is sent, so a user back in that gap gets a
    /// join that must not overtake the leave (listeners would see the leave
    /// last and the user gone). Joins share it; sending leaves holds it alone.
    pub announcing: tokio::sync::RwLock<()>,
    pub leave_delay: Duration,
    pub typing_interval: Duration,
    pub max_list: usize,
    pub node_ttl: Duration,
}

impl Registry {
    pub fn new(config: &PresenceConfig) -> Registry {
        Registry {
            rooms: DashMap::new(),
            leaving: Mutex::default(),
            generation: AtomicU16::new(0),
            typed: Mutex::default(),
            announcing: tokio::sync::RwLock::new(()),
            leave_delay: config.leave_delay,
            typing_interval: config.typing_interval,
            max_list: config.max_list,
            node_ttl: config.node_ttl,
        }
    }

    /// A subscription of `user` to `chat` entered the room's presence
    /// (`listening`: it asked for presence events). True when the user was
    /// not present here before (nor leaving): a join to announce.
    pub fn enter(&self, chat: ChatId, user: UserId, listening: bool) -> bool {
        let mut users = self.rooms.entry(chat).or_default();
        match users.binary_search_by(|e| e.user.cmp(&user)) {
            Ok(i) => {
                let entry = &mut users[i];
                entry.conns += 1;
                entry.listeners = entry.listeners.saturating_add(u16::from(listening));
                false
            }
            Err(i) => {
                if users.len() == users.capacity() && users.len() < SMALL_ROOM {
                    // Two-person rooms are the common shape: a small room grows
                    // one entry at a time instead of doubling (to four at once).
                    users.reserve_exact(1);
                }
                users.insert(i, Entry { user, conns: 1, listeners: u16::from(listening), left: 0 });
                true
            }
        }
    }

    /// A present subscription started listening for presence events.
    pub fn listen(&self, chat: ChatId, user: UserId) {
        if let Some(mut users) = self.rooms.get_mut(&chat) {
            if let Ok(i) = users.binary_search_by(|e| e.user.cmp(&user)) {
                users[i].listeners = users[i].listeners.saturating_add(1);
            }
        }
    }

    /// A present subscription ended. The user's last one here queues its
    /// leave for `leave_delay` from `now`.
    pub fn exit(&self, chat: ChatId, user: UserId, listening: bool, now: Stamp) {
        let Some(mut users) = self.rooms.get_mut(&chat) else { return };
        let Ok(i) = users.binary_search_by(|e| e.user.cmp(&user)) else { return };
        let entry = &mut users[i];
        entry.conns = entry.conns.saturating_sub(1);
        entry.listeners = entry.listeners.saturating_sub(u16::from(listening));
        if entry.conns == 0 {
            let generation = self.generation.fetch_add(1, Ordering::Relaxed);
            entry.left = generation;
            drop(users);
            lock(&self.leaving).push_back((now + self.leave_delay, chat, user, generation));
        }
    }

    /// Whether a leave is due by `now` (so joins are held back only then).
    pub fn any_due(&self, now: Stamp) -> bool {
        lock(&self.leaving).front().is_some_and(|&(at, ..)| at <= now)
    }

    /// Removes the users whose leave came due by `now` (and who did not come
    /// back): the leaves to announce.
    pub fn due(&self, now: Stamp) -> Vec<(ChatId, UserId)> {
        let mut due = Vec::new();
        loop {
            let next = {
                let mut leaving = lock(&self.leaving);
                match leaving.front() {
                    Some(&(at, ..)) if at <= now => leaving.pop_front(),
                    _ => None,
                }
            };
            let Some((_, chat, user, generation)) = next else { break };
            let gone = self.rooms.remove_if_mut(&chat, |_, users| {
                if let Ok(i) = users.binary_search_by(|e| e.user.cmp(&user)) {
                    if users[i].conns == 0 && users[i].left == generation {
                        users.remove(i);
                        due.push((chat, user));
                    }
                }
                users.is_empty()
            });
            drop(gone);
            if let Some(mut users) = self.rooms.get_mut(&chat) {
                if users.capacity() > users.len() * 2 + 4 {
                    users.shrink_to_fit();
                }
            }
        }
        due
    }

    /// The room's users on this node (those leaving included: no leave was
    /// announced for them yet), sorted.
    pub fn users(&self, chat: ChatId) -> Vec<UserId> {
        self.rooms.get(&chat).map(|users| users.iter().map(|e| e.user).collect()).unwrap_or_default()
    }

    /// The users on this node to offer an ephemeral frame of `chat`: those
    /// with a listening subscription, or (`listeners_only` false) any.
    pub fn recipients(&self, chat: ChatId, listeners_only: bool) -> Vec<UserId> {
        let Some(users) = self.rooms.get(&chat) else { return Vec::new() };
        users
            .iter()
            .filter(|e| if listeners_only { e.listeners > 0 } else { e.conns > 0 })
            .map(|e| e.user)
            .collect()
    }

    /// Takes the user's typing slot in the room: false when one was taken
    /// less than `typing_interval` ago (the event is dropped).
    pub fn typing(&self, chat: ChatId, user: UserId, now: Stamp) -> bool {
        let mut typed = lock(&self.typed);
        match typed.get_mut(&(chat, user)) {
            Some(at) if now.since(*at) < self.typing_interval => false,
            Some(at) => {
                *at = now;
                true
            }
            None => {
                typed.insert((chat, user), now);
                true
            }
        }
    }

    /// Forgets typing slots that are free again, and the room a burst of
    /// them left behind.
    pub fn sweep_typing(&self, now: Stamp) {
        let mut typed = lock(&self.typed);
        typed.retain(|_, at| now.since(*at) < self.typing_interval);
        let len = typed.len();
        if typed.capacity() > 64 && len * 4 < typed.capacity() {
            typed.shrink_to(len * 2);
        }
    }

    /// Typing slots taken (those not swept yet included).
    pub fn typing_slots(&self) -> usize {
        lock(&self.typed).len()
    }

    /// Every room with users here, and those users (for the Redis bus's refresh).
    pub fn local(&self) -> Vec<(ChatId, Vec<UserId>)> {
        self.rooms.iter().map(|r| (*r.key(), r.value().iter().map(|e| e.user).collect())).collect()
    }

    /// (room, user) pairs present on this node, leaving ones included.
    pub fn len(&self) -> usize {
        self.rooms.iter().map(|r| r.value().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.rooms.is_empty()
    }
}

/// Rooms with fewer users than this grow their list one entry at a time.
const SMALL_ROOM: usize = 8;

/// How often due leaves are looked for at most (and at least).
const TICK_MIN: Duration = Duration::from_millis(20);
const TICK_MAX: Duration = Duration::from_millis(250);
/// Leaves announced through the bus at once.
const LEAVES_AT_ONCE: usize = 64;

/// Announces due leaves, refreshes this node's presence in the bus (every
/// third of `node_ttl`, and at every tick after a refresh failed until one
/// succeeds; the Redis bus also reaps there the users of nodes that stopped
/// refreshing) and prunes the typing slots, until `stop`; then
/// hands its users over ([`crate::bus::Bus::depart_presence`]): they leave
/// `leave_delay` later unless back on another node.
pub async fn run(node: Arc<Node>, stop: CancellationToken) {
    let Some(registry) = node.presence.clone() else { return };
    let tick_every = (registry.leave_delay / 5).clamp(TICK_MIN, TICK_MAX);
    let refresh_every = registry.node_ttl / 3;
    let mut tick = tokio::time::interval(tick_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut refreshed = Stamp::now();
    let mut swept = refreshed;
    // The last refresh failed (the bus unreachable): tried again at every tick
    // until one succeeds, or the node's users would run out `node_ttl` after
    // the last good one although it was back well before that.
    let mut failing = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let now = Stamp::now();
        let announcing = if registry.any_due(now) { Some(registry.announcing.write().await) } else { None };
        let due = if announcing.is_some() { registry.due(now) } else { Vec::new() };
        for chunk in due.chunks(LEAVES_AT_ONCE) {
            let leaves = chunk.iter().map(|&(chat, user)| node.bus.presence(Ephemeral::Leave { chat, user }));
            for (result, (chat, user)) in futures_util::future::join_all(leaves).await.into_iter().zip(chunk)
            {
                if let Err(e) = result {
                    // The bus's own expiry (`node_ttl`) takes the user out of the room then.
                    tracing::warn!(%chat, %user, error = %e, "cannot announce a presence leave");
                }
            }
        }
        drop(announcing);
        if now.since(swept) >= registry.typing_interval {
            // Every interval, not with the refresh: a slot is worth keeping for the interval
            // alone, and slots taken in many rooms must not pile up for a third of node_ttl.
            swept = now;
            registry.sweep_typing(now);
        }
        if failing || now.since(refreshed) >= refresh_every {
            refreshed = now;
            let local = registry.local();
            match node.bus.refresh_presence(local).await {
                Ok(()) => failing = false,
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "cannot refresh this node's presence on the bus; retrying");
                    }
                    failing = true;
                }
            }
        }
    }
    // Stopping: this node's users leave after the delay, unless back on another node by then.
    let local = registry.local();
    match tokio::time::timeout(DEPART_WAIT, node.bus.depart_presence(local, registry.leave_delay)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot hand this node's presence over; it expires after presence.node_ttl")
        }
        Err(_) => tracing::warn!(
            "handing this node's presence over took too long; it expires after presence.node_ttl"
        ),
    }
}

/// How long a stopping node tries to hand its presence over.
const DEPART_WAIT: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(leave_delay: Duration) -> Registry {
        Registry::new(&PresenceConfig { leave_delay, ..PresenceConfig::default() })
    }

    #[test]
    fn a_user_joins_once_and_leaves_after_the_delay_unless_back_within_it() {
        let r = registry(Duration::from_secs(5));
        let (chat, alice, bob) = (ChatId::from_u128(1), UserId::from_u128(2), UserId::from_u128(3));
        let t0 = Stamp::now();
        assert!(r.enter(chat, bob, false));
        assert!(r.enter(chat, alice, true));
        assert!(!r.enter(chat, alice, false), "a second connection is no join");
        assert_eq!(r.users(chat), vec![alice, bob], "sorted");
        assert_eq!(r.recipients(chat, true), vec![alice]);
        r.exit(chat, alice, true, t0);
        r.exit(chat, alice, false, t0);
        assert!(r.due(t0 + Duration::from_secs(4)).is_empty());
        assert_eq!(r.users(chat), vec![alice, bob], "listed while leaving");
        assert!(r.recipients(chat, false) == vec![bob]);
        // Back within the delay: no join, and the queued leave is void.
        assert!(!r.enter(chat, alice, false));
        assert!(r.due(t0 + Duration::from_secs(6)).is_empty());
        // Gone for good this time.
        let t1 = t0 + Duration::from_secs(7);
        r.exit(chat, alice, false, t1);
        assert!(r.due(t1 + Duration::from_secs(4)).is_empty());
        assert_eq!(r.due(t1 + Duration::from_secs(5)), vec![(chat, alice)]);
        r.exit(chat, bob, false, t1);
        assert_eq!(r.due(t1 + Duration::from_secs(5)), vec![(chat, bob)]);
        assert!(r.is_empty(), "an empty room is forgotten");
    }

    #[test]
    fn a_room_costs_its_entries_alone() {
        assert_eq!(std::mem::size_of::<Entry>(), 24);
        let r = registry(Duration::from_secs(5));
        let chat = ChatId::from_u128(1);
        for n in 1..=3u128 {
            r.enter(chat, UserId::from_u128(n), false);
            assert_eq!(r.rooms.get(&chat).map(|u| u.capacity()), Some(n as usize));
        }
    }

    #[test]
    fn typing_is_one_per_user_per_room_per_interval() {
        let r = registry(Duration::from_secs(5));
        let (chat, alice) = (ChatId::from_u128(1), UserId::from_u128(2));
        let t0 = Stamp::now();
        assert!(r.typing(chat, alice, t0));
        assert!(!r.typing(chat, alice, t0 + Duration::from_secs(1)));
        assert!(r.typing(ChatId::from_u128(9), alice, t0), "per room");
        assert!(r.typing(chat, alice, t0 + Duration::from_secs(2)));
        r.sweep_typing(t0 + Duration::from_secs(10));
        assert!(lock(&r.typed).is_empty());
    }
}
