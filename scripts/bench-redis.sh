#!/usr/bin/env bash
# Two Herald nodes on one redis-server (all on loopback); loadgen spreads its
# connections and publishers over both (--also-url), so events cross nodes
# through Redis. Any mode that takes --also-url: fanout, recovery, soak. In
# recovery and soak every reconnect resumes on the other node, and with the
# default --layout by-room a room's connections start on one node, so resumes
# on the other read the missed range from Redis.
# REDIS_TLS=1: Redis listens on a TLS port only, with the default user off and
# an ACL user; the nodes connect with rediss://herald:<password>@ and
# bus.redis_tls_ca_file (a CA and server certificate made here with openssl),
# to measure what TLS + ACL cost against the same run in plain text.
# SPLIT=1 (fanout only): every connection on node A, every publisher on node B
# (--publish-url), so all of A's load arrives through Redis and A's overload must
# push back B's publishers (shared pressure, PROTOCOL.md section 5).
# CLUSTER=1: a Redis Cluster of three primaries (no replicas) on RPORT, RPORT+1, RPORT+2
# (cluster bus on +10000), the nodes on bus.kind redis_cluster; the summary adds each shard's
# SPUBLISH calls (its rooms' events only: sharded pub/sub).
# Each node's line "publish answered in X ms" is the mean POST /api/events time: without --rate
# the publishers wait for each answer, so it sets the event rate at saturation.
# Usage: scripts/bench-redis.sh <fanout|recovery|soak> <loadgen args...>
#   e.g. scripts/bench-redis.sh soak --duration 90s --conns 500 --rooms 10 --rate 100 \
#          --churn 0.2 --outage 8s --content-bytes 20000
# Env: SERVER_BIN, LOADGEN_BIN (default target/release/{herald,loadgen}),
# RPORT (16399), A (18081), B (18082), SPLIT; HERALD_* settings pass through to both nodes.
# Exits with loadgen's status (a failed soak verdict is non-zero).
set -euo pipefail
cd "$(dirname "$0")/.."
SERVER_BIN=${SERVER_BIN:-target/release/herald}
LOADGEN_BIN=${LOADGEN_BIN:-target/release/loadgen}
RPORT=${RPORT:-16399} A=${A:-18081} B=${B:-18082}
export LOADGEN_JWT_SECRET=bench-secret-0123456789abcdef LOADGEN_API_KEY=bench-key-0123456789abcdef
tmp=$(mktemp -d)
redis_args=(--bind 127.0.0.1 --save '' --appendonly no --daemonize no)
url=redis://127.0.0.1:$RPORT
cli=(redis-cli -p "$RPORT")
tls_env=()
if [ "${REDIS_TLS:-0}" = 1 ]; then
    pass=bench-redis-password-0123456789
    (
        cd "$tmp"
        openssl ecparam -name prime256v1 -genkey -noout -out ca.key
        openssl req -x509 -new -key ca.key -sha256 -days 2 -subj '/CN=bench CA' -out ca.pem
        openssl ecparam -name prime256v1 -genkey -noout -out server.key
        openssl req -new -key server.key -subj /CN=127.0.0.1 -out server.csr
        echo subjectAltName=IP:127.0.0.1 >ext.cnf
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -sha256 \
            -extfile ext.cnf -out server.pem
    ) >/dev/null 2>&1
    redis_args+=(--port 0 --tls-port "$RPORT" --tls-cert-file "$tmp/server.pem" --tls-key-file "$tmp/server.key"
        --tls-ca-cert-file "$tmp/ca.pem" --tls-auth-clients no
        --user default off --user herald on ">$pass" '~*' '&*' '+@all')
    url=rediss://herald:$pass@127.0.0.1:$RPORT
    cli+=(--tls --cacert "$tmp/ca.pem" --user herald --pass "$pass" --no-auth-warning)
    tls_env=(HERALD_BUS__REDIS_TLS_CA_FILE="$tmp/ca.pem")
else
    redis_args+=(--port "$RPORT")
fi
pids=()
rpids=()
cleanup() { kill "${pids[@]}" "${rpids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT
bus_env=(HERALD_BUS__KIND=redis HERALD_BUS__REDIS_URL="$url")
rports=("$RPORT")
if [ "${CLUSTER:-0}" = 1 ]; then
    rports=("$RPORT" $((RPORT + 1)) $((RPORT + 2)))
    seeds=()
    for p in "${rports[@]}"; do
        redis-server --port "$p" --bind 127.0.0.1 --save '' --appendonly no --cluster-enabled yes \
            --cluster-config-file "$tmp/nodes-$p.conf" --dir "$tmp" >>/tmp/bench-redis.log 2>&1 &
        rpids+=($!)
        seeds+=("redis://127.0.0.1:$p")
    done
    for p in "${rports[@]}"; do
        for _ in $(seq 50); do redis-cli -p "$p" ping >/dev/null 2>&1 && break; sleep 0.1; done
    done
    redis-cli --cluster create "${seeds[@]#redis://}" --cluster-replicas 0 --cluster-yes >/dev/null
    for _ in $(seq 100); do
        redis-cli -p "$RPORT" cluster info | grep -q cluster_state:ok && break
        sleep 0.1
    done
    bus_env=(HERALD_BUS__KIND=redis_cluster HERALD_BUS__REDIS_CLUSTER_URLS="$(IFS=,; echo "${seeds[*]}")")
else
    redis-server "${redis_args[@]}" >/tmp/bench-redis.log 2>&1 &
    rpids+=($!)
    for _ in $(seq 50); do "${cli[@]}" ping >/dev/null 2>&1 && break; sleep 0.1; done
fi
for port in "$A" "$B"; do
    env HERALD_AUTH__JWT_SECRET=$LOADGEN_JWT_SECRET HERALD_API__KEYS=$LOADGEN_API_KEY HERALD_AUTH__MEMBERSHIP=open \
        "${bus_env[@]}" "${tls_env[@]}" \
        HERALD_SERVER__LISTEN=127.0.0.1:$port RUST_LOG=warn "$SERVER_BIN" &
    pids+=($!)
done
for port in "$A" "$B"; do
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" | grep -q '"ok"' && break; sleep 0.1; done
done
cpu() { awk '{print $14+$15}' "/proc/$1/stat"; }
rss() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
rcpu() { local t=0; for p in "${rpids[@]}"; do t=$((t + $(cpu "$p"))); done; echo "$t"; }
# Pub/sub calls per Redis server (direct or from scripts): PUBLISH on one server, SPUBLISH per shard.
pubs() {
    local count=(awk -F'[=,:]' '/^cmdstat_s?publish:/ {n += $3} END {print n + 0}')
    if [ "${CLUSTER:-0}" = 1 ]; then
        for p in "${rports[@]}"; do redis-cli -p "$p" info commandstats | "${count[@]}"; done
    else
        "${cli[@]}" info commandstats | "${count[@]}"
    fi
}
before=($(cpu "${pids[0]}") $(cpu "${pids[1]}") $(rcpu))
pubs_before=($(pubs))
status=0
nodes=(--also-url "http://127.0.0.1:$B")
[ "${SPLIT:-0}" = 1 ] && nodes=(--publish-url "http://127.0.0.1:$B")
"$LOADGEN_BIN" "$@" --url "http://127.0.0.1:$A" "${nodes[@]}" --server-pid "${pids[0]}" || status=$?
after=($(cpu "${pids[0]}") $(cpu "${pids[1]}") $(rcpu))
pubs_after=($(pubs))
hz=$(getconf CLK_TCK)
secs() { printf '%d.%02d' $(( $1 / hz )) $(( ($1 % hz) * 100 / hz )); }
echo "whole-run CPU seconds: node A $(secs $((after[0]-before[0]))), node B $(secs $((after[1]-before[1]))), redis $(secs $((after[2]-before[2])))" >&2
echo "RSS at end (KiB): node A $(rss "${pids[0]}"), node B $(rss "${pids[1]}"), redis $(rss "${rpids[0]}")" >&2
for i in "${!rports[@]}"; do
    echo "redis ${rports[$i]}: $((pubs_after[i] - pubs_before[i])) publish calls" >&2
done
for port in "$A" "$B"; do
    metrics=$(curl -s "http://127.0.0.1:$port/metrics" || true)
    # Saturation runs are a closed loop (each publisher waits for its answer): the mean time a
    # POST /api/events took on this node (admission + the Redis round trip) sets the event rate.
    awk -v port="$port" '/^herald_publish_duration_seconds_sum / {s = $2} /^herald_publish_duration_seconds_count / {n = $2}
        END {if (n > 0) printf "node %s: publish answered in %.2f ms on average (%d requests)\n", port, s * 1000 / n, n}' \
        <<<"$metrics" >&2
    printf '%s\n' "$metrics" \
        | grep -E '^herald_((frames_out|write_syscalls|slow_consumers_dropped|redis_inbound_dropped|events_in|catchups|recoveries|redis_history_reads|closes|publish_overloaded|publish_overloaded_remote)_total|backlog_frames|history_(frames|bytes))' \
        | sed "s/^/node $port: /" >&2 || true
done
exit "$status"
