//! Entry point of `loadgen`: parse the CLI, build the runtime, run the chosen mode, print the summary.
//!
//! # Layout
//! - `cli`: flags and subcommands.
//! - `fanout`, `idle`, `recovery`, `soak`: the four runs; `streams`: the healthy connection
//!   classes and their accounting (recovery, soak); `abuse`: soak's abusive clients.
//! - `pool`: opening many subscribed connections; `ws`: one client connection; `frame`: the
//!   WebSocket codec (no IO); `msg`: cheap field extraction from server frames.
//! - `publish`: the HTTP publishers; `http`: a minimal keep-alive HTTP/1.1 client.
//! - `stats`: shared counters and seq checking; `report`: summaries; `progress`: the stderr bar.
//! - `scrape`: the server's /metrics samples; `procfs`: CPU/RSS/limits from /proc; `ident`: room
//!   ids and tokens; `target`: URL + loopback rule.

mod abuse;
mod cli;
mod deflate;
mod fanout;
mod frame;
mod http;
mod ident;
mod idle;
mod msg;
mod pool;
mod procfs;
mod progress;
mod publish;
mod recovery;
mod report;
mod scrape;
mod soak;
mod stats;
mod streams;
mod target;
mod ws;

use anyhow::Context as _;
use clap::Parser as _;

use crate::cli::{Cli, Command};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let common = match &cli.command {
        Command::Fanout(a) => &a.common,
        Command::Idle(a) => &a.common,
        Command::Recovery(a) => &a.common,
        Command::Soak(a) => &a.common,
    };
    let threads = common.threads;
    deflate::enable(common.compress);
    if let Command::Fanout(a) = &cli.command {
        deflate::ask_standalone(a.inflate_every > 1);
    }
    let runtime = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(usize::from(threads)).enable_all().build()
    }
    .context("building the tokio runtime")?;
    runtime.block_on(async {
        match cli.command {
            Command::Fanout(args) => {
                let json = args.common.json;
                let report = fanout::run(args).await?;
                print(json, &report, report.human())?;
                if report.published.events_accepted == 0 {
                    anyhow::bail!("the server accepted no event: nothing was measured");
                }
                Ok(())
            }
            Command::Idle(args) => {
                let json = args.common.json;
                let report = idle::run(args).await?;
                print(json, &report, report.human())?;
                if let Some((received, expected)) = report.warm_shortfall() {
                    anyhow::bail!(
                        "--warm: only {received} of {expected} room events reached their connections"
                    );
                }
                Ok(())
            }
            Command::Recovery(args) => {
                let json = args.common.json;
                let report = recovery::run(args).await?;
                print(json, &report, report.human())?;
                if report.streams.published.events_accepted == 0 {
                    anyhow::bail!("the server accepted no event: nothing was measured");
                }
                Ok(())
            }
            Command::Soak(args) => {
                let json = args.common.json;
                let report = soak::run(args).await?;
                print(json, &report, report.human())?;
                if report.streams.published.events_accepted == 0 {
                    anyhow::bail!("the server accepted no event: nothing was measured");
                }
                if !report.verdict.pass {
                    anyhow::bail!("soak failed: {}", report.verdict.reasons.join("; "));
                }
                Ok(())
            }
        }
    })
}

/// Prints the summary as JSON (one line) or as text.
fn print(json: bool, report: &impl serde::Serialize, text: String) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(report).context("encoding the summary")?);
    } else {
        print!("{text}");
    }
    Ok(())
}
