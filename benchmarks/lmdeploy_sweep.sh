#!/usr/bin/env bash
# LMDeploy's engine settings against its evaluation throughput on one GPU
# (benchmarks/lmdeploy_sweep.py), on the data of benchmarks/engine_parity.sh.
# Usage (GPU machine, repo root, wheels from benchmarks/gpu_wheels.sh in .whl/):
#   OUT=/some/dir bash benchmarks/lmdeploy_sweep.sh --transformers 16 --run batch=64,threads=16 ...
set -euo pipefail
OUT=${OUT:-/tmp/lmdeploy_sweep}
W=${WORK:-$PWD/results/engine_parity_work}
mkdir -p "$OUT" "$W"
source benchmarks/gpu_env.sh
source benchmarks/parity_data.sh
python3 benchmarks/lmdeploy_sweep.py --model "$W/base2b" --eval "$W/eval.jsonl" --image-folder "$W/ds" \
  --out "$OUT" "$@" 2>&1 | tee "$OUT/lmdeploy_sweep.log" | grep -v "Warning\|warn(" | tail -80
