#!/usr/bin/env bash
# GPU verification of the training and merge steps (issue "Training and merge"): on one GPU,
# build an exact-size InternVL2-2B with random weights (vlmtune.model_builder --preset full),
# train QLoRA (4-bit, ZeRO-1) and bf16 LoRA (ZeRO-2) for a few iterations with the workflow's
# own commands, merge the QLoRA run with convert_to_official + checks, and reload the merged
# model to answer one image. Wheels for the GPU stack come from .whl/ (see .whl/INSTALL.txt).
# Usage (on the GPU machine, repo root): OUT=/some/dir bash benchmarks/gpu_smoke.sh
set -euo pipefail
OUT=${OUT:-/tmp/gpu_smoke}
mkdir -p "$OUT"
W=/tmp/gpu_smoke_work
mkdir -p $W
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} DS_ACCELERATOR=cuda PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 - <<'PY' | tee "$OUT/versions.txt"
import importlib.metadata as m
for p in ["torch", "transformers", "xtuner", "mmengine", "deepspeed", "bitsandbytes", "peft", "accelerate", "tokenizers"]:
    try: print(p, m.version(p))
    except Exception as e: print(p, "MISSING", e)
PY
time python3 -m vlmtune.model_builder --preset full --out $W/InternVL2-2B 2>&1 | tail -1 | tee "$OUT/build.txt"
python3 -m vlmtune.demo dataset --out $W/ds
python3 -m vlmtune.convert --dataset $W/ds --eval-images 2 --out-train $W/train.json --out-eval $W/eval.jsonl --report $W/report.json
for method in qlora lora; do
  ds=$([ $method = qlora ] && echo zero1 || echo zero2)
  settings=$(printf '{"device":"cuda","gpus":1,"deepspeed":"%s","method":"%s","max_length":4096,"batch_size":2,"accumulative_counts":1,"dataloader_num_workers":2,"max_epochs":1,"lr":2e-5,"warmup_ratio":0.2,"save_steps":100,"save_total_limit":1,"log_interval":1,"seed":0}' $ds $method)
  python3 -m vlmtune.xtuner_config --model $W/InternVL2-2B --train-json $W/train.json --image-folder $W/ds \
    --train-settings "$settings" --out $W/$method/cfg.py --plan $W/$method/plan.json
  /usr/bin/time -v python3 -m vlmtune.train --config $W/$method/cfg.py --plan $W/$method/plan.json --work-dir $W/$method/work \
    --result $W/$method/result.json --summary "$OUT/${method}_summary.json" --curves "$OUT/${method}_curves.png" \
    --gpus 1 --deepspeed $ds > "$OUT/${method}_train.log" 2>&1 || { tail -60 "$OUT/${method}_train.log"; exit 1; }
  grep -E "Iter\(train\)" "$OUT/${method}_train.log" | tail -4
  cat "$OUT/${method}_summary.json"
done
time python3 -m vlmtune.merge --config $W/qlora/cfg.py --train-result $W/qlora/result.json --base $W/InternVL2-2B \
  --out $W/InternVL2-2B-smoke --report "$OUT/merge_report.json" > "$OUT/merge.log" 2>&1 || { tail -40 "$OUT/merge.log"; exit 1; }
python3 -m vlmtune.evaluate generate --model $W/InternVL2-2B-smoke --eval $W/eval.jsonl --image-folder $W/ds --engine transformers \
  --generation '{"max_new_tokens": 8, "do_sample": false, "temperature": 1.0, "top_p": 1.0, "seed": 0}' --max-records 1 \
  --out "$OUT/predictions.jsonl" 2>&1 | tail -2
head -c 300 "$OUT/merge_report.json"
