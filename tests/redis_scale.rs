//! Redis the way production runs it, against real servers the tests start: `rediss://` with a
//! certificate made here and an ACL user (and refusals that name the key), and Sentinel with a
//! master killed mid-stream. Clients get every event once, or are told `recovered:false`.

#[path = "support/redis_scale.rs"]
mod scale;
mod support;

use std::time::Duration;

use herald::cmd::check_config;
use herald::config::{BusConfig, BusKind, Config};
use herald::server::Server;
use scale::{query, SentinelGroup, TlsRedis, MASTER_NAME, PASSWORD};
use serde_json::json;
use support::redis::{assert_fixed_503, endpoint_count, follow, publish_through, wait_until, Seen};
use support::{chat, message_sent, user, Client, Gateway, PATIENCE};

/// The test config on a TLS Redis as the ACL user with `password`, trusting `ca`.
fn tls_config(tls: &TlsRedis, password: &str, ca: Option<&std::path::Path>) -> Config {
    let mut config = support::config();
    config.bus = BusConfig {
        kind: BusKind::Redis,
        redis_url: tls.url(password),
        redis_tls_ca_file: ca.map(|p| p.to_path_buf()),
        ..BusConfig::default()
    };
    config
}

/// The test config on the Sentinel group behind `urls`, monitoring [`MASTER_NAME`].
fn sentinel_config(urls: Vec<String>) -> Config {
    let mut config = support::config();
    config.bus = BusConfig {
        kind: BusKind::RedisSentinel,
        redis_sentinel_urls: urls,
        redis_sentinel_master: MASTER_NAME.into(),
        ..BusConfig::default()
    };
    config
}

/// A fresh Redis makes nodes wait out the settle window; marked, it counts as long settled.
async fn mark_settled(client: &redis::Client) {
    let _: () = query(client, &["SET", "herald:boot", "0"]).await;
}

/// Waits until the group can fail over, and marks its master settled.
async fn ready_and_settled(group: &SentinelGroup) {
    group.wait_ready().await;
    mark_settled(&group.client_of(group.master.port)).await;
}

/// A client on `watcher` subscribes to a new room and gets the event `publisher` accepts:
/// both nodes carry events. Returns the room, the client and the room's head before the event.
async fn first_event_arrives(publisher: &Gateway, watcher: &Gateway) -> (uuid::Uuid, Client, u64) {
    let room = chat();
    let mut client = watcher.connect(user(), &[]).await;
    let head = client.subscribe(room).await;
    assert_eq!(publisher.publish(&message_sent(room, &json!({"n": 1}))).await.0, 202);
    assert_eq!(client.recv().await["seq"], head + 1);
    (room, client, head)
}

/// Events 2 to 4, published on `a` and seen by `on_a`, that the replica (plain text) never gets
/// (it hangs and loses its link); then the primary crashes and the replica resumes.
async fn publish_three_the_replica_loses(
    a: &Gateway,
    on_a: &mut Client,
    room: uuid::Uuid,
    primary: &mut scale::Proc,
    replica: &scale::Proc,
    primary_client: &redis::Client,
) {
    // The replica has event 1 first (the lost ones are exactly the next three).
    scale::replica_caught_up(primary_client, &SentinelGroup::client(replica.port)).await;
    replica.signal("STOP");
    let _: () = query(primary_client, &["CLIENT", "KILL", "TYPE", "replica"]).await;
    for n in 2..=4 {
        assert_eq!(a.publish(&message_sent(room, &json!({ "n": n }))).await.0, 202);
        assert_eq!(on_a.recv().await["data"]["n"], n);
    }
    primary.kill();
    replica.signal("CONT");
}

/// B, moved to the promoted replica while A is not yet, publishes event 5 (it knows nothing of
/// the room: an event accepted now would take a seq A's client holds). Returns the status and
/// the events accepted so far.
async fn publish_before_a_moved(b: &Gateway, room: uuid::Uuid) -> (u16, Vec<u64>) {
    let mut accepted = vec![1, 2, 3, 4];
    let (early, reply) = b.publish(&message_sent(room, &json!({"n": 5}))).await;
    match early {
        202 => accepted.push(5),
        _ => assert_fixed_503(&reply),
    }
    (early, accepted)
}

/// Once both nodes moved: B's event 6 reaches A's client, which got every accepted event or
/// was told it may miss some; and B's early publish was refused: it waited, as after a restart,
/// until every node had time to re-seed.
async fn assert_no_event_lost_untold(
    a: &Gateway,
    on_a: &mut Client,
    b: &Gateway,
    room: uuid::Uuid,
    head: u64,
    (early, mut accepted): (u16, Vec<u64>),
) {
    support::redis::http_publish_eventually(b, &message_sent(room, &json!({"n": 6}))).await;
    accepted.push(6);
    let mut seen = Seen { seqs: vec![head + 4], ns: vec![1, 2, 3, 4], told_gap: false };
    follow(a, on_a, room, head, &mut seen, 6).await;
    for n in &accepted {
        assert!(seen.ns.contains(n) || seen.told_gap, "accepted event {n} never reached A's client, untold");
    }
    assert_eq!(early, 503, "B published under a counter the failover set back");
}

/// Why the node refuses to start with `config`.
async fn startup_error(config: Config) -> String {
    config.validate().expect("valid config");
    match tokio::time::timeout(PATIENCE, Server::bind(config)).await.expect("answers in time") {
        Ok(_) => panic!("the node started"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn nodes_on_tls_redis_as_an_acl_user_carry_events_and_never_show_the_password() {
    let tls = TlsRedis::start();
    mark_settled(&tls.client()).await;
    let config = tls_config(&tls, PASSWORD, Some(&tls.ca));
    let (a, b) = (support::start(config.clone()).await, support::start(config.clone()).await);
    let room = chat();
    let mut on_b = b.connect(user(), &[]).await;
    let head = on_b.subscribe(room).await;
    assert_eq!(a.publish(&message_sent(room, &json!({"n": 1}))).await.0, 202);
    assert_eq!(on_b.recv().await, json!({"type":"message.new","chat_id":room,"seq":head + 1,"data":{"n":1}}));

    // Only TLS reaches it: the server has no plain port at all.
    let plain = redis::Client::open(format!("redis://127.0.0.1:{}", tls.server.port)).expect("url");
    assert!(plain.get_multiplexed_async_connection().await.is_err(), "a plain client got through");

    // The password shows nowhere an operator looks.
    let (_, metrics) = a.get("/metrics").await;
    let (_, info) = a.get("/api/info").await;
    let shown = check_config::check(&config).expect("renders");
    let reached = check_config::connect(&config).await.expect("reaches the server");
    for text in [&metrics, &info, &shown, &reached, &format!("{config:?}")] {
        assert!(!text.contains(PASSWORD), "password leaked:\n{text}");
    }
    assert!(shown.contains(&format!("rediss://herald:***@127.0.0.1:{}", tls.server.port)), "{shown}");
    assert!(reached.starts_with("ok") && reached.contains("answers PING"), "{reached}");
    // Counted per endpoint, by address: no URL, no user.
    let at = format!("127.0.0.1:{}", tls.server.port);
    assert_eq!(a.labelled("redis_endpoint_sessions_total", "endpoint", &at).await, 1.0, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn a_wrong_password_or_an_untrusted_certificate_stops_startup_naming_the_key() {
    let tls = TlsRedis::start();
    let wrong = "not-the-password-at-all";

    let err = startup_error(tls_config(&tls, wrong, Some(&tls.ca))).await;
    assert!(err.contains("bus.redis_url") && err.contains("refused the user or password"), "{err}");
    assert!(!err.contains(wrong), "password in the error: {err}");

    let err = startup_error(tls_config(&tls, PASSWORD, Some(&tls.other_ca))).await;
    assert!(err.contains("bus.redis_tls_ca_file") && err.contains("not trusted"), "{err}");
    assert!(!err.contains(PASSWORD), "password in the error: {err}");

    // Without a CA file the system roots are used, and they do not know the test CA.
    let err = startup_error(tls_config(&tls, PASSWORD, None)).await;
    assert!(err.contains("bus.redis_url") && err.contains("not trusted"), "{err}");

    // `--connect` says which server failed and why, without the password.
    let err = check_config::connect(&tls_config(&tls, wrong, Some(&tls.ca))).await.map(|_| ()).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("FAILED bus.redis_url") && text.contains("refused"), "{text}");
    assert!(!text.contains(wrong), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn sentinel_failover_mid_stream_is_followed_with_every_event_or_recovered_false() {
    let mut group = SentinelGroup::start();
    ready_and_settled(&group).await;
    let config = sentinel_config(group.sentinel_urls());
    // A master name the sentinels do not know is a configuration error, named.
    let mut unknown = config.clone();
    unknown.bus.redis_sentinel_master = "not-monitored".into();
    let err = startup_error(unknown).await;
    assert!(err.contains("bus.redis_sentinel_master") && err.contains("not-monitored"), "{err}");
    let reached = check_config::connect(&config).await.expect("reaches every server");
    assert_eq!(
        reached.lines().filter(|l| l.starts_with("ok")).count(),
        4,
        "3 sentinels + the master:\n{reached}"
    );

    let (a, b) = (support::start(config.clone()).await, support::start(config.clone()).await);
    let room = chat();
    let (mut on_a, mut on_b) = (a.connect(user(), &[]).await, b.connect(user(), &[]).await);
    let (head_a, head_b) = (on_a.subscribe(room).await, on_b.subscribe(room).await);
    assert_eq!(head_a, head_b);

    // Publish on A without pause; kill the master after 20 events are accepted; keep on until
    // 20 more are accepted after the last refusal.
    let (mut accepted, n) = publish_through(&a, room, async || group.master.kill(), true).await;
    assert_eq!(group.master_port().await, group.replica.port, "the sentinels promoted the replica");

    // A marker both nodes deliver live: sent once both are ready again.
    for gw in [&a, &b] {
        let what = "a node never became ready after the failover";
        wait_until(what, PATIENCE, Duration::from_millis(50), async || gw.get("/readyz").await.0 == 200)
            .await;
    }
    let marker = n + 1;
    assert_eq!(b.publish(&message_sent(room, &json!({ "n": marker }))).await.0, 202);
    accepted.push(marker);

    for (gw, client) in [(&a, &mut on_a), (&b, &mut on_b)] {
        let mut seen = Seen::default();
        follow(gw, client, room, head_a, &mut seen, marker).await;
        if !seen.told_gap {
            // Never told of a gap: it got every accepted event, in order, without a hole.
            for n in &accepted {
                assert!(seen.ns.contains(n), "accepted event {n} missing and no recovered:false");
            }
        }
        assert!(gw.metric("redis_failovers_total").await >= 1.0, "the node followed the failover");
        let promoted = format!("127.0.0.1:{}", group.replica.port);
        assert_eq!(gw.labelled("redis_endpoint_failovers_total", "endpoint", &promoted).await, 1.0);
        assert_eq!(gw.metric("bus_up").await, 1.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn sentinels_over_tls_as_an_acl_user_name_the_master_and_nodes_carry_events() {
    let group = SentinelGroup::start_with(true);
    ready_and_settled(&group).await;
    let mut config = sentinel_config(group.sentinel_urls());
    config.bus.redis_tls_ca_file = group.ca.clone();
    let reached = check_config::connect(&config).await.expect("reaches every server");
    assert_eq!(
        reached.lines().filter(|l| l.starts_with("ok")).count(),
        4,
        "3 sentinels + the master:\n{reached}"
    );
    assert!(!reached.contains(PASSWORD) && reached.contains("rediss://herald:***@"), "{reached}");

    // The sentinels' password is the master's too: a wrong one is named at the sentinels' key.
    let wrong = "not-the-sentinel-password";
    let mut refused = config.clone();
    refused.bus.redis_sentinel_urls = group.sentinel_urls_with(wrong);
    let err = startup_error(refused).await;
    assert!(err.contains("bus.redis_sentinel_urls") && err.contains("refused the user or password"), "{err}");
    assert!(!err.contains(wrong), "{err}");

    let (a, b) = (support::start(config.clone()).await, support::start(config.clone()).await);
    let _watching = first_event_arrives(&a, &b).await;
    let at = format!("127.0.0.1:{}", group.master.port);
    assert_eq!(a.labelled("redis_endpoint_sessions_total", "endpoint", &at).await, 1.0);
    let (_, metrics) = a.get("/metrics").await;
    assert!(!metrics.contains(PASSWORD));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn a_failover_without_a_crash_moves_the_nodes_off_the_demoted_master() {
    let group = SentinelGroup::start();
    ready_and_settled(&group).await;
    let config = sentinel_config(group.sentinel_urls());
    let (a, b) = (support::start(config.clone()).await, support::start(config.clone()).await);
    let (room, mut on_b, head) = first_event_arrives(&a, &b).await;

    // The old master stays up and becomes a replica (the sentinels also close its clients'
    // connections: the next test covers a node whose connection stays open).
    let _: () =
        query(&group.client_of(group.sentinels[0].port), &["SENTINEL", "FAILOVER", MASTER_NAME]).await;
    let what = "the sentinels never promoted the replica";
    wait_until(what, Duration::from_secs(30), Duration::from_millis(100), async || {
        group.master_port().await == group.replica.port
    })
    .await;
    let promoted = format!("127.0.0.1:{}", group.replica.port);
    for gw in [&a, &b] {
        let what = "a node stayed on the demoted master";
        wait_until(what, Duration::from_secs(20), Duration::from_millis(100), async || {
            endpoint_failovers(gw, &promoted).await >= 1.0
        })
        .await;
    }
    support::redis::http_publish_eventually(&a, &message_sent(room, &json!({"n": 2}))).await;
    let mut seen = Seen::default();
    follow(&b, &mut on_b, room, head + 1, &mut seen, 2).await;
    assert_eq!(seen.ns, [2], "the event after the failover, once");
    let role: Vec<redis::Value> = query(&group.client_of(group.master.port), &["ROLE"]).await;
    assert_eq!(
        role.first(),
        Some(&redis::Value::BulkString(b"slave".to_vec())),
        "the old master was demoted, not killed"
    );
}

/// `herald_redis_endpoint_failovers_total` of `endpoint`; 0 while the node has not counted it.
async fn endpoint_failovers(gw: &Gateway, endpoint: &str) -> f64 {
    endpoint_count(gw, "redis_endpoint_failovers_total", endpoint).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn a_master_demoted_under_an_open_connection_is_left_at_the_next_role_check() {
    let group = SentinelGroup::start();
    ready_and_settled(&group).await;
    let master = group.client_of(group.master.port);
    let config = sentinel_config(group.sentinel_urls());
    let a = support::start(config).await;
    let room = chat();
    assert_eq!(a.publish(&message_sent(room, &json!({"n": 1}))).await.0, 202);

    // Demoted behind the sentinels' back: nobody closes the node's connection, and the
    // sentinels keep naming this server for a while. Only its role says it takes no writes.
    let _: () = query(&master, &["REPLICAOF", "127.0.0.1", &group.replica.port.to_string()]).await;
    let what = "the node kept serving on a server that is no longer master";
    wait_until(what, Duration::from_secs(5), Duration::from_millis(50), async || {
        a.get("/readyz").await.0 == 503
    })
    .await;
    let (status, reply) = a.publish(&message_sent(room, &json!({"n": 2}))).await;
    assert_eq!(status, 503, "{reply}");
    assert_fixed_503(&reply);
    assert_eq!(a.metric("redis_reconnects_total").await, 0.0, "no reconnect to the demoted server");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn a_sentinel_naming_a_replica_does_not_keep_the_node_off_the_master() {
    let group = SentinelGroup::start();
    ready_and_settled(&group).await;
    // Listed first: a node that always believes the first sentinel that answers stays on the
    // replica for as long as that sentinel is wrong.
    let stale = group.stale_sentinel();
    let named: (String, u16) =
        query(&SentinelGroup::client(stale.port), &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME])
            .await;
    assert_eq!(named.1, group.replica.port, "the stale sentinel names the replica");
    let mut urls = vec![format!("redis://127.0.0.1:{}", stale.port)];
    urls.extend(group.sentinel_urls());
    let config = sentinel_config(urls);
    // `--connect` says which answer is wrong.
    let err = check_config::connect(&config).await.map(|_| ()).unwrap_err().to_string();
    assert!(
        err.contains(&format!("127.0.0.1:{}", group.replica.port)) && err.contains("is a slave"),
        "{err}"
    );

    let a = support::start(config).await;
    let what = "the node stayed on the replica a stale sentinel named";
    wait_until(what, PATIENCE * 2, Duration::from_millis(50), async || a.get("/readyz").await.0 == 200).await;
    let _watching = first_event_arrives(&a, &a).await;
    let at = format!("127.0.0.1:{}", group.master.port);
    assert_eq!(a.labelled("redis_endpoint_sessions_total", "endpoint", &at).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn a_password_with_url_characters_is_never_shown_even_unencoded() {
    let tls = TlsRedis::start();
    // An ACL user whose password holds `#`, `/` and `?`, as generated passwords do.
    let secret = "pa#ss/wo?rd-0123456789";
    let _: () =
        query(&tls.client(), &["ACL", "SETUSER", "odd", "on", &format!(">{secret}"), "~*", "&*", "+@all"])
            .await;
    mark_settled(&tls.client()).await;
    let port = tls.server.port;
    let ca = tls.ca.to_string_lossy().into_owned();
    let pieces = ["ss/wo", "wo?rd", "rd-0123456789"];
    let leaked = |text: &str| pieces.iter().any(|p| text.contains(p));
    let env = |url: String| {
        [
            ("HERALD_BUS__KIND", "redis".to_string()),
            ("HERALD_BUS__REDIS_URL", url),
            ("HERALD_BUS__REDIS_TLS_CA_FILE", ca.clone()),
        ]
        .map(|(k, v)| (k.to_string(), v))
    };
    let parse = |url: String| Config::parse("", std::path::Path::new("herald.yaml"), env(url));

    // Written as is (`#` included), the URL is refused, and the refusal does not show it.
    let err = parse(format!("rediss://odd:{secret}@127.0.0.1:{port}")).map(|_| ()).unwrap_err().to_string();
    assert!(err.contains("bus.redis_url") && err.contains("%23") && !leaked(&err), "{err}");

    // Without the `#`, the config loads but the URL cannot be used: no place shows the rest.
    let bare = "pass/wo?rd-0123456789";
    let mut config = support::config();
    config.bus = parse(format!("rediss://odd:{bare}@127.0.0.1:{port}")).expect("loads").bus;
    let shown = format!("{config:?}");
    assert!(!leaked(&shown) && shown.contains("rediss://odd:***@127.0.0.1"), "{shown}");
    let err = check_config::check(&config).map(|_| ()).unwrap_err().to_string();
    assert!(err.contains("bus.redis_url") && !leaked(&err), "{err}");
    let err = startup_error(config.clone()).await;
    assert!(err.contains("bus.redis_url") && !leaked(&err), "{err}");
    let err = check_config::connect(&config).await.map(|_| ()).unwrap_err().to_string();
    assert!(!leaked(&err), "{err}");

    // Percent-encoded, it is the password Redis knows.
    let encoded = secret.replace('#', "%23").replace('/', "%2F").replace('?', "%3F");
    let config = parse(format!("rediss://odd:{encoded}@127.0.0.1:{port}")).expect("loads");
    let reached = check_config::connect(&config).await.expect("the encoded password logs in");
    assert!(reached.contains("answers PING") && !leaked(&reached), "{reached}");
    let mut node = support::config();
    node.bus = config.bus;
    let a = support::start(node).await;
    first_event_arrives(&a, &a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn a_ca_file_with_a_broken_certificate_is_named_by_its_key() {
    let tls = TlsRedis::start();
    // PEM framing around bytes that are no certificate: the file is read, the trust anchor is not.
    let broken = tls.dir.path("broken-ca.pem");
    std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\nAAAAAAAA\n-----END CERTIFICATE-----\n")
        .expect("write the CA file");
    let err = startup_error(tls_config(&tls, PASSWORD, Some(&broken))).await;
    assert!(err.contains("bus.redis_tls_ca_file") && err.contains("broken-ca.pem"), "{err}");
    assert!(!err.contains(PASSWORD), "{err}");
    let err =
        check_config::connect(&tls_config(&tls, PASSWORD, Some(&broken))).await.map(|_| ()).unwrap_err();
    assert!(err.to_string().contains("bus.redis_tls_ca_file"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn check_config_refuses_the_ca_file_startup_refuses() {
    let tls = TlsRedis::start();
    let missing = tls.dir.path("no-such-ca.pem");
    let config = tls_config(&tls, PASSWORD, Some(&missing));
    let err = startup_error(config.clone()).await;
    assert!(err.contains("bus.redis_tls_ca_file") && err.contains("no-such-ca.pem"), "{err}");
    // `check-config` without `--connect` promises the same refusals as startup.
    let err = check_config::check(&config).map(|_| ()).unwrap_err().to_string();
    assert!(err.contains("bus.redis_tls_ca_file") && err.contains("no-such-ca.pem"), "{err}");
    assert!(!err.contains(PASSWORD), "{err}");
    assert!(check_config::check(&tls_config(&tls, PASSWORD, Some(&tls.ca))).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn events_the_promoted_replica_lost_are_never_reused_by_a_node_that_did_not_see_them() {
    let mut group = SentinelGroup::start();
    ready_and_settled(&group).await;
    // A asks only the first sentinel, B the other two (nodes in two zones, say).
    let urls = group.sentinel_urls();
    let (a, b) = (
        support::start(sentinel_config(urls[..1].to_vec())).await,
        support::start(sentinel_config(urls[1..].to_vec())).await,
    );
    // Only A watches the room.
    let (room, mut on_a, head) = first_event_arrives(&a, &a).await;

    // The replica hangs and loses its link; A's next events reach A's client but never the
    // replica; then the master crashes. The replica, promoted, lacks them.
    let seq_key = format!("herald:{{{room}}}:seq");
    let master_client = group.client_of(group.master.port);
    publish_three_the_replica_loses(&a, &mut on_a, room, &mut group.master, &group.replica, &master_client)
        .await;
    // A is cut off from its sentinel until B is on the promoted replica.
    group.sentinels[0].signal("STOP");
    let promoted = format!("127.0.0.1:{}", group.replica.port);
    wait_until(
        "B never followed the failover",
        Duration::from_secs(30),
        Duration::from_millis(50),
        async || endpoint_sessions(&b, &promoted).await >= 1.0,
    )
    .await;
    let kept: u64 = query(&group.client_of(group.replica.port), &["GET", &seq_key]).await;
    assert_eq!(kept, head + 1, "the promoted replica lost the last three events");

    let early = publish_before_a_moved(&b, room).await;
    group.sentinels[0].signal("CONT");
    wait_until(
        "A never followed the failover",
        Duration::from_secs(30),
        Duration::from_millis(50),
        async || endpoint_sessions(&a, &promoted).await >= 1.0,
    )
    .await;
    assert_no_event_lost_untold(&a, &mut on_a, &b, room, head, early).await;
    // And Redis's state is still the same one: the member log is not replayed as if lost.
    for gw in [&a, &b] {
        assert_eq!(gw.metric("redis_membership_log_gaps_total").await, 0.0);
    }
}

/// `herald_redis_endpoint_sessions_total` of `endpoint`; 0 while the node has not counted it.
async fn endpoint_sessions(gw: &Gateway, endpoint: &str) -> f64 {
    endpoint_count(gw, "redis_endpoint_sessions_total", endpoint).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn check_config_connect_names_every_sentinel_that_never_answers() {
    let group = SentinelGroup::start();
    let stale = group.stale_sentinel();
    let mut urls = group.sentinel_urls();
    urls.push(format!("redis://127.0.0.1:{}", stale.port));
    let config = sentinel_config(urls.clone());
    // Four sentinels that accept connections and never reply (hung, or a zone cut off behind
    // a proxy): asked one after the other they outlast `--connect`'s deadline.
    for s in group.sentinels.iter().chain([&stale]) {
        s.signal("STOP");
    }
    let err = check_config::connect(&config).await.map(|_| ()).unwrap_err().to_string();
    for url in &urls {
        assert!(err.contains(&format!("FAILED bus.redis_sentinel_urls {url}")), "{url} not named:\n{err}");
    }
    for s in group.sentinels.iter().chain([&stale]) {
        s.signal("CONT");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn a_node_started_while_every_sentinel_is_down_starts_degraded_and_finds_the_master_later() {
    let mut group = SentinelGroup::start();
    ready_and_settled(&group).await;
    let config = sentinel_config(group.sentinel_urls());
    let ports: Vec<u16> = group.sentinels.iter().map(|s| s.port).collect();
    for s in &mut group.sentinels {
        s.kill();
    }
    let a = support::start(config).await;
    assert_eq!(a.get("/readyz").await.0, 503);
    let room = chat();
    let (status, reply) = a.publish(&message_sent(room, &json!({"n": 1}))).await;
    assert_eq!(status, 503, "{reply}");
    assert_fixed_503(&reply);
    // The sentinels come back (each rewrote its file with what it knew).
    group.sentinels = ports
        .iter()
        .enumerate()
        .map(|(n, port)| {
            let conf = group.dir.path(&format!("sentinel-{n}.conf")).to_string_lossy().into_owned();
            scale::Proc::redis(*port, &[conf, "--sentinel".into()])
        })
        .collect();
    support::redis::http_publish_eventually(&a, &message_sent(room, &json!({"n": 2}))).await;
    let at = format!("127.0.0.1:{}", group.master.port);
    assert_eq!(a.labelled("redis_endpoint_sessions_total", "endpoint", &at).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn a_managed_redis_failover_behind_one_address_is_settled_like_a_sentinel_one() {
    // A primary and its replica; each node reaches "the" Redis through its own relay, as
    // through a managed service's endpoint that a failover moves to the promoted replica.
    let dir = scale::TempDir::new("managed");
    let d = dir.0.to_string_lossy().into_owned();
    let (px, py) = (scale::free_port(), scale::free_port());
    let server = |port: u16, extra: &[&str]| {
        let mut args: Vec<String> = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &d,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        scale::Proc::redis(port, &args)
    };
    let mut primary = server(px, &[]);
    let replica = server(py, &["--replicaof", "127.0.0.1", &px.to_string()]);
    wait_until("the replica never synced", Duration::from_secs(20), Duration::from_millis(100), async || {
        let info: String = query(&SentinelGroup::client(py), &["INFO", "replication"]).await;
        info.contains("master_link_status:up")
    })
    .await;
    mark_settled(&SentinelGroup::client(px)).await;
    let (to_a, to_b) = (scale::Relay::start(px).await, scale::Relay::start(px).await);
    let node = |relay: &scale::Relay| {
        let mut config = support::config();
        config.bus = BusConfig {
            kind: BusKind::Redis,
            redis_url: format!("redis://127.0.0.1:{}", relay.port),
            ..BusConfig::default()
        };
        config
    };
    let (a, b) = (support::start(node(&to_a)).await, support::start(node(&to_b)).await);
    let (room, mut on_a, head) = first_event_arrives(&a, &a).await;

    // Three events the replica never gets; the primary crashes; the replica is promoted and
    // B's address moves to it first.
    publish_three_the_replica_loses(&a, &mut on_a, room, &mut primary, &replica, &SentinelGroup::client(px))
        .await;
    let _: () = query(&SentinelGroup::client(py), &["REPLICAOF", "NO", "ONE"]).await;
    let kept: u64 = query(&SentinelGroup::client(py), &["GET", &format!("herald:{{{room}}}:seq")]).await;
    assert_eq!(kept, head + 1, "the promoted replica lost the last three events");
    to_b.switch(py);
    wait_until("B never reconnected", Duration::from_secs(30), Duration::from_millis(50), async || {
        b.metric("redis_reconnects_total").await >= 1.0
    })
    .await;
    let early = publish_before_a_moved(&b, room).await;
    to_a.switch(py);
    wait_until("A never reconnected", Duration::from_secs(30), Duration::from_millis(50), async || {
        a.metric("redis_reconnects_total").await >= 1.0
    })
    .await;
    assert_no_event_lost_untold(&a, &mut on_a, &b, room, head, early).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server"]
async fn a_redis_server_listed_as_the_sentinel_stops_startup_naming_the_key() {
    // The master's own address where the sentinels' belongs: a plain Redis server answers
    // every connect and never names a master, so retrying cannot help.
    let port = scale::free_port();
    let args: Vec<String> =
        ["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    let _server = scale::Proc::redis(port, &args);
    let config = sentinel_config(vec![format!("redis://127.0.0.1:{port}")]);
    let err = startup_error(config.clone()).await;
    assert!(err.contains("bus.redis_sentinel_urls") && err.contains("not a sentinel"), "{err}");
    let err = check_config::connect(&config).await.map(|_| ()).unwrap_err().to_string();
    assert!(err.contains("not a sentinel"), "{err}");
}
