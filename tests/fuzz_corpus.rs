//! Replays the saved fuzz corpus (`fuzz/corpus/<target>/`) and every crash
//! input kept as a regression (`fuzz/regressions/<target>/`) through the same
//! harness the libFuzzer targets run, so the stable suite checks the fuzzers'
//! invariants on every input they found interesting, without nightly.

#[path = "../fuzz/harness.rs"]
mod harness;

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The input files of one target in `kind` (`corpus` or `regressions`).
fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = fuzz_dir().join(kind).join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.unwrap_or_else(|e| panic!("{}: {e}", dir.display())).path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs every input of `target`; a failure names the file to reproduce with
/// `cargo +nightly fuzz run <target> <file>`.
fn replay(target: &str) {
    let (_, run) = harness::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .unwrap_or_else(|| panic!("no harness for {target}"));
    let corpus = inputs("corpus", target);
    assert!(!corpus.is_empty(), "fuzz/corpus/{target}/ has no inputs");
    for file in corpus.iter().chain(&inputs("regressions", target)) {
        let data = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        if std::panic::catch_unwind(|| run(&data)).is_err() {
            panic!("{target}: invariant broken by {}", file.display());
        }
    }
}

#[test]
fn every_corpus_directory_has_a_target() {
    for kind in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(fuzz_dir().join(kind)) else { continue };
        for entry in entries {
            let name = entry.unwrap_or_else(|e| panic!("fuzz/{kind}: {e}")).file_name();
            let name = name.to_string_lossy();
            assert!(
                harness::TARGETS.iter().any(|(t, _)| *t == name),
                "fuzz/{kind}/{name} matches no target in fuzz/harness.rs"
            );
        }
    }
}

#[test]
fn frame_decode() {
    replay("frame_decode");
}

#[test]
fn reassemble() {
    replay("reassemble");
}

#[test]
fn inflate() {
    replay("inflate");
}

#[test]
fn client_command() {
    replay("client_command");
}

#[test]
fn ingress_events() {
    replay("ingress_events");
}

#[test]
fn config() {
    replay("config");
}

#[test]
fn token() {
    replay("token");
}
