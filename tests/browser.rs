//! A real browser as the client: headless Chromium, driven over the DevTools
//! protocol, loads Herald's own demo page (and pages served by this test
//! that import `/client.js`), and the tests read what the page shows.
//! Covered: the demo page shows published events and live numbers (plotted),
//! who is online in its chat and who is typing; the
//! client survives a node restart (with the Redis bus, the missed events are
//! replayed from the room's history) and a token expiry (4001, renewed through
//! `getToken()`); `allowed_origins` holds for the browser's `Origin`.
//!
//! Needs Debian's `chromium` (`.ci/run` installs it), hence they are ignored with a reason:
//! run with `cargo test --test browser -- --include-ignored`. The demo page's
//! screenshot lands in `$CARGO_TARGET_TMPDIR/demo.png`, and in
//! `docs/demo.png` (the README's) with `UPDATE_SCREENSHOT=1`.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use herald::config::{Config, Membership};
use herald::http::DemoPage;
use herald::protocol::{ChatId, UserId};
use herald::server::Server;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// How long a page may take to show what the test waits for.
const PAGE_PATIENCE: Duration = Duration::from_secs(30);

fn chromium() -> PathBuf {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("headless Chromium not found: install Debian's `chromium` package")
}

/// A headless Chromium and a DevTools session on its one page.
struct Browser {
    process: tokio::process::Child,
    profile: PathBuf,
    devtools: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>,
    next_id: u64,
}

impl Browser {
    async fn open(url: &str) -> Browser {
        let profile = std::env::temp_dir().join(format!("herald-chromium-{}", uuid::Uuid::new_v4()));
        let process = tokio::process::Command::new(chromium())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1200,820",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(url)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromium starts");
        // Chromium writes the port it picked into the profile once it listens.
        let port_file = profile.join("DevToolsActivePort");
        let deadline = tokio::time::Instant::now() + PAGE_PATIENCE;
        let port = loop {
            if let Some(port) =
                std::fs::read_to_string(&port_file).ok().and_then(|t| t.lines().next()?.parse().ok())
            {
                break port;
            }
            assert!(tokio::time::Instant::now() < deadline, "chromium did not open its DevTools port");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let devtools_addr = SocketAddr::from(([127, 0, 0, 1], port));
        let (_, targets) = http(devtools_addr, "GET /json/list HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await;
        let targets: Value = serde_json::from_str(&targets).expect("DevTools lists its targets");
        let page = targets
            .as_array()
            .and_then(|t| t.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["id"].as_str())
            .map(|id| format!("ws://{devtools_addr}/devtools/page/{id}"))
            .expect("chromium has a page");
        let (devtools, _) = tokio_tungstenite::connect_async(page).await.expect("DevTools session");
        Browser { process, profile, devtools, next_id: 0 }
    }

    /// One DevTools command; its `result`, or its `error`.
    async fn call(&mut self, method: &str, params: Value) -> Result<Value, Value> {
        self.next_id += 1;
        let id = self.next_id;
        let cmd = json!({"id": id, "method": method, "params": params}).to_string();
        self.devtools.send(Message::text(cmd)).await.expect("DevTools send");
        loop {
            let msg = self.devtools.next().await.expect("DevTools open").expect("DevTools frame");
            let Message::Text(text) = msg else { continue };
            let reply: Value = serde_json::from_str(&text).expect("DevTools speaks JSON");
            if reply["id"] == id {
                return match reply["error"].is_null() {
                    true => Ok(reply["result"].clone()),
                    false => Err(reply["error"].clone()),
                };
            }
        }
    }

    /// Evaluates `expr` in the page (awaiting a promise); `None` when the
    /// page threw or was still navigating.
    async fn eval(&mut self, expr: &str) -> Option<Value> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "awaitPromise": true, "returnByValue": true}),
            )
            .await
            .ok()?;
        r["exceptionDetails"].is_null().then(|| r["result"]["value"].clone())
    }

    /// Waits until `cond` (a JS expression) is truthy in the page; returns it.
    async fn wait_for(&mut self, what: &str, cond: &str) -> Value {
        // The page polls itself, so the test waits on one promise per try.
        let expr = format!(
            "new Promise((resolve) => {{ const end = Date.now() + 2000; const t = () => {{ \
             let v; try {{ v = ({cond}); }} catch (_) {{}} \
             if (v || Date.now() > end) resolve(v || null); else setTimeout(t, 50); }}; t(); }})"
        );
        let deadline = tokio::time::Instant::now() + PAGE_PATIENCE;
        loop {
            if let Some(v) = self.eval(&expr).await.filter(|v| !v.is_null() && v != &json!(false)) {
                return v;
            }
            // Navigating: no page to ask yet.
            tokio::time::sleep(Duration::from_millis(20)).await;
            if tokio::time::Instant::now() > deadline {
                let text = self.eval("document.body && document.body.innerText").await;
                panic!("the page never showed {what}; it shows:\n{}", text.unwrap_or_default());
            }
        }
    }

    async fn screenshot(&mut self) -> Vec<u8> {
        let shot = self.call("Page.captureScreenshot", json!({"format": "png"})).await.expect("screenshot");
        base64_decode(shot["data"].as_str().expect("screenshot data"))
    }

    async fn close(mut self) {
        let _ = self.process.kill().await;
        // Chromium's helper processes may still be writing the profile for a
        // moment after the main one is gone.
        for _ in 0..20 {
            if std::fs::remove_dir_all(&self.profile).is_ok() || !self.profile.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Browser {
    /// A failed test leaves no browser or profile behind either.
    fn drop(&mut self) {
        let _ = self.process.start_kill();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// A node whose page runs a demo, as the embedded default does.
struct DemoNode {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn demo(token_ttl: Duration) -> DemoPage {
    DemoPage {
        secret: support::SECRET.into(),
        user: UserId::new_v4(),
        chat: ChatId::new_v4(),
        api_key: support::API_KEY.into(),
        token_ttl,
    }
}

fn demo_config() -> Config {
    let mut config = support::config();
    // The demo token's `chats` claim is what lets the page in.
    config.auth.membership = Membership::Token;
    config
}

impl DemoNode {
    async fn start(config: Config, demo: &DemoPage) -> DemoNode {
        let server = Server::bind(config).await.expect("server binds").with_demo_page(demo.clone());
        let addr = server.local_addr();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.run(shutdown.clone()));
        DemoNode { addr, shutdown, task }
    }

    async fn publish(&self, chat: ChatId, content: &str) {
        let body = json!({"type": "message.sent", "chat_id": chat, "data": {"content": content}}).to_string();
        let (status, reply) = http(
            self.addr,
            &format!(
                "POST /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                support::API_KEY,
                body.len()
            ),
        )
        .await;
        assert_eq!(status, 202, "publish refused: {reply}");
    }

    /// Graceful stop: every socket gets 1001.
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(support::PATIENCE, self.task)
            .await
            .expect("drains in time")
            .expect("server task");
    }
}

/// The text of the event row with this `seq` and content, once the page shows it.
fn row(seq: u64, content: &str) -> String {
    format!(
        "[...document.querySelectorAll('#events li.event[data-seq=\"{seq}\"]')]\
         .find((li) => li.textContent.includes({content:?}))?.textContent"
    )
}

const EVENT_ROWS: &str = "document.querySelectorAll('#events li.event').length";

#[tokio::test]
#[ignore = "needs chromium"]
async fn the_demo_page_shows_published_events_and_live_numbers() {
    let demo = demo(Duration::from_secs(3600));
    let node = DemoNode::start(demo_config(), &demo).await;
    let mut page = Browser::open(&format!("http://{}/", node.addr)).await;
    page.wait_for("the demo chat subscribed", "document.body.dataset.subscribed === '1'").await;
    assert_eq!(page.eval("document.getElementById('state').textContent").await, Some(json!("connected")));
    let head = support::position(node.addr, demo.chat).await;

    node.publish(demo.chat, "Hello from the API").await;
    page.wait_for("the published event", &row(head + 1, "Hello from the API")).await;

    // The page's own form publishes through the API too.
    page.eval(
        "document.getElementById('message').value = 'Typed in the page'; \
         document.getElementById('publish').requestSubmit(); true",
    )
    .await;
    page.wait_for("the event from the form", &row(head + 2, "Typed in the page")).await;
    node.publish(demo.chat, "Live, encoded once, fanned out").await;
    page.wait_for("the third event", &row(head + 3, "Live, encoded once")).await;

    // The node's numbers, from /api/stats.
    page.wait_for(
        "the live numbers",
        "document.getElementById('stat-connections').textContent === '1' && \
         document.getElementById('stat-events').textContent === '3' && \
         /^\\d+\\.\\d$/.test(document.getElementById('stat-frames-rate').textContent)",
    )
    .await;
    assert_eq!(page.eval(EVENT_ROWS).await, Some(json!(3)));

    let png = page.screenshot().await;
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("demo.png");
    std::fs::write(&shot, &png).expect("save screenshot");
    if std::env::var_os("UPDATE_SCREENSHOT").is_some() {
        std::fs::write(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/demo.png"), &png)
            .expect("save docs/demo.png");
    }
    page.close().await;
    node.stop().await;
}

#[tokio::test]
#[ignore = "needs chromium"]
async fn the_demo_page_shows_who_is_online_and_who_is_typing() {
    let demo = demo(Duration::from_secs(3600));
    let node = DemoNode::start(demo_config(), &demo).await;
    let mut page = Browser::open(&format!("http://{}/", node.addr)).await;
    page.wait_for("the demo chat subscribed", "document.body.dataset.subscribed === '1'").await;
    page.wait_for("the demo user online", "document.body.dataset.online === '1'").await;

    // A second user joins the chat from outside the page.
    let other = UserId::new_v4();
    let mut client = support::Client::connect(node.addr, &support::token(other, &[demo.chat])).await;
    client.subscribe(demo.chat).await;
    let short = &other.to_string()[..8];
    page.wait_for(
        "two users online",
        &format!(
            "document.body.dataset.online === '2' &&              document.querySelector('#online li[data-user=\"{other}\"]')?.textContent === '{short}' &&              document.querySelector('#online li.me')?.dataset.user === '{}'",
            demo.user
        ),
    )
    .await;

    // It types: the page says so.
    client.send_json(json!({"type":"typing","chat_id":demo.chat})).await;
    page.wait_for(
        "the typing indicator",
        &format!("document.getElementById('typing').textContent === '{short} is typing\u{2026}'"),
    )
    .await;
    // Typing in the page reaches the other user.
    page.eval(
        "const m = document.getElementById('message'); m.value = 'h';          m.dispatchEvent(new Event('input')); true",
    )
    .await;
    assert_eq!(client.recv().await, json!({"type":"typing","chat_id":demo.chat,"user_id":demo.user}));
    // And the node's numbers are plotted.
    page.wait_for(
        "the charts",
        "Number(document.getElementById('chart-frames').dataset.samples) >= 2 &&          Number(document.getElementById('chart-connections').dataset.samples) >= 2",
    )
    .await;
    let png = page.screenshot().await;
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    std::fs::write(PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("demo-presence.png"), &png)
        .expect("save screenshot");
    page.close().await;
    node.stop().await;
}

#[tokio::test]
#[ignore = "needs chromium"]
async fn the_client_reconnects_and_resubscribes_after_a_restart() {
    let demo = demo(Duration::from_secs(3600));
    let node = DemoNode::start(demo_config(), &demo).await;
    let addr = node.addr;
    let mut page = Browser::open(&format!("http://{addr}/")).await;
    page.wait_for("the demo chat subscribed", "document.body.dataset.subscribed === '1'").await;
    let head = support::position(addr, demo.chat).await;
    node.publish(demo.chat, "before the restart 1").await;
    node.publish(demo.chat, "before the restart 2").await;
    page.wait_for("the second event", &row(head + 2, "before the restart 2")).await;

    node.stop().await;
    page.wait_for("the 1001 close", "document.querySelector('#events li.notice[data-code=\"1001\"]')").await;

    // Same address, new process state: the memory bus's history is gone, so
    // the server cannot replay and the page is told to refetch.
    let mut config = demo_config();
    config.server.listen = addr;
    let node = DemoNode::start(config, &demo).await;
    page.wait_for("the resubscription", "document.body.dataset.subscribed === '2'").await;
    page.wait_for("the refetch notice", "document.querySelector('#events li.notice[data-refetch]')").await;
    // The room starts a new life on the new node, above every seq of its first.
    let new_head = support::position(addr, demo.chat).await;
    assert!(
        new_head > head + 2,
        "the new life's position {new_head} is above the first life's last seq {}",
        head + 2
    );
    node.publish(demo.chat, "after the restart").await;
    page.wait_for("the live event after the restart", &row(new_head + 1, "after the restart")).await;
    assert_eq!(page.eval(EVENT_ROWS).await, Some(json!(3)), "no event twice, none lost live");
    page.close().await;
    node.stop().await;
}

#[tokio::test]
#[ignore = "needs chromium and redis-server"]
async fn over_redis_a_restart_shows_the_missed_events_with_no_gap() {
    let redis = support::redis::RedisServer::start();
    let redis_config = |listen: Option<SocketAddr>| {
        let mut config = demo_config();
        config.bus.kind = herald::config::BusKind::Redis;
        config.bus.redis_url = redis.url();
        if let Some(addr) = listen {
            config.server.listen = addr;
        }
        config
    };
    let demo = demo(Duration::from_secs(3600));
    let node = DemoNode::start(redis_config(None), &demo).await;
    let addr = node.addr;
    // A second node publishes while the page's node is down.
    let other = DemoNode::start(redis_config(None), &demo).await;
    let mut page = Browser::open(&format!("http://{addr}/")).await;
    page.wait_for("the demo chat subscribed", "document.body.dataset.subscribed === '1'").await;
    let head = support::position(addr, demo.chat).await;
    other.publish(demo.chat, "one").await;
    other.publish(demo.chat, "two").await;
    page.wait_for("the second event", &row(head + 2, "two")).await;

    node.stop().await;
    page.wait_for("the 1001 close", "document.querySelector('#events li.notice[data-code=\"1001\"]')").await;
    other.publish(demo.chat, "three, while away").await;
    other.publish(demo.chat, "four, while away").await;

    // Events 3 and 4 reached Redis while the page was away: the restarted
    // node replays them from the room's history in Redis.
    let node = DemoNode::start(redis_config(Some(addr)), &demo).await;
    page.wait_for("the resubscription", "document.body.dataset.subscribed === '2'").await;
    node.publish(demo.chat, "five, live").await;
    page.wait_for("the live event", &row(head + 5, "five, live")).await;
    let seqs = page
        .eval("[...document.querySelectorAll('#events li.event')].map((li) => Number(li.dataset.seq)).reverse()")
        .await;
    let shown = page.eval("document.getElementById('events').innerText").await;
    let want: Vec<u64> = (head + 1..=head + 5).collect();
    assert_eq!(seqs, Some(json!(want)), "every event once, in order; the page shows:\n{shown:?}");
    assert_eq!(
        page.eval("document.querySelector('#events li.notice[data-refetch]')").await,
        Some(Value::Null)
    );
    page.close().await;
    node.stop().await;
    other.stop().await;
}

#[tokio::test]
#[ignore = "needs chromium"]
async fn an_expired_token_is_renewed_through_get_token() {
    // Tokens the page fetches live 2-3 s (`exp` has whole seconds).
    let demo = demo(Duration::from_secs(3));
    let node = DemoNode::start(demo_config(), &demo).await;
    let mut page = Browser::open(&format!("http://{}/", node.addr)).await;
    page.wait_for("the demo chat subscribed", "document.body.dataset.subscribed === '1'").await;
    page.wait_for("the 4001 close", "document.querySelector('#events li.notice[data-code=\"4001\"]')").await;
    page.wait_for("the resubscription", "Number(document.body.dataset.subscribed) >= 2").await;
    let fetches = page.eval("Number(document.getElementById('token-fetches').textContent)").await;
    assert!(fetches.and_then(|v| v.as_u64()).is_some_and(|n| n >= 2), "getToken() was called again");
    let head = support::position(node.addr, demo.chat).await;
    node.publish(demo.chat, "with a renewed token").await;
    page.wait_for("an event on the renewed connection", &row(head + 1, "with a renewed token")).await;
    page.close().await;
    node.stop().await;
}

/// A page of another origin that imports Herald's `/client.js` and reports
/// what its client sees to `/report?...`.
fn client_page(herald: SocketAddr, token: &str, chat: ChatId) -> String {
    format!(
        r#"<!doctype html><html><body><script type="module">
import {{ HeraldClient }} from 'http://{herald}/client.js';
const report = (what) => fetch('/report?' + encodeURIComponent(JSON.stringify(what)));
const client = new HeraldClient('ws://{herald}/ws', {{ token: '{token}', backoffInitial: 200 }});
client.on('disconnected', (d) => report({{type: 'disconnected', code: d.code}}));
client.subscribe('{chat}', (e) => report(e)).then((ack) => report({{type: 'subscribed', chat: ack.chatId}}));
client.connect();
</script></body></html>"#
    )
}

#[tokio::test]
#[ignore = "needs chromium"]
async fn allowed_origins_holds_for_the_client() {
    let allowed = TcpListener::bind("127.0.0.1:0").await.expect("bind page server");
    let other = TcpListener::bind("127.0.0.1:0").await.expect("bind page server");
    let allowed_origin = format!("http://{}", allowed.local_addr().expect("addr"));
    let other_origin = format!("http://{}", other.local_addr().expect("addr"));
    let mut config = support::config();
    config.auth.allowed_origins = vec![allowed_origin.clone()];
    let gw = support::start(config).await;
    let chat = ChatId::new_v4();
    let token = support::token(UserId::new_v4(), &[chat]);

    let (ok_tx, mut ok_reports) = mpsc::unbounded_channel();
    tokio::spawn(serve_page(allowed, client_page(gw.addr, &token, chat), ok_tx));
    let (bad_tx, mut bad_reports) = mpsc::unbounded_channel();
    tokio::spawn(serve_page(other, client_page(gw.addr, &token, chat), bad_tx));

    let good = Browser::open(&format!("{allowed_origin}/")).await;
    assert_eq!(next_report(&mut ok_reports).await, json!({"type": "subscribed", "chat": chat}));
    let data = json!({"content": "to the allowed origin"});
    assert_eq!(gw.publish(&support::message_sent(chat, &data)).await.0, 202);
    assert_eq!(next_report(&mut ok_reports).await["data"], data);

    // The other origin's upgrade is refused (403, which a browser reports as
    // 1006), and its client keeps trying without ever subscribing.
    let bad = Browser::open(&format!("{other_origin}/")).await;
    assert_eq!(next_report(&mut bad_reports).await, json!({"type": "disconnected", "code": 1006}));
    assert_eq!(next_report(&mut bad_reports).await, json!({"type": "disconnected", "code": 1006}));
    assert!(gw.labelled("upgrades_rejected_total", "reason", "origin").await >= 2.0);

    // The first page's socket was never disturbed.
    gw.stop().await;
    assert_eq!(next_report(&mut ok_reports).await, json!({"type": "disconnected", "code": 1001}));
    good.close().await;
    bad.close().await;
}

/// The page: connect, subscribe, and report each step to `/report?...`.
fn raw_page(ws_url: &str, chat: ChatId) -> String {
    format!(
        r#"<!doctype html><html><body><script>
const report = (what) => fetch('/report?' + encodeURIComponent(what));
const ws = new WebSocket('{ws_url}');
ws.onopen = () => ws.send(JSON.stringify({{type: 'subscribe', chat_id: '{chat}'}}));
ws.onmessage = (e) => report(e.data);
ws.onclose = (e) => report(JSON.stringify({{type: 'closed', code: e.code}}));
ws.onerror = () => report(JSON.stringify({{type: 'socket-error'}}));
</script></body></html>"#
    )
}

#[tokio::test]
#[ignore = "needs chromium"]
async fn a_browser_websocket_subscribes_and_receives_events_live() {
    let page_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind page server");
    let page_origin = format!("http://{}", page_listener.local_addr().expect("page addr"));

    let mut config = support::config();
    config.auth.allowed_origins = vec![page_origin.clone()];
    let gw = support::start(config).await;
    let chat = ChatId::new_v4();
    let ws_url = gw.ws_url(&support::token(UserId::new_v4(), &[chat]));

    let (reports_tx, mut reports) = mpsc::unbounded_channel();
    tokio::spawn(serve_page(page_listener, raw_page(&ws_url, chat), reports_tx));
    let browser = Browser::open(&format!("{page_origin}/")).await;

    let subscribed = next_report(&mut reports).await;
    let head = support::position_from(gw.addr, chat, Some(&page_origin)).await;
    assert_eq!(subscribed, json!({"type":"subscribed","chat_id":chat,"seq":head}));
    let data = json!({"content":"Hello from Herald","n":1});
    assert_eq!(gw.publish(&support::message_sent(chat, &data)).await.0, 202);
    let event = next_report(&mut reports).await;
    assert_eq!((event["type"].clone(), event["data"].clone()), (json!("message.new"), data));
    gw.publish(&json!({"type":"chat.updated","chat_id":chat,"data":{"name":"Renamed"}}).to_string()).await;
    assert_eq!(next_report(&mut reports).await["seq"], event["seq"].as_u64().expect("seq") + 1);

    // A graceful shutdown reaches the browser as close code 1001.
    gw.stop().await;
    assert_eq!(next_report(&mut reports).await, json!({"type":"closed","code":1001}));
    browser.close().await;
}

/// Serves the page at `/` and forwards every `/report?<text>` to `reports`.
async fn serve_page(listener: TcpListener, html: String, reports: mpsc::UnboundedSender<String>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { return };
        let (html, reports) = (html.clone(), reports.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            let mut len = 0;
            while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") && len < buf.len() {
                match stream.read(&mut buf[len..]).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => len += n,
                }
            }
            let head = String::from_utf8_lossy(&buf[..len]).to_string();
            let path = head.split(' ').nth(1).unwrap_or("/").to_string();
            let body = match path.strip_prefix("/report?") {
                Some(query) => {
                    let _ = reports.send(percent_decode(query));
                    String::new()
                }
                None if path == "/" => html,
                None => String::new(),
            };
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(resp.as_bytes()).await;
        });
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn next_report(reports: &mut mpsc::UnboundedReceiver<String>) -> Value {
    let text = tokio::time::timeout(PAGE_PATIENCE, reports.recv())
        .await
        .expect("the browser reported in time")
        .expect("page server running");
    serde_json::from_str(&text).unwrap_or_else(|_| panic!("browser reported non-JSON: {text}"))
}

/// One HTTP/1.1 request; status and body. Reads by `Content-Length`, since
/// Chromium's DevTools server keeps the connection open.
async fn http(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write request");
    let read = async {
        let mut raw = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            let n = stream.read(&mut buf).await.expect("read response");
            raw.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&raw);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length = head.lines().find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length").then(|| value.trim().parse::<usize>().ok())?
                });
                if n == 0 || length.is_some_and(|len| body.len() >= len) {
                    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
                    return (status, body.to_string());
                }
            }
            assert!(n > 0, "connection closed mid-response");
        }
    };
    tokio::time::timeout(support::PATIENCE, read).await.expect("response in time")
}

fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let digits: Vec<u8> = text.bytes().filter(|&c| c != b'=').map(value).collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &d)| n | (u32::from(d) << (18 - 6 * i)));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

/// Chromium offers permessage-deflate on every WebSocket: the page sees
/// what was agreed, and events above the threshold reach it compressed.
#[tokio::test]
#[ignore = "needs chromium"]
async fn a_browser_negotiates_permessage_deflate_and_receives_compressed_events() {
    let page_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind page server");
    let page_origin = format!("http://{}", page_listener.local_addr().expect("page addr"));
    let gw = support::start(support::config()).await;
    let chat = ChatId::new_v4();
    let ws_url = gw.ws_url(&support::token(UserId::new_v4(), &[chat]));
    let page = format!(
        r#"<!doctype html><html><body><script>
const report = (what) => fetch('/report?' + encodeURIComponent(what));
const ws = new WebSocket('{ws_url}');
ws.onopen = () => {{
  report(JSON.stringify({{type: 'open', extensions: ws.extensions}}));
  ws.send(JSON.stringify({{type: 'subscribe', chat_id: '{chat}'}}));
}};
ws.onmessage = (e) => report(e.data);
</script></body></html>"#
    );
    let (reports_tx, mut reports) = mpsc::unbounded_channel();
    tokio::spawn(serve_page(page_listener, page, reports_tx));
    let browser = Browser::open(&format!("{page_origin}/")).await;

    let open = next_report(&mut reports).await;
    assert_eq!(
        open,
        json!({"type":"open","extensions":"permessage-deflate; client_no_context_takeover"}),
        "the context is kept: the browser keeps its inflate window"
    );
    assert_eq!(next_report(&mut reports).await["type"], "subscribed");
    // Consecutive events: each after the first refers to the one before it.
    let data = |i: usize| json!({"n": i, "content": "A long message about the release, the build and the notes. ".repeat(4)});
    for i in 0..5 {
        assert_eq!(gw.publish(&support::message_sent(chat, &data(i))).await.0, 202);
    }
    for i in 0..5 {
        let event = next_report(&mut reports).await;
        assert_eq!((event["type"].clone(), event["data"].clone()), (json!("message.new"), data(i)));
    }
    assert_eq!(gw.metric("compressed_frames_total").await, 5.0, "every event went out compressed");
    let (before, after) =
        (gw.metric("compression_bytes_in_total").await, gw.metric("compression_bytes_out_total").await);
    assert!(after * 3.0 < before, "after their predecessor the events shrink: {after} of {before} bytes");
    assert_eq!(gw.metric("compression_connections").await, 1.0);
    gw.stop().await;
    browser.close().await;
}
