//! docs/PROTOCOL.md is the user's copy of the contract: every error code,
//! close code, config key and metric the code has must appear in it, so a
//! new one cannot ship undocumented.

use herald::config::Config;
use herald::error::{CloseCode, Ended, ErrorCode};
use herald::metrics::{Gauges, Metrics};

const DOC: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/PROTOCOL.md"));

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
fn every_config_key_is_documented_in_its_section() -> Result<(), Box<dyn std::error::Error>> {
    let tree = serde_json::to_value(Config::default())?;
    let yaml = DOC.split("```yaml").nth(1).ok_or("no yaml block")?.split("```").next().ok_or("unclosed")?;
    let serde_json::Value::Object(sections) = tree else { return Err("config is not a mapping".into()) };
    for (section, keys) in sections {
        let start =
            yaml.find(&format!("\n{section}:")).ok_or(format!("section {section} is not documented"))?;
        // The section's lines: up to the next top-level key.
        let body: String = yaml[start + 1..]
            .lines()
            .skip(1)
            .take_while(|l| l.starts_with(' ') || l.is_empty())
            .collect::<Vec<_>>()
            .join("\n");
        let serde_json::Value::Object(keys) = keys else { continue };
        for key in keys.keys() {
            assert!(body.contains(&format!("  {key}:")), "config key {section}.{key} is not documented");
        }
    }
    Ok(())
}

#[test]
fn every_metric_is_documented() {
    let text = Metrics::default().render(&Gauges::default(), true);
    let names: Vec<&str> =
        text.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next()).collect();
    assert!(names.len() > 10, "{text}");
    for name in names {
        assert!(DOC.contains(&format!("`{name}")), "metric {name} is not in docs/PROTOCOL.md");
    }
}
