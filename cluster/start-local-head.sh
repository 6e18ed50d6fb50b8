#!/usr/bin/env bash
# Start a one-machine Ray head for esm-ray jobs: every listener on 127.0.0.1, token auth ON.
#
#   cluster/start-local-head.sh [more `ray start` flags, e.g. --block]
#
# Environment (all optional):
#   RAY_PORT              GCS port (6379)
#   RAY_DASHBOARD_PORT    dashboard / Jobs API port (8265)
#   NUM_CPUS, NUM_GPUS    resources to advertise (default: detected)
#   RAY_TEMP_DIR          session files and logs (default: Ray's own temp directory)
#   RAY_AUTH_TOKEN_PATH   token file (default ~/.ray/auth_token; created when missing)
set -euo pipefail

port="${RAY_PORT:-6379}"
dash="${RAY_DASHBOARD_PORT:-8265}"
token_file="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"

# Without this Ray binds and advertises the machine's network address, not 127.0.0.1.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# Token auth, explicitly: every client (CLI, SDK, driver, dashboard) must present the token.
export RAY_AUTH_MODE=token
export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"

if [ ! -s "$token_file" ]; then
  mkdir -p "$(dirname "$token_file")"
  (umask 077 && od -An -N32 -tx1 /dev/urandom | tr -d ' \n' > "$token_file")
  echo "generated a new auth token in $token_file"
fi
export RAY_AUTH_TOKEN_PATH="$token_file"

args=(--head --node-ip-address=127.0.0.1 --port="$port"
      --dashboard-host=127.0.0.1 --dashboard-port="$dash" --disable-usage-stats)
if [ -n "${NUM_CPUS:-}" ]; then args+=(--num-cpus="$NUM_CPUS"); fi
if [ -n "${NUM_GPUS:-}" ]; then args+=(--num-gpus="$NUM_GPUS"); fi
if [ -n "${RAY_TEMP_DIR:-}" ]; then args+=(--temp-dir="$RAY_TEMP_DIR"); fi

cat <<INFO
Ray head on 127.0.0.1 (GCS :$port, dashboard http://127.0.0.1:$dash), token auth ON.
Clients need the token, either from the environment:
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$token_file
  esm-ray submit spec.yaml --address http://127.0.0.1:$dash
  ray job submit --address http://127.0.0.1:$dash --working-dir . -- python -m jobs.merge --spec spec.yaml
or as a header: esm-ray submit spec.yaml --address http://127.0.0.1:$dash --token-file $token_file
Drivers on this machine: RAY_AUTH_MODE=token esm-ray merge spec.yaml --runtime ray --address 127.0.0.1:$port
Stop: ray stop (stops every Ray of this user on this machine).
INFO

exec ray start "${args[@]}" "$@"
