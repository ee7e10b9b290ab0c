//! Presence on the Redis bus: the join, leave and typing calls, the deployment's list of a room's
//! users, and each node's refresh of the users it holds (keys `herald:{<chat>}:presence*`, one
//! slot per room). The Lua scripts that decide a join or a leave once for the deployment are in
//! `scripts.rs`.

use std::time::Duration;

use super::{channel, scripts, RedisBus};
use crate::bus::{BusError, Ephemeral, Topic};
use crate::protocol::{ChatId, UserId};

/// A random non-zero id for this node.
pub(super) fn random_id() -> u64 {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        // Unique enough among nodes for presence names: the clock and the process.
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        return (nanos.as_nanos() as u64) ^ u64::from(std::process::id()) | 1;
    }
    u64::from_le_bytes(bytes) | 1
}

/// The JSON form of a typing event on a room channel (join and leave are written by the Lua
/// scripts in the same shape, without `node` and `conn`). Its first key is `presence`, which no
/// domain event or control message has.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct PresenceWire {
    pub(super) presence: String,
    pub(super) chat_id: ChatId,
    pub(super) user_id: UserId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) node: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) conn: Option<u64>,
}

/// What every presence message on a room channel starts with.
pub(super) const PRESENCE_PREFIX: &[u8] = br#"{"presence":"#;

/// Rooms per pipeline of a presence refresh.
const REFRESH_ROOMS: usize = 256;

impl RedisBus {
    pub(super) async fn presence_call(&self, event: Ephemeral) -> Result<bool, BusError> {
        let chat = event.chat();
        let mut conn = self.shared.connection_for(&scripts::presence_key(chat))?;
        let room = channel(Topic::Room(chat));
        let scripts = &self.shared.scripts;
        let mut cmd = redis::cmd("EVALSHA");
        match event {
            Ephemeral::Join { user, .. } | Ephemeral::Leave { user, .. } => {
                let join = matches!(event, Ephemeral::Join { .. });
                let script = if join { &scripts.presence_join } else { &scripts.presence_leave };
                cmd.arg(script.get_hash())
                    .arg(2)
                    .arg(scripts::presence_key(chat))
                    .arg(scripts::presence_users_key(chat))
                    .arg(&room)
                    .arg(chat.to_string())
                    .arg(self.shared.node_id);
                if join {
                    cmd.arg(self.shared.options.presence_ttl.as_millis().to_string());
                }
                cmd.arg(user.to_string());
            }
            Ephemeral::Typing { user, from, .. } => {
                let wire = PresenceWire {
                    presence: "typing".into(),
                    chat_id: chat,
                    user_id: user,
                    node: Some(self.shared.node_id),
                    conn: Some(from),
                };
                // ok: plain data with string keys cannot fail to serialize.
                let message = serde_json::to_string(&wire).unwrap_or_default();
                cmd.arg(scripts.typing.get_hash())
                    .arg(1)
                    .arg(scripts::typing_key(chat, user))
                    .arg(self.shared.options.typing_interval.as_millis().max(1).to_string())
                    .arg(&room)
                    .arg(message);
            }
        }
        let sent: i64 = cmd.query_async(&mut conn).await.map_err(|e| {
            tracing::warn!(%chat, error = %e, "redis presence call failed");
            self.shared.fail(&e)
        })?;
        Ok(!matches!(event, Ephemeral::Typing { .. }) || sent == 1)
    }

    pub(super) async fn present_users(&self, chat: ChatId) -> Result<Option<Vec<UserId>>, BusError> {
        let mut conn = self.shared.connection_for(&scripts::presence_key(chat))?;
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.shared.scripts.presence_list.get_hash())
            .arg(2)
            .arg(scripts::presence_key(chat))
            .arg(scripts::presence_users_key(chat))
            .arg(channel(Topic::Room(chat)))
            .arg(chat.to_string());
        let users: Vec<String> = cmd.query_async(&mut conn).await.map_err(|e| {
            tracing::warn!(%chat, error = %e, "redis presence read failed");
            self.shared.fail(&e)
        })?;
        let mut users: Vec<UserId> = users.iter().filter_map(|u| UserId::try_parse(u).ok()).collect();
        users.sort_unstable();
        users.dedup();
        Ok(Some(users))
    }

    pub(super) async fn refresh_rooms(&self, rooms: Vec<(ChatId, Vec<UserId>)>) -> Result<(), BusError> {
        let link = self.shared.link()?;
        let ttl = self.shared.options.presence_ttl.as_millis().to_string();
        // One call per room (one slot under Cluster), pipelined a chunk at a time per primary.
        let keys: Vec<String> = rooms.iter().map(|(chat, _)| scripts::presence_key(*chat)).collect();
        for (mut conn, chunk) in link.group(&keys).into_iter().flat_map(|(conn, indexes)| {
            let chunks: Vec<Vec<usize>> = indexes.chunks(REFRESH_ROOMS).map(<[usize]>::to_vec).collect();
            chunks.into_iter().map(move |c| (conn.clone(), c))
        }) {
            let chunk: Vec<&(ChatId, Vec<UserId>)> = chunk.iter().map(|i| &rooms[*i]).collect();
            let mut pipe = redis::pipe();
            for (chat, users) in chunk {
                let cmd = pipe
                    .cmd("EVALSHA")
                    .arg(self.shared.scripts.presence_join.get_hash())
                    .arg(2)
                    .arg(scripts::presence_key(*chat))
                    .arg(scripts::presence_users_key(*chat))
                    .arg(channel(Topic::Room(*chat)))
                    .arg(chat.to_string())
                    .arg(self.shared.node_id)
                    .arg(&ttl);
                for user in users {
                    cmd.arg(user.to_string());
                }
                cmd.ignore();
            }
            pipe.query_async::<()>(&mut conn).await.map_err(|e| {
                tracing::warn!(error = %e, "redis presence refresh failed");
                self.shared.fail(&e)
            })?;
        }
        Ok(())
    }

    pub(super) async fn depart_rooms(
        &self,
        rooms: Vec<(ChatId, Vec<UserId>)>,
        within: Duration,
    ) -> Result<(), BusError> {
        let link = self.shared.link()?;
        let within = within.as_millis().to_string();
        let keys: Vec<String> = rooms.iter().map(|(chat, _)| scripts::presence_key(*chat)).collect();
        for (mut conn, chunk) in link.group(&keys).into_iter().flat_map(|(conn, indexes)| {
            let chunks: Vec<Vec<usize>> = indexes.chunks(REFRESH_ROOMS).map(<[usize]>::to_vec).collect();
            chunks.into_iter().map(move |c| (conn.clone(), c))
        }) {
            let chunk: Vec<&(ChatId, Vec<UserId>)> = chunk.iter().map(|i| &rooms[*i]).collect();
            let mut pipe = redis::pipe();
            for (chat, users) in chunk {
                let cmd = pipe
                    .cmd("EVALSHA")
                    .arg(self.shared.scripts.presence_depart.get_hash())
                    .arg(2)
                    .arg(scripts::presence_key(*chat))
                    .arg(scripts::presence_users_key(*chat))
                    .arg(self.shared.node_id)
                    .arg(&within);
                for user in users {
                    cmd.arg(user.to_string());
                }
                cmd.ignore();
            }
            pipe.query_async::<()>(&mut conn).await.map_err(|e| {
                tracing::warn!(error = %e, "redis presence departure failed");
                self.shared.fail(&e)
            })?;
        }
        Ok(())
    }
}
