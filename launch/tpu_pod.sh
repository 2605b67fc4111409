#!/usr/bin/env bash
# Runs one command on every worker of a Cloud TPU VM pod slice (v4, v5e, v5p, ...).
# JAX finds the other workers itself (MMJAX_DISTRIBUTED=auto -> jax.distributed).
#
#   launch/tpu_pod.sh my-v5p-128 us-east5-a \
#     python -m mmjax.train --config=configs/flamingo.py:9b --workdir=gs://bucket/runs/9b \
#     --config.mesh.data=1 --config.mesh.fsdp=-1
#
# The repository must be at the same path on every worker (clone it there once, e.g.
# with `SETUP=1 launch/tpu_pod.sh ...`, which also installs mmjax with jax[tpu]).
# The workdir should be a bucket (gs://...) or a shared file system: Orbax writes each
# process's shards of the checkpoint there.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  echo "usage: $0 TPU_NAME ZONE COMMAND [ARGS...]" >&2
  exit 2
fi
tpu=$1 zone=$2
shift 2
repo=${MMJAX_REPO_DIR:-\$HOME/mmjax}
command=$(printf '%q ' "$@")

if [[ ${SETUP:-0} == 1 ]]; then
  gcloud compute tpus tpu-vm scp --recurse --worker=all --zone="${zone}" \
    "$(cd "$(dirname "$0")/.." && pwd)" "${tpu}:mmjax"
  gcloud compute tpus tpu-vm ssh "${tpu}" --worker=all --zone="${zone}" \
    --command="cd ${repo} && pip install -q -e . 'jax[tpu]'"
fi

gcloud compute tpus tpu-vm ssh "${tpu}" --worker=all --zone="${zone}" \
  --command="cd ${repo} && MMJAX_DISTRIBUTED=auto ${command}"
