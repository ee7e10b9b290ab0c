//! Presence and typing (issue 23) over real sockets: on the memory bus, and
//! (`--include-ignored`) on two nodes sharing a real `redis-server`, one of
//! them a `herald` process killed with SIGKILL.

mod support;

use std::time::Duration;

use herald::config::{Config, Membership};
use herald::protocol::{ChatId, UserId};
use serde_json::{json, Value};
use support::redis::{mark_settled, redis_cmd, RedisServer};
use support::{chat, user, Client, Gateway, API_KEY};
use tokio::time::{sleep, Instant};

const LEAVE_DELAY: Duration = Duration::from_millis(600);
const TYPING_INTERVAL: Duration = Duration::from_millis(800);

fn presence_config(mut config: Config) -> Config {
    config.presence.leave_delay = LEAVE_DELAY;
    config.presence.typing_interval = TYPING_INTERVAL;
    config.presence.node_ttl = Duration::from_secs(1);
    config
}

async fn node() -> Gateway {
    support::start(presence_config(support::config())).await
}

/// Alice subscribes to a new room listening for presence, then Bob (not
/// listening): Alice has seen both joins.
struct Pair {
    room: ChatId,
    bob: UserId,
    a: Client,
    b: Client,
}

async fn alice_listens_bob_joins(gw: &Gateway) -> Pair {
    let (room, alice, bob) = (chat(), user(), user());
    let mut a = gw.connect(alice, &[]).await;
    subscribe_listening(&mut a, room).await;
    assert_eq!(a.recv().await, join(room, alice));
    let mut b = gw.connect(bob, &[]).await;
    b.subscribe(room).await;
    assert_eq!(a.recv().await, join(room, bob));
    Pair { room, bob, a, b }
}

/// Subscribes with `"presence":true`; returns the room's position.
async fn subscribe_listening(c: &mut Client, chat: ChatId) -> u64 {
    c.send_json(json!({"type":"subscribe","chat_id":chat,"presence":true})).await;
    let reply = c.recv().await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    reply["seq"].as_u64().expect("seq")
}

fn join(chat: ChatId, user: UserId) -> Value {
    json!({"type":"presence.join","chat_id":chat,"user_id":user})
}

fn leave(chat: ChatId, user: UserId) -> Value {
    json!({"type":"presence.leave","chat_id":chat,"user_id":user})
}

async fn presence_list(c: &mut Client, chat: ChatId) -> Value {
    c.send_json(json!({"type":"presence","chat_id":chat})).await;
    c.recv().await
}

fn sorted(mut users: Vec<UserId>) -> Vec<String> {
    users.sort();
    users.iter().map(UserId::to_string).collect()
}

/// Proves that nothing else is on its way to any of `clients` (all
/// subscribed to `room`): two markers published one after the other must be
/// the next thing each of them reads (see `Client::expect_nothing_else`).
async fn quiet(gw: &Gateway, room: ChatId, clients: &mut [&mut Client]) {
    for n in 0..2 {
        let marker = json!({"marker": n});
        let (status, _) = gw.publish(&support::message_sent(room, &marker)).await;
        assert_eq!(status, 202, "marker published");
        for c in clients.iter_mut() {
            let got = c.recv().await;
            assert_eq!(got["data"], marker, "expected nothing before marker {n}, got {got}");
        }
    }
}

/// `GET /api/rooms/{chat}/presence` with the API key.
async fn http_presence(gw: &Gateway, chat: ChatId) -> (u16, Value) {
    let (status, _, body) = support::exchange(
        gw.addr,
        &format!(
            "GET /api/rooms/{chat}/presence HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {API_KEY}\r\n\
             Connection: close\r\n\r\n"
        ),
    )
    .await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn join_then_leave_after_the_delay_and_the_list_in_between() {
    let gw = node().await;
    let (room, alice, bob) = (chat(), user(), user());
    let mut a = gw.connect(alice, &[]).await;
    subscribe_listening(&mut a, room).await;
    assert_eq!(a.recv().await, join(room, alice), "a listener hears its own join too");

    let mut b = gw.connect(bob, &[]).await;
    b.subscribe(room).await;
    assert_eq!(a.recv().await, join(room, bob));
    // A second connection of the same user is no join.
    let mut b2 = gw.connect(bob, &[]).await;
    b2.subscribe(room).await;

    let want = json!({"type":"presence","chat_id":room,"users":sorted(vec![alice, bob])});
    assert_eq!(presence_list(&mut b, room).await, want, "sorted, each once");
    assert_eq!(
        http_presence(&gw, room).await,
        (200, json!({"chat_id":room,"users":sorted(vec![alice, bob])}))
    );

    // Bob's last subscription ends: the leave comes after the delay, not before.
    b.send_json(json!({"type":"unsubscribe","chat_id":room})).await;
    assert_eq!(b.recv().await["type"], "unsubscribed");
    drop(b2);
    let gone = Instant::now();
    assert_eq!(a.recv().await, leave(room, bob));
    assert!(gone.elapsed() >= LEAVE_DELAY - Duration::from_millis(50), "left after {:?}", gone.elapsed());
    assert_eq!(presence_list(&mut a, room).await, json!({"type":"presence","chat_id":room,"users":[alice]}));
    // A subscriber that did not ask for presence events receives none.
    let mut c = gw.connect(user(), &[]).await;
    c.subscribe(room).await;
    assert_eq!(a.recv().await["type"], "presence.join");
    c.expect_nothing_else(&gw, room).await;
    gw.stop().await;
}

#[tokio::test]
async fn a_reconnect_within_the_delay_produces_neither_leave_nor_join() {
    let gw = node().await;
    let Pair { room, bob, mut a, b } = alice_listens_bob_joins(&gw).await;
    drop(b);
    sleep(LEAVE_DELAY / 3).await;
    let mut b = gw.connect(bob, &[]).await;
    b.subscribe(room).await;
    sleep(LEAVE_DELAY * 2).await;
    a.expect_nothing_else(&gw, room).await;
    gw.stop().await;
}

#[tokio::test]
async fn typing_reaches_the_others_once_per_interval_never_the_sender() {
    let gw = node().await;
    let (room, alice, bob) = (chat(), user(), user());
    let mut a = gw.connect(alice, &[]).await;
    a.subscribe(room).await;
    let mut b = gw.connect(bob, &[]).await;
    b.subscribe(room).await;

    b.send_json(json!({"type":"typing","chat_id":room})).await;
    assert_eq!(a.recv().await, json!({"type":"typing","chat_id":room,"user_id":bob}));
    // A flood within the interval: dropped silently, counted.
    for _ in 0..5 {
        b.send_json(json!({"type":"typing","chat_id":room})).await;
    }
    quiet(&gw, room, &mut [&mut a, &mut b]).await;
    gw.wait_metric("typing_dropped_total", 5.0).await;
    assert_eq!(gw.metric("typing_delivered_total").await, 1.0);
    sleep(TYPING_INTERVAL).await;
    b.send_json(json!({"type":"typing","chat_id":room})).await;
    assert_eq!(a.recv().await, json!({"type":"typing","chat_id":room,"user_id":bob}), "the next interval");

    // Typing needs a subscription.
    let other = chat();
    b.send_json(json!({"type":"typing","chat_id":other})).await;
    let reply = b.recv().await;
    assert_eq!(
        (reply["code"].as_str(), reply["chat_id"].as_str()),
        (Some("not_subscribed"), Some(&*other.to_string()))
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_removed_user_leaves_presence() {
    let gw = node().await;
    let Pair { room, bob, mut a, mut b } = alice_listens_bob_joins(&gw).await;
    let (status, _) =
        gw.publish(&json!({"type":"chat.member_removed","chat_id":room,"user_id":bob}).to_string()).await;
    assert_eq!(status, 202);
    let reply = b.recv().await;
    assert_eq!(reply, json!({"type":"unsubscribed","chat_id":room,"reason":"removed"}));
    // Alice sees the removal event itself, then Bob's leave.
    loop {
        let got = a.recv().await;
        if got["type"] == "presence.leave" {
            assert_eq!(got, leave(room, bob));
            break;
        }
        assert_eq!(got["type"], "chat.member_removed", "{got}");
    }
    gw.stop().await;
}

#[tokio::test]
async fn presence_follows_the_membership_rules_and_can_be_switched_off() {
    let mut config = presence_config(support::config());
    config.auth.membership = Membership::Token;
    let gw = support::start(config).await;
    let (mine, theirs) = (chat(), chat());
    let mut c = gw.connect(user(), &[mine]).await;
    let reply = presence_list(&mut c, theirs).await;
    assert_eq!(reply["code"], "forbidden", "{reply}");
    let reply = presence_list(&mut c, mine).await;
    assert_eq!(reply, json!({"type":"presence","chat_id":mine,"users":[]}), "a room never seen is empty");
    gw.stop().await;

    let mut config = support::config();
    config.presence.enabled = false;
    let gw = support::start(config).await;
    let room = chat();
    let mut c = gw.connect(user(), &[]).await;
    c.send_json(json!({"type":"subscribe","chat_id":room,"presence":true})).await;
    assert_eq!(c.recv().await["type"], "subscribed");
    for ty in ["presence", "typing"] {
        c.send_json(json!({"type":ty,"chat_id":room})).await;
        assert_eq!(c.recv().await["code"], "unknown_type");
        // Malformed too: the commands do not exist, so nothing else about them is wrong.
        for bad in
            [json!({"type":ty}), json!({"type":ty,"chat_id":"garbage"}), json!({"type":ty,"chat_id":42})]
        {
            c.send_json(bad.clone()).await;
            assert_eq!(c.recv().await["code"], "unknown_type", "{bad}");
        }
    }
    assert_eq!(http_presence(&gw, room).await.0, 404);
    c.expect_nothing_else(&gw, room).await;
    gw.stop().await;
}

#[tokio::test]
async fn the_presence_list_is_truncated_at_max_list() {
    let mut config = presence_config(support::config());
    config.presence.max_list = 2;
    let gw = support::start(config).await;
    let room = chat();
    let mut clients = Vec::new();
    let mut users = Vec::new();
    for _ in 0..3 {
        let u = user();
        let mut c = gw.connect(u, &[]).await;
        c.subscribe(room).await;
        clients.push(c);
        users.push(u);
    }
    let reply = presence_list(&mut clients[0], room).await;
    let want = sorted(users);
    assert_eq!(reply, json!({"type":"presence","chat_id":room,"users":want[..2],"truncated":true}));
    gw.stop().await;
}

/// Typing in many rooms holds a slot per (room, user) for `presence.typing_interval`, no longer:
/// the slots are freed every interval, not only with the bus refresh (a third of
/// `presence.node_ttl`, which may be hours).
#[tokio::test]
async fn typing_slots_are_freed_after_the_interval_whatever_node_ttl() {
    const ROOMS: usize = 20;
    let mut config = presence_config(support::config());
    config.presence.node_ttl = Duration::from_secs(3600);
    let gw = support::start(config).await;
    let mut c = gw.connect(user(), &[]).await;
    let rooms: Vec<ChatId> = (0..ROOMS).map(|_| chat()).collect();
    for &room in &rooms {
        c.subscribe(room).await;
        c.send_json(json!({"type":"typing","chat_id":room})).await;
    }
    let held = gw.metric("typing_slots").await;
    assert!(held > 0.0, "one slot per room typed in: {held}");
    gw.wait_metric("typing_slots", 0.0).await;
    // And the rate limit still holds within an interval.
    c.send_json(json!({"type":"typing","chat_id":rooms[0]})).await;
    c.send_json(json!({"type":"typing","chat_id":rooms[0]})).await;
    gw.wait_metric("typing_dropped_total", 1.0).await;
    gw.stop().await;
}

// ---- two nodes on a real redis-server --------------------------------------

async fn redis_node(redis: &RedisServer) -> Gateway {
    support::start(presence_config(support::redis::config(redis))).await
}

#[tokio::test]
#[ignore = "needs redis-server"]
async fn presence_and_typing_span_nodes_and_a_move_between_them_is_silent() {
    let redis = RedisServer::start();
    mark_settled(&redis).await;
    let (one, two) = (redis_node(&redis).await, redis_node(&redis).await);
    let (room, alice, bob) = (chat(), user(), user());
    let mut a = one.connect(alice, &[]).await;
    subscribe_listening(&mut a, room).await;
    assert_eq!(a.recv().await, join(room, alice));
    let mut b = two.connect(bob, &[]).await;
    subscribe_listening(&mut b, room).await;
    assert_eq!(a.recv().await, join(room, bob));
    assert_eq!(b.recv().await, join(room, bob));

    let both = json!({"type":"presence","chat_id":room,"users":sorted(vec![alice, bob])});
    assert_eq!(presence_list(&mut a, room).await, both);
    assert_eq!(presence_list(&mut b, room).await, both);
    assert_eq!(
        http_presence(&one, room).await,
        (200, json!({"chat_id":room,"users":sorted(vec![alice, bob])}))
    );

    // Typing crosses nodes, once per interval deployment-wide, never to the sender.
    b.send_json(json!({"type":"typing","chat_id":room})).await;
    assert_eq!(a.recv().await, json!({"type":"typing","chat_id":room,"user_id":bob}));
    let mut b_on_one = one.connect(bob, &[]).await;
    b_on_one.subscribe(room).await;
    b_on_one.send_json(json!({"type":"typing","chat_id":room})).await;
    b.send_json(json!({"type":"typing","chat_id":room})).await;
    quiet(&two, room, &mut [&mut a, &mut b, &mut b_on_one]).await;
    drop(b_on_one);

    // Bob moves from node two to node one within the delay: no leave, no join.
    drop(b);
    sleep(LEAVE_DELAY / 3).await;
    let mut b = one.connect(bob, &[]).await;
    b.subscribe(room).await;
    sleep(LEAVE_DELAY * 2).await;
    a.expect_nothing_else(&one, room).await;
    assert_eq!(presence_list(&mut a, room).await, both);

    // Gone for good: one leave, announced once.
    drop(b);
    assert_eq!(a.recv().await, leave(room, bob));
    a.expect_nothing_else(&one, room).await;
    let mut c = two.connect(user(), &[]).await;
    assert_eq!(presence_list(&mut c, room).await, json!({"type":"presence","chat_id":room,"users":[alice]}));
    one.stop().await;
    two.stop().await;
}

#[tokio::test]
#[ignore = "needs redis-server"]
async fn the_users_of_a_node_killed_with_sigkill_leave_after_node_ttl() {
    let redis = RedisServer::start();
    mark_settled(&redis).await;
    let one = redis_node(&redis).await;
    let addr = support::free_addr();
    let mut child = support::herald()
        .env("HERALD_SERVER__LISTEN", addr.to_string())
        .env("HERALD_AUTH__JWT_SECRET", support::SECRET)
        .env("HERALD_API__KEYS", API_KEY)
        .env("HERALD_AUTH__MEMBERSHIP", "open")
        .env("HERALD_BUS__KIND", "redis")
        .env("HERALD_BUS__REDIS_URL", redis.url())
        .env("HERALD_PRESENCE__NODE_TTL", "1s")
        .spawn()
        .expect("herald starts");
    support::wait_healthy(&mut child, addr).await;

    let (room, alice, bob) = (chat(), user(), user());
    let mut a = one.connect(alice, &[]).await;
    subscribe_listening(&mut a, room).await;
    assert_eq!(a.recv().await, join(room, alice));
    let mut b = Client::connect(addr, &support::token(bob, &[])).await;
    b.subscribe(room).await;
    assert_eq!(a.recv().await, join(room, bob));

    child.start_kill().expect("SIGKILL");
    child.wait().await.expect("reaped");
    let killed = Instant::now();
    assert_eq!(a.recv().await, leave(room, bob));
    let took = killed.elapsed();
    // The killed node's member runs out after node_ttl; node one reaps it at its next refresh.
    assert!(took <= Duration::from_secs(3), "leave after {took:?}");
    assert_eq!(presence_list(&mut a, room).await, json!({"type":"presence","chat_id":room,"users":[alice]}));
    drop(b);
    one.stop().await;
}

/// A deploy: node one stops (gracefully) and every one of its clients comes
/// back on node two within `presence.leave_delay`. The listeners on node two
/// see neither a leave nor a join, and every user is still listed.
#[tokio::test]
#[ignore = "needs redis-server"]
async fn a_mass_move_between_nodes_within_the_delay_produces_no_leave_or_join() {
    // Scaled up by hand for BENCHMARKS.md (a deploy of 10,000 clients in 100 rooms):
    // PRESENCE_MOVE=<rooms>x<per room>[@<leave delay in s>].
    let scale = std::env::var("PRESENCE_MOVE").unwrap_or_else(|_| "3x100@4".into());
    let (shape, delay) = scale.split_once('@').unwrap_or((&scale, "4"));
    let (rooms_n, per_room) = shape.split_once('x').expect("PRESENCE_MOVE=<rooms>x<per room>[@<s>]");
    let n_rooms: usize = rooms_n.parse().expect("rooms");
    let n_per_room: usize = per_room.parse().expect("per room");
    let delay = Duration::from_secs(delay.parse().expect("leave delay in seconds"));
    let redis = RedisServer::start();
    mark_settled(&redis).await;
    let config = || {
        let mut c = presence_config(support::redis::config(&redis));
        c.presence.leave_delay = delay;
        // Refreshes late by more than a third of this (a loaded test machine) would look like a
        // node that died: its users would leave and come back.
        c.presence.node_ttl = Duration::from_secs(10);
        c.server.max_connections = 50_000;
        // Clients this test does not read for a while (scaled up, longer than a minute) answer
        // no pings meanwhile.
        c.websocket.ping_interval = Duration::from_secs(600);
        c.websocket.pong_wait = Duration::from_secs(1200);
        c
    };
    let one = support::start(config()).await;
    let two = support::start(config()).await;
    let rooms: Vec<ChatId> = (0..n_rooms).map(|_| chat()).collect();
    let mut listeners = Vec::new();
    for &room in &rooms {
        let watcher = user();
        let mut l = two.connect(watcher, &[]).await;
        subscribe_listening(&mut l, room).await;
        assert_eq!(l.recv().await, join(room, watcher));
        listeners.push((l, watcher));
    }
    let mut users = Vec::new();
    let mut clients = Vec::new();
    for &room in &rooms {
        for _ in 0..n_per_room {
            let u = user();
            let mut c = one.connect(u, &[]).await;
            c.subscribe(room).await;
            clients.push(c);
            users.push((room, u));
        }
    }
    // One user who does not come back: its leave comes after the delay, not after node_ttl.
    let gone = user();
    let mut gone_client = one.connect(gone, &[]).await;
    gone_client.subscribe(rooms[0]).await;
    for (i, (l, _)) in listeners.iter_mut().enumerate() {
        for _ in 0..n_per_room + usize::from(i == 0) {
            let got = l.recv().await;
            assert_eq!(
                (got["type"].as_str(), got["chat_id"].as_str()),
                (Some("presence.join"), Some(&*rooms[i].to_string()))
            );
        }
    }

    // The deploy: node one stops, its clients are closed with 1001 and come back on node two.
    let stopped = Instant::now();
    one.stop().await;
    drop(clients);
    drop(gone_client);
    let moved = Instant::now();
    let mut clients = Vec::new();
    for &(room, u) in &users {
        let mut c = two.connect(u, &[]).await;
        c.subscribe(room).await;
        clients.push(c);
    }
    let took = moved.elapsed();
    assert!(took < delay, "moved within the delay: {took:?}");
    eprintln!("{} clients in {n_rooms} rooms moved in {took:?}", users.len());
    // Past the delay, node two's refresh reaps what node one handed over: only the user who
    // stayed away leaves.
    tokio::time::sleep_until(stopped + delay.mul_f64(0.8).max(delay.saturating_sub(Duration::from_secs(2))))
        .await;
    quiet(&two, rooms[0], &mut [&mut listeners[0].0]).await;
    assert_eq!(listeners[0].0.recv().await, leave(rooms[0], gone), "after the delay, not sooner");
    sleep(Duration::from_secs(2)).await;
    let mut all: Vec<&mut Client> = listeners.iter_mut().map(|(l, _)| l).collect();
    for (i, l) in all.iter_mut().enumerate() {
        quiet(&two, rooms[i], &mut [&mut **l]).await;
    }
    for (i, (l, watcher)) in listeners.iter_mut().enumerate() {
        let mut want: Vec<UserId> = users.iter().filter(|(r, _)| *r == rooms[i]).map(|(_, u)| *u).collect();
        want.push(*watcher);
        let list = presence_list(l, rooms[i]).await;
        assert_eq!(list["users"], json!(sorted(want)), "room {i}");
    }
    two.stop().await;
}

/// A client that stops reading while typing events pour in is not closed
/// for them (4008 is for room frames it fell behind and per-user events):
/// once its queue is full, further presence and typing frames are dropped
/// and counted, and it reads on from where it was when it reads again.
#[tokio::test]
async fn a_reader_that_stalls_under_a_typing_flood_is_not_closed_for_it() {
    const ROOMS: usize = 300;
    const TYPINGS: usize = 300;
    let mut config = presence_config(support::config());
    config.presence.typing_interval = Duration::from_millis(1);
    // The stall timer is not what this test is about: the reader stops for seconds.
    config.websocket.write_wait = Duration::from_secs(120);
    config.websocket.max_subscriptions = ROOMS;
    let gw = support::start(config).await;
    let rooms: Vec<ChatId> = (0..ROOMS).map(|_| chat()).collect();
    let mut reader = support::RawClient::connect_small(gw.addr, &support::token(user(), &[]), 4096).await;
    for (i, &room) in rooms.iter().enumerate() {
        if i >= 90 {
            // Within the command budget (a burst of 100, then 50/s).
            sleep(Duration::from_millis(22)).await;
        }
        reader.send_frame(0x81, json!({"type":"subscribe","chat_id":room}).to_string().as_bytes()).await;
        let reply = reader.read_json().await.expect("subscribed");
        assert_eq!(reply["type"], "subscribed", "{reply}");
    }
    // One typist per room: each typing event reaches the reader alone. Well
    // over the 4 MiB a connection may hold queued (about 115 bytes each).
    let typists = rooms.iter().map(|&room| {
        let addr = gw.addr;
        tokio::spawn(async move {
            let mut c = Client::connect(addr, &support::token(user(), &[])).await;
            c.subscribe(room).await;
            for _ in 0..TYPINGS {
                c.send_json(json!({"type":"typing","chat_id":room})).await;
                // Within the command rate (50/s), and past typing_interval.
                sleep(Duration::from_millis(22)).await;
            }
            c
        })
    });
    let typists = futures_util::future::join_all(typists).await;
    // Every one was handled: sent on (to the reader, or dropped for it), or dropped by the
    // rate limit (two that a busy node read together, within typing_interval).
    let deadline = Instant::now() + support::PATIENCE;
    loop {
        let handled = gw.metric("typing_delivered_total").await + gw.metric("typing_dropped_total").await;
        if handled == (ROOMS * TYPINGS) as f64 {
            break;
        }
        assert!(Instant::now() < deadline, "{handled} typing events handled");
        sleep(Duration::from_millis(50)).await;
    }
    let marker = json!({"marker": 0});
    let (status, _) = gw.publish(&support::message_sent(rooms[0], &marker)).await;
    assert_eq!(status, 202);
    let mut typings = 0usize;
    loop {
        let (first, payload) = reader.read_frame().await.expect("a frame, not the end");
        if first & 0x0f == 0x8 {
            let code = payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]));
            panic!("closed with {code:?} after {typings} typing events");
        }
        if first & 0x0f != 0x1 {
            continue;
        }
        let got: Value = serde_json::from_slice(&payload).expect("JSON");
        if got["type"] == "typing" {
            typings += 1;
            continue;
        }
        assert_eq!(got["data"], marker, "{got}");
        break;
    }
    assert!(typings > 0 && typings < ROOMS * TYPINGS, "{typings}");
    assert!(gw.metric("ephemeral_dropped_total").await > 0.0);
    drop(typists);
    gw.stop().await;
}

const NODE_A_USER: &str = "herald-presence-a";
const NODE_A_PASSWORD: &str = "presence-a-password-0123";

/// Redis's clock, in ms (the presence scores are on it).
async fn redis_ms(redis: &RedisServer) -> i64 {
    let time: Vec<String> = redis_cmd(redis, &["TIME"]).await;
    let part = |i: usize| time.get(i).and_then(|s| s.parse::<i64>().ok()).expect("TIME answers two numbers");
    part(0) * 1000 + part(1) / 1000
}

async fn until_redis_ms(redis: &RedisServer, at: i64) {
    while redis_ms(redis).await < at {
        sleep(Duration::from_millis(10)).await;
    }
}

/// Until when (Redis ms) a node vouches for `user` in `chat`, if one does.
async fn vouched_until(redis: &RedisServer, chat: ChatId, user: UserId) -> Option<i64> {
    let key = format!("herald:{{{chat}}}:presence");
    let members: Vec<String> = redis_cmd(redis, &["ZRANGE", &key, "0", "-1", "WITHSCORES"]).await;
    let user = user.to_string();
    members
        .chunks(2)
        .find(|m| m[0].starts_with(&user))
        .and_then(|m| m.get(1)?.parse::<f64>().ok())
        .map(|s| s as i64)
}

/// Cuts node A off Redis (its Redis user is disabled and its connections killed) until [`let_back`].
async fn cut_off(redis: &RedisServer, a: &Gateway) {
    let _: () = redis_cmd(redis, &["ACL", "SETUSER", NODE_A_USER, "off"]).await;
    let killed: i64 = redis_cmd(redis, &["CLIENT", "KILL", "USER", NODE_A_USER]).await;
    assert!(killed >= 1, "node A had a connection");
    a.wait_metric("bus_up", 0.0).await;
}

async fn let_back(redis: &RedisServer) {
    let _: () = redis_cmd(redis, &["ACL", "SETUSER", NODE_A_USER, "on"]).await;
}

/// A node cut off from Redis for less than `presence.node_ttl` keeps its users present: a
/// refresh that failed is tried again as soon as Redis is back, not a third of `node_ttl`
/// later (by then two missed refreshes had let the node's users run out: a false leave).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn a_node_cut_off_for_less_than_node_ttl_produces_no_leave() {
    const NODE_TTL: Duration = Duration::from_secs(12);
    let redis = RedisServer::start();
    mark_settled(&redis).await;
    let password = format!(">{NODE_A_PASSWORD}");
    let _: () =
        redis_cmd(&redis, &["ACL", "SETUSER", NODE_A_USER, "on", &password, "~*", "&*", "+@all"]).await;
    let config = || {
        let mut c = presence_config(support::redis::config(&redis));
        c.presence.node_ttl = NODE_TTL;
        c
    };
    let mut config_a = config();
    config_a.bus.redis_url = format!("redis://{NODE_A_USER}:{NODE_A_PASSWORD}@127.0.0.1:{}", redis.port());
    let (a, b) = (support::start(config_a).await, support::start(config()).await);
    let (room, alice, bob) = (chat(), user(), user());
    let mut on_b = b.connect(alice, &[]).await;
    subscribe_listening(&mut on_b, room).await;
    assert_eq!(on_b.recv().await, join(room, alice));
    let mut on_a = a.connect(bob, &[]).await;
    on_a.subscribe(room).await;
    assert_eq!(on_b.recv().await, join(room, bob));

    // Catch node A's refresh: Bob's member moves to `until`, and A refreshes every `third`.
    let third = i64::try_from(NODE_TTL.as_millis() / 3).expect("small");
    let first = vouched_until(&redis, room, bob).await.expect("node A vouches for Bob");
    let deadline = Instant::now() + NODE_TTL;
    let until = loop {
        match vouched_until(&redis, room, bob).await {
            Some(s) if s != first => break s,
            _ => assert!(Instant::now() < deadline, "node A never refreshed"),
        }
        sleep(Duration::from_millis(10)).await;
    };
    // Cut off across A's next two refreshes, back well before `until`: A refreshes at once,
    // before Bob's member runs out (two thirds of node_ttl after A was cut off).
    cut_off(&redis, &a).await;
    until_redis_ms(&redis, until - third + third / 10).await;
    let_back(&redis).await;
    loop {
        if vouched_until(&redis, room, bob).await.is_some_and(|s| s > until) {
            break;
        }
        let now = redis_ms(&redis).await;
        assert!(
            now < until - third / 10,
            "node A, back since {} ms, has not refreshed",
            now - (until - third)
        );
        sleep(Duration::from_millis(10)).await;
    }
    a.wait_metric("bus_up", 1.0).await;
    // Past the moment Bob's member would have run out.
    until_redis_ms(&redis, until + third / 10).await;

    // Bob never left: no leave, and he is still listed.
    let both = json!({"type":"presence","chat_id":room,"users":sorted(vec![alice, bob])});
    assert_eq!(presence_list(&mut on_b, room).await, both);
    on_b.expect_nothing_else(&b, room).await;
    drop(on_a);
    a.stop().await;
    b.stop().await;
}

/// Nodes with different `presence.node_ttl` (a config change rolled out node by node): a refresh
/// by the node with the short one must not cut short the room's keys, which hold the other
/// node's users until their own, longer, time.
#[tokio::test]
#[ignore = "needs redis-server"]
async fn a_node_with_a_shorter_node_ttl_does_not_expire_the_others_users() {
    const LONG: Duration = Duration::from_secs(9);
    let redis = RedisServer::start();
    mark_settled(&redis).await;
    let config = |ttl| {
        let mut c = presence_config(support::redis::config(&redis));
        c.presence.node_ttl = ttl;
        c
    };
    let a = support::start(config(LONG)).await;
    let b = support::start(config(Duration::from_secs(1))).await;
    let (room, alice, bob) = (chat(), user(), user());
    let mut on_a = a.connect(alice, &[]).await;
    subscribe_listening(&mut on_a, room).await;
    assert_eq!(on_a.recv().await, join(room, alice));
    let mut on_b = b.connect(bob, &[]).await;
    on_b.subscribe(room).await;
    assert_eq!(on_a.recv().await, join(room, bob));

    // Right after a refresh of node A (Alice's member moves), Bob leaves: node B refreshes the
    // room for the last time within the leave delay, setting the keys to expire a second later.
    let first = vouched_until(&redis, room, alice).await.expect("node A vouches for Alice");
    let deadline = Instant::now() + LONG;
    let until = loop {
        match vouched_until(&redis, room, alice).await {
            Some(s) if s != first => break s,
            _ => assert!(Instant::now() < deadline, "node A never refreshed"),
        }
        sleep(Duration::from_millis(10)).await;
    };
    let refreshed = until - i64::try_from(LONG.as_millis()).expect("small");
    on_b.send_json(json!({"type":"unsubscribe","chat_id":room})).await;
    assert_eq!(on_b.recv().await["type"], "unsubscribed");
    assert_eq!(on_a.recv().await, leave(room, bob));
    // Past node B's last word on the room, before node A's next refresh (a third of 9 s).
    until_redis_ms(&redis, refreshed + 2300).await;
    assert_eq!(
        presence_list(&mut on_a, room).await,
        json!({"type":"presence","chat_id":room,"users":[alice]})
    );
    assert!(redis_ms(&redis).await < refreshed + 3000, "checked before node A refreshed again");
    // Nor is Alice announced again when node A refreshes.
    until_redis_ms(&redis, refreshed + 3500).await;
    on_a.expect_nothing_else(&a, room).await;
    drop(on_b);
    a.stop().await;
    b.stop().await;
}
