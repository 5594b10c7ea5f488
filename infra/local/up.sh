#!/usr/bin/env bash
# Start a local development cluster on 127.0.0.1: a Ray head (with dashboard and job server)
# and an S3-compatible server (moto) with one bucket. Both run with this repository's
# virtualenv, so jobs submitted to this head use the same interpreter and packages.
#
#   infra/local/up.sh        # then paste the printed exports
#   infra/local/down.sh      # stops exactly the processes started here
#
# Settings (environment): RAY_PORT (6379), DASHBOARD_PORT (8265), S3_PORT (9000), CLIENT_PORT
# (10001), AGENT_PORT (52365); Ray's worker ports are 10002-19999, keep the others outside;
# NUM_CPUS (4: logical CPUs, more than the cores so Ray Data keeps slots beside Train),
# S3_BUCKET (sslmm), SSLMM_LOCAL_STATE (<repo>/.local-cluster), READY_TIMEOUT (120 s).
# The state folder records the pids, ports, logs and Ray's temp dir for down.sh.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
STATE="${SSLMM_LOCAL_STATE:-$REPO/.local-cluster}"
RAY_PORT="${RAY_PORT:-6379}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
S3_PORT="${S3_PORT:-9000}"
NUM_CPUS="${NUM_CPUS:-4}"
S3_BUCKET="${S3_BUCKET:-sslmm}"
CLIENT_PORT="${CLIENT_PORT:-10001}"    # Ray Client server
AGENT_PORT="${AGENT_PORT:-52365}"      # dashboard agent (HTTP)
READY_TIMEOUT="${READY_TIMEOUT:-120}"
HOST=127.0.0.1

die() { echo "up.sh: $*" >&2; exit 1; }
alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }

[[ -x "$VENV/bin/ray" && -x "$VENV/bin/python" ]] \
  || die "no virtualenv at $VENV (run 'make setup' first, or set VENV)"

mkdir -p "$STATE"
for name in ray s3; do
  if [[ -f "$STATE/$name.pid" ]] && alive "$(cat "$STATE/$name.pid")"; then
    die "already running ($name pid $(cat "$STATE/$name.pid")); run infra/local/down.sh first"
  fi
done
rm -f "$STATE"/*.pid "$STATE"/*.env

# Refuse ports that are taken instead of half-starting.
"$VENV/bin/python" - "$RAY_PORT" "$DASHBOARD_PORT" "$S3_PORT" "$CLIENT_PORT" "$AGENT_PORT" \
  <<'PY' || exit 1
import socket, sys
for port in map(int, sys.argv[1:]):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "in use"
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            sys.exit(f"up.sh: port {port} on 127.0.0.1 is in use; pick another (see the header)")
PY

# Ray token authentication, explicit and per cluster: a fresh random token in the state folder
# (mode 600). Without this, Ray's mode would depend on whether ~/.ray/auth_token happens to
# exist. Clients (ray job ..., sslmm ...) need the two variables below (env.sh sets them); job
# drivers and workers inherit them from the head.
( umask 077 && "$VENV/bin/python" -c "import secrets; print(secrets.token_hex(32))" \
    > "$STATE/auth_token" )
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$STATE/auth_token"

# Job entrypoints say `python ...`: the head resolves it on its PATH, which must therefore
# lead to this virtualenv (as `python` is the image's interpreter on a real cluster).
export PATH="$VENV/bin:$PATH"

# Ray keeps sockets under its temp dir: a short path (< 108 bytes for a socket name).
RAY_TMP="$(mktemp -d /tmp/sslmm-ray-XXXXXX)"
echo "$RAY_TMP" > "$STATE/ray_temp_dir"

# `ray start --block` stays in the foreground and owns the head's processes: SIGTERM to it
# stops them all. setsid gives it its own session and process group (pgid = its pid), so
# down.sh can also signal that group, and a Ctrl-C in this shell never reaches it.
setsid "$VENV/bin/ray" start --head --block \
  --node-ip-address "$HOST" --port "$RAY_PORT" \
  --dashboard-host "$HOST" --dashboard-port "$DASHBOARD_PORT" --include-dashboard true \
  --ray-client-server-port "$CLIENT_PORT" --dashboard-agent-listen-port "$AGENT_PORT" \
  --num-cpus "$NUM_CPUS" --temp-dir "$RAY_TMP" --disable-usage-stats \
  > "$STATE/ray.log" 2>&1 < /dev/null &
echo $! > "$STATE/ray.pid"

# The S3 server: python -m ...s3server runs moto_server as its child (own session) and stops
# it on SIGTERM; the bucket is created before it prints its settings.
setsid "$VENV/bin/python" -m sslmm_ray.devtools.s3server --port "$S3_PORT" --bucket "$S3_BUCKET" \
  > "$STATE/s3.log" 2>&1 < /dev/null &
echo $! > "$STATE/s3.pid"

cleanup_on_failure() {
  echo "up.sh: start failed; stopping what was started (logs in $STATE)" >&2
  "$REPO/infra/local/down.sh" >&2 || true
  exit 1
}

deadline=$(( $(date +%s) + READY_TIMEOUT ))
wait_http() {  # wait_http NAME PIDFILE URL
  until curl -s -o /dev/null --max-time 2 "$3"; do
    alive "$(cat "$2")" || { echo "up.sh: $1 exited; last log lines:" >&2;
                             tail -n 20 "$STATE/$1.log" >&2; cleanup_on_failure; }
    (( $(date +%s) < deadline )) || { echo "up.sh: $1 not ready in ${READY_TIMEOUT}s" >&2;
                                      cleanup_on_failure; }
    sleep 1
  done
}
wait_http s3 "$STATE/s3.pid" "http://$HOST:$S3_PORT/"
until grep -q "^export SSLMM_S3_ENDPOINT" "$STATE/s3.log" 2>/dev/null; do  # bucket created
  alive "$(cat "$STATE/s3.pid")" || { tail -n 20 "$STATE/s3.log" >&2; cleanup_on_failure; }
  (( $(date +%s) < deadline )) || cleanup_on_failure
  sleep 0.5
done
wait_http ray "$STATE/ray.pid" "http://$HOST:$DASHBOARD_PORT/api/version"

# What a shell needs to use this cluster (moto's fake credentials are not secrets).
cat > "$STATE/env.sh" <<ENV
export RAY_ADDRESS=$HOST:$RAY_PORT
export RAY_API_SERVER_ADDRESS=http://$HOST:$DASHBOARD_PORT
export SSLMM_S3_ENDPOINT=http://$HOST:$S3_PORT
export AWS_ACCESS_KEY_ID=testing
export AWS_SECRET_ACCESS_KEY=testing
export AWS_REGION=us-east-1
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$STATE/auth_token
ENV

cat <<MSG
Local cluster up (state in $STATE):
  Ray head      $HOST:$RAY_PORT   pid $(cat "$STATE/ray.pid")   ($NUM_CPUS logical CPUs)
  dashboard     http://$HOST:$DASHBOARD_PORT   (also the job API for 'ray job submit')
  S3 (moto)     http://$HOST:$S3_PORT   bucket s3://$S3_BUCKET   pid $(cat "$STATE/s3.pid")

Use it from this shell:
  source $STATE/env.sh
which sets
$(sed 's/^/  /' "$STATE/env.sh")
(RAY_ADDRESS: sslmm commands attach to this head; RAY_API_SERVER_ADDRESS: 'ray job ...';
 RAY_AUTH_*: this cluster's token, which every client must present.)

Stop it:  infra/local/down.sh
MSG
