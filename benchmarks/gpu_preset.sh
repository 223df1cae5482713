#!/usr/bin/env bash
# A larger InternVL2 preset through the workflow's own commands on one GPU (issue "The InternVL2
# family"): the exact-size model with random weights (vlmtune.model_builder, weights initialised on
# the GPU), a CLoT-shaped dataset in the hub's layout, then `snakemake` with config/config.yaml and
# an overlay that sets `model.preset`, points model/dataset at those folders, one GPU and a few
# training iterations, up to the merged model (fetch, convert, validate, render, QLoRA train, merge).
# Prints the rendered template, the training figures (samples/s after the first optimizer step,
# peak allocated/reserved by the training process; the first iteration left out) and the peak GPU memory of the whole run.
#
# Usage (GPU machine, repo root): OUT=/some/dir PRESET=InternVL2-8B BUILDER=full-8b bash benchmarks/gpu_preset.sh
set -euo pipefail
OUT=${OUT:-/tmp/gpu_preset}
PRESET=${PRESET:-InternVL2-8B}
BUILDER=${BUILDER:-full-8b}
WORK=${WORK:-$PWD/results/gpu_preset}
RECORDS=${RECORDS:-400}
MAX_ITERS=${MAX_ITERS:-12}
mkdir -p "$OUT" "$WORK"
source benchmarks/gpu_env.sh  # wheels into $SITE, PYTHONPATH and the step environment
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

RUN_DIR=$WORK/run
mkdir -p "$RUN_DIR"
cp -r Snakefile workflow config envs src "$RUN_DIR"/
T0=$(date +%s)
[ -d "$WORK/model" ] || python3 -m vlmtune.model_builder --preset "$BUILDER" --device cuda --out "$WORK/model" 2>&1 | tail -1
T1=$(date +%s)
[ -d "$WORK/clot" ] || python3 -m vlmtune.demo clot-like --out "$WORK/clot" --records "$RECORDS" > /dev/null
echo "model build $((T1 - T0)) s" | tee "$OUT/build.txt"
cat > "$RUN_DIR/overlay.yaml" <<YAML
run: big
model: {preset: $PRESET, source: local, path: $WORK/model, name: model}
dataset: {source: local, path: $WORK/clot, name: clot}
train: {gpus: 1, max_iters: $MAX_ITERS, iteration_log: true, log_interval: 1, warmup_ratio: 0.1}
YAML

nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$OUT/gpu_memory_mib.txt" &
SAMPLER=$!
trap 'kill $SAMPLER 2>/dev/null || true' EXIT
cd "$RUN_DIR"
START=$(date +%s)
set +e
python3 -m snakemake -j 16 --resources gpu=1 --configfile config/config.yaml overlay.yaml \
  --show-failed-logs results/merged/model-big > "$OUT/snakemake.txt" 2>&1
STATUS=$?
set -e
kill $SAMPLER 2>/dev/null || true
echo "snakemake exit $STATUS after $(( $(date +%s) - START )) s" | tee -a "$OUT/snakemake.txt"
grep -E "^(rule|localrule) |Finished job|jobid" "$OUT/snakemake.txt" | head -40 || true
tar -czf "$OUT/logs.tar.gz" --ignore-failed-read logs .snakemake/log results/xtuner results/train \
  results/merged/model-big.merge_report.json 2>/dev/null || true
[ $STATUS -eq 0 ] || { tail -60 "$OUT/snakemake.txt"; exit $STATUS; }
python3 - "$OUT" <<'PY'
import glob, json, sys
from pathlib import Path
from vlmtune.iteration_log import read, summarise
out = Path(sys.argv[1])
cfg = Path(glob.glob("results/xtuner/*/*.py")[0]).read_text()
template = next(l for l in cfg.splitlines() if l.startswith("prompt_template"))
quant = [l.strip() for l in cfg.splitlines() if "quantization_llm" in l]
records = read(next(Path("results/train").rglob("iterations.jsonl")))
# A few iterations are fewer than one optimizer step of accumulation: leave out only the first
# (CUDA and cuDNN warm-up); the rest are micro-batches of the real step.
s = summarise(records, 1)
mem = [int(x) for x in (out / "gpu_memory_mib.txt").read_text().split() if x.strip().isdigit()]
merged = Path("results/merged/model-big")
size = sum(f.stat().st_size for f in merged.glob("*.safetensors"))
text = [f"template: {template}", f"rendered: {quant}", f"iterations logged: {len(records)}",
        f"training: {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in s.items()})}",
        f"peak GPU memory (nvidia-smi, whole run): {max(mem) / 1024:.1f} GiB",
        f"merged model: {merged} ({size / 1e9:.2f} GB of safetensors)"]
(out / "summary.txt").write_text("\n".join(text) + "\n")
print("\n".join(text))
PY
