//! Herald's one typed configuration: YAML file (PROTOCOL.md section 8 names),
//! `HERALD_*` environment overrides, defaults, and validation that names the
//! offending key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use bus::{mask_url_password, BusConfig, BusKind};
pub use presence::PresenceConfig;

/// A configuration that cannot be used; the message names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid YAML: {message}")]
    Yaml { path: PathBuf, message: String },
    #[error("config key `{key}`: {message}")]
    Key { key: String, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
}

fn key_error(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Key { key: key.to_string(), message: message.into() }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub auth: AuthConfig,
    pub api: ApiConfig,
    pub events: EventsConfig,
    pub websocket: WebSocketConfig,
    pub rooms: RoomsConfig,
    pub bus: BusConfig,
    pub log: LogConfig,
    pub ui: UiConfig,
    pub presence: PresenceConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on. Without a configured secret only loopback is allowed.
    pub listen: SocketAddr,
    /// The operator's port: when set, `/api/*`, `/metrics`, `/healthz` and
    /// `/readyz` are served here only, and `listen` keeps the browser's
    /// routes (`/ws`, `/client.js`, `/`, `/demo/token`). Unset: one port.
    pub internal_listen: Option<SocketAddr>,
    /// Connections held at once; upgrades beyond it get 503.
    pub max_connections: usize,
    /// How long shutdown waits for connections to drain after sending 1001.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Largest `POST /api/events` body; larger ones get 413.
    pub max_body_bytes: usize,
    /// HTTP connections held at once before they upgrade or finish (plain
    /// requests, handshakes in progress); more are closed at accept.
    pub max_http_connections: usize,
    /// How long a client may take to send its request headers.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            internal_listen: None,
            max_connections: 19_500,
            shutdown_grace: Duration::from_secs(10),
            max_body_bytes: 1 << 20,
            max_http_connections: 1024,
            header_read_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// HS256 shared secret.
    pub jwt_secret: Option<String>,
    /// RS256 / ES256 public key (PEM).
    pub jwt_public_key_file: Option<PathBuf>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub membership: Membership,
    /// Allowed `Origin` values for upgrades; empty allows any.
    #[serde(deserialize_with = "string_or_list")]
    pub allowed_origins: Vec<String>,
    /// Clock skew tolerated when checking `exp` and `nbf`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    /// How long revocations (`POST /api/users/{id}/revoke`) and removals
    /// (`chat.member_removed`, for tokens issued before it) are remembered:
    /// set it to the longest lifetime of a token the issuer hands out.
    #[serde(with = "humantime_serde")]
    pub max_token_ttl: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            jwt_secret: None,
            jwt_public_key_file: None,
            issuer: None,
            audience: None,
            membership: Membership::default(),
            allowed_origins: Vec::new(),
            leeway: Duration::ZERO,
            max_token_ttl: Duration::from_secs(86_400),
        }
    }
}

/// Who may subscribe to which chat (`auth.membership`), as
/// [`crate::membership::allowed`] decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Membership {
    /// The `chats` claim of the connection's JWT.
    #[default]
    Token,
    /// What `chat.member_added` / `chat.member_removed` events taught us.
    Events,
    /// Every authenticated user may subscribe to every chat.
    Open,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Bearer keys accepted by `POST /api/events`.
    #[serde(deserialize_with = "string_or_list")]
    pub keys: Vec<String>,
    /// `true`: a batch with an event of unknown type (neither known nor
    /// passed through) is refused with 400 naming it, and none of it is
    /// accepted; `false`: such events are counted and ignored.
    pub reject_unknown: bool,
    /// Admission by delivery latency (CoDel's sojourn idea): while most of
    /// the node's socket writes send room frames that waited longer than
    /// this, for a whole interval (100 ms), publishes wait, then get 429
    /// ([`crate::node::Node::admit`]). 0: off, the default (BENCHMARKS.md:
    /// 50 ms kept overload p99 near 2x uWS's; off because one client
    /// catching up over a slow link could trip it on a quiet node).
    #[serde(with = "humantime_serde")]
    pub overload_latency: Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig { keys: Vec::new(), reject_unknown: false, overload_latency: Duration::ZERO }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Globs on `type` (`*`: any run of characters) of custom events
    /// delivered as published (`protocol::event::Passthrough`).
    #[serde(deserialize_with = "string_or_list")]
    pub passthrough: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketConfig {
    /// Bytes taken from the socket per read, clamped to 512..8192: reads go
    /// into a stack buffer that exists only during the read.
    pub read_buffer_size: usize,
    /// Accepted for compatibility with the contract's defaults; it has no
    /// effect (writes gather pre-encoded frames into a per-thread buffer of
    /// 64 KiB, shared by every connection of that thread).
    pub write_buffer_size: usize,
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub pong_wait: Duration,
    #[serde(with = "humantime_serde")]
    pub write_wait: Duration,
    pub max_message_size: usize,
    /// Rooms one connection may be subscribed to at once.
    pub max_subscriptions: usize,
    /// Per-user frames a connection may have queued before it is a slow consumer.
    pub user_queue: usize,
    /// Agree to permessage-deflate when a client offers it.
    pub compression: bool,
    /// Room frames with a smaller payload go out uncompressed.
    pub compression_threshold: usize,
    /// Keep the compression context (room frames compressed after the
    /// room's previous one) unless the client asks `server_no_context_takeover`.
    pub compression_context: bool,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        WebSocketConfig {
            read_buffer_size: 1024,
            write_buffer_size: 1024,
            ping_interval: Duration::from_secs(30),
            pong_wait: Duration::from_secs(60),
            write_wait: Duration::from_secs(10),
            max_message_size: 65536,
            max_subscriptions: 256,
            user_queue: 256,
            compression: true,
            compression_threshold: 128,
            compression_context: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoomsConfig {
    /// Frames a room's live ring holds: the fast path. A reader that lags
    /// it continues from the room's history (see ARCHITECTURE.md for why
    /// the default is small).
    pub buffer: usize,
    /// Recent events each room keeps for recovery and catch-up.
    pub history_size: usize,
    /// How long an event stays in history.
    #[serde(with = "humantime_serde")]
    pub history_ttl: Duration,
    /// Frame bytes all rooms' histories may hold together (extension).
    pub history_bytes: usize,
}

impl Default for RoomsConfig {
    fn default() -> Self {
        RoomsConfig {
            buffer: 8,
            history_size: 100,
            history_ttl: Duration::from_secs(300),
            history_bytes: 64 << 20,
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines; coloured only when the output is a terminal.
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, target, message, fields)
    /// for log collectors.
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `RUST_LOG`-style filter such as `info` or `info,herald=debug`;
    /// `RUST_LOG`, when set, wins over it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: LogFormat::Text, level: "info".into() }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UiConfig {
    /// The demo page at `/`. Unset: on exactly when Herald runs on the true
    /// embedded default (no config file, no JWT key or API key from the
    /// environment: generated secrets, loopback only); `true` serves the page,
    /// but with demo credentials only on the embedded default (elsewhere it
    /// asks for a token); `false` never.
    pub enabled: Option<bool>,
}

/// Lists may be given as YAML lists or as one comma-separated string (env).
fn string_or_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => {
            s.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
        }
        OneOrMany::Many(v) => v,
    })
}

impl Config {
    /// Loads the file (if any), applies `HERALD_*` variables from `env`, and validates.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let text = match path {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?,
            None => String::new(),
        };
        Config::parse(&text, path.unwrap_or(Path::new("(none)")), env)
    }

    /// Parses YAML text (`path` names it in errors), applies `HERALD_*`
    /// variables from `env`, and validates.
    pub fn parse(
        text: &str,
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let value: Value = if text.trim().is_empty() {
            Value::Object(Map::new())
        } else {
            serde_saphyr::from_str(text)
                .map_err(|e| ConfigError::Yaml { path: path.to_path_buf(), message: e.to_string() })?
        };
        let mut tree = match value {
            Value::Object(mut sections) => {
                // A section whose keys are all commented out parses as null:
                // it means "all defaults", not an error.
                for section in sections.values_mut() {
                    if section.is_null() {
                        *section = Value::Object(Map::new());
                    }
                }
                Value::Object(sections)
            }
            Value::Null => Value::Object(Map::new()),
            _ => return Err(key_error("(root)", "the config file must be a mapping of sections")),
        };
        let mut vars: Vec<(String, String)> = env.into_iter().filter(|(k, _)| is_override(k)).collect();
        vars.sort();
        for (var, raw) in vars {
            apply_env(&mut tree, &var, &raw)?;
        }
        let mut config: Config = serde_path_to_error::deserialize(tree).map_err(|e| {
            let path = e.path().to_string();
            let key = if path == "." { "(root)".to_string() } else { path };
            match credential_type_error(&key) {
                Some(message) => key_error(&key, message),
                None => key_error(&key, e.into_inner().to_string()),
            }
        })?;
        config.log.level = log_filter(&config.log.level);
        config.validate()?;
        Ok(config)
    }

    /// Checks values serde cannot: ranges and combinations.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let ws = &self.websocket;
        let positive = [
            ("websocket.max_message_size", ws.max_message_size),
            ("websocket.read_buffer_size", ws.read_buffer_size),
            ("websocket.write_buffer_size", ws.write_buffer_size),
            ("websocket.max_subscriptions", ws.max_subscriptions),
            ("websocket.user_queue", ws.user_queue),
            ("rooms.buffer", self.rooms.buffer),
            ("rooms.history_size", self.rooms.history_size),
            ("server.max_connections", self.server.max_connections),
            ("server.max_http_connections", self.server.max_http_connections),
            ("server.max_body_bytes", self.server.max_body_bytes),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(key_error(key, "must be greater than 0"));
            }
        }
        // A publish body becomes frames every reader queues: a connection's
        // write queue counts in 4 bytes, so no frame may come near 4 GiB.
        if self.server.max_body_bytes > 1 << 30 {
            return Err(key_error("server.max_body_bytes", "must be at most 1 GiB (1073741824)"));
        }
        // Bounded above too: a huge duration would overflow the clock.
        const DAY: Duration = Duration::from_secs(86_400);
        for (key, value, max) in [
            ("websocket.ping_interval", ws.ping_interval, DAY),
            ("websocket.pong_wait", ws.pong_wait, DAY),
            ("websocket.write_wait", ws.write_wait, DAY),
            ("server.header_read_timeout", self.server.header_read_timeout, DAY),
            ("server.shutdown_grace", self.server.shutdown_grace, DAY),
        ] {
            if value.is_zero() {
                return Err(key_error(key, "must be longer than 0s"));
            }
            if value > max {
                return Err(key_error(key, "must be at most 1 day"));
            }
        }
        if self.auth.leeway > DAY {
            return Err(key_error("auth.leeway", "must be at most 1 day"));
        }
        if self.auth.max_token_ttl < Duration::from_secs(60) || self.auth.max_token_ttl > 30 * DAY {
            return Err(key_error("auth.max_token_ttl", "must be between 1m and 30 days"));
        }
        let latency = self.api.overload_latency;
        if !latency.is_zero() && (latency < Duration::from_millis(1) || latency > Duration::from_secs(10)) {
            return Err(key_error("api.overload_latency", "must be 0s (off) or between 1ms and 10s"));
        }
        let rooms = &self.rooms;
        for (key, value, max) in
            [("rooms.buffer", rooms.buffer, 1 << 16), ("rooms.history_size", rooms.history_size, 100_000)]
        {
            if value > max {
                return Err(key_error(key, format!("must be at most {max}")));
            }
        }
        if rooms.history_ttl.is_zero() || rooms.history_ttl > Duration::from_secs(7 * 86_400) {
            return Err(key_error("rooms.history_ttl", "must be longer than 0s and at most 7 days"));
        }
        if rooms.history_bytes < 1 << 16 {
            return Err(key_error("rooms.history_bytes", "must be at least 65536"));
        }
        let presence = &self.presence;
        if presence.leave_delay > Duration::from_secs(3600) {
            return Err(key_error("presence.leave_delay", "must be at most 1h"));
        }
        if presence.typing_interval.is_zero() || presence.typing_interval > Duration::from_secs(3600) {
            return Err(key_error("presence.typing_interval", "must be longer than 0s and at most 1h"));
        }
        if presence.max_list == 0 || presence.max_list > 100_000 {
            return Err(key_error("presence.max_list", "must be between 1 and 100000"));
        }
        if presence.node_ttl < Duration::from_secs(1) || presence.node_ttl > DAY {
            return Err(key_error("presence.node_ttl", "must be between 1s and 1 day"));
        }
        if ws.pong_wait <= ws.ping_interval {
            return Err(key_error("websocket.pong_wait", "must be longer than websocket.ping_interval"));
        }
        if self.auth.jwt_secret.is_some() && self.auth.jwt_public_key_file.is_some() {
            return Err(key_error(
                "auth.jwt_public_key_file",
                "set either auth.jwt_secret or this, not both",
            ));
        }
        if self.auth.jwt_secret.as_deref().is_some_and(|s| s.len() < 16) {
            return Err(key_error("auth.jwt_secret", "must be at least 16 bytes"));
        }
        if let Err(e) = crate::protocol::event::Passthrough::compile(&self.events.passthrough) {
            return Err(key_error("events.passthrough", e.to_string()));
        }
        if self.api.keys.iter().any(|k| k.len() < 16) {
            return Err(key_error("api.keys", "every key must be at least 16 bytes"));
        }
        let has_secret = self.auth.jwt_secret.is_some() || self.auth.jwt_public_key_file.is_some();
        if !self.server.listen.ip().is_loopback() && (!has_secret || self.api.keys.is_empty()) {
            return Err(key_error(
                "server.listen",
                format!(
                    "{} is not a loopback address: configure auth.jwt_secret (or auth.jwt_public_key_file) \
                     and api.keys first",
                    self.server.listen
                ),
            ));
        }
        if let Some(internal) = self.server.internal_listen {
            // Port 0 twice is two different ports; any other equal pair is one.
            if internal == self.server.listen && internal.port() != 0 {
                return Err(key_error(
                    "server.internal_listen",
                    format!("{internal} is server.listen too: give the internal listener its own port"),
                ));
            }
            if !internal.ip().is_loopback() && (!has_secret || self.api.keys.is_empty()) {
                return Err(key_error(
                    "server.internal_listen",
                    format!(
                        "{internal} is not a loopback address: configure auth.jwt_secret (or \
                         auth.jwt_public_key_file) and api.keys first"
                    ),
                ));
            }
        }
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(log_filter(&self.log.level)) {
            return Err(key_error(
                "log.level",
                format!("not a log filter such as `info` or `info,herald=debug`: {e}"),
            ));
        }
        self.bus.validate()
    }
}

/// `log.level` with each comma-separated directive trimmed and empty ones
/// dropped. tracing-subscriber 0.3.23 slices a directive at offsets taken
/// from its trimmed form, so leading whitespace shifts every cut:
/// `info, herald=debug` is refused, `info, herald` silently targets
/// ` herald`, and a cut through a non-ASCII character panics (found by
/// fuzzing).
pub fn log_filter(level: &str) -> String {
    level.split(',').map(str::trim).filter(|d| !d.is_empty()).collect::<Vec<_>>().join(",")
}

/// The message for a value of the wrong type at a credential's key, instead
/// of serde's, which quotes the value it could not read (a secret written
/// as a bare YAML number): a configured secret or key must not reach stderr
/// or a log, even mistyped.
fn credential_type_error(key: &str) -> Option<&'static str> {
    if key == "auth.jwt_secret" {
        Some("must be text (quote it in YAML); its value is not repeated here")
    } else if key == "api.keys" || key.starts_with("api.keys[") {
        Some("must be a list of text keys or one comma-separated text (quote each key in YAML); its value is not repeated here")
    } else {
        None
    }
}

/// Only `HERALD_<SECTION>__<KEY>` names are Herald's: an orchestrator injects
/// others (`HERALD_PORT`, `HERALD_SERVICE_HOST` for a service named herald),
/// and those are ignored (contract section 8).
fn is_override(var: &str) -> bool {
    let Some(rest) = var.strip_prefix("HERALD_") else { return false };
    if rest.contains("__") {
        return true;
    }
    tracing::debug!(var, "environment variable is not HERALD_<SECTION>__<KEY>; ignored");
    false
}

/// Keys whose values are text even when they look like numbers (a numeric
/// secret from the environment must stay a string).
const TEXT_KEYS: &[&str] = &[
    "server.listen",
    "server.internal_listen",
    "auth.jwt_secret",
    "auth.jwt_public_key_file",
    "auth.issuer",
    "auth.audience",
    "auth.allowed_origins",
    "api.keys",
    "events.passthrough",
    "bus.redis_url",
    "bus.redis_cluster_urls",
    "bus.redis_sentinel_urls",
    "bus.redis_sentinel_master",
    "bus.redis_tls_ca_file",
    "log.level",
];

/// Applies one `HERALD_SECTION__KEY=value` override to the config tree.
fn apply_env(tree: &mut Value, var: &str, raw: &str) -> Result<(), ConfigError> {
    let path: Vec<String> = var["HERALD_".len()..].split("__").map(|s| s.to_ascii_lowercase()).collect();
    if path.len() != 2 || path.iter().any(String::is_empty) {
        return Err(ConfigError::Env {
            var: var.into(),
            message: "expected HERALD_<SECTION>__<KEY>, e.g. HERALD_AUTH__JWT_SECRET".into(),
        });
    }
    // Values are read as YAML scalars so numbers stay numbers; anything that
    // does not parse as one is taken as a plain string.
    let text = TEXT_KEYS.contains(&format!("{}.{}", path[0], path[1]).as_str());
    let value = match serde_saphyr::from_str::<Value>(raw) {
        Ok(v @ (Value::Number(_) | Value::Bool(_))) if !text => v,
        _ => Value::String(raw.to_string()),
    };
    let Value::Object(root) = tree else { return Ok(()) };
    let section = root.entry(path[0].clone()).or_insert_with(|| Value::Object(Map::new()));
    match section {
        Value::Object(map) => {
            map.insert(path[1].clone(), value);
            Ok(())
        }
        _ => Err(key_error(&path[0], "must be a mapping")),
    }
}

mod bus;
mod presence;
#[cfg(test)]
mod tests;
