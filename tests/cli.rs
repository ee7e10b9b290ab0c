//! The operator commands as real processes: `herald token` mints what `/ws`
//! accepts, `herald check-token` agrees with `/ws` on good and bad tokens,
//! `herald check-config` names bad keys, masks secrets and (with
//! `--connect`) reaches Redis, `herald init` writes a config a node serves
//! from, logs are plain text or JSON lines when piped, and the demo runs
//! only on the true embedded default (no config file, no credentials from
//! the environment) and never hands out or prints configured credentials.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use herald::auth::now_secs;
use herald::config::Config;
use herald::protocol::{ChatId, UserId};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use support::{
    exchange, free_addr, herald, message_sent, printed, publish_to, refusal, run, wait_healthy, Client,
    PATIENCE,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Child;

const SECRET: &str = "cli-test-secret-0123456789abcdef";
const API_KEY: &str = "cli-test-api-key-0123456789";

/// A config file in a fresh temporary directory, removed on drop.
struct TempConfig {
    dir: PathBuf,
    path: PathBuf,
}

impl TempConfig {
    fn new(yaml: &str) -> TempConfig {
        let dir = std::env::temp_dir().join(format!("herald-cli-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir(&dir).expect("create temp dir");
        let path = dir.join("herald.yaml");
        if !yaml.is_empty() {
            std::fs::write(&path, yaml).expect("write config");
        }
        TempConfig { dir, path }
    }

    /// A node started in this process from the same file, on port 0.
    async fn start(&self) -> support::Gateway {
        let mut config = Config::load(Some(&self.path), []).expect("config loads");
        config.server.listen = "127.0.0.1:0".parse().unwrap();
        support::start(config).await
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn hs256_config(extra_auth: &str) -> TempConfig {
    TempConfig::new(&format!(
        "auth:\n  jwt_secret: \"{SECRET}\"\n  membership: token\n{extra_auth}api:\n  keys: [\"{API_KEY}\"]\n"
    ))
}

/// `herald token` with this config; returns the printed token.
async fn mint(config: &Path, user: UserId, chats: &[ChatId]) -> String {
    let mut cmd = herald();
    cmd.arg("token").arg("--config").arg(config).args(["--sub", &user.to_string(), "--ttl", "10m"]);
    for chat in chats {
        cmd.args(["--chat", &chat.to_string()]);
    }
    let (ok, out, err) = run(&mut cmd).await;
    assert!(ok, "herald token failed: {err}");
    assert_eq!(out.lines().count(), 1, "only the token on stdout: {out}");
    out.trim().to_string()
}

/// What `/ws` does with a token: `None` if it upgrades, else the 401 reason.
async fn ws_verdict(addr: SocketAddr, token: &str) -> Option<String> {
    let (status, body) = refusal(format!("ws://{addr}/ws?token={token}")).await?;
    assert_eq!(status, 401);
    Some(body["error"].as_str().unwrap_or_else(|| panic!("an error reason in {body}")).to_string())
}

#[tokio::test]
async fn a_minted_token_connects_and_subscribes_to_its_chats() {
    let file = hs256_config("  issuer: \"https://auth.example\"\n  audience: herald\n");
    let gw = file.start().await;
    let (user, lobby, side, other) = (UserId::new_v4(), ChatId::new_v4(), ChatId::new_v4(), ChatId::new_v4());
    let token = mint(&file.path, user, &[lobby, side]).await;

    let mut c = gw.connect_token(&token).await;
    c.subscribe(lobby).await;
    c.subscribe(side).await;
    c.send_json(json!({"type":"subscribe","chat_id":other})).await;
    assert_eq!(c.recv().await["code"], "forbidden", "a chat not in the token's claim");
    assert_eq!(gw.publish_with_key(&message_sent(lobby, &json!({"n":1})), Some(API_KEY)).await.0, 202);
    assert_eq!(c.recv().await["data"], json!({"n":1}));
}

#[tokio::test]
async fn token_refuses_to_mint_without_a_private_key() {
    let public = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rsa_public.pem");
    let file = TempConfig::new(&format!("auth:\n  jwt_public_key_file: {}\n", public.display()));
    let mut cmd = herald();
    cmd.arg("token").arg("--config").arg(&file.path).args(["--sub", &UserId::new_v4().to_string()]);
    let (ok, out, err) = run(&mut cmd).await;
    assert!(!ok, "minted without a private key: {out}");
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("cannot mint"), "{err}");
    assert!(err.contains("auth.jwt_public_key_file"), "{err}");
}

#[tokio::test]
async fn check_token_agrees_with_ws() {
    let file = hs256_config("  audience: herald\n");
    let gw = file.start().await;
    let user = UserId::new_v4();
    let good = mint(&file.path, user, &[]).await;
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    let sign = |claims: Value, alg| jsonwebtoken::encode(&Header::new(alg), &claims, &key).expect("sign");
    let expired = sign(json!({"sub": user, "exp": now_secs() - 3600, "aud": "herald"}), Algorithm::HS256);
    let wrong_aud = sign(json!({"sub": user, "exp": now_secs() + 600, "aud": "elsewhere"}), Algorithm::HS256);
    let hs384 = sign(json!({"sub": user, "exp": now_secs() + 600, "aud": "herald"}), Algorithm::HS384);
    // Tampered: the payload swapped for another user's, the signature kept.
    let other = mint(&file.path, UserId::new_v4(), &[]).await;
    let tampered = {
        let (head, rest) = good.split_once('.').expect("a JWT");
        let (_, sig) = rest.split_once('.').expect("a JWT");
        let (_, other_rest) = other.split_once('.').expect("a JWT");
        let (other_payload, _) = other_rest.split_once('.').expect("a JWT");
        format!("{head}.{other_payload}.{sig}")
    };
    let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiIwMDAwMDAwMC0wMDAwLTAwMDAtMDAwMC0wMDAwMDAwMDAwMDciLCJleHAiOjQxMDI0NDQ4MDAsImF1ZCI6ImhlcmFsZCJ9.";

    let cases = [
        ("good", good.as_str(), None, "valid"),
        ("expired", &expired, Some("token_expired"), "expired at "),
        ("tampered", &tampered, Some("invalid_signature"), "not signed with auth.jwt_secret"),
        ("wrong audience", &wrong_aud, Some("invalid_issuer_or_audience"), r#"its aud is "elsewhere""#),
        ("alg none", none, Some("malformed_token"), r#"alg "none""#),
        ("HS384", &hs384, Some("algorithm_not_allowed"), "accepts only HS256"),
        ("garbage", "not-a-jwt", Some("malformed_token"), "three base64url parts"),
    ];
    for (name, token, want_ws, detail) in cases {
        let ws = ws_verdict(gw.addr, token).await;
        assert_eq!(ws.as_deref(), want_ws, "/ws on the {name} token");
        let mut cmd = herald();
        cmd.arg("check-token").arg("--config").arg(&file.path).arg(token);
        let (ok, out, err) = run(&mut cmd).await;
        match &ws {
            None => {
                assert!(ok && out.contains(&user.to_string()), "{name}: /ws accepts, check-token: {out}{err}")
            }
            Some(reason) => {
                assert!(!ok, "{name}: /ws refuses ({reason}) but check-token accepts: {out}");
                assert!(out.starts_with(&format!("refused ({reason})")), "{name}: /ws says {reason}: {out}");
            }
        }
        assert!(out.contains(detail), "{name}: no {detail:?} in {out}");
    }
}

#[tokio::test]
async fn check_token_reads_standard_input() {
    let file = hs256_config("");
    let token = mint(&file.path, UserId::new_v4(), &[]).await;
    let mut child = herald()
        .arg("check-token")
        .arg("--config")
        .arg(&file.path)
        .arg("-")
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(format!("{token}\n").as_bytes()).await.expect("write token");
    drop(stdin);
    let out = tokio::time::timeout(PATIENCE, child.wait_with_output()).await.expect("in time").expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

#[tokio::test]
async fn check_config_masks_secrets_and_names_bad_keys() {
    // A port already taken and an unreachable Redis: checking binds and
    // connects to neither, so both are fine.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let file = TempConfig::new(&format!(
        "server:\n  listen: {addr}\nauth:\n  jwt_secret: \"{SECRET}\"\napi:\n  keys: [\"{API_KEY}\"]\n\
         bus:\n  kind: redis\n  redis_url: redis://:redis-password-123@127.0.0.1:1\n"
    ));
    let mut cmd = herald();
    cmd.arg("check-config").arg("--config").arg(&file.path).env("HERALD_WEBSOCKET__PING_INTERVAL", "7s");
    let (ok, out, err) = run(&mut cmd).await;
    assert!(ok, "{err}");
    for secret in [SECRET, API_KEY, "redis-password-123"] {
        assert!(!out.contains(secret), "{secret} printed:\n{out}");
    }
    let shown =
        [&format!("listen: {addr}"), "ping_interval: 7s", "redis://:***@127.0.0.1:1", "<masked, 32 bytes>"];
    for text in shown {
        assert!(out.contains(text), "{text} missing:\n{out}");
    }
    // It is YAML of the same shape: the output loads (masks are long enough to pass as secrets).
    let echo = TempConfig::new(&out);
    let reloaded = Config::load(Some(&echo.path), []).expect("the printed config loads");
    assert_eq!(reloaded.websocket.ping_interval, Duration::from_secs(7));

    let bad = TempConfig::new("websocket:\n  ping_intervall: 5s\n");
    let (ok, out, err) = run(herald().arg("check-config").arg("--config").arg(&bad.path)).await;
    assert!(!ok && out.is_empty(), "{out}");
    assert!(err.contains("ping_intervall") && err.contains("websocket"), "{err}");
    let (ok, _, err) = run(herald().args(["check-config"]).env("HERALD_LOG__FORMAT", "xml")).await;
    assert!(!ok && err.contains("log.format"), "{err}");
    let (ok, _, err) = run(herald().args(["check-config"]).env("HERALD_LOG__LEVEL", "herald=loud")).await;
    assert!(!ok && err.contains("log.level"), "{err}");
}

#[tokio::test]
async fn init_writes_a_config_a_node_serves_from() {
    let file = TempConfig::new("");
    let (ok, out, err) = run(herald().arg("init").arg(&file.path)).await;
    assert!(ok, "{err}");
    assert!(out.contains(&file.path.display().to_string()), "{out}");
    let written = std::fs::read_to_string(&file.path).expect("init wrote the file");
    let (ok, _, err) = run(herald().arg("init").arg(&file.path)).await;
    assert!(!ok && err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read_to_string(&file.path).expect("still there"), written, "not overwritten");

    let addr = free_addr();
    let mut node = herald()
        .arg("--config")
        .arg(&file.path)
        .env("HERALD_SERVER__LISTEN", addr.to_string())
        .spawn()
        .expect("spawn herald");
    wait_healthy(&mut node, addr).await;

    // The written secret and key are in force: a token minted from the file
    // subscribes to its chat, and the file's API key publishes to it.
    let (user, room) = (UserId::new_v4(), ChatId::new_v4());
    let token = mint(&file.path, user, &[room]).await;
    let mut c = Client::connect(addr, &token).await;
    c.subscribe(room).await;
    let key = Config::load(Some(&file.path), []).expect("loads").api.keys[0].clone();
    let body = message_sent(room, &json!({"n":1}));
    let (status, reply) = publish_to(addr, &key, &body).await;
    assert_eq!(status, 202, "{reply}");
    assert_eq!(c.recv().await["data"], json!({"n":1}));
    node.kill().await.expect("kill herald");
}

/// Starts a node with `env`, waits until it serves, stops it, returns stderr.
async fn node_stderr(env: &[(&str, &str)]) -> String {
    let addr = free_addr();
    let mut cmd = herald();
    cmd.env("HERALD_SERVER__LISTEN", addr.to_string()).envs(env.iter().copied());
    let mut node = cmd.spawn().expect("spawn herald");
    wait_healthy(&mut node, addr).await;
    node.kill().await.expect("kill herald");
    let mut err = String::new();
    node.stderr.take().expect("stderr").read_to_string(&mut err).await.expect("read stderr");
    err
}

#[tokio::test]
async fn piped_logs_are_plain_text_or_json_lines() {
    let text = node_stderr(&[]).await;
    assert!(text.contains("herald listening"), "info is the default level: {text}");
    assert!(!text.contains('\x1b'), "ANSI escapes in piped logs: {text:?}");

    let json = node_stderr(&[("HERALD_LOG__FORMAT", "json")]).await;
    let lines: Vec<Value> =
        json.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}"))).collect();
    let listening = lines.iter().find(|l| l["message"] == "herald listening").expect("a listening line");
    for key in ["timestamp", "level", "target", "addr"] {
        assert!(listening.get(key).is_some(), "no {key} in {listening}");
    }
    assert_eq!(listening["level"], "INFO");

    // RUST_LOG wins over log.level.
    let quiet = node_stderr(&[("HERALD_LOG__LEVEL", "debug"), ("RUST_LOG", "error")]).await;
    assert!(!quiet.contains("herald listening"), "{quiet}");
    // Spaces after commas are read as written (tracing-subscriber alone
    // refuses or misreads them, and panics on some).
    let spaced = node_stderr(&[("RUST_LOG", "error, herald=info")]).await;
    assert!(spaced.contains("herald listening"), "{spaced}");
}

#[tokio::test]
async fn help_lists_the_subcommands() {
    let (ok, out, _) = run(herald().arg("--help")).await;
    assert!(ok);
    for command in ["serve", "token", "check-token", "check-config", "init"] {
        assert!(out.contains(&format!("\n  {command} ")), "{command} missing from:\n{out}");
    }
}

#[tokio::test]
async fn check_config_connect_pings_redis() {
    let dead = free_addr();
    let down = TempConfig::new(&format!("bus:\n  kind: redis\n  redis_url: redis://:pw-0123456789@{dead}\n"));
    let (ok, _, err) =
        run(herald().arg("check-config").arg("--connect").arg("--config").arg(&down.path)).await;
    assert!(!ok, "no Redis listens on {dead}");
    assert!(err.contains(&format!("bus.redis_url redis://:***@{dead}")), "{err}");
    assert!(!err.contains("pw-0123456789"), "{err}");
}

#[tokio::test]
#[ignore = "needs redis-server"]
async fn check_config_connect_reaches_a_live_redis() {
    let redis = support::redis::RedisServer::start();
    let up = TempConfig::new(&format!("bus:\n  kind: redis\n  redis_url: {}\n", redis.url()));
    let (ok, out, err) =
        run(herald().arg("check-config").arg("--connect").arg("--config").arg(&up.path)).await;
    assert!(ok, "{err}");
    assert!(out.contains("answers PING"), "{out}");
}

// ---- the demo: only on the true embedded default (issue 17) ----------------

/// Every `Host` a same-host proxy, `kubectl port-forward` or a tunnel may
/// send: each names this machine, so each would have been given the demo.
const LOOPBACK_HOSTS: [&str; 5] = ["127.0.0.1", "localhost", "localhost:8080", "[::1]:8080", "127.0.0.2"];

/// A `herald` process serving on a free loopback port.
struct NodeProcess {
    child: Child,
    addr: SocketAddr,
}

impl NodeProcess {
    /// Starts `herald [--config FILE]` with `env` and waits until it serves.
    async fn start(config: Option<&Path>, env: &[(&str, &str)]) -> NodeProcess {
        let addr = free_addr();
        let mut cmd = herald();
        if let Some(path) = config {
            cmd.arg("--config").arg(path);
        }
        cmd.env("HERALD_SERVER__LISTEN", addr.to_string()).envs(env.iter().copied());
        let mut child = cmd.spawn().expect("spawn herald");
        wait_healthy(&mut child, addr).await;
        NodeProcess { child, addr }
    }

    /// `GET path` naming `host`, with forwarding headers that claim loopback
    /// too (Herald must not trust them either way); status and body.
    async fn get(&self, path: &str, host: &str) -> (u16, String) {
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nX-Forwarded-For: 127.0.0.1\r\n\
             X-Forwarded-Host: localhost\r\nX-Forwarded-Proto: http\r\nConnection: close\r\n\r\n"
        );
        let (status, _, body) = exchange(self.addr, &request).await;
        (status, body)
    }

    /// Stops the node; returns all it wrote: the banner (stdout) and logs (stderr).
    async fn output(mut self) -> String {
        self.child.kill().await.expect("kill herald");
        let mut out = String::new();
        self.child.stdout.take().expect("stdout").read_to_string(&mut out).await.expect("read stdout");
        self.child.stderr.take().expect("stderr").read_to_string(&mut out).await.expect("read stderr");
        out
    }
}

/// A node with configured credentials: `/demo/token` is 404 for every
/// loopback `Host`, the page (when `page_on`) carries no demo settings, no
/// key and no token, and nothing it prints holds a configured credential.
async fn assert_no_demo(config: Option<&Path>, env: &[(&str, &str)], page_on: bool, configured: &[&str]) {
    let node = NodeProcess::start(config, env).await;
    let mut pages = Vec::new();
    for host in LOOPBACK_HOSTS {
        let (status, body) = node.get("/demo/token", host).await;
        assert_eq!(status, 404, "/demo/token for Host {host} on a configured node: {body}");
        let (status, page) = node.get("/", host).await;
        if page_on {
            assert_eq!(status, 200, "ui.enabled: true serves the page for Host {host}");
            assert!(page.contains("const demo = null;"), "demo settings for Host {host}:\n{page}");
        } else {
            assert_eq!(status, 404, "the page is off without a demo (Host {host})");
        }
        assert!(!page.contains("eyJ"), "a token in the page for Host {host}:\n{page}");
        pages.push(page);
    }
    let output = node.output().await;
    for secret in configured {
        assert!(!output.contains(secret), "a configured credential printed:\n{output}");
    }
    assert!(!output.contains("demo token") && !output.contains("Demo page"), "{output}");
    // A key Herald generated may be printed, but no page carries it either.
    let keys = configured.iter().map(|k| k.to_string()).chain(printed(&output, "API key:"));
    for key in keys {
        assert!(pages.iter().all(|page| !page.contains(&key)), "an API key in the page");
    }
}

/// Issue 17: a configured `auth.jwt_secret` without `api.keys` used to
/// start the demo, whose `/demo/token` minted tokens with that secret for
/// any request naming a loopback `Host`.
#[tokio::test]
async fn a_configured_secret_without_api_keys_runs_no_demo() {
    let file = TempConfig::new(&format!("auth:\n  jwt_secret: \"{SECRET}\"\n  membership: token\n"));
    assert_no_demo(Some(&file.path), &[], false, &[SECRET]).await;
    // From the environment alone, without a file: configured all the same.
    assert_no_demo(None, &[("HERALD_AUTH__JWT_SECRET", SECRET)], false, &[SECRET]).await;
}

/// `ui.enabled: true` on a configured node serves the page, never a demo.
#[tokio::test]
async fn ui_enabled_on_a_configured_node_serves_the_page_without_credentials() {
    let file = TempConfig::new(&format!("auth:\n  jwt_secret: \"{SECRET}\"\nui:\n  enabled: true\n"));
    assert_no_demo(Some(&file.path), &[], true, &[SECRET]).await;
    let env = [("HERALD_AUTH__JWT_SECRET", SECRET), ("HERALD_UI__ENABLED", "true")];
    assert_no_demo(None, &env, true, &[SECRET]).await;
    // Only `api.keys` configured: the page used to embed that very key.
    let file = TempConfig::new(&format!("api:\n  keys: [\"{API_KEY}\"]\nui:\n  enabled: true\n"));
    assert_no_demo(Some(&file.path), &[], true, &[API_KEY]).await;
    let env = [("HERALD_API__KEYS", API_KEY), ("HERALD_UI__ENABLED", "true")];
    assert_no_demo(None, &env, true, &[API_KEY]).await;
}

/// A config file makes a node configured even without credentials: Herald
/// generates both for the run and prints them, but runs no demo.
#[tokio::test]
async fn a_config_file_without_credentials_runs_no_demo() {
    let file = TempConfig::new("ui:\n  enabled: true\n");
    let node = NodeProcess::start(Some(&file.path), &[]).await;
    assert_eq!(node.get("/demo/token", "127.0.0.1").await.0, 404);
    assert!(node.get("/", "127.0.0.1").await.1.contains("const demo = null;"));
    let output = node.output().await;
    for label in ["JWT secret (HS256):", "API key:"] {
        assert!(printed(&output, label).is_some_and(|v| v.len() >= 32), "no generated {label}:\n{output}");
    }
    assert!(!output.contains("demo token"), "{output}");
}

/// The true embedded default keeps its demo: the page carries the printed
/// key and `/demo/token` mints tokens `/ws` accepts, for loopback hosts only.
#[tokio::test]
async fn the_embedded_default_serves_the_demo_to_loopback_hosts() {
    let node = NodeProcess::start(None, &[]).await;
    let (status, page) = node.get("/", "localhost").await;
    assert_eq!(status, 200);
    let (status, body) = node.get("/demo/token", "127.0.0.1").await;
    assert_eq!(status, 200, "{body}");
    let token: Value = serde_json::from_str(&body).expect("JSON");
    let token = token["token"].as_str().expect("a token").to_string();
    assert_eq!(ws_verdict(node.addr, &token).await, None, "the demo token connects");
    // Another name (DNS rebinding) gets neither.
    assert_eq!(node.get("/demo/token", "rebound.example").await.0, 404);
    assert!(node.get("/", "rebound.example").await.1.contains("const demo = null;"));

    let output = node.output().await;
    let key = printed(&output, "API key:").expect("the banner prints the API key");
    assert!(page.contains(&format!("\"apiKey\":\"{key}\"")), "the page publishes with the printed key");
    assert!(page.contains("\"tokenUrl\":\"/demo/token\""), "{page}");
    assert!(printed(&output, "JWT secret (HS256):").is_some_and(|s| s.len() == 64), "{output}");
}
