//! A real browser as the client: headless Chromium loads a page (served by
//! this test) whose script connects to Herald with `new WebSocket(...)`,
//! subscribes, and reports what it receives back to the test over HTTP.
//! Herald runs with `allowed_origins` set to the page's origin, so the
//! browser's own `Origin` header is checked too.
//!
//! Needs Debian's `chromium`: `.ci/run` installs it. Locally without it the
//! test skips loudly; under `CI=true` a missing browser fails the test.

mod support;

use std::process::Stdio;
use std::time::Duration;

use herald::protocol::{ChatId, UserId};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

fn chromium() -> Option<std::path::PathBuf> {
    let found = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.exists());
    if found.is_none() {
        let message = "headless Chromium not found: install Debian's `chromium` package";
        if std::env::var_os("CI").is_some() {
            panic!("{message}");
        }
        eprintln!("\n!!!!!!!! SKIPPING browser test: {message} !!!!!!!!\n");
    }
    found
}

/// The page: connect, subscribe, and report each step to `/report?...`.
fn page(ws_url: &str, chat: ChatId) -> String {
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

async fn next_report(reports: &mut mpsc::UnboundedReceiver<String>) -> serde_json::Value {
    let text = tokio::time::timeout(Duration::from_secs(30), reports.recv())
        .await
        .expect("the browser reported in time")
        .expect("page server running");
    serde_json::from_str(&text).unwrap_or_else(|_| panic!("browser reported non-JSON: {text}"))
}

#[tokio::test]
async fn a_browser_subscribes_and_receives_events_live() {
    let Some(browser) = chromium() else { return };
    let page_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind page server");
    let page_origin = format!("http://{}", page_listener.local_addr().expect("page addr"));

    let mut config = support::config();
    config.auth.allowed_origins = vec![page_origin.clone()];
    let gw = support::start(config).await;
    let chat = ChatId::new_v4();
    let ws_url = gw.ws_url(&support::token(UserId::new_v4(), &[chat]));

    let (reports_tx, mut reports) = mpsc::unbounded_channel();
    tokio::spawn(serve_page(page_listener, page(&ws_url, chat), reports_tx));
    let profile = std::env::temp_dir().join(format!("herald-chromium-{}", uuid::Uuid::new_v4()));
    let mut chrome = tokio::process::Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("{page_origin}/"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("chromium starts");

    assert_eq!(next_report(&mut reports).await, json!({"type":"subscribed","chat_id":chat,"seq":0}));
    let data = json!({"content":"Hello from Herald","n":1});
    assert_eq!(gw.publish(&support::message_sent(chat, &data)).await.0, 202);
    assert_eq!(
        next_report(&mut reports).await,
        json!({"type":"message.new","chat_id":chat,"seq":1,"data":data})
    );
    gw.publish(&json!({"type":"chat.updated","chat_id":chat,"data":{"name":"Renamed"}}).to_string()).await;
    assert_eq!(next_report(&mut reports).await["seq"], 2);

    // A graceful shutdown reaches the browser as close code 1001.
    gw.stop().await;
    assert_eq!(next_report(&mut reports).await, json!({"type":"closed","code":1001}));

    let _ = chrome.kill().await;
    let _ = std::fs::remove_dir_all(profile);
}
