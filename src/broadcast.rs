//! The broadcaster: hands each delivered domain event's frames (encoded once,
//! by `protocol::server`) to the recipients [`route`] names in the room and
//! user registries, and applies its membership change to the node's table and
//! to the removed user's connections, and an operator's [`Control`] to the
//! node's bans and the user's connections.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::bans::Bans;
use crate::bus::{Control, Deliver, Ephemeral};
use crate::mailbox::UserMsg;
use crate::membership;
use crate::metrics::Metrics;
use crate::protocol::event::{DomainEvent, EventKind};
use crate::protocol::route::{route, MemberChange};
use crate::protocol::{server, ChatId, UserId};
use crate::rooms::Rooms;
use crate::users::Users;

/// Implements [`Deliver`] for a node's registries.
pub struct Broadcaster {
    pub rooms: Arc<Rooms>,
    pub users: Arc<Users>,
    pub membership: Arc<membership::Table>,
    /// Revocations and removals, remembered for `auth.max_token_ttl`.
    pub bans: Arc<Bans>,
    /// Decides whether the table is kept ([`membership::keeps_table`]).
    pub source: membership::Source,
    pub metrics: Arc<Metrics>,
    /// Who is in which room here (`presence.enabled`).
    pub presence: Option<Arc<crate::presence::Registry>>,
}

impl Broadcaster {
    /// Ends `user`'s subscriptions to `chat` on this node. Its readers are
    /// cut off at once: a frame of the room published right after must not
    /// reach them, even if they take it before they read the removal.
    fn removed(&self, chat: ChatId, user: UserId) {
        if self.users.send(user, UserMsg::Removed(chat)) > 0 {
            self.rooms.revoke(chat, user);
        }
    }
}

/// Applies an operator's instruction on this node: a revocation is
/// remembered, then every connection of the user it concerns is told (a
/// connection registering meanwhile checks the bans itself). Returns the
/// connections told. The API calls it before answering; the broadcaster for
/// what other nodes sent.
pub fn act(users: &Users, bans: &Bans, msg: Control, now: u64) -> usize {
    match msg {
        Control::Disconnect(user) => users.send(user, UserMsg::Disconnect),
        Control::Revoke { user, before } => {
            if bans.revoke(user, before, now).is_err() {
                // Only a Redis node gets here (the API refuses a revocation it cannot hold):
                // Redis keeps it, and this node asks Redis about users it holds nothing for.
                bans.count_dropped();
            }
            users.send(user, UserMsg::Revoke(before))
        }
    }
}

impl Deliver for Broadcaster {
    fn control(&self, msg: Control) {
        act(&self.users, &self.bans, msg, crate::auth::now_secs());
    }

    fn ephemeral(&self, event: Ephemeral, skip: u64) {
        let Some(presence) = &self.presence else { return };
        let (ty, chat, user, listeners_only) = match event {
            Ephemeral::Join { chat, user } => ("presence.join", chat, user, true),
            Ephemeral::Leave { chat, user } => ("presence.leave", chat, user, true),
            Ephemeral::Typing { chat, user, .. } => ("typing", chat, user, false),
        };
        let recipients = presence.recipients(chat, listeners_only);
        if recipients.is_empty() {
            return;
        }
        // Encoded once; each connection keeps it only while subscribed (and listening).
        let frame = server::ephemeral(ty, chat, user);
        let msg = UserMsg::Ephemeral { chat, listeners_only, skip, frame };
        let mut dropped = 0;
        for user in recipients {
            dropped += self.users.send_ephemeral(user, &msg).1;
        }
        if dropped > 0 {
            self.metrics.ephemeral_dropped.fetch_add(dropped as u64, Ordering::Relaxed);
        }
    }

    fn deliver_to_user(&self, event: &DomainEvent, _seq: Option<u64>, user: UserId) {
        if event.kind == EventKind::Unknown {
            self.metrics.events_unknown.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // Counted per copy: an event for several users here counts once per user.
        self.metrics.events_in.fetch_add(1, Ordering::Relaxed);
        let route = route(event);
        if !route.users.contains(&user) {
            return;
        }
        if let Some(frame) = server::user_frame(event, &route) {
            self.users.send(user, UserMsg::Frame(frame));
        }
    }

    fn removals_snapshot(&self, removals: Vec<(ChatId, UserId, u64)>) {
        self.bans.replace_removals(&removals, crate::auth::now_secs());
    }

    fn membership_snapshot(&self, pairs: Vec<(ChatId, UserId)>) {
        // Only a kept table has anything to replace. Under every source the removals a node
        // missed while cut off from Redis reach `deliver` first, replayed from the bus's member log.
        if !membership::keeps_table(self.source) {
            return;
        }
        for (chat, user) in self.membership.replace(&pairs) {
            self.removed(chat, user);
        }
    }

    fn deliver(&self, event: &DomainEvent, seq: Option<u64>) {
        // Ingress sets unknown types aside (`event::known`). The one way one still gets here is
        // Redis: a node running a newer version published a type this one does not know. It is
        // counted like any unknown type and goes nowhere.
        if event.kind == EventKind::Unknown {
            self.metrics.events_unknown.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.metrics.events_in.fetch_add(1, Ordering::Relaxed);
        let route = route(event);
        match route.membership {
            Some(MemberChange::Added { chat, user }) => {
                // A re-add lifts a removal under every source.
                self.bans.readd(chat, user);
                if membership::keeps_table(self.source) {
                    self.membership.add(chat, user);
                }
            }
            Some(MemberChange::Removed { chat, user }) => {
                self.membership.remove(chat, user);
                // Remembered so the user's older tokens cannot subscribe again.
                let now = crate::auth::now_secs();
                if self.bans.remove(chat, user, now, now).is_err() {
                    self.bans.count_dropped();
                }
                // Under every source: a removed user's subscription ends.
                self.removed(chat, user);
            }
            None => {}
        }
        match (route.room, seq) {
            (Some(chat), Some(seq)) => {
                if let Some(frame) = server::room_frame(event, seq) {
                    self.rooms.publish(chat, seq, frame);
                }
            }
            (Some(_), None) => {
                tracing::warn!(kind = ?event.kind, "room event delivered without a seq; dropped")
            }
            (None, _) => {}
        }
        if let Some(frame) = server::user_frame(event, &route) {
            // Encoded once, however many users: each gets a reference to the same bytes.
            for user in route.users.iter() {
                self.users.send(*user, UserMsg::Frame(frame.clone()));
            }
        }
    }
}
