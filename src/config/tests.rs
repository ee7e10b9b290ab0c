//! The configuration loader's tests: YAML, environment overrides and the
//! validation messages that name each bad key.

use super::*;

type TestResult = Result<(), Box<dyn std::error::Error>>;
use std::io::Write;

fn load_yaml(yaml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let mut file = tempfile();
    if let Err(source) = file.1.write_all(yaml.as_bytes()) {
        return Err(ConfigError::Read { path: file.0, source });
    }
    let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
    let result = Config::load(Some(&file.0), env);
    let _ = std::fs::remove_file(&file.0);
    result
}

fn tempfile() -> (PathBuf, std::fs::File) {
    let path = std::env::temp_dir().join(format!("herald-config-{}.yaml", uuid::Uuid::new_v4()));
    match std::fs::File::create(&path) {
        Ok(file) => (path, file),
        Err(e) => panic!("cannot create {}: {e}", path.display()),
    }
}

#[test]
fn defaults_are_the_documented_ones() -> TestResult {
    let c = Config::load(None, [])?;
    assert_eq!(c.server.listen, "127.0.0.1:8080".parse()?);
    assert_eq!(c.websocket.read_buffer_size, 1024);
    assert_eq!(c.websocket.write_buffer_size, 1024);
    assert_eq!(c.websocket.ping_interval, Duration::from_secs(30));
    assert_eq!(c.websocket.pong_wait, Duration::from_secs(60));
    assert_eq!(c.websocket.write_wait, Duration::from_secs(10));
    assert_eq!(c.websocket.max_message_size, 65536);
    assert_eq!(c.rooms.buffer, 8);
    assert_eq!(c.rooms.history_size, 100);
    assert_eq!(c.rooms.history_ttl, Duration::from_secs(300));
    assert_eq!(c.bus.kind, BusKind::Memory);
    assert_eq!(c.auth.membership, Membership::Token);
    assert_eq!((c.log.format, c.log.level.as_str()), (LogFormat::Text, "info"));
    assert_eq!(c.ui.enabled, None);
    Ok(())
}

#[test]
fn reads_every_section_and_env_overrides_win() -> TestResult {
    let yaml = r#"
server:
  listen: 127.0.0.1:9000
auth:
  jwt_secret: "0123456789abcdef0123"
  membership: events
  allowed_origins: ["https://app.example"]
api:
  keys: ["key-0123456789abcdef"]
websocket:
  ping_interval: 5s
  pong_wait: 15s
rooms:
  buffer: 64
bus:
  kind: redis
  redis_url: redis://127.0.0.1:7000
log:
  format: json
  level: warn,herald=debug
ui:
  enabled: false
"#;
    let c = load_yaml(
        yaml,
        &[
            ("HERALD_WEBSOCKET__PING_INTERVAL", "2s"),
            ("HERALD_WEBSOCKET__COMPRESSION_CONTEXT", "false"),
            ("HERALD_API__KEYS", "a-0123456789abcdef,b-0123456789abcdef"),
            ("HERALD_LOG__LEVEL", "debug"),
        ],
    )?;
    assert_eq!(c.server.listen.port(), 9000);
    assert_eq!(c.auth.membership, Membership::Events);
    assert_eq!(c.auth.allowed_origins, vec!["https://app.example"]);
    assert_eq!(c.websocket.ping_interval, Duration::from_secs(2));
    assert_eq!(c.websocket.pong_wait, Duration::from_secs(15));
    assert!(!c.websocket.compression_context && Config::default().websocket.compression_context);
    assert_eq!(c.rooms.buffer, 64);
    assert_eq!(c.bus.kind, BusKind::Redis);
    assert_eq!(c.api.keys.len(), 2);
    assert_eq!((c.log.format, c.log.level.as_str()), (LogFormat::Json, "debug"));
    assert_eq!(c.ui.enabled, Some(false));
    Ok(())
}

/// Fuzzing found: tracing-subscriber misreads a directive with leading
/// whitespace, and panics when that is followed by non-ASCII text.
#[test]
fn log_directives_are_trimmed_before_tracing_reads_them() -> TestResult {
    let c = load_yaml("log:\n  level: \"info, herald=debug\"\n", &[])?;
    assert_eq!(c.log.level, "info,herald=debug");
    let c = load_yaml("", &[("HERALD_LOG__LEVEL", "\tx\u{e9}=debug ,")])?;
    assert_eq!(c.log.level, "x\u{e9}=debug");
    Ok(())
}

#[test]
fn a_section_with_every_key_commented_out_means_defaults() -> TestResult {
    let c = load_yaml("ui:\n  # enabled: true\nrooms:\n", &[])?;
    assert_eq!(c.ui.enabled, None);
    assert_eq!(c.rooms.history_size, 100);
    Ok(())
}

#[test]
fn orchestrator_variables_are_ignored_and_numeric_secrets_stay_text() -> TestResult {
    let c = load_yaml(
        "",
        &[
            ("HERALD_PORT", "tcp://10.0.0.1:8080"),
            ("HERALD_SERVICE_HOST", "10.0.0.1"),
            ("HERALD_AUTH__JWT_SECRET", "12345678901234567890"),
            ("HERALD_API__KEYS", "12345678901234567890"),
        ],
    )?;
    assert_eq!(c.auth.jwt_secret.as_deref(), Some("12345678901234567890"));
    assert_eq!(c.api.keys, vec!["12345678901234567890"]);
    Ok(())
}

#[test]
fn a_mistyped_credential_is_named_but_not_repeated() {
    for (yaml, key) in [
        ("auth:\n  jwt_secret: 1234567890123456789\n", "auth.jwt_secret"),
        ("auth:\n  jwt_secret: [1234567890123456789]\n", "auth.jwt_secret"),
        ("api:\n  keys: 1234567890123456789\n", "api.keys"),
        ("api:\n  keys: [abcdefghijklmnopq, 1234567890123456789]\n", "api.keys"),
        ("api:\n  keys: {k: 1234567890123456789}\n", "api.keys"),
    ] {
        let message = match load_yaml(yaml, &[]) {
            Ok(_) => panic!("loaded {yaml:?}"),
            Err(e) => e.to_string(),
        };
        assert!(message.contains(key), "{message}");
        assert!(!message.contains("1234567890123456789"), "the value repeated: {message}");
    }
}

#[test]
fn bad_input_names_the_key() {
    let err = |yaml: &str, env: &[(&str, &str)]| load_yaml(yaml, env).unwrap_err().to_string();
    assert!(
        err("websocket:\n  ping_intervall: 5s\n", &[]).contains("websocket"),
        "{}",
        err("websocket:\n  ping_intervall: 5s\n", &[])
    );
    assert!(err("websocket:\n  ping_intervall: 5s\n", &[]).contains("ping_intervall"));
    assert!(err("websocket:\n  pong_wait: soon\n", &[]).contains("websocket.pong_wait"));
    assert!(err("rooms:\n  buffer: -3\n", &[]).contains("rooms.buffer"));
    assert!(err("rooms:\n  buffer: 0\n", &[]).contains("rooms.buffer"));
    assert!(err("server:\n  max_body_bytes: 2147483648\n", &[]).contains("server.max_body_bytes"));
    assert!(load_yaml("server:\n  max_body_bytes: 1073741824\n", &[]).is_ok());
    assert!(err("rooms:\n  history_size: 1000000\n", &[]).contains("rooms.history_size"));
    assert!(err("api:\n  overload_latency: 500us\n", &[]).contains("api.overload_latency"));
    assert!(err("", &[("HERALD_API__OVERLOAD_LATENCY", "1h")]).contains("api.overload_latency"));
    assert!(err("websocket:\n  ping_interval: 1000years\n", &[]).contains("websocket.ping_interval"));
    assert!(err("server:\n  shutdown_grace: 400days\n", &[]).contains("server.shutdown_grace"));
    assert!(err("auth:\n  leeway: 2days\n", &[]).contains("auth.leeway"));
    assert!(err("rooms:\n  history_ttl: 0s\n", &[]).contains("rooms.history_ttl"));
    assert!(err("rooms:\n  history_bytes: 10\n", &[]).contains("rooms.history_bytes"));
    assert!(err("bogus: 1\n", &[]).contains("bogus"));
    assert!(err("", &[("HERALD_WEBSOCKET__MAX_MESSAGE_SIZE", "big")]).contains("websocket.max_message_size"));
    assert!(err("", &[("HERALD_SERVER__LISTN", "x")]).contains("listn"));
    assert!(err("", &[("HERALD_A__B__C", "x")]).contains("HERALD_A__B__C"));
    assert!(err("auth:\n  membership: everyone\n", &[]).contains("auth.membership"));
    assert!(err("server:\n  listen: 0.0.0.0:8080\n", &[]).contains("server.listen"));
    assert!(err("server:\n  internal_listen: 127.0.0.1:8080\n", &[]).contains("server.internal_listen"));
    assert!(err("server:\n  internal_listen: 0.0.0.0:9090\n", &[]).contains("server.internal_listen"));
    assert!(err("server:\n  internal_listen: nine\n", &[]).contains("server.internal_listen"));
    assert!(err(": : :\n", &[]).contains("YAML"));
    assert!(err("log:\n  format: xml\n", &[]).contains("log.format"));
    assert!(err("log:\n  level: \"herald=loud\"\n", &[]).contains("log.level"));
    assert!(err("", &[("HERALD_LOG__LEVEL", "=")]).contains("log.level"));
}

#[test]
fn the_internal_listener_is_optional_and_read_from_the_environment() -> TestResult {
    assert_eq!(Config::load(None, [])?.server.internal_listen, None);
    let c = load_yaml("", &[("HERALD_SERVER__INTERNAL_LISTEN", "127.0.0.1:9090")])?;
    assert_eq!(c.server.internal_listen, Some("127.0.0.1:9090".parse()?));
    Ok(())
}
