//! Redis key and channel names, and the Lua scripts Herald runs there: the whole of what Herald
//! keeps in Redis and how it is laid out.
//!
//! # Names
//!
//! Per-room and per-user names carry a Redis Cluster hash tag (the id in braces), so every key of
//! one room hashes to one slot:
//!
//! | name | kind | what |
//! |---|---|---|
//! | `herald:{<chat>}:seq` | string | the room's `seq` counter, made at a [`crate::bus::seq_origin`] (Redis's clock); one no event used yet expires `rooms.history_ttl` after the last node watching the room stopped refreshing it |
//! | `herald:{<chat>}:room` | channel | the room's events |
//! | `herald:{<chat>}:members` | set | the room's members (`chat.member_*` events) |
//! | `herald:{<chat>}:history` | list | the room's recent events, `<ms>\|<event JSON with seq>`, oldest first |
//! | `herald:{<chat>}:removed` | hash | user -> when it was removed from the room (Unix seconds, Redis's clock): its older tokens may not subscribe; a re-add deletes the field; expires `auth.max_token_ttl` after the room's last removal |
//! | `herald:{<chat>}:presence` | sorted set | `<user>\|<node>` -> until when (Redis ms) the node vouches for the user in the room: each node refreshes its own every third of `presence.node_ttl`; a member past its time belongs to a node that stopped (its leave is announced by whichever node next refreshes or reads the room); expires once no refresh vouches for any member any more (a refresh never shortens it) |
//! | `herald:{<chat>}:presence-users` | hash | user -> how many nodes hold it in the room (a join is announced when it becomes 1, a leave when it drops to 0); kept with the sorted set |
//! | `herald:{<chat>}:typing:<user>` | string | the user's typing slot in the room, `PX presence.typing_interval`: one typing event per interval, deployment-wide |
//! | `herald:{<user>}:user` | channel | events addressed to one user, and operator disconnects (`{"control":"disconnect",...}`) |
//! | `herald:{<user>}:revoked` | string | the user's revocation: tokens issued before these Unix seconds are refused; expires after `auth.max_token_ttl` |
//! | `herald:members` | channel | membership events and revocations (`{"control":"revoke",...}`), for every node |
//! | `herald:removed-chats` | set | rooms that may have a removed hash (pruned by the snapshot script) |
//! | `herald:member-chats` | set | rooms that have a member set |
//! | `herald:member-log` | list | the last 10,000 membership events, `<gseq>\|<previous entry's gseq>\|<event JSON with seq>`, oldest first |
//! | `herald:gseq` | string | global counter of non-room events |
//! | `herald:boot` | string | when Redis's current state began (ms) |
//! | `herald:{pressure}` | hash | node id -> `<expires ms>\|<rooms or *>`: the rooms each overloaded node asks every node's publishers to hold back (`pressure.rs`, which owns the name and its script) |
//! | `herald:failover` | string | when a node last followed a Sentinel failover to this master (ms); room events wait `settle` after it as after `herald:boot`; expires soon after |
//!
//! On one Redis server (also the master Sentinel names) a publish script call covers a whole
//! batch: many rooms plus the global keys.
//!
//! Under Redis Cluster (`bus.kind: redis_cluster`) the global keys, the member sets, removed
//! hashes, revocations and the members channel share the `{herald}` slot under cluster-only
//! names (`names.rs`: `herald:{herald}:boot`, `herald:{herald}:members:<chat>`,
//! `herald:{herald}:revoked:<user>`, ...), so one-server deployments keep their keys. Room events
//! go through [`ROOM_PUBLISH_LUA`], one call per room of a batch on the room's slot, which
//! `SPUBLISH`es the room channel; copies to user channels are separate `SPUBLISH`es to each user's slot. Every
//! channel is a shard channel (`SSUBSCRIBE`), and the presence and typing scripts `SPUBLISH` too.

use crate::bus::Topic;
use crate::protocol::{ChatId, UserId};

pub(super) use super::script_set::Scripts;

/// The channel every node subscribes to for its whole life: membership events.
pub const MEMBERS_CHANNEL: &str = "herald:members";
pub(super) const BOOT_KEY: &str = "herald:boot";
/// Read by [`boot_prelude!`] by name (a single server's key, like the boot mark).
pub(super) const FAILOVER_KEY: &str = "herald:failover";
pub(super) const GSEQ_KEY: &str = "herald:gseq";
pub(super) const MEMBER_INDEX_KEY: &str = "herald:member-chats";
/// Rooms with a removed hash (the publish script adds, the snapshot script prunes).
pub(super) const REMOVED_INDEX_KEY: &str = "herald:removed-chats";
/// The membership log: every `chat.member_*` event, bounded, so a node that was cut off from Redis
/// replays the changes it missed (the publish script writes it, the snapshot script reads it).
pub(super) const MEMBER_LOG_KEY: &str = "herald:member-log";

/// The Redis channel for a topic (public so tests and tools can inspect `PUBSUB CHANNELS`).
pub fn channel(topic: Topic) -> String {
    match topic {
        Topic::Room(chat) => format!("herald:{{{chat}}}:room"),
        Topic::User(user) => format!("herald:{{{user}}}:user"),
    }
}

/// The room's `seq` counter.
pub(super) fn seq_key(chat: ChatId) -> String {
    format!("herald:{{{chat}}}:seq")
}

/// The room's history list (written by [`PUBLISH_LUA`], read by [`KEPT_LUA`]).
pub(super) fn history_key(chat: ChatId) -> String {
    format!("herald:{{{chat}}}:history")
}

/// The room's presence: `<user>|<node>` -> until (ms).
pub(super) fn presence_key(chat: ChatId) -> String {
    format!("herald:{{{chat}}}:presence")
}

/// The room's present users: user -> nodes holding it.
pub(super) fn presence_users_key(chat: ChatId) -> String {
    format!("herald:{{{chat}}}:presence-users")
}

/// The user's typing slot in the room.
pub(super) fn typing_key(chat: ChatId, user: UserId) -> String {
    format!("herald:{{{chat}}}:typing:{user}")
}

/// Lua shared by the scripts that need Redis's clock and boot mark: sets `now` (ms), `boot`
/// (when Redis's state began, recorded under `KEYS[1]` on first sight) and `fresh` (the later of
/// `boot` and the last failover a node followed to this server, `herald:failover`): room counters
/// may be behind what clients hold since `fresh`.
macro_rules! boot_prelude {
    () => {
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local boot = redis.call('GET', KEYS[1])
if not boot then
  redis.call('SET', KEYS[1], now)
  boot = now
end
local fresh = math.max(tonumber(boot), tonumber(redis.call('GET', 'herald:failover') or '0'))
"#
    };
}

/// Records that a node followed a failover to this server, now (Redis's clock). KEYS: the
/// failover key; ARGV: how long the mark is kept (ms).
pub(super) const MARK_FAILOVER_LUA: &str = r#"
local t = redis.call('TIME')
redis.call('SET', KEYS[1], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), 'PX', ARGV[1])
return 1
"#;

/// Lua: `origin(floor)`, a new room counter's first value as a string: Redis's clock in
/// microseconds ([`crate::bus::seq_origin`]), never below `floor`. Built from `TIME`'s two strings,
/// so no precision is lost on the way.
macro_rules! origin_fn {
    () => {
        r#"
local function origin(floor)
  local c = redis.call('TIME')
  local micros = c[1] .. string.format('%06d', tonumber(c[2]))
  if tonumber(micros) < floor then return string.format('%d', floor) end
  return micros
end
"#
    };
}

/// The error code [`PUBLISH_LUA`] refuses room events with while Redis's state is new.
pub(super) const SETTLING: &str = "SETTLING";

/// Publishes one batch atomically. KEYS: boot, gseq, member index, removed index, then per event
/// its key (room counter, member set, or gseq) and, for a room event, the room's history list, for
/// a membership event the member log and the room's removed hash. ARGV: settle ms,
/// has-room flag, history size, history TTL ms, removal TTL ms (`auth.max_token_ttl`), then per
/// event: op, floor, chat, user, payload (event JSON without seq), channel count, channels.
/// Returns the seqs.
///
/// A removal is also recorded in the room's removed hash (Redis's clock, seconds), which a re-add
/// clears, so every node, also one started later, refuses the user's older tokens.
///
/// A room event is appended to its room's history in the same call that assigns its `seq` and
/// publishes it, so history and live delivery can never disagree. Likewise a membership event is
/// appended to the member log (bounded to 10,000 entries) with the global counter it is published
/// with; each entry also names the previous entry's counter, so a reader can tell whether the log
/// still reaches back to a given point.
pub(super) const PUBLISH_LUA: &str = concat!(
    boot_prelude!(),
    origin_fn!(),
    r#"if ARGV[2] == '1' and now - fresh < tonumber(ARGV[1]) then
  return redis.error_reply('SETTLING redis lost its state recently; nodes are re-seeding room seq')
end
local seqs = {}
local hsize, httl, rttl = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local i = 6
local k = 5
while k <= #KEYS do
  local key = KEYS[k]
  k = k + 1
  local op, floor, chat, user, payload = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local nch = tonumber(ARGV[i + 5])
  i = i + 6
  local seq
  if op == 'r' then
    local cur = redis.call('GET', key)
    if not cur then
      redis.call('SET', key, origin(floor))
    elseif tonumber(cur) < floor then
      redis.call('SET', key, string.format('%d', floor))
    end
    seq = redis.call('INCR', key)
    -- A counter made by HEAD_LUA expires unless an event uses it; one that did is kept.
    redis.call('PERSIST', key)
  else
    if op == 'a' then
      redis.call('SADD', key, user)
      redis.call('SADD', KEYS[3], chat)
    elseif op == 'x' then
      redis.call('SREM', key, user)
      if redis.call('SCARD', key) == 0 then redis.call('SREM', KEYS[3], chat) end
    end
    seq = redis.call('INCR', KEYS[2])
    if op ~= 'u' then
      local log = KEYS[k]
      k = k + 1
      local last = redis.call('LINDEX', log, -1)
      redis.call('RPUSH', log, string.format('%d|%s|', seq, last and string.match(last, '^%d+') or '0')
        .. string.sub(payload, 1, -2) .. ',"seq":' .. string.format('%d', seq) .. '}')
      redis.call('LTRIM', log, -10000, -1)
      local removed = KEYS[k]
      k = k + 1
      if op == 'x' then
        redis.call('HSET', removed, user, string.format('%d', math.floor(now / 1000)))
        redis.call('PEXPIRE', removed, rttl)
        redis.call('SADD', KEYS[4], chat)
      else
        redis.call('HDEL', removed, user)
      end
    end
  end
  local msg = string.sub(payload, 1, -2) .. ',"seq":' .. string.format('%d', seq) .. '}'
  if op == 'r' then
    local hkey = KEYS[k]
    k = k + 1
    redis.call('RPUSH', hkey, string.format('%d', now) .. '|' .. msg)
    redis.call('LTRIM', hkey, -hsize, -1)
    redis.call('PEXPIRE', hkey, httl)
  end
  for c = 0, nch - 1 do
    redis.call('PUBLISH', ARGV[i + c], msg)
  end
  i = i + nch
  seqs[#seqs + 1] = seq
end
return seqs
"#
);

/// Marks Redis's state as seen (boot key) and raises room counters to the floors this node knows.
/// KEYS: boot, then room counters; ARGV: the floors. Returns ms since Redis's state began (or a
/// node last followed a failover to it).
pub(super) const RESEED_LUA: &str = concat!(
    boot_prelude!(),
    r#"for k = 2, #KEYS do
  local floor = tonumber(ARGV[k - 1])
  local cur = tonumber(redis.call('GET', KEYS[k]) or '0')
  if cur < floor then redis.call('SET', KEYS[k], floor) end
end
return now - fresh
"#
);

/// A room's position: its counter, made now at [`origin_fn!`] (`ARGV[1]` the floor this node knows)
/// when the room has none, so the first event follows the position a subscriber is told. A counter
/// made here expires after `ARGV[2]` ms unless an event uses it (the publish script keeps it then)
/// or a node watching the room refreshes it ([`TOUCH_LUA`]): subscribing to rooms that never
/// carry an event leaves nothing behind in Redis. KEYS: room counter.
pub(super) const HEAD_LUA: &str = concat!(
    origin_fn!(),
    r#"
local cur = redis.call('GET', KEYS[1])
if cur then return cur end
local o = origin(tonumber(ARGV[1]))
redis.call('SET', KEYS[1], o, 'PX', ARGV[2])
return o
"#
);

/// Refreshes the expiry of the counters (KEYS) that no event has used yet, for the rooms this
/// node watches; counters without an expiry are left alone. ARGV: the expiry in ms.
pub(super) const TOUCH_LUA: &str = r#"
for _, key in ipairs(KEYS) do
  if redis.call('PTTL', key) > 0 then redis.call('PEXPIRE', key, ARGV[1]) end
end
return #KEYS
"#;

/// A room's events after a position: the counter, Redis's clock (ms), then the history entries
/// (`<ms>|<json>`) with `seq` in `(since, head]` younger than the TTL, oldest first. Entries are
/// consecutive and end at the counter except after a re-seed, so the range is taken by count from
/// the end and the caller checks every `seq`. KEYS: room counter, room history; ARGV: TTL ms,
/// since.
pub(super) const KEPT_LUA: &str = r#"
local head = tonumber(redis.call('GET', KEYS[1]) or '0')
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = { string.format('%d', head), string.format('%d', now) }
local since = tonumber(ARGV[2])
if since < head then
  local n = math.min(head - since, redis.call('LLEN', KEYS[2]))
  local oldest = now - tonumber(ARGV[1])
  if n > 0 then
    for _, entry in ipairs(redis.call('LRANGE', KEYS[2], -n, -1)) do
      local bar = string.find(entry, '|', 1, true)
      if bar and tonumber(string.sub(entry, 1, bar - 1)) > oldest then
        out[#out + 1] = entry
      end
    end
  end
end
return out
"#;

/// The membership snapshot and the membership changes a node missed. KEYS: boot, member index,
/// gseq, member log, removed index; ARGV: member set name prefix and suffix (around the chat id),
/// then the boot mark and gseq this node's membership is at (an empty boot mark: none yet, the log
/// is not read), the removed hash's suffix and the removal TTL ms.
///
/// Returns, flattened: the boot mark; the global counter (the snapshot's position); how far back
/// the log reaches (it holds every membership event after that counter); the number `n` of log
/// entries after the node's position, then those `n` events (JSON with seq, oldest first); the
/// number `m` of removals younger than the TTL, then `m` (chat, user, Unix seconds) triples
/// (older ones are deleted on the way, and rooms left without any leave the index); then the
/// (chat, user) pairs. After a Redis state loss (another boot mark) the node's position means
/// nothing here, so the whole log is returned. The log is read from its end, so a node that missed
/// little costs little.
pub(super) const SNAPSHOT_LUA: &str = r#"
local boot = redis.call('GET', KEYS[1]) or 'none'
local out = { boot, redis.call('GET', KEYS[3]) or '0', '0', '0' }
if ARGV[3] ~= '' then
  local after = ARGV[3] == boot and tonumber(ARGV[4]) or 0
  local missed, reach, oldest, hi = {}, nil, '0', -1
  while not reach do
    local chunk = redis.call('LRANGE', KEYS[4], hi - 255, hi)
    hi = hi - 256
    for j = #chunk, 1, -1 do
      local gseq, prev, event = string.match(chunk[j], '^(%d+)|(%d+)|(.*)$')
      if tonumber(gseq) <= after then
        reach = gseq
        break
      end
      missed[#missed + 1] = event
      oldest = prev
    end
    if not reach and #chunk < 256 then reach = oldest end
  end
  out[3] = reach
  out[4] = tostring(#missed)
  for j = #missed, 1, -1 do
    out[#out + 1] = missed[j]
  end
end
local t = redis.call('TIME')
local cutoff = tonumber(t[1]) - math.floor(tonumber(ARGV[6]) / 1000)
local removals = {}
for _, chat in ipairs(redis.call('SMEMBERS', KEYS[5])) do
  local key = ARGV[1] .. chat .. ARGV[5]
  local flat = redis.call('HGETALL', key)
  if #flat == 0 then redis.call('SREM', KEYS[5], chat) end
  for j = 1, #flat, 2 do
    if tonumber(flat[j + 1]) > cutoff then
      removals[#removals + 1] = chat
      removals[#removals + 1] = flat[j]
      removals[#removals + 1] = flat[j + 1]
    else
      redis.call('HDEL', key, flat[j])
    end
  end
end
out[#out + 1] = tostring(#removals / 3)
for _, v in ipairs(removals) do
  out[#out + 1] = v
end
for _, chat in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  for _, user in ipairs(redis.call('SMEMBERS', ARGV[1] .. chat .. ARGV[2])) do
    out[#out + 1] = chat
    out[#out + 1] = user
  end
end
return out
"#;

/// Records a revocation and tells every node. KEYS: the user's revoked key; ARGV: before (Unix
/// seconds), TTL ms, the members channel, the user id. Keeps the later of the held and the new
/// cut-off (with a fresh TTL) and publishes that one, so no node learns an earlier one than Redis
/// holds. Returns the cut-off kept.
pub(super) const REVOKE_LUA: &str = r#"
local before = tonumber(ARGV[1])
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if cur > before then before = cur end
redis.call('SET', KEYS[1], string.format('%d', before), 'PX', ARGV[2])
redis.call('PUBLISH', ARGV[3], string.format('{"control":"revoke","user_id":"%s","before":%d}', ARGV[4], before))
return before
"#;

/// Lua shared by the presence scripts: `now` (Redis ms), `announce(kind, user)` (publishes a
/// presence message on the room's channel, ARGV[1], for chat ARGV[2]), and `reap()`, which takes
/// out the members whose node stopped refreshing them and announces the users no node holds any
/// more. KEYS: presence sorted set, presence-users hash.
macro_rules! presence_prelude {
    () => {
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function announce(kind, user)
  redis.call('PUBLISH', ARGV[1], '{"presence":"' .. kind .. '","chat_id":"' .. ARGV[2] .. '","user_id":"' .. user .. '"}')
end
local function gone(user)
  if redis.call('HINCRBY', KEYS[2], user, -1) <= 0 then
    redis.call('HDEL', KEYS[2], user)
    announce('leave', user)
  end
end
local function reap()
  local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now)
  for _, m in ipairs(dead) do
    redis.call('ZREM', KEYS[1], m)
    gone(string.sub(m, 1, 36))
  end
end
"#
    };
}

/// A node vouches for its users in a room (a join, or its periodic refresh): reaps the members of
/// stopped nodes, then (re)sets this node's member of each user until now + TTL, and keeps the
/// keys at least that long (never shorter: other nodes may vouch longer); a user no node held
/// before is announced (`presence.join`), once for the deployment since the script is atomic. KEYS: presence sorted set, presence-users hash. ARGV: channel, chat, node, TTL ms,
/// users.
pub(super) const PRESENCE_JOIN_LUA: &str = concat!(
    presence_prelude!(),
    r#"
reap()
local ttl = tonumber(ARGV[4])
for i = 5, #ARGV do
  local user = ARGV[i]
  if redis.call('ZADD', KEYS[1], now + ttl, user .. '|' .. ARGV[3]) == 1 then
    if redis.call('HINCRBY', KEYS[2], user, 1) == 1 then announce('join', user) end
  end
end
if #ARGV >= 5 then
  -- Only ever lengthened: a node with a shorter node_ttl must not cut short the other nodes' time.
  for _, key in ipairs(KEYS) do
    if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
  end
end
return 0
"#
);

/// A node no longer holds these users in a room (their leave delay ran out there): a user no
/// other node holds is announced (`presence.leave`). KEYS: as [`PRESENCE_JOIN_LUA`]. ARGV:
/// channel, chat, node, users.
pub(super) const PRESENCE_LEAVE_LUA: &str = concat!(
    presence_prelude!(),
    r#"
reap()
for i = 4, #ARGV do
  local user = ARGV[i]
  if redis.call('ZREM', KEYS[1], user .. '|' .. ARGV[3]) == 1 then gone(user) end
end
return 0
"#
);

/// The room's present users (members whose node still vouches for them), after reaping the
/// others. KEYS: as [`PRESENCE_JOIN_LUA`]. ARGV: channel, chat.
pub(super) const PRESENCE_LIST_LUA: &str = concat!(
    presence_prelude!(),
    r#"
reap()
return redis.call('HKEYS', KEYS[2])
"#
);

/// A typing event: published on the room's channel only when the user's typing slot in the room
/// is free (then taken for the interval). Returns 1 when published, 0 when dropped. KEYS: typing
/// slot. ARGV: interval ms, channel, message.
pub(super) const TYPING_LUA: &str = r#"
if redis.call('SET', KEYS[1], '1', 'PX', ARGV[1], 'NX') then
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
"#;

/// A node that stops gracefully: its members of these users in a room run out `within` ms from
/// now (then whichever node refreshes or reads the room next reaps them, announcing a leave for a
/// user no other node holds by then); the keys are kept at least that long. KEYS: as
/// [`PRESENCE_JOIN_LUA`]. ARGV: node, within ms, users.
pub(super) const PRESENCE_DEPART_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local within = tonumber(ARGV[2])
for i = 3, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', now + within, ARGV[i] .. '|' .. ARGV[1])
end
for _, key in ipairs(KEYS) do
  local ttl = redis.call('PTTL', key)
  if ttl >= 0 and ttl < within + 1000 then redis.call('PEXPIRE', key, within + 1000) end
end
return 0
"#;

/// Cluster only: publishes a batch's events of one room on the room's slot (its primary),
/// assigning each its `seq` and appending it to the room's history in the same step; Redis
/// Cluster refuses one script over several slots, so a batch over many rooms is one call per
/// room. Settling after a failover is the node's (`cluster.rs`), as no global key shares the
/// room's slot. KEYS: room counter, room history. ARGV: floor, history size, history TTL ms, room
/// channel, then each event's payload (event JSON without seq), in order. Returns the seqs.
pub(super) const ROOM_PUBLISH_LUA: &str = concat!(
    origin_fn!(),
    r#"
local floor = tonumber(ARGV[1])
local cur = redis.call('GET', KEYS[1])
if not cur then
  redis.call('SET', KEYS[1], origin(floor))
elseif tonumber(cur) < floor then
  redis.call('SET', KEYS[1], string.format('%d', floor))
end
local t = redis.call('TIME')
local stamp = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)) .. '|'
local seqs = {}
for i = 5, #ARGV do
  local seq = redis.call('INCR', KEYS[1])
  local msg = string.sub(ARGV[i], 1, -2) .. ',"seq":' .. string.format('%d', seq) .. '}'
  redis.call('RPUSH', KEYS[2], stamp .. msg)
  redis.call('PUBLISH', ARGV[4], msg)
  seqs[#seqs + 1] = seq
end
redis.call('PERSIST', KEYS[1])
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[2]), -1)
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return seqs
"#
);

/// Cluster only: raises one room counter (KEYS[1]) to the floor ARGV[1].
pub(super) const RESEED_ROOM_LUA: &str = r#"
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if cur < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
return 0
"#;
