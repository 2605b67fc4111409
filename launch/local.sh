#!/usr/bin/env bash
# N processes of one command on this machine, joined by jax.distributed through a
# coordinator on localhost: the multi-host code path (per-process data, global arrays,
# Orbax multi-process checkpoints) without a cluster.
#
#   launch/local.sh 2 python -m mmjax.train --config=configs/lm.py --workdir=/tmp/lm2
#
# Each process sees the devices JAX gives it (one CPU device by default; more with
# XLA_FLAGS=--xla_force_host_platform_device_count=K). Output lines are prefixed with the
# process index. If one process fails the others are stopped; SIGTERM and Ctrl-C are
# passed on to all of them (the trainer saves a checkpoint and exits).
set -euo pipefail

if [[ $# -lt 2 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NUM_PROCESSES COMMAND [ARGS...]" >&2
  exit 2
fi
num_processes=$1
shift
port=${MMJAX_COORDINATOR_PORT:-$(python - <<'PY'
import socket
with socket.socket() as s:
  s.bind(("localhost", 0))
  print(s.getsockname()[1])
PY
)}

pids=()
stop_all() { kill -TERM "${pids[@]}" 2>/dev/null || true; }
trap 'stop_all' TERM INT

for ((i = 0; i < num_processes; i++)); do
  MMJAX_COORDINATOR_ADDRESS="localhost:${port}" MMJAX_NUM_PROCESSES="${num_processes}" \
    MMJAX_PROCESS_ID="${i}" "$@" > >(sed -u "s/^/[${i}] /") 2>&1 &
  pids+=($!)
done

status=0
running=("${pids[@]}")
while ((${#running[@]})); do
  still=()
  for pid in "${running[@]}"; do
    if kill -0 "${pid}" 2>/dev/null; then
      still+=("${pid}")
    elif ! wait "${pid}"; then
      status=1
      stop_all
    fi
  done
  running=("${still[@]}")
  sleep 0.2
done
exit "${status}"
