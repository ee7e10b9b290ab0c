#!/usr/bin/env bash
# Builds every cargo-fuzz target in fuzz/ and runs each for a bounded time.
#
#   scripts/fuzz.sh [seconds-per-target]     (default 60)
#   CMIN=1 scripts/fuzz.sh 240               (then minimise each corpus)
#   QUIET=1 scripts/fuzz.sh 20               (summaries only, as CI runs it)
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz
# --locked`). Each run starts from, and adds to, fuzz/corpus/<target>/. A
# crash stops the script; libFuzzer saves the input under
# fuzz/artifacts/<target>/. Reproduce with `cargo +nightly fuzz run <target>
# <file>`, fix it, then keep the input in fuzz/regressions/<target>/ so the
# stable suite (tests/fuzz_corpus.rs) replays it from then on.
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-60}"
case "$secs" in
    '' | *[!0-9]*) echo "usage: $0 [seconds-per-target]" >&2; exit 2 ;;
esac

cargo +nightly fuzz build
for target in $(cargo +nightly fuzz list); do
    echo "== fuzz $target for ${secs}s"
    # -timeout: one input taking 10 s is a hang worth reporting.
    args=(-max_total_time="$secs" -timeout=10 -rss_limit_mb=2048)
    if [ "${QUIET:-0}" = 1 ]; then
        # For CI: libFuzzer's progress lines are thousands; keep its
        # summary, and the whole tail when it fails.
        log="$(mktemp)"
        if ! cargo +nightly fuzz run "$target" -- "${args[@]}" >"$log" 2>&1; then
            tail -n 80 "$log"
            exit 1
        fi
        grep -E '^Done [0-9]+ runs' "$log" || tail -n 3 "$log"
        rm -f "$log"
    else
        cargo +nightly fuzz run "$target" -- "${args[@]}"
    fi
    if [ "${CMIN:-0}" = 1 ]; then
        # Edge coverage only (no hit counts): keeps the committed corpus
        # small. Minimising drops or renames the hand-named seeds; restore
        # those from git (`git checkout -- fuzz/corpus`) before committing.
        cargo +nightly fuzz cmin "$target" -- -use_counters=0
    fi
done
