#!/usr/bin/env bash
# Starts a release Herald on loopback, runs `loadgen soak` against it with the server's pid, and
# stops it. Usage: scripts/soak.sh <loadgen soak args...>
# Env: SERVER_BIN, LOADGEN_BIN (default target/release/{herald,loadgen}), PORT (default 18081).
set -euo pipefail
cd "$(dirname "$0")/.."
SERVER_BIN=${SERVER_BIN:-target/release/herald}
LOADGEN_BIN=${LOADGEN_BIN:-target/release/loadgen}
PORT=${PORT:-18081}
export LOADGEN_JWT_SECRET=soak-secret-0123456789abcdef LOADGEN_API_KEY=soak-key-0123456789abcdef
HERALD_AUTH__JWT_SECRET=$LOADGEN_JWT_SECRET HERALD_API__KEYS=$LOADGEN_API_KEY HERALD_AUTH__MEMBERSHIP=open \
    HERALD_SERVER__LISTEN=127.0.0.1:$PORT RUST_LOG=warn "$SERVER_BIN" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 0.1; done
"$LOADGEN_BIN" soak "$@" --url "http://127.0.0.1:$PORT" --server-pid "$pid"
