#!/usr/bin/env bash
# Which mesh and remat policy fit Flamingo-3B/9B/80B on chosen TPU slices: the real train
# step compiled ahead of time for each topology on this (CPU) host by libtpu's compiler.
# Appends one JSON line per configuration to benchmarks/results/tpu_fit.jsonl.
#
#   bash benchmarks/tpu_fit.sh            # every row below (~30 min on 2 cores)
#   bash benchmarks/tpu_fit.sh 3b         # the rows of one variant
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p benchmarks/results
out=benchmarks/results/tpu_fit.jsonl
# bf16 compute (float32 master weights and Adam state), global batch 256 sequences of
# 256 tokens with up to 5 images each, as in the paper's M3W batches.
common=(--config.compute_dtype=bfloat16 --config.data.batch_size=256
        --config.data.seq_len=256 --config.data.max_images=5 --config.mesh.data=1)

rows=(
  # variant topology  remat  extra mesh flags
  "3b  v5e-16   none    --config.mesh.fsdp=-1"
  "3b  v5e-16   full    --config.mesh.fsdp=-1"
  "3b  v5p-8    minimal --config.mesh.fsdp=-1"
  "9b  v5e-64   full    --config.mesh.fsdp=-1"
  "9b  v5p-16   full    --config.mesh.fsdp=-1"
  "80b v5p-128  full    --config.mesh.fsdp=-1"
  "80b v5p-128  full    --config.mesh.fsdp=-1 --config.mesh.tensor=4 --config.sharding=fsdp_tensor"
  "80b v5e-256  full    --config.mesh.fsdp=-1"
)

for row in "${rows[@]}"; do
  read -r variant topology remat mesh <<<"${row}"
  if [[ $# -gt 0 && $1 != "${variant}" ]]; then continue; fi
  echo "== ${variant} on ${topology}, remat ${remat}, ${mesh}" >&2
  JAX_PLATFORMS=cpu python -m mmjax.compile --config="configs/flamingo.py:${variant}" \
      --topology="${topology}" --config.remat="${remat}" "${common[@]}" ${mesh} \
      2> >(grep -v -e "^WARNING" -e "^E0000" -e "Source Location" -e "^learning/" \
           -e "Failed to find host bounds" >&2) \
    | python -c "
import json, sys
for line in sys.stdin:
  if line.startswith('{'):
    with open('${out}', 'a') as f:
      f.write(json.dumps({'variant': '${variant}', **json.loads(line)}) + '\n')
  else:
    print(line, end='')"
done
