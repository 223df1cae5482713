#!/usr/bin/env bash
# The whole workflow on one GPU, as a user runs it: `snakemake` with config/config.yaml plus an
# overlay that only points model/dataset at local folders, sets one GPU and caps the training
# iterations and evaluated records. Every rule of `rule all` runs: fetch (local), convert,
# validate, render, train (QLoRA, the default), merge, evaluate base and fine-tuned with LMDeploy,
# reference NLL, metrics, report. Then the same records are answered by the transformers engine and
# benchmarks/gpu_workflow_report.py prints the job table, peak GPU memory and the engine comparison.
#
# Model: the exact-size InternVL2-2B with random weights (vlmtune.model_builder --preset full), in
# a folder named `base2b` (no "InternVL2" in the base or the merged model's path: the explicit
# chat template must do the work). Data: a CLoT-shaped dataset in the hub's layout (cn.jsonl +
# images.zip, vlmtune.demo clot-like). Wheels for the GPU machine: benchmarks/gpu_wheels.sh.
#
# Usage (GPU machine, repo root): OUT=/some/dir bash benchmarks/gpu_workflow.sh
# Resumable: the model, the data and finished jobs are kept in $WORK (a re-run continues).
set -euo pipefail
OUT=${OUT:-/tmp/gpu_workflow}
WORK=${WORK:-$PWD/results/gpu_workflow}
RECORDS=${RECORDS:-2000}
MAX_ITERS=${MAX_ITERS:-32}
EVAL_RECORDS=${EVAL_RECORDS:-64}
mkdir -p "$OUT" "$WORK"
source benchmarks/gpu_env.sh  # wheels into $SITE, PYTHONPATH and the step environment

python3 - <<'PY' | tee "$OUT/versions.txt"
import importlib.metadata as m, platform, subprocess
print("date", subprocess.run(["date", "-u", "+%F %T"], capture_output=True, text=True).stdout.strip())
print("gpu", subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True).stdout.strip())
print("python", platform.python_version())
for p in ["torch", "transformers", "xtuner", "mmengine", "deepspeed", "bitsandbytes", "peft", "lmdeploy", "snakemake", "triton"]:
    try:
        print(p, m.version(p))
    except Exception as e:
        print(p, "MISSING", e)
PY

# The workflow in its own folder (data/, results/, logs/ of this run only).
RUN_DIR=$WORK/run
mkdir -p "$RUN_DIR"
cp -r Snakefile workflow config envs src "$RUN_DIR"/
[ -d "$WORK/base2b" ] || python3 -m vlmtune.model_builder --preset full --out "$WORK/base2b" 2>&1 | tail -1
[ -d "$WORK/clot" ] || python3 -m vlmtune.demo clot-like --out "$WORK/clot" --records "$RECORDS"
cat > "$RUN_DIR/overlay.yaml" <<EOF
run: gpu
model: {source: local, path: $WORK/base2b, name: base2b}
dataset: {source: local, path: $WORK/clot, name: clot}
train: {gpus: 1, max_iters: $MAX_ITERS}
evaluate: {max_records: $EVAL_RECORDS}
EOF

# Logs and small outputs of the run, for $OUT (also after a failure).
pack() {
  (cd "$RUN_DIR" && tar -czf "$OUT/run_outputs.tar.gz" --ignore-failed-read logs .snakemake/log results/eval \
    results/train/gpu/train_summary.json results/train/gpu/loss_curve.png results/xtuner/gpu \
    results/merged/base2b-gpu.merge_report.json results/converted/clot-cn/convert_report.json \
    results/converted/clot-cn/validation_report.json transformers_finetuned.jsonl transformers_finetuned.log \
    2>/dev/null) || true
}

# Peak GPU memory over the whole run (all processes), sampled every 200 ms.
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$OUT/gpu_memory_mib.txt" &
SAMPLER=$!
trap 'kill $SAMPLER 2>/dev/null || true' EXIT
cd "$RUN_DIR"
START=$(date +%s)
set +e
python3 -m snakemake -j 16 --resources gpu=1 --configfile config/config.yaml overlay.yaml \
  --show-failed-logs > "$OUT/snakemake.txt" 2>&1
STATUS=$?
set -e
echo "snakemake exit $STATUS after $(( $(date +%s) - START )) s" | tee -a "$OUT/snakemake.txt"
[ $STATUS -eq 0 ] || { pack; tail -80 "$OUT/snakemake.txt"; for f in $(ls -t logs/*.log logs/*/*.log 2>/dev/null | head -2); do echo "== $f"; tail -40 "$f"; done; exit $STATUS; }

# The same records, settings and batch size with the transformers engine (fine-tuned model).
GEN=$(python3 -c "import json; print(json.dumps(json.load(open('results/eval/gpu/finetuned/provenance.json'))['generation']))")
python3 -m vlmtune.evaluate generate --model results/merged/base2b-gpu --eval results/converted/clot-cn/eval.jsonl \
  --image-folder data/datasets/clot --engine transformers --generation "$GEN" --batch-size 16 \
  --max-records "$EVAL_RECORDS" --out "$RUN_DIR/transformers_finetuned.jsonl" > "$RUN_DIR/transformers_finetuned.log" 2>&1 \
  || { pack; tail -40 "$RUN_DIR/transformers_finetuned.log"; exit 1; }
kill $SAMPLER 2>/dev/null || true
cd - > /dev/null
pack
python3 benchmarks/gpu_workflow_report.py --run "$RUN_DIR" --transformers "$RUN_DIR/transformers_finetuned.jsonl" \
  --transformers-log "$RUN_DIR/transformers_finetuned.log" --gpu-memory "$OUT/gpu_memory_mib.txt" \
  --versions "$OUT/versions.txt" --out "$OUT/gpu_workflow.md" | tee "$OUT/summary.txt"
