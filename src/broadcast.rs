//! The broadcaster: maps each delivered domain event to its client message
//! (PROTOCOL.md section 5), encodes it once as a WebSocket frame, and hands
//! that frame to the room and user registries.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::bus::Deliver;
use crate::membership;
use crate::metrics::Metrics;
use crate::protocol::event::{DomainEvent, EventKind};
use crate::protocol::server;
use crate::rooms::{Rooms, UserMsg, Users};

/// Implements [`Deliver`] for a node's registries.
pub struct Broadcaster {
    pub rooms: Arc<Rooms>,
    pub users: Arc<Users>,
    pub membership: Arc<membership::Table>,
    pub metrics: Arc<Metrics>,
}

impl Deliver for Broadcaster {
    fn deliver(&self, event: &DomainEvent, seq: Option<u64>) {
        self.metrics.events_in.fetch_add(1, Ordering::Relaxed);
        let data = event.data.as_ref().map_or("null", |d| d.get());
        match event.kind {
            EventKind::MessageSent | EventKind::ChatUpdated | EventKind::TaskStatusChanged => {
                let ty = event.kind.client_type().unwrap_or_default();
                if let (Some(chat), Some(seq)) = (event.chat_id, seq) {
                    self.rooms.publish(chat, seq, server::room_event(ty, chat, seq, data));
                } else if event.chat_id.is_some() {
                    tracing::warn!(kind = ?event.kind, "room event delivered without a seq; dropped");
                }
                if !event.user_ids.is_empty() {
                    // One frame for every addressed user: per-user events carry no seq.
                    let frame = server::user_event(ty, event.chat_id, data);
                    for user in &event.user_ids {
                        self.users.send(*user, UserMsg::Frame(frame.clone()));
                    }
                }
            }
            EventKind::NotificationCreated => {
                if let Some(user) = event.user_id {
                    let frame = server::user_event("notification.new", None, data);
                    self.users.send(user, UserMsg::Frame(frame));
                }
            }
            EventKind::MemberAdded => {
                if let (Some(chat), Some(user)) = (event.chat_id, event.user_id) {
                    self.membership.add(chat, user);
                }
            }
            EventKind::MemberRemoved => {
                if let (Some(chat), Some(user)) = (event.chat_id, event.user_id) {
                    self.membership.remove(chat, user);
                    self.users.send(user, UserMsg::Removed(chat));
                }
            }
            EventKind::Unknown => {
                self.metrics.events_unknown.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
