//! `herald init`: writes a complete, commented starter config with a fresh
//! random JWT secret and API key. The body is `examples/herald.yaml`, so the
//! two cannot drift apart.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::demo::{random_hex, RandomError};

/// The documented example; its placeholders are replaced by fresh secrets.
const EXAMPLE: &str = include_str!("../../examples/herald.yaml");
const SECRET_PLACEHOLDER: &str = "change-me-to-a-long-random-secret";
const KEY_PLACEHOLDER: &str = "change-me-publisher-key-0001";

/// Why no starter config was written.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("{path} already exists: not overwriting it (choose another path or remove it)")]
    Exists { path: PathBuf },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Random(#[from] RandomError),
}

/// The starter config's text, for a file at `path`.
pub fn starter_config(path: &Path) -> Result<String, RandomError> {
    let path = path.display();
    // The example's own header (how to use the example) gives way to one
    // about this file; the rest documents every key.
    let body = EXAMPLE.split_once("\n\n").map_or(EXAMPLE, |(_, body)| body);
    let body =
        body.replacen(SECRET_PLACEHOLDER, &random_hex(32)?, 1).replacen(KEY_PLACEHOLDER, &random_hex(24)?, 1);
    Ok(format!(
        "# Herald configuration written by `herald init`: every key Herald reads, with
# its default. auth.jwt_secret and api.keys below are fresh random values:
# keep this file private.
#
#   herald --config {path}                          serve
#   herald check-config --config {path}             validate; print, secrets masked
#   herald token --config {path} --sub <uuid>       mint a token for a user
#
# Every key can be overridden by HERALD_<SECTION>__<KEY>, for example
# HERALD_SERVER__LISTEN=127.0.0.1:9000 or HERALD_API__KEYS=k1,k2 (lists as
# comma-separated values). Durations use humantime: 500ms, 30s, 2m.

{body}"
    ))
}

/// Writes the starter config to `path`, which must not exist yet. On Unix
/// the file is readable by its owner only: it holds the secrets.
pub fn write(path: &Path) -> Result<(), InitError> {
    let text = starter_config(path)?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::AlreadyExists => InitError::Exists { path: path.to_path_buf() },
        _ => InitError::Write { path: path.to_path_buf(), source },
    })?;
    file.write_all(text.as_bytes()).map_err(|source| InitError::Write { path: path.to_path_buf(), source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    #[test]
    fn the_example_has_one_of_each_placeholder_after_its_header() -> TestResult {
        let (_, body) = EXAMPLE.split_once("\n\n").ok_or("the example's header ends with a blank line")?;
        assert_eq!(body.matches(SECRET_PLACEHOLDER).count(), 1);
        assert_eq!(body.matches(KEY_PLACEHOLDER).count(), 1);
        Ok(())
    }

    #[test]
    fn the_starter_config_loads_with_fresh_secrets() -> TestResult {
        let path = std::env::temp_dir().join(format!("herald-init-{}.yaml", uuid::Uuid::new_v4()));
        write(&path)?;
        let loaded = Config::load(Some(&path), []);
        let again = write(&path);
        let text = std::fs::read_to_string(&path)?;
        #[cfg(unix)]
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path)?.permissions());
        std::fs::remove_file(&path)?;

        let config = loaded?;
        let secret = config.auth.jwt_secret.ok_or("a secret")?;
        assert_eq!(secret.len(), 64);
        assert_eq!(config.api.keys.len(), 1);
        assert!(!text.contains("change-me"), "{text}");
        assert!(text.contains(&format!("herald --config {}", path.display())), "{text}");
        assert!(matches!(again, Err(InitError::Exists { .. })), "an existing file is never overwritten");
        #[cfg(unix)]
        assert_eq!(mode & 0o777, 0o600);
        Ok(())
    }

    #[test]
    fn two_starter_configs_differ() -> TestResult {
        let path = Path::new("herald.yaml");
        assert_ne!(starter_config(path)?, starter_config(path)?);
        Ok(())
    }
}
