//! The `herald` binary: parse the command line, load the config, start
//! tracing, and hand over to the library: serve until Ctrl-C or SIGTERM, or
//! run one operator command and print its result.

use std::io::{IsTerminal as _, Read as _};
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use herald::cmd::{self, check_config, init, token, Cli, Command};
use herald::config::{Config, LogConfig, LogFormat};
use herald::demo::{self, Prepared};
use herald::server::Server;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    match run(Cli::parse().into_command()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("herald: {}", cmd::describe(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve(args) => serve(load(args.config.as_deref())?, args.config.is_some())?,
        Command::Token(args) => {
            let config = load(args.config.config.as_deref())?;
            println!("{}", token::mint(&config.auth, args.sub, &args.chats, args.ttl)?);
        }
        Command::CheckToken(args) => {
            let config = load(args.config.config.as_deref())?;
            let jwt = if args.token == "-" {
                let mut s = String::new();
                std::io::stdin().read_to_string(&mut s).context("reading the token from stdin")?;
                s
            } else {
                args.token
            };
            let verdict = token::check(&config.auth, &jwt)?;
            println!("{verdict}");
            if !matches!(verdict, token::Verdict::Accepted(_)) {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::CheckConfig(args) => {
            let config = load(args.config.config.as_deref())?;
            print!("{}", check_config::check(&config)?);
            if args.connect {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                for line in runtime.block_on(check_config::connect(&config))?.lines() {
                    println!("# {line}");
                }
            }
        }
        Command::Init(args) => {
            init::write(&args.path)?;
            let path = args.path.display();
            println!("wrote {path} with a fresh JWT secret and API key\n  start:  herald --config {path}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The one loader, with the process environment's `HERALD_*` overrides.
fn load(path: Option<&Path>) -> anyhow::Result<Config> {
    Ok(Config::load(path, std::env::vars())?)
}

/// `config_file`: whether `--config` named a file. Without one, and
/// without credentials from the environment, the node runs the demo.
fn serve(mut config: Config, config_file: bool) -> anyhow::Result<()> {
    init_tracing(&config.log)?;
    let prepared = demo::prepare(&mut config, config_file)?;
    match &prepared {
        Prepared::Demo(_) => {
            tracing::warn!(
                "no config and no credentials: running the demo with random ones for this run only"
            )
        }
        // Names only: a log line never carries a credential.
        Prepared::Generated(generated) => tracing::warn!(
            generated = generated.keys(),
            "not configured: using a random value for this run only (no demo on a configured node)"
        ),
        Prepared::Configured => {}
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let mut server = Server::bind(config.clone()).await?;
        let (addr, api) = (server.local_addr(), server.api_addr());
        tracing::info!(%addr, bus = ?config.bus.kind, membership = ?config.auth.membership, "herald listening");
        if let Some(internal) = server.internal_addr() {
            tracing::info!(%internal, "internal listener: /api/*, /metrics, /healthz and /readyz are served here only");
        }
        match &prepared {
            Prepared::Demo(demo) => {
                if config.ui.enabled != Some(false) {
                    println!("\n  Demo page: open http://{addr}/ in a browser");
                    server = server.with_demo_page(demo.page());
                }
                println!("{}", demo.banner(&config, addr, api));
            }
            Prepared::Generated(generated) => println!("{}", generated.banner(api)),
            Prepared::Configured => {}
        }
        let shutdown = CancellationToken::new();
        tokio::spawn(signal(shutdown.clone()));
        server.run(shutdown).await;
        Ok(())
    })
}

/// Logs go to stderr, coloured only when it is a terminal (never into a
/// file or a collector). `RUST_LOG`, when set, wins over `log.level`.
fn init_tracing(log: &LogConfig) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.is_empty() => {
            // Trimmed as `log.level` is: the same parser bug applies.
            let directives = herald::config::log_filter(&directives);
            EnvFilter::builder().parse(&directives).context("RUST_LOG is not a valid log filter")?
        }
        _ => EnvFilter::builder().parse(&log.level).context("log.level")?,
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match log.format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Ok(())
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

/// jemalloc: slabs of same-size objects (no per-allocation header, no
/// padding around tokio's 128-byte-aligned task cells), so an idle
/// connection costs less than under glibc's malloc.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read once at start (a C string it looks up by name):
/// a background thread gives pages freed by a burst of connections back
/// within about a second, instead of only when the process next allocates
/// a lot.
#[expect(unsafe_code, reason = "exporting a symbol jemalloc reads; the one unsafe item of the crate")]
#[export_name = "_rjem_malloc_conf"]
static MALLOC_CONF: &[u8; 60] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";
