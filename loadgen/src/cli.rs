//! Command-line interface: the flags every run shares and the `fanout` and `idle` subcommands.

use std::net::IpAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Load generator for a Herald deployment you operate (loopback only unless --allow-remote).
#[derive(Debug, Parser)]
#[command(name = "loadgen", version, about, long_about = None)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Subscribe C connections to R rooms, publish message.sent events over HTTP and measure
    /// deliveries, publish->deliver latency, losses and duplicates.
    Fanout(FanoutArgs),
    /// Hold N subscribed connections open and measure connect rate and server memory per connection.
    Idle(IdleArgs),
}

/// Flags shared by every subcommand.
#[derive(Debug, Args)]
pub(crate) struct CommonArgs {
    /// Server base URL; the WebSocket URL is derived as ws://host:port/ws.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub(crate) url: String,
    /// HS256 secret used to mint connection tokens (the server's auth.jwt_secret).
    #[arg(long, env = "LOADGEN_JWT_SECRET", hide_env_values = true)]
    pub(crate) jwt_secret: String,
    /// Bearer key for POST /api/events (one of the server's api.keys).
    #[arg(long, env = "LOADGEN_API_KEY", hide_env_values = true)]
    pub(crate) api_key: Option<String>,
    /// Server process id: report its CPU (/proc/PID/stat) and RSS (/proc/PID/status).
    #[arg(long)]
    pub(crate) server_pid: Option<u32>,
    /// Print one JSON object with every figure on stdout (no progress bar).
    #[arg(long)]
    pub(crate) json: bool,
    /// Source IPs to bind client sockets to, round-robin (e.g. 127.0.0.1,127.0.0.2), so more
    /// connections fit than one address's ~28k ephemeral ports.
    #[arg(long, value_delimiter = ',')]
    pub(crate) source_addrs: Vec<IpAddr>,
    /// Allow a --url that is not a loopback address. Only load servers you operate.
    #[arg(long)]
    pub(crate) allow_remote: bool,
    /// Runtime worker threads; 1 = a current-thread runtime.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub(crate) threads: u16,
    /// Connections opened (handshake + subscribe) at the same time.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub(crate) connect_concurrency: u32,
    /// Give up on one connection's handshake + subscribe after this long.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub(crate) connect_timeout: Duration,
    /// Give up waiting for all connections after this long and run with those that made it.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub(crate) connect_deadline: Duration,
    /// Room group: room ids are deterministic per (group, index); processes with the same group
    /// share rooms.
    #[arg(long, default_value_t = 0)]
    pub(crate) room_group: u32,
}

#[derive(Debug, Args)]
pub(crate) struct FanoutArgs {
    #[command(flatten)]
    pub(crate) common: CommonArgs,
    /// WebSocket connections (each subscribes to one room, round-robin).
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) conns: u32,
    /// Rooms the connections and events are spread over.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) rooms: u32,
    /// More nodes of the same cluster (repeatable): connections and publishers are spread
    /// round-robin over --url and these, so events cross nodes (multi-node runs).
    #[arg(long = "also-url", value_name = "URL")]
    pub(crate) also_urls: Vec<String>,
    /// Events per second over all publishers; 0 = as fast as the server answers.
    #[arg(long, default_value_t = 0)]
    pub(crate) rate: u64,
    /// Events per POST (a JSON array when > 1).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub(crate) batch: u32,
    /// Publish requests outstanding at once (one keep-alive connection each).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1_000))]
    pub(crate) in_flight: u32,
    /// Measured window.
    #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
    pub(crate) duration: Duration,
    /// Publishing before the window starts (not measured).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub(crate) warmup: Duration,
    /// Time after publishing stops for the last deliveries to arrive.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub(crate) drain: Duration,
    /// Bytes of the `content` field of each message.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub(crate) content_bytes: u32,
}

#[derive(Debug, Args)]
pub(crate) struct IdleArgs {
    #[command(flatten)]
    pub(crate) common: CommonArgs,
    /// Connections to open and hold.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) conns: u32,
    /// Rooms the connections subscribe to, round-robin.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) rooms: u32,
    /// How long to hold the connections once all are subscribed.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub(crate) hold: Duration,
    /// At the end, send {"type":"ping"} on every connection and count the pongs.
    #[arg(long)]
    pub(crate) ping_check: bool,
}

/// Longest any single phase may be asked to last: every run ends by itself.
pub(crate) const MAX_PHASE: Duration = Duration::from_secs(3600);

impl CommonArgs {
    /// Rejects durations that would make a run unbounded in practice.
    pub(crate) fn check_durations(&self, extra: &[(&str, Duration)]) -> anyhow::Result<()> {
        let all =
            [("--connect-timeout", self.connect_timeout), ("--connect-deadline", self.connect_deadline)];
        for (name, d) in all.iter().chain(extra) {
            if *d > MAX_PHASE {
                anyhow::bail!("{name} {} is longer than the 1 h limit", humantime::format_duration(*d));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_a_fanout_run() {
        let cli = Cli::try_parse_from([
            "loadgen",
            "fanout",
            "--jwt-secret",
            "s",
            "--conns",
            "200",
            "--rooms",
            "4",
            "--duration",
            "3s",
            "--warmup",
            "1s",
            "--source-addrs",
            "127.0.0.1,127.0.0.2",
        ])
        .expect("parses");
        let Command::Fanout(f) = cli.command else { panic!("fanout") };
        assert_eq!(
            (f.conns, f.rooms, f.duration, f.warmup),
            (200, 4, Duration::from_secs(3), Duration::from_secs(1))
        );
        assert_eq!(f.common.source_addrs.len(), 2);
        assert_eq!(f.common.url, "http://127.0.0.1:8080");
    }
}
