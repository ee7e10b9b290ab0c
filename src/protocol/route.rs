//! Who receives a domain event (PROTOCOL.md section 5): its room, its users and the chat their
//! frame names, and the membership change every node applies. The one routing rule, shared by the
//! broadcaster (which hands frames to local rooms and users) and the Redis publisher (which picks
//! the channels an event is published on), so the two cannot disagree.

use std::borrow::Cow;

use super::event::{DomainEvent, EventKind};
use super::{ChatId, UserId};

/// Where one event goes. Empty for unknown types and for events missing their target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route<'a> {
    /// The room whose subscribers receive it; such an event takes the room's next `seq`.
    pub room: Option<ChatId>,
    /// Users who receive it directly, each once, in the order first named. Borrowed from the
    /// event unless it named someone twice.
    pub users: Cow<'a, [UserId]>,
    /// The chat their frame names: the event's, except that a notification is about no chat
    /// even when it names one.
    pub user_chat: Option<ChatId>,
    /// A membership change every node applies.
    pub membership: Option<MemberChange>,
}

/// A `chat.member_added` / `chat.member_removed` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberChange {
    Added { chat: ChatId, user: UserId },
    Removed { chat: ChatId, user: UserId },
}

impl Route<'_> {
    /// True when nobody receives the event.
    pub fn is_empty(&self) -> bool {
        self.room.is_none() && self.users.is_empty() && self.membership.is_none()
    }
}

/// The room an event is broadcast to, if any: the events that carry `seq`.
pub fn room(event: &DomainEvent) -> Option<ChatId> {
    match event.kind {
        EventKind::MessageSent
        | EventKind::ChatUpdated
        | EventKind::TaskStatusChanged
        | EventKind::Passthrough => event.chat_id,
        _ => None,
    }
}

// Defined here rather than in `event.rs` so that the rule stays in this file and `event.rs` never
// imports the routing built on it.
impl DomainEvent {
    /// The room this event is broadcast to, if any: [`room`], for the buses, which need no more
    /// of the route to order an event.
    pub fn room(&self) -> Option<ChatId> {
        room(self)
    }
}

/// Routes one event. Pure: no IO, no allocation unless the event names a user twice.
pub fn route(event: &DomainEvent) -> Route<'_> {
    let mut route = Route { room: room(event), users: Cow::Borrowed(&[]), user_chat: None, membership: None };
    match event.kind {
        EventKind::MessageSent | EventKind::ChatUpdated | EventKind::TaskStatusChanged => {
            route.users = distinct(&event.user_ids);
            route.user_chat = event.chat_id;
        }
        EventKind::NotificationCreated => route.users = Cow::Borrowed(event.user_id.as_slice()),
        EventKind::MemberAdded | EventKind::MemberRemoved => {
            if let (Some(chat), Some(user)) = (event.chat_id, event.user_id) {
                route.membership = Some(if event.kind == EventKind::MemberAdded {
                    MemberChange::Added { chat, user }
                } else {
                    MemberChange::Removed { chat, user }
                });
            }
        }
        // Exactly one of the two (checked by `event::known`): a room event, or one user's.
        EventKind::Passthrough if event.chat_id.is_none() => {
            route.users = Cow::Borrowed(event.user_id.as_slice());
        }
        EventKind::Passthrough | EventKind::Unknown => {}
    }
    route
}

/// `users` without repeats, first occurrence kept. Publishers send a handful of ids, so the
/// quadratic check is cheaper than hashing; it allocates only when there is a repeat.
fn distinct(users: &[UserId]) -> Cow<'_, [UserId]> {
    let repeats = users.iter().enumerate().any(|(i, user)| users[..i].contains(user));
    if !repeats {
        return Cow::Borrowed(users);
    }
    let mut seen = Vec::with_capacity(users.len());
    for user in users {
        if !seen.contains(user) {
            seen.push(*user);
        }
    }
    Cow::Owned(seen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::event::parse_batch;

    const CHAT: &str = "7d1b3c2a-0f7e-4a55-9a55-1b2c3d4e5f60";
    const ANN: &str = "11111111-2222-4333-8444-555555555555";
    const BOB: &str = "66666666-7777-4888-9999-aaaaaaaaaaaa";

    fn id(s: &str) -> uuid::Uuid {
        s.parse().expect("test ids are UUIDs")
    }

    /// Parses `json` as a publish body of one event and checks its route.
    fn check(
        json: &str,
        room: Option<&str>,
        users: &[&str],
        user_chat: Option<&str>,
        membership: Option<MemberChange>,
    ) {
        let events = parse_batch(json.as_bytes()).expect("valid test event");
        let got = route(&events[0]);
        let want = Route {
            room: room.map(id),
            users: Cow::Owned(users.iter().map(|u| id(u)).collect()),
            user_chat: user_chat.map(id),
            membership,
        };
        assert_eq!(got, want, "route of {json}");
        assert_eq!(events[0].room(), want.room, "DomainEvent::room agrees with the route");
        assert_eq!(got.is_empty(), room.is_none() && users.is_empty() && membership.is_none());
    }

    #[test]
    fn room_events_go_to_their_room() {
        let sent = format!(r#"{{"type":"message.sent","chat_id":"{CHAT}","data":{{}}}}"#);
        check(&sent, Some(CHAT), &[], Some(CHAT), None);
        let updated = format!(r#"{{"type":"chat.updated","chat_id":"{CHAT}","data":{{}}}}"#);
        check(&updated, Some(CHAT), &[], Some(CHAT), None);
    }

    #[test]
    fn task_events_go_to_their_room_and_users() {
        let both = format!(
            r#"{{"type":"task.status_changed","chat_id":"{CHAT}","user_ids":["{ANN}","{BOB}"],"data":{{}}}}"#
        );
        check(&both, Some(CHAT), &[ANN, BOB], Some(CHAT), None);
        let users_only = format!(r#"{{"type":"task.status_changed","user_ids":["{BOB}"],"data":{{}}}}"#);
        check(&users_only, None, &[BOB], None, None);
    }

    #[test]
    fn a_user_named_twice_is_routed_once() {
        let twice = format!(
            r#"{{"type":"task.status_changed","user_ids":["{ANN}","{BOB}","{ANN}","{BOB}","{ANN}"],"data":{{}}}}"#
        );
        check(&twice, None, &[ANN, BOB], None, None);
    }

    #[test]
    fn notifications_go_to_their_user_only_about_no_chat() {
        let json =
            format!(r#"{{"type":"notification.created","chat_id":"{CHAT}","user_id":"{ANN}","data":{{}}}}"#);
        check(&json, None, &[ANN], None, None);
    }

    #[test]
    fn membership_events_change_membership_and_reach_no_client_directly() {
        let (chat, user) = (id(CHAT), id(ANN));
        let added = format!(r#"{{"type":"chat.member_added","chat_id":"{CHAT}","user_id":"{ANN}"}}"#);
        check(&added, None, &[], None, Some(MemberChange::Added { chat, user }));
        let removed = format!(r#"{{"type":"chat.member_removed","chat_id":"{CHAT}","user_id":"{ANN}"}}"#);
        check(&removed, None, &[], None, Some(MemberChange::Removed { chat, user }));
    }

    #[test]
    fn passthrough_events_go_to_their_room_or_their_user() {
        let pass = crate::protocol::event::Passthrough::compile(&["reaction.*".into()]).expect("valid glob");
        let one = |json: String| {
            let events = parse_batch(json.as_bytes()).expect("valid test event");
            crate::protocol::event::known(events, &pass).expect("valid passthrough").events.remove(0)
        };
        let in_room = one(format!(r#"{{"type":"reaction.added","chat_id":"{CHAT}","data":{{}}}}"#));
        let got = route(&in_room);
        assert_eq!((got.room, got.users.len(), got.user_chat), (Some(id(CHAT)), 0, None));
        let to_user = one(format!(r#"{{"type":"reaction.added","user_id":"{ANN}","data":{{}}}}"#));
        let got = route(&to_user);
        assert_eq!((got.room, got.users.to_vec(), got.user_chat), (None, vec![id(ANN)], None));
    }

    #[test]
    fn unknown_events_go_nowhere() {
        let unknown = format!(r#"{{"type":"invoice.paid","chat_id":"{CHAT}","user_id":"{ANN}"}}"#);
        check(&unknown, None, &[], None, None);
    }
}
