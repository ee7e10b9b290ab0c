//! Command-line interface: the flags every run shares and the `fanout`, `idle`, `recovery` and
//! `soak` subcommands.

use std::net::IpAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

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
    /// Publish at a fixed rate while some connections drop and resume with `since` and others
    /// stall; check that every class sees every seq exactly once.
    Recovery(RecoveryArgs),
    /// Run for minutes with churn, stalls, room switches and abusive clients mixed in; sample the
    /// server's memory and tasks; check that healthy clients lose nothing and every abusive
    /// client is closed with the expected code.
    Soak(SoakArgs),
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
    /// Subscribe with "presence":true, so every connection receives its room's presence.join and
    /// presence.leave; in fanout and soak each connection also sends {"type":"typing"} in its room
    /// every --typing-every (the server's presence section must be enabled, as it is by default).
    #[arg(long)]
    pub(crate) presence: bool,
    /// With --presence, how often each connection sends typing (fanout, recovery, soak).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub(crate) typing_every: Duration,
    /// Offer permessage-deflate, as browsers and most client libraries do; compressed messages
    /// are inflated, and the report gives wire bytes per delivery either way.
    #[arg(long)]
    pub(crate) compress: bool,
}

impl CommonArgs {
    /// How often each connection sends typing, when it does.
    pub(crate) fn typing(&self) -> Option<Duration> {
        (self.presence && !self.typing_every.is_zero()).then_some(self.typing_every)
    }
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
    /// Nodes the publishers post to (repeatable), round-robin; the connections stay on --url and
    /// --also-url. E.g. readers on node A, publishers on node B: the overload of A's readers
    /// must push back publishers connected to B (shared through Redis). Default: the connections'
    /// nodes.
    #[arg(long = "publish-url", value_name = "URL")]
    pub(crate) publish_urls: Vec<String>,
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
    /// With --compress: inflate only one compressed delivery in N per connection, and count the
    /// others without reading them, so the load generator's inflation does not slow its reading
    /// (and the server's batching) on shared cores. Every delivery is still counted (lost =
    /// expected - received), and each sampled one is seq-checked against the count of those
    /// before it; latency and publish-window figures come from the sampled ones, and server CPU
    /// is divided by deliveries that arrived inside the window. Skipping messages needs frames
    /// that each inflate alone: with N > 1 clients ask for `server_no_context_takeover`, so the
    /// wire bytes are those of standalone frames, not of Herald's default context takeover.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000), conflicts_with = "presence")]
    pub(crate) inflate_every: u32,
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
    /// Rooms each connection subscribes to (distinct): connection i takes rooms i*n .. i*n+n-1
    /// (mod --rooms). With --rooms = conns * n every room has one subscriber.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub(crate) subs_per_conn: u32,
    /// Once every connection is subscribed, publish one message.sent event to every room they
    /// subscribed to (POST /api/events, needs --api-key) and wait up to 30 s until each
    /// connection has received one per room, before the "subscribed" RSS sample: the memory
    /// figures then describe rooms that carry an event. Exits non-zero when some did not arrive.
    #[arg(long)]
    pub(crate) warm: bool,
}

#[derive(Debug, Args)]
pub(crate) struct RecoveryArgs {
    #[command(flatten)]
    pub(crate) common: CommonArgs,
    #[command(flatten)]
    pub(crate) streams: StreamArgs,
    /// How long events are published (and connections dropped and stalled).
    #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
    pub(crate) duration: Duration,
}

/// The healthy classes and the fixed-rate publishing that `recovery` and `soak` share.
#[derive(Debug, Args)]
pub(crate) struct StreamArgs {
    /// WebSocket connections (each subscribes to one room, round-robin).
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) conns: u32,
    /// Rooms the connections and events are spread over.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) rooms: u32,
    /// Events per second over all publishers (a fixed rate is needed to stay within history).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) rate: u64,
    /// Events per POST (a JSON array when > 1).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub(crate) batch: u32,
    /// Publish requests outstanding at once (one keep-alive connection each).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1_000))]
    pub(crate) in_flight: u32,
    /// Time after publishing stops for resumed and stalled connections to catch up.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub(crate) drain: Duration,
    /// Bytes of the `content` field of each message. A resume replays what it missed, up to the
    /// server's rooms.history_size events of this size: 20000 makes a 100-event replay ~2 MB (the
    /// server's server.max_body_bytes, 1 MiB by default, bounds one POST).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub(crate) content_bytes: u32,
    /// More nodes of the same cluster (repeatable, e.g. two Herald nodes on one Redis): connections
    /// start on them by --layout, publishers alternate over --url and these, and every reconnect
    /// (a churner's, or after a server close) resumes on the next node round-robin, so
    /// recoveries run on a node other than the one the connection dropped from.
    #[arg(long = "also-url", value_name = "URL")]
    pub(crate) also_urls: Vec<String>,
    /// With --also-url, where connections first connect. by-room: every connection of room r
    /// starts on node r % nodes, so the other nodes hold a room only while a resumed or switching
    /// connection is there, and a resume there reads the missed range from the bus (Redis);
    /// spread: each room's connections alternate over the nodes.
    #[arg(long, value_enum, default_value_t = Layout::ByRoom)]
    pub(crate) layout: Layout,
    /// Fraction of connections that repeatedly drop their socket and resume with `since`.
    #[arg(long, default_value_t = 0.1, value_parser = fraction)]
    pub(crate) churn: f64,
    /// Mean time a churning connection stays connected (uniform in 0.5x .. 1.5x).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub(crate) churn_every: Duration,
    /// Longest time a churning connection stays away before reconnecting (uniform in 0 .. this).
    /// With a room's events/s x this near the server's rooms.history_size, resumes replay up to a
    /// whole history (e.g. 10 events/s per room and 8s: up to ~80 events).
    #[arg(long, default_value = "300ms", value_parser = humantime::parse_duration)]
    pub(crate) outage: Duration,
    /// Fraction of connections that stop reading for --stall-for, then resume.
    #[arg(long, default_value_t = 0.05, value_parser = fraction)]
    pub(crate) stall: f64,
    /// How long a stalled connection reads nothing.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub(crate) stall_for: Duration,
    /// Mean time a stalling connection reads between stalls (uniform in 0.5x .. 1.5x).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub(crate) stall_every: Duration,
    /// SO_RCVBUF of stalling connections, so the server's writes back up quickly.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1024..))]
    pub(crate) stall_rcvbuf: u32,
    /// The server's rooms.history_size: only labels why a resume was not recovered.
    #[arg(long, default_value_t = 100)]
    pub(crate) history_size: u64,
}

#[derive(Debug, Args)]
pub(crate) struct SoakArgs {
    #[command(flatten)]
    pub(crate) common: CommonArgs,
    #[command(flatten)]
    pub(crate) streams: StreamArgs,
    /// How long events are published and every class runs (at most 1h).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub(crate) duration: Duration,
    /// Fraction of connections that move between rooms: unsubscribe, then subscribe to the next
    /// room of their rotation, with `since` when they were there before.
    #[arg(long, default_value_t = 0.05, value_parser = fraction)]
    pub(crate) switch: f64,
    /// Mean time a switcher stays in a room (uniform in 0.5x .. 1.5x).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub(crate) switch_every: Duration,
    /// Rooms a switcher rotates through: its own and the next ones (keep their absence from each
    /// room within the server's history).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(2..=256))]
    pub(crate) switch_rooms: u32,
    /// Seconds between two samples of the server (RSS, tasks, connections, history bytes).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub(crate) sample_every: Duration,
    /// Clients that send a burst of pings and never read the pongs (expect close 1008).
    #[arg(long, default_value_t = 2)]
    pub(crate) ping_flooders: u32,
    /// Clients that send text that is not a command until the error budget runs out (1008).
    #[arg(long, default_value_t = 2)]
    pub(crate) garbage_senders: u32,
    /// Clients that send a text frame that is not UTF-8 (1007).
    #[arg(long, default_value_t = 2)]
    pub(crate) non_utf8_senders: u32,
    /// Clients in every room (up to 256) that read 16 bytes every 20 ms (4008 via write_wait).
    #[arg(long, default_value_t = 2)]
    pub(crate) tricklers: u32,
    /// Plain TCP connections to the HTTP port that send nothing (closed by the server).
    #[arg(long, default_value_t = 4)]
    pub(crate) idle_http: u32,
    /// Clients that send a handshake's headers a byte every 100 ms (cut off by
    /// server.header_read_timeout).
    #[arg(long, default_value_t = 2)]
    pub(crate) slowloris: u32,
    /// Pause of an abusive client between being closed and coming back.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub(crate) abuse_pause: Duration,
}

/// Where connections first connect when there are several nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Layout {
    /// Room r's connections all start on node r % nodes.
    ByRoom,
    /// Each room's connections alternate over the nodes.
    Spread,
}

impl Layout {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Layout::ByRoom => "by-room",
            Layout::Spread => "spread",
        }
    }
}

/// A number in 0..=1.
fn fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("{s:?} is not a fraction between 0 and 1")),
    }
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

    #[test]
    fn parses_an_idle_run_warm_or_not() {
        let parse = |extra: &[&str]| {
            let args = ["loadgen", "idle", "--jwt-secret", "s", "--conns", "20", "--rooms", "5"];
            let cli = Cli::try_parse_from(args.iter().chain(extra)).expect("parses");
            let Command::Idle(a) = cli.command else { panic!("idle") };
            a
        };
        let cold = parse(&[]);
        assert_eq!((cold.conns, cold.rooms, cold.warm, cold.ping_check), (20, 5, false, false));
        let warm = parse(&["--warm", "--ping-check"]);
        assert!(warm.warm && warm.ping_check);
    }

    #[test]
    fn parses_a_recovery_run_and_refuses_bad_fractions() {
        let cli = Cli::try_parse_from([
            "loadgen",
            "recovery",
            "--jwt-secret",
            "s",
            "--churn",
            "0.25",
            "--stall",
            "0",
            "--stall-for",
            "500ms",
        ])
        .expect("parses");
        let Command::Recovery(r) = cli.command else { panic!("recovery") };
        let s = &r.streams;
        assert_eq!((s.churn, s.stall, s.stall_for), (0.25, 0.0, Duration::from_millis(500)));
        assert_eq!((s.conns, s.rooms, s.rate), (2000, 20, 500));
        for bad in ["1.5", "-0.1", "x"] {
            assert!(
                Cli::try_parse_from(["loadgen", "recovery", "--jwt-secret", "s", "--churn", bad]).is_err()
            );
        }
        assert!(Cli::try_parse_from(["loadgen", "recovery", "--jwt-secret", "s", "--rate", "0"]).is_err());
    }

    #[test]
    fn parses_a_soak_run_with_the_recovery_flags() {
        let cli = Cli::try_parse_from([
            "loadgen",
            "soak",
            "--jwt-secret",
            "s",
            "--duration",
            "10m",
            "--rooms",
            "50",
            "--switch",
            "0.1",
            "--tricklers",
            "0",
            "--stall",
            "0.02",
        ])
        .expect("parses");
        let Command::Soak(a) = cli.command else { panic!("soak") };
        assert_eq!(
            (a.duration, a.streams.rooms, a.switch, a.tricklers),
            (Duration::from_secs(600), 50, 0.1, 0)
        );
        assert_eq!((a.streams.stall, a.sample_every, a.switch_rooms), (0.02, Duration::from_secs(10), 3));
        assert!(a.streams.also_urls.is_empty());
        assert_eq!(a.streams.layout, Layout::ByRoom);
    }

    #[test]
    fn parses_a_soak_over_several_nodes_with_big_events() {
        let cli = Cli::try_parse_from([
            "loadgen",
            "soak",
            "--jwt-secret",
            "s",
            "--url",
            "http://127.0.0.1:18081",
            "--also-url",
            "http://127.0.0.1:18082",
            "--also-url",
            "http://127.0.0.1:18083",
            "--layout",
            "spread",
            "--content-bytes",
            "20000",
            "--outage",
            "8s",
        ])
        .expect("parses");
        let Command::Soak(a) = cli.command else { panic!("soak") };
        assert_eq!(a.streams.also_urls, ["http://127.0.0.1:18082", "http://127.0.0.1:18083"]);
        assert_eq!((a.streams.layout, a.streams.content_bytes), (Layout::Spread, 20_000));
        assert_eq!(a.streams.outage, Duration::from_secs(8));
        let too_big = ["loadgen", "soak", "--jwt-secret", "s", "--content-bytes", "1000001"];
        assert!(Cli::try_parse_from(too_big).is_err());
    }
}
