//! The `herald` command line: what each subcommand takes (clap), and the
//! operator commands themselves, which print nothing: `main` prints what
//! they return.
//!
//! - [`token`]: mint a token, and check one exactly as `/ws` would.
//! - [`check_config`]: the effective config with secrets masked.
//! - [`init`]: a commented starter config with fresh secrets.

pub mod check_config;
pub mod init;
pub mod token;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::protocol::{ChatId, UserId};

const AFTER_HELP: &str = "\
With no subcommand, Herald serves (as `herald serve`). With no --config it runs
on its embedded default: 127.0.0.1:8080, the in-memory bus, and a random JWT
secret and API key printed for this run.

Every config key can be set with HERALD_<SECTION>__<KEY>, e.g.
HERALD_AUTH__JWT_SECRET or HERALD_WEBSOCKET__PING_INTERVAL=30s; the
subcommands apply them too. Logs go to stderr: log.level / log.format in the
config, or RUST_LOG=herald=debug (which wins).";

#[derive(Debug, Parser)]
#[command(
    name = "herald",
    version,
    about = "Herald: realtime WebSocket fan-out gateway",
    after_help = AFTER_HELP,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// Serving options, for `herald` without a subcommand.
    #[command(flatten)]
    pub serve: ConfigArgs,
    #[command(subcommand)]
    pub command: Option<Command>,
}

impl Cli {
    /// The subcommand to run; plain `herald` serves.
    pub fn into_command(self) -> Command {
        self.command.unwrap_or(Command::Serve(self.serve))
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve WebSockets and the publish API (what plain `herald` does).
    Serve(ConfigArgs),
    /// Mint an HS256 token signed with the configured auth.jwt_secret.
    Token(TokenArgs),
    /// Verify a token exactly as /ws would; print its claims or why it is refused.
    CheckToken(CheckTokenArgs),
    /// Load and validate a config (file + HERALD_* env) and print it, secrets masked.
    ///
    /// Binds no port and touches no Redis unless --connect. Exits non-zero naming the bad key.
    CheckConfig(CheckConfigArgs),
    /// Write a complete, commented starter config with fresh random secrets.
    Init(InitArgs),
}

#[derive(Debug, Clone, Default, Args)]
pub struct ConfigArgs {
    /// YAML config file; without it, the embedded default plus HERALD_* variables.
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// The user the token is for (`sub`, a UUID).
    #[arg(long, value_name = "UUID")]
    pub sub: UserId,
    /// A chat the user may subscribe to (`chats`); repeat for several.
    #[arg(long = "chat", value_name = "UUID")]
    pub chats: Vec<ChatId>,
    /// How long the token is valid: 30m, 24h, 7d.
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct CheckTokenArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// The token (JWT); `-` reads it from standard input.
    pub token: String,
}

#[derive(Debug, Clone, Args)]
pub struct CheckConfigArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Also check that the configured Redis answers (bus.kind: redis).
    #[arg(long)]
    pub connect: bool,
}

#[derive(Debug, Clone, Args)]
pub struct InitArgs {
    /// Where to write the config; an existing file is never overwritten.
    #[arg(default_value = "herald.yaml")]
    pub path: PathBuf,
}

/// An error and its causes on one line, each cause printed once: errors
/// such as "cannot listen on ...: {source}" already include their source's
/// text, which a plain `{:#}` chain would print a second time.
pub fn describe(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    #[test]
    fn plain_herald_serves_and_subcommands_parse() -> TestResult {
        let cli = Cli::try_parse_from(["herald", "--config", "a.yaml"])?;
        assert!(
            matches!(cli.into_command(), Command::Serve(ConfigArgs { config: Some(p) }) if p == Path::new("a.yaml"))
        );
        assert!(matches!(
            Cli::try_parse_from(["herald"])?.into_command(),
            Command::Serve(ConfigArgs { config: None })
        ));
        assert!(matches!(
            Cli::try_parse_from(["herald", "serve", "-c", "b.yaml"])?.into_command(),
            Command::Serve(_)
        ));

        let user = UserId::from_u128(1);
        let (a, b) = (ChatId::from_u128(2), ChatId::from_u128(3));
        let (user_s, a_s, b_s) = (user.to_string(), a.to_string(), b.to_string());
        let argv = [
            "herald", "token", "--config", "c.yaml", "--sub", &user_s, "--chat", &a_s, "--chat", &b_s,
            "--ttl", "90m",
        ];
        match Cli::try_parse_from(argv)?.into_command() {
            Command::Token(t) => {
                assert_eq!((t.sub, t.chats, t.ttl), (user, vec![a, b], Duration::from_secs(5400)));
                assert_eq!(t.config.config, Some(PathBuf::from("c.yaml")));
            }
            other => panic!("parsed as {other:?}"),
        }
        match Cli::try_parse_from(["herald", "token", "--sub", &user.to_string()])?.into_command() {
            Command::Token(t) => assert_eq!((t.ttl, t.chats.len()), (Duration::from_secs(24 * 3600), 0)),
            other => panic!("parsed as {other:?}"),
        }
        match Cli::try_parse_from(["herald", "init"])?.into_command() {
            Command::Init(i) => assert_eq!(i.path, PathBuf::from("herald.yaml")),
            other => panic!("parsed as {other:?}"),
        }
        assert!(matches!(
            Cli::try_parse_from(["herald", "check-token", "x.y.z"])?.into_command(),
            Command::CheckToken(CheckTokenArgs { token, .. }) if token == "x.y.z"
        ));
        Ok(())
    }

    #[test]
    fn bad_arguments_are_refused() {
        assert!(Cli::try_parse_from(["herald", "token", "--sub", "bob"]).is_err(), "sub must be a UUID");
        assert!(Cli::try_parse_from(["herald", "token"]).is_err(), "sub is required");
        let ttl = ["herald", "token", "--sub", "00000000-0000-0000-0000-000000000001", "--ttl", "soon"];
        assert!(Cli::try_parse_from(ttl).is_err());
        assert!(Cli::try_parse_from(["herald", "check-token"]).is_err(), "the token is required");
        assert!(Cli::try_parse_from(["herald", "--bogus"]).is_err());
    }

    #[test]
    fn describe_prints_each_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("cannot listen on 127.0.0.1:1 (server.listen): {source}")]
        struct Includes {
            source: std::io::Error,
        }
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Wraps(#[source] std::io::Error);

        let os = || std::io::Error::new(std::io::ErrorKind::AddrInUse, "Address already in use");
        let text = describe(&Includes { source: os() });
        assert_eq!(text, "cannot listen on 127.0.0.1:1 (server.listen): Address already in use");
        assert_eq!(describe(&Wraps(os())), "outer: Address already in use");
    }
}
