//! The command session: answers client commands in order (subscribe with
//! recovery, unsubscribe, ping), enforces the command rate limit and the
//! error budget, and keeps the bus's interest in step with the rooms.

use std::sync::atomic::Ordering;

use super::{Conn, End, Socket};
use crate::alarms::Stamp;
use crate::bus::{Ephemeral, Topic};
use crate::error::{CloseCode, ErrorCode};
use crate::membership;
use crate::protocol::assemble::Inbound;
use crate::protocol::client::{self, Command};
use crate::protocol::frame::{self, OpCode};
use crate::protocol::{server, ChatId};

/// Per-connection command budget: burst and refill per second.
const COMMAND_BURST: f32 = 100.0;
const COMMAND_RATE: f32 = 50.0;
/// Error replies a connection may earn before it is closed with 1008; the
/// count decays by one every ten seconds, so a long-lived client's
/// occasional mistakes never add up to a close.
const MAX_ERRORS: f32 = 100.0;
const ERROR_DECAY_PER_SEC: f32 = 0.1;

impl<S: Socket> Conn<S> {
    /// Answers every complete client message, in order: those in the inbox,
    /// then those the reassembler held back from bytes already read while
    /// the inbox was full (a few bytes of compressed messages can be
    /// megabytes inflated, so they are inflated as they are answered).
    pub(super) async fn handle(&mut self) -> Result<(), End> {
        loop {
            self.answer_inbox().await?;
            if !self.assembler.held_back() {
                return Ok(());
            }
            self.ingest(&[])?;
        }
    }

    async fn answer_inbox(&mut self) -> Result<(), End> {
        // Taken whole, so an idle connection keeps no inbox buffer.
        for msg in std::mem::take(&mut self.inbox) {
            match msg {
                Inbound::Text(text) => self.command(&text).await?,
                Inbound::Binary => self.reply_error(
                    ErrorCode::BadRequest,
                    "binary frames are not accepted: commands are JSON text",
                    None,
                )?,
                Inbound::Ping(payload) => {
                    // Pings spend the command budget too: a flood of them
                    // (which cost a read and a write each) is abuse.
                    if !self.take_token() {
                        self.node.metrics.pongs_dropped.fetch_add(1, Ordering::Relaxed);
                        if self.limits.error() {
                            return Err(End::Close(CloseCode::PolicyViolation));
                        }
                        continue;
                    }
                    // One pong waiting is enough (RFC 6455 5.5.3 allows
                    // answering only the latest): a client that pings without
                    // reading cannot grow the queue with pongs.
                    if self.pong_queued {
                        self.node.metrics.pongs_dropped.fetch_add(1, Ordering::Relaxed);
                    } else {
                        self.pong_queued = true;
                        self.out.push(frame::encode(OpCode::Pong, &payload));
                    }
                }
                Inbound::Pong => {}
                Inbound::Close(code) => return Err(End::Echo(code)),
            }
        }
        self.check_queued()
    }

    async fn command(&mut self, text: &[u8]) -> Result<(), End> {
        if !self.take_token() {
            return self.reply_error(ErrorCode::RateLimited, "too many commands; slow down", None);
        }
        match client::parse(text) {
            Ok(Command::Ping) => self.out.push(server::pong()),
            Ok(Command::Subscribe { chat_id, since, presence }) => {
                let fresh = self.subs.position(chat_id).is_none();
                self.subscribe(chat_id, since).await?;
                self.enter_presence(chat_id, presence, fresh).await;
            }
            Ok(Command::Presence { chat_id }) if self.node.presence.is_some() => {
                self.presence(chat_id).await?
            }
            Ok(Command::Typing { chat_id }) if self.node.presence.is_some() => self.typing(chat_id).await?,
            Ok(Command::Presence { .. } | Command::Typing { .. }) => {
                // `presence.enabled: false`: as if the commands did not exist.
                let e = client::CommandError::UnknownType;
                self.reply_error(e.code(), &e.to_string(), None)?
            }
            Ok(Command::Unsubscribe { chat_id }) => {
                self.leave(chat_id);
                self.out.push(server::unsubscribed(chat_id));
            }
            Err(_) if self.node.presence.is_none() && client::names_presence_command(text) => {
                // `presence.enabled: false`: malformed or not, the commands do not exist.
                let e = client::CommandError::UnknownType;
                self.reply_error(e.code(), &e.to_string(), None)?
            }
            Err(e) => self.reply_error(e.code(), &e.to_string(), None)?,
        }
        Ok(())
    }

    /// Subscribes, and places the connection in the room: at the room's
    /// head, or (with `since`) right after `since` when history still holds
    /// everything from there (contract section 3.1).
    async fn subscribe(&mut self, chat: ChatId, since: Option<u64>) -> Result<(), End> {
        if let Some(at) = self.subs.position(chat) {
            // Idempotent: already there, at this position.
            self.out.push(server::subscribed(chat, at, since.map(|_| false)));
            return Ok(());
        }
        if self.subs.len() >= self.node.ws.max_subscriptions {
            return self.reply_error(
                ErrorCode::TooManySubscriptions,
                "subscription limit reached",
                Some(chat),
            );
        }
        if let Err(why) = self.may_subscribe(chat) {
            return self.reply_error(ErrorCode::Forbidden, why, Some(chat));
        }
        // Join the ring first, then watch the bus, then ask the bus for the
        // position: every event after that position is then either in this
        // subscription's receiver (or the one the room makes for it with its
        // ring) or in the room's history, and the ring's copies of anything
        // at or before it are skipped by seq.
        let (room, joined) = self.node.rooms.join(chat, self.user, &self.mailbox);
        self.subs.insert(chat, room.clone(), joined);
        self.node.metrics.subscriptions_active.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.node.bus.watch(Topic::Room(chat)).await {
            tracing::warn!(%chat, error = %e, "cannot watch room on the bus");
            self.leave_unwatched(chat);
            return self.reply_error(ErrorCode::Unavailable, "event bus unavailable; retry", Some(chat));
        }
        let head = match self.node.bus.head(chat).await {
            Ok(head) => head,
            Err(e) => {
                tracing::warn!(%chat, error = %e, "cannot read the room's position");
                self.leave(chat);
                return self.reply_error(ErrorCode::Unavailable, "event bus unavailable; retry", Some(chat));
            }
        };
        let Some(since) = since else {
            self.subs.set_position(chat, head, false);
            self.out.push(server::subscribed(chat, head, None));
            return Ok(());
        };
        let head = if since < head && !room.covers(since, head) {
            match self.node.fill_from_bus(&room, chat, since, head).await {
                Ok(head) => head,
                Err(e) => {
                    tracing::warn!(%chat, error = %e, "cannot read the room's history from the bus");
                    self.leave(chat);
                    return self.reply_error(
                        ErrorCode::Unavailable,
                        "event bus unavailable; retry",
                        Some(chat),
                    );
                }
            }
        } else {
            head
        };
        let metrics = &self.node.metrics;
        if room.covers(since, head) {
            // Replayed from the room's history by the pump, at the socket's
            // pace and within the queue budget, however much it is.
            self.subs.set_position(chat, since, since < head);
            metrics.recovered.fetch_add(1, Ordering::Relaxed);
            self.out.push(server::subscribed(chat, head, Some(true)));
        } else {
            metrics.not_recovered.fetch_add(1, Ordering::Relaxed);
            self.subs.set_position(chat, head, false);
            self.out.push(server::subscribed(chat, head, Some(false)));
        }
        Ok(())
    }

    /// Whether this connection may subscribe to `chat` (and so see who is
    /// in it): the membership source, then the removals that stick.
    fn may_subscribe(&self, chat: ChatId) -> Result<(), &'static str> {
        if !membership::allowed(self.node.source, &self.node.membership, self.user, &self.token_chats, chat) {
            return Err("not a member of this chat");
        }
        // A removal sticks for the tokens issued before it, whatever the source says.
        let now = crate::auth::now_secs();
        if self.node.bans.is_removed(chat, self.user, Some(self.issued_at), now) {
            return Err("removed from this chat");
        }
        Ok(())
    }

    /// After a subscribe: a new subscription enters the room's presence
    /// (the user's first here announces a join), and one that was there
    /// without `"presence":true` starts listening when asked again with it.
    ///
    /// Runs right after `subscribe` placed the subscription, before anything
    /// else can end it: a placed subscription is in the room's presence.
    async fn enter_presence(&mut self, chat: ChatId, listen: bool, fresh: bool) {
        let Some(registry) = self.node.presence.clone() else { return };
        // Not placed: the subscribe failed.
        let Some((true, listening)) = self.subs.presence(chat) else { return };
        if !fresh {
            if listen && !listening {
                self.subs.set_listening(chat, true);
                registry.listen(chat, self.user);
            }
            return;
        }
        self.subs.set_listening(chat, listen);
        if registry.enter(chat, self.user, listen) {
            let node = self.node.clone();
            // After any leave of this user being sent now (see `Registry::announcing`).
            let _after_leaves = registry.announcing.read().await;
            if let Err(e) = node.bus.presence(Ephemeral::Join { chat, user: self.user }).await {
                // The next refresh (a third of `presence.node_ttl`, or as soon as the bus is back) announces it.
                tracing::warn!(%chat, error = %e, "cannot announce a presence join");
            }
        }
    }

    /// `presence`: the room's users on every node, sorted, at most `presence.max_list`.
    async fn presence(&mut self, chat: ChatId) -> Result<(), End> {
        let Some(registry) = self.node.presence.clone() else { return Ok(()) };
        if let Err(why) = self.may_subscribe(chat) {
            return self.reply_error(ErrorCode::Forbidden, why, Some(chat));
        }
        let node = self.node.clone();
        let mut users = match node.bus.present(chat).await {
            Ok(Some(users)) => users,
            Ok(None) => registry.users(chat),
            Err(e) => {
                tracing::warn!(%chat, error = %e, "cannot read the room's presence");
                return self.reply_error(ErrorCode::Unavailable, "event bus unavailable; retry", Some(chat));
            }
        };
        let truncated = users.len() > registry.max_list;
        users.truncate(registry.max_list);
        self.out.push(server::presence(chat, &users, truncated));
        Ok(())
    }

    /// `typing`: sent on to the room's other subscribers, at most one per
    /// user per room per `presence.typing_interval` (the rest are dropped
    /// silently and counted).
    async fn typing(&mut self, chat: ChatId) -> Result<(), End> {
        let Some(registry) = self.node.presence.clone() else { return Ok(()) };
        if self.subs.position(chat).is_none() {
            return self.reply_error(
                ErrorCode::NotSubscribed,
                "subscribe to the chat before sending typing",
                Some(chat),
            );
        }
        let metrics = &self.node.metrics;
        if !registry.typing(chat, self.user, Stamp::now()) {
            metrics.typing_dropped.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let node = self.node.clone();
        let from = self.mailbox.token();
        match node.bus.presence(Ephemeral::Typing { chat, user: self.user, from }).await {
            Ok(true) => node.metrics.typing_delivered.fetch_add(1, Ordering::Relaxed),
            Ok(false) => node.metrics.typing_dropped.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                tracing::debug!(%chat, error = %e, "typing not sent: bus unavailable");
                node.metrics.typing_dropped.fetch_add(1, Ordering::Relaxed)
            }
        };
        Ok(())
    }

    /// Drops a subscription, if any; returns whether there was one.
    pub(super) fn leave(&mut self, chat: ChatId) -> bool {
        let had = self.leave_unwatched(chat);
        if had {
            self.node.bus.unwatch(Topic::Room(chat));
        }
        had
    }

    fn leave_unwatched(&mut self, chat: ChatId) -> bool {
        // Dropping the subscription drops its receiver before the room checks emptiness.
        let presence = self.subs.presence(chat);
        let had = self.subs.remove(chat);
        if had {
            self.node.rooms.leave(chat);
            self.node.metrics.subscriptions_active.fetch_sub(1, Ordering::Relaxed);
            if let (Some((true, listening)), Some(registry)) = (presence, &self.node.presence) {
                registry.exit(chat, self.user, listening, Stamp::now());
            }
        }
        had
    }

    fn reply_error(&mut self, code: ErrorCode, message: &str, chat: Option<ChatId>) -> Result<(), End> {
        self.node.metrics.client_error(code);
        self.out.push(server::error(code.as_str(), message, chat));
        if self.limits.error() {
            return Err(End::Close(CloseCode::PolicyViolation));
        }
        Ok(())
    }

    fn take_token(&mut self) -> bool {
        self.limits.take(Stamp::now())
    }
}

/// A connection's command rate limit (a token bucket) and its error budget
/// (errors earned, decaying with time). Pure arithmetic over the clock it is
/// given.
pub(super) struct Limits {
    tokens: f32,
    errors: f32,
    at: Stamp,
}

impl Limits {
    pub(super) fn new(now: Stamp) -> Limits {
        Limits { tokens: COMMAND_BURST, errors: 0.0, at: now }
    }

    /// Takes one command token; false when the client is over its rate.
    fn take(&mut self, now: Stamp) -> bool {
        let elapsed = now.since(self.at).as_secs_f32();
        self.tokens = (self.tokens + elapsed * COMMAND_RATE).min(COMMAND_BURST);
        self.errors = (self.errors - elapsed * ERROR_DECAY_PER_SEC).max(0.0);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Counts one error reply; true when the budget is exhausted (close 1008).
    fn error(&mut self) -> bool {
        self.errors += 1.0;
        self.errors > MAX_ERRORS
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn errors_decay_so_only_a_burst_of_abuse_closes() {
        let start = Stamp::now();
        let mut limits = Limits::new(start);
        // 100 errors a day apart (10,000 minutes) never add up.
        for day in 0..100u64 {
            assert!(limits.take(start + Duration::from_secs(day * 86_400)));
            assert!(!limits.error(), "closed on day {day}");
        }
        // 101 in a burst do.
        let now = start + Duration::from_secs(100 * 86_400);
        assert!(limits.take(now));
        assert!((0..101).any(|_| limits.error()));
    }

    #[test]
    fn commands_are_limited_to_a_burst_then_a_rate() {
        let start = Stamp::now();
        let mut limits = Limits::new(start);
        assert_eq!((0..150).filter(|_| limits.take(start)).count(), 100);
        assert_eq!((0..100).filter(|_| limits.take(start + Duration::from_secs(1))).count(), 50);
    }
}
