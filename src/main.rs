//! The `herald` binary: parse the command line, load the config, start the
//! node, and stop it on Ctrl-C or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use herald::config::Config;
use herald::demo::Demo;
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
    let demo = Demo::prepare(&mut config)?;
    if demo.is_some() {
        tracing::warn!("no auth.jwt_secret / api.keys configured: using random ones for this run only");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let server = Server::bind(config.clone()).await?;
        let addr = server.local_addr();
        tracing::info!(%addr, bus = ?config.bus.kind, membership = ?config.auth.membership, "herald listening");
        if let Some(demo) = demo {
            println!("{}", demo.banner(&config, addr));
        }
        let shutdown = CancellationToken::new();
        tokio::spawn(signal(shutdown.clone()));
        server.run(shutdown).await;
        Ok(())
    })
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
