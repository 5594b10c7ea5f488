#!/usr/bin/env bash
# Stop the local cluster that infra/local/up.sh started, and nothing else: only the process
# ids recorded in the state folder, their process groups, and processes whose command line
# names this head's private temp dir (Ray workers of this head). Every wait is bounded.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STATE="${SSLMM_LOCAL_STATE:-$REPO/.local-cluster}"
GRACE="${GRACE:-20}"   # seconds each process gets after SIGTERM before SIGKILL

alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }
group_alive() { kill -0 -- "-$1" 2>/dev/null; }

# wait_gone PID [GROUP]: up to GRACE seconds for the pid (and its process group) to exit.
wait_gone() {
  local end=$(( $(date +%s) + GRACE ))
  while alive "$1" || { [[ -n "${2:-}" ]] && group_alive "$1"; }; do
    (( $(date +%s) < end )) || return 1
    sleep 0.5
  done
}

stopped=0

# --- S3 server: SIGTERM makes it stop its moto_server child (own session) and exit.
if [[ -f "$STATE/s3.pid" ]]; then
  pid="$(cat "$STATE/s3.pid")"
  children="$(pgrep -P "$pid" 2>/dev/null || true)"   # moto_server, by parent pid
  if alive "$pid"; then
    kill -TERM "$pid" 2>/dev/null
    wait_gone "$pid" || { echo "down.sh: S3 server $pid ignored SIGTERM; killing"; kill -KILL "$pid" 2>/dev/null; }
  fi
  for child in $children; do
    if alive "$child"; then
      kill -TERM "$child" 2>/dev/null
      wait_gone "$child" || kill -KILL "$child" 2>/dev/null
    fi
  done
  rm -f "$STATE/s3.pid"
  echo "S3 server stopped (pid $pid)"
  stopped=1
fi

# --- Ray head: `ray start --block` stops its raylet, GCS, dashboard and workers on SIGTERM.
if [[ -f "$STATE/ray.pid" ]]; then
  pid="$(cat "$STATE/ray.pid")"
  if alive "$pid" || group_alive "$pid"; then
    kill -TERM "$pid" 2>/dev/null
    if ! wait_gone "$pid" group; then
      echo "down.sh: Ray head group $pid still running after ${GRACE}s; killing the group"
      kill -KILL -- "-$pid" 2>/dev/null
      wait_gone "$pid" group || true
    fi
  fi
  # Anything of this head that escaped the group (Ray starts some processes in their own
  # sessions) still names the head's private temp dir on its command line.
  tmp="$(cat "$STATE/ray_temp_dir" 2>/dev/null || true)"
  if [[ "$tmp" == /tmp/sslmm-ray-* ]]; then
    for _ in 1 2 3; do
      # Pattern read from the state file, so grep's own command line cannot match it.
      strays=$(grep -lsFf "$STATE/ray_temp_dir" /proc/[0-9]*/cmdline 2>/dev/null \
               | cut -d/ -f3 | grep -vx "$$" || true)
      [[ -z "$strays" ]] && break
      kill -KILL $strays 2>/dev/null
      sleep 0.5
    done
    rm -rf -- "$tmp"
  fi
  rm -f "$STATE/ray.pid" "$STATE/ray_temp_dir" "$STATE/env.sh" "$STATE/auth_token"
  echo "Ray head stopped (pid $pid)"
  stopped=1
fi

(( stopped )) || echo "down.sh: nothing recorded in $STATE; nothing to stop"
