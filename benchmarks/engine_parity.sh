#!/usr/bin/env bash
# LMDeploy against the transformers engine on one GPU (benchmarks/engine_parity.py): first-position
# logits of both engines and of an fp32 reference, with and without the image, and the throughput of
# both engines (LMDeploy cold and warm, at several max_batch_size values and image-preprocessing
# thread counts), on held-out-style records of a CLoT-shaped dataset and the exact-size InternVL2-2B
# with random weights.
# Usage (GPU machine, repo root, wheels from benchmarks/gpu_wheels.sh in .whl/):
#   OUT=/some/dir bash benchmarks/engine_parity.sh
set -euo pipefail
OUT=${OUT:-/tmp/engine_parity}
W=${WORK:-$PWD/results/engine_parity_work}
RECORDS=${RECORDS:-64}
mkdir -p "$OUT" "$W"
source benchmarks/gpu_env.sh
source benchmarks/parity_data.sh
python3 benchmarks/engine_parity.py --model "$W/base2b" --eval "$W/eval.jsonl" --image-folder "$W/ds" \
  --records "$RECORDS" --lmdeploy-runs "${LMDEPLOY_RUNS:-16:1,16:16,64:16}" --out "$OUT" 2>&1 | tee "$OUT/engine_parity.log" \
  | grep -v "Warning\|warn(" | tail -150
