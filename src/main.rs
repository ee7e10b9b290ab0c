//! The `herald` binary: parse the command line, load the config, start the
//! node, and stop it on Ctrl-C or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use herald::config::{Config, Membership};
use herald::http::DemoPage;
use herald::protocol::{ChatId, UserId};
use herald::server::Server;
use tokio_util::sync::CancellationToken;

const USAGE: &str = "\
herald: realtime WebSocket fan-out gateway

USAGE:
    herald [--config <FILE>]

With no --config, Herald runs on its embedded default: 127.0.0.1:8080, the
in-memory bus, and a random JWT secret and API key printed for this run.
Every config key can be set with HERALD_<SECTION>__<KEY>, e.g.
HERALD_AUTH__JWT_SECRET or HERALD_WEBSOCKET__PING_INTERVAL=30s.
Logs: RUST_LOG=herald=debug.";

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herald: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut path: Option<PathBuf> = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-c" | "--config" => path = Some(args.next().context("--config needs a file path")?.into()),
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            "-V" | "--version" => {
                println!("herald {}", env!("CARGO_PKG_VERSION"));
                return Ok(());
            }
            other => anyhow::bail!("unknown argument {other:?}\n\n{USAGE}"),
        }
    }
    let mut config = Config::load(path.as_deref(), std::env::vars())?;
    let demo = fill_ephemeral_secrets(&mut config);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let mut server = Server::bind(config.clone()).await?;
        let addr = server.local_addr();
        tracing::info!(%addr, bus = ?config.bus.kind, membership = ?config.auth.membership, "herald listening");
        if let Some(demo) = demo {
            let page = DemoPage {
                secret: demo.secret.clone(),
                user: UserId::new_v4(),
                chat: ChatId::new_v4(),
                api_key: demo.api_key.clone(),
                token_ttl: Duration::from_secs(24 * 3600),
            };
            print_demo(&config, addr, &demo, &page);
            server = server.with_demo_page(page);
        }
        let shutdown = CancellationToken::new();
        tokio::spawn(signal(shutdown.clone()));
        server.run(shutdown).await;
        Ok(())
    })
}

/// What the embedded default generated for this run.
struct Demo {
    secret: String,
    /// False when the secret came from the config: then it is not printed.
    secret_generated: bool,
    api_key: String,
}

/// Without a configured key, generates a JWT secret and an API key for this
/// run. `Config::validate` has already refused this on non-loopback addresses.
fn fill_ephemeral_secrets(config: &mut Config) -> Option<Demo> {
    let no_jwt_key = config.auth.jwt_secret.is_none() && config.auth.jwt_public_key_file.is_none();
    if !no_jwt_key && !config.api.keys.is_empty() {
        return None;
    }
    if no_jwt_key {
        config.auth.jwt_secret = Some(random_hex(32));
    }
    if config.api.keys.is_empty() {
        config.api.keys.push(random_hex(24));
    }
    tracing::warn!("no auth.jwt_secret / api.keys configured: using random ones for this run only");
    let secret = config.auth.jwt_secret.clone()?;
    Some(Demo { secret, secret_generated: no_jwt_key, api_key: config.api.keys[0].clone() })
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    if getrandom::fill(&mut buf).is_err() {
        // ok: without OS randomness there is no safe secret to make.
        panic!("the OS random number generator is unavailable");
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn print_demo(config: &Config, addr: std::net::SocketAddr, demo: &Demo, page: &DemoPage) {
    let (user, chat) = (page.user, page.chat);
    let token = herald::auth::mint_hs256(&demo.secret, user, &[chat], Duration::from_secs(24 * 3600));
    let membership_note = match config.auth.membership {
        Membership::Token => "the token's `chats` claim lets it subscribe to the demo chat",
        Membership::Events => "membership: events -- publish chat.member_added for this user first",
        Membership::Open => "membership: open -- any chat may be subscribed",
    };
    println!(
        r#"{page_line}
Herald is running on the embedded default (in-memory bus, secrets for this run only).

  JWT secret (HS256): {secret}
  API key:            {key}
  demo user:          {user}
  demo chat:          {chat}
  demo token (24 h):  {token}
  ({membership_note})

Connect (websocat):
  websocat 'ws://{addr}/ws?token={token}'
  then send: {{"type":"subscribe","chat_id":"{chat}"}}

Or in a browser console:
  const ws = new WebSocket('ws://{addr}/ws?token={token}');
  ws.onmessage = (e) => console.log(e.data);
  ws.onopen = () => ws.send(JSON.stringify({{type: 'subscribe', chat_id: '{chat}'}}));

Publish a message:
  curl -sS -X POST http://{addr}/api/events \
    -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \
    -d '{{"type":"message.sent","chat_id":"{chat}","data":{{"id":"{msg}","content":"Hello!","sender_id":"{user}","created_at":"2026-01-15T10:30:00Z"}}}}'
"#,
        secret = if demo.secret_generated { demo.secret.as_str() } else { "(configured)" },
        key = demo.api_key,
        page_line = if config.ui.enabled == Some(false) {
            String::new()
        } else {
            format!("\n  Demo page: open http://{addr}/ in a browser\n")
        },
        msg = uuid::Uuid::new_v4(),
    );
}

async fn signal(shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
    tracing::info!("shutdown signal received");
    shutdown.cancel();
}
