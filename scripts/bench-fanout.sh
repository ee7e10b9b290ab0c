#!/usr/bin/env bash
# Starts a release Herald on loopback, runs one loadgen scenario against it,
# stops it. Usage: scripts/bench-fanout.sh <fanout|idle|recovery|soak> <loadgen args...>
# Env: SERVER_BIN, LOADGEN_BIN (default target/release/{herald,loadgen}), PORT (default 18080);
# HERALD_* settings pass through to the node. Exits with loadgen's status.
set -euo pipefail
cd "$(dirname "$0")/.."
SERVER_BIN=${SERVER_BIN:-target/release/herald}
LOADGEN_BIN=${LOADGEN_BIN:-target/release/loadgen}
PORT=${PORT:-18080}
export LOADGEN_JWT_SECRET=bench-secret-0123456789abcdef LOADGEN_API_KEY=bench-key-0123456789abcdef
HERALD_AUTH__JWT_SECRET=$LOADGEN_JWT_SECRET HERALD_API__KEYS=$LOADGEN_API_KEY HERALD_AUTH__MEMBERSHIP=open \
    HERALD_SERVER__LISTEN=127.0.0.1:$PORT RUST_LOG=warn "$SERVER_BIN" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 0.1; done
status=0
"$LOADGEN_BIN" "$@" --url "http://127.0.0.1:$PORT" --server-pid "$pid" || status=$?
curl -s "http://127.0.0.1:$PORT/metrics" | grep -E '^herald_(frames_out|write_syscalls|slow_consumers|catchups|recoveries)' >&2 || true
exit "$status"
