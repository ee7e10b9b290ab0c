//! docs/PROTOCOL.md is the user's copy of the contract: every error code,
//! close code, config key and metric the code has must appear in it, so a
//! new one cannot ship undocumented.
//!
//! Each reference exists once. The configuration: `examples/herald.yaml`
//! (what `herald init` writes) has every key with its default; PROTOCOL.md
//! section 8 lists the stable names; both must name exactly the keys
//! [`Config`] parses. The metrics: PROTOCOL.md section 7, checked against
//! what `/metrics` renders. The README links to them and copies neither.

use std::collections::BTreeSet;
use std::path::Path;

use herald::config::Config;
use herald::error::{CloseCode, Ended, ErrorCode};
use herald::metrics::{Gauges, Metrics};
use herald::process::Process;
use serde_json::Value;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const DOC: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/PROTOCOL.md"));
const EXAMPLE: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/herald.yaml"));
const README: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"));

/// Keys whose value in the example is a placeholder for a secret, not the
/// default (`herald init` replaces them with fresh random values).
const CREDENTIALS: [&str; 2] = ["auth.jwt_secret", "api.keys"];

/// The text of PROTOCOL.md's section that starts with `## {number}.`, up to
/// the next `## ` heading.
fn section(number: &str) -> Result<&'static str, String> {
    let heading = format!("\n## {number}. ");
    let start = DOC.find(&heading).ok_or(format!("PROTOCOL.md has no section {number}"))? + 1;
    let rest = &DOC[start..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |i| i + 3);
    Ok(&rest[..end])
}

/// Every `section.key` of the config Herald parses, with its default
/// (`null` for an optional key that is unset by default).
fn config_keys() -> Result<Vec<(String, Value)>, Box<dyn std::error::Error>> {
    let Value::Object(sections) = serde_json::to_value(Config::default())? else {
        return Err("the config is not a mapping".into());
    };
    let mut keys = Vec::new();
    for (section, body) in sections {
        let Value::Object(body) = body else {
            return Err(format!("config section {section} is not a mapping").into());
        };
        keys.extend(body.into_iter().map(|(key, value)| (format!("{section}.{key}"), value)));
    }
    Ok(keys)
}

fn is_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// The keys a config file written like `examples/herald.yaml` shows, in
/// order, each as (`section.key`, set): `  key: value` is set, `  # key: value`
/// is shown commented out (unset). Any other line indented by two spaces
/// must be a comment.
fn shown_keys(yaml: &str) -> Result<Vec<(String, bool)>, String> {
    let mut section: Option<&str> = None;
    let mut keys = Vec::new();
    for line in yaml.lines() {
        let trimmed = line.trim_start();
        if trimmed.is_empty() {
            continue;
        }
        if !line.starts_with(' ') {
            if trimmed.starts_with('#') {
                continue;
            }
            let name = line.split_once(':').map(|(name, _)| name).filter(|n| is_name(n));
            section = Some(name.ok_or(format!("not a section: {line:?}"))?);
            continue;
        }
        let Some(rest) = line.strip_prefix("  ").filter(|r| !r.starts_with(' ')) else { continue };
        let (set, rest) = match rest.strip_prefix("# ") {
            Some(commented) => (false, commented),
            None if rest.starts_with('#') => continue,
            None => (true, rest),
        };
        let name = match rest.split_once(": ").or_else(|| rest.strip_suffix(':').map(|n| (n, ""))) {
            Some((name, _)) if is_name(name) => name,
            // Prose in a comment, not a key.
            _ if !set => continue,
            _ => return Err(format!("not a key: {line:?}")),
        };
        let section = section.ok_or(format!("a key before any section: {line:?}"))?;
        keys.push((format!("{section}.{name}"), set));
    }
    Ok(keys)
}

/// Checks a config file written like `examples/herald.yaml` (`name` in
/// messages): it shows every key of [`Config`] exactly once and no other,
/// every key with a default is set, to that default (but the credentials),
/// and only keys unset by default are commented out.
fn assert_every_key_with_its_default(name: &str, yaml: &str) -> TestResult {
    let defaults = config_keys()?;
    let shown = shown_keys(yaml).map_err(|e| format!("{name}: {e}"))?;
    let mut seen = BTreeSet::new();
    for (key, _) in &shown {
        assert!(seen.insert(key.as_str()), "{name} shows {key} twice");
        assert!(defaults.iter().any(|(k, _)| k == key), "{name} shows {key}, which Herald does not read");
    }
    for (key, default) in &defaults {
        let set = shown.iter().find(|(k, _)| k == key).map(|(_, set)| *set);
        let Some(set) = set else { panic!("{name} does not show {key} (not even commented out)") };
        assert!(
            set || default.is_null(),
            "{name} comments out {key}, whose default is {default}: show it set to its default"
        );
    }
    // Strictly parsed (an unknown key is an error) and validated; with the
    // credentials put back, every value must be the default.
    let parsed = serde_json::to_value(Config::parse(yaml, Path::new(name), [])?)?;
    for (key, default) in &defaults {
        let (section, field) = key.split_once('.').ok_or("a key path")?;
        let value = &parsed[section][field];
        if CREDENTIALS.contains(&key.as_str()) {
            assert!(!value.is_null() && value != default, "{name} sets no placeholder for {key}");
            continue;
        }
        assert_eq!(value, default, "{name} sets {key} to {value}, but its default is {default}");
    }
    Ok(())
}

#[test]
fn every_error_code_and_close_code_is_documented() {
    for code in ErrorCode::ALL {
        assert!(
            DOC.contains(&format!("`{}`", code.as_str())),
            "error code {} is not in docs/PROTOCOL.md",
            code.as_str()
        );
    }
    for code in CloseCode::ALL {
        assert!(
            DOC.contains(&format!("| {} |", code.code())),
            "close code {} has no row in docs/PROTOCOL.md",
            code.code()
        );
    }
    for label in Ended::LABELS {
        assert!(DOC.contains(&format!("`{label}`")), "close label {label} is not in docs/PROTOCOL.md");
    }
}

#[test]
fn the_example_config_shows_every_key_with_its_default() -> TestResult {
    assert_every_key_with_its_default("examples/herald.yaml", EXAMPLE)
}

#[test]
fn herald_init_writes_every_key_with_its_default() -> TestResult {
    let written = herald::cmd::init::starter_config(Path::new("herald.yaml"))?;
    assert_every_key_with_its_default("the config `herald init` writes", &written)
}

#[test]
fn protocol_section_8_names_exactly_the_config_keys() -> TestResult {
    let text = section("8")?;
    let table = text.split_once("| section | keys |").ok_or("section 8 has no `| section | keys |` table")?.1;
    let mut named = Vec::new();
    for row in table.lines().skip(2).take_while(|l| l.starts_with('|')) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let [_, section, keys, _] = cells[..] else { return Err(format!("not a table row: {row:?}").into()) };
        let section = section.split('`').nth(1).ok_or(format!("no section name in {row:?}"))?;
        // Backquoted names; what follows a name in parentheses is not one.
        named.extend(keys.split('`').skip(1).step_by(2).map(|key| format!("{section}.{key}")));
    }
    let config: Vec<String> = config_keys()?.into_iter().map(|(key, _)| key).collect();
    let named_set: BTreeSet<&String> = named.iter().collect();
    assert_eq!(named_set.len(), named.len(), "section 8 names a key twice: {named:?}");
    for key in &config {
        assert!(named_set.contains(key), "config key {key} is not named in PROTOCOL.md section 8");
    }
    for key in &named {
        assert!(config.contains(key), "PROTOCOL.md section 8 names {key}, which Herald does not read");
    }
    // The reference it points to for defaults.
    assert!(text.contains("(../examples/herald.yaml)"), "section 8 does not link examples/herald.yaml");
    Ok(())
}

/// Whether `doc` has a table row for the metric `name` (with or without labels).
fn has_row(doc: &str, name: &str) -> bool {
    doc.contains(&format!("| `{name}`")) || doc.contains(&format!("| `{name}{{"))
}

#[test]
fn every_metric_is_documented_in_section_7() -> TestResult {
    let doc = section("7")?;
    // With process facts, as on Linux, so their rows are required everywhere.
    let gauges = Gauges { process: Some(Process::default()), ..Gauges::default() };
    let text = Metrics::default().render(&gauges, true);
    let names: Vec<&str> =
        text.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next()).collect();
    assert!(names.len() > 10, "{text}");
    // Herald's own are prefixed; the standard process metrics keep their names.
    let process: Vec<&&str> = names.iter().filter(|n| n.starts_with("process_")).collect();
    assert_eq!(process.len(), 4, "{text}");
    for name in names {
        assert!(
            name.starts_with("herald_") || name.starts_with("process_"),
            "metric {name} is neither herald_ nor a standard process_ metric"
        );
        assert!(has_row(doc, name), "metric {name} has no row in PROTOCOL.md section 7");
    }
    Ok(())
}

/// GitHub's anchor for a Markdown heading.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

#[test]
fn the_readme_links_the_references_and_copies_neither() -> TestResult {
    assert!(!README.contains("```yaml"), "README.md carries a YAML block: link examples/herald.yaml instead");
    assert!(README.contains("(examples/herald.yaml)"), "README.md does not link examples/herald.yaml");

    // Links into the contract land on a heading.
    let anchors: Vec<String> = DOC
        .lines()
        .filter_map(|l| l.strip_prefix("## ").or_else(|| l.strip_prefix("### ")))
        .map(anchor)
        .collect();
    for link in README.split("(docs/PROTOCOL.md#").skip(1) {
        let target = link.split(')').next().ok_or("an unclosed link")?;
        assert!(
            anchors.iter().any(|a| a == target),
            "README.md links docs/PROTOCOL.md#{target}, not a heading"
        );
    }
    assert!(README.contains("(docs/PROTOCOL.md#7-operations)"), "README.md does not link the metrics");
    assert!(
        README.contains("(docs/PROTOCOL.md#8-configuration-names-stable)"),
        "README.md does not link the configuration names"
    );

    // Metrics the README names (in its advice) are ones section 7 documents,
    // and it names only a few: the list is section 7's.
    let section_7 = section("7")?;
    let mut mentioned = BTreeSet::new();
    for piece in README.split("herald_").skip(1) {
        let name: String =
            piece.chars().take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_').collect();
        assert!(
            has_row(section_7, &format!("herald_{name}")),
            "README.md names herald_{name}, which PROTOCOL.md section 7 does not document"
        );
        mentioned.insert(name);
    }
    let documented = section_7.matches("| `herald_").count();
    assert!(
        mentioned.len() * 2 < documented,
        "README.md names {} of {documented} metrics: link PROTOCOL.md section 7 instead of listing them",
        mentioned.len()
    );
    Ok(())
}
