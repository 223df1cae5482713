#!/usr/bin/env bash
# LMDeploy's generation throughput at a larger batch than the transformers engine's, on the same
# held-out-style records (exact-size InternVL2-2B with random weights, CLoT-shaped images), through
# `python -m vlmtune.evaluate generate` (model loading excluded from the printed prompts/s).
# Usage (GPU machine, repo root, wheels from benchmarks/gpu_wheels.sh in .whl/):
#   OUT=/some/dir LMDEPLOY_BATCH=64 bash benchmarks/lmdeploy_batch.sh
set -euo pipefail
OUT=${OUT:-/tmp/lmdeploy_batch}
W=${WORK:-/tmp/lmdeploy_batch_work}
RECORDS=${RECORDS:-64}
mkdir -p "$OUT" "$W"
[ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --target /tmp/site .whl/*.whl && touch /tmp/site/.installed; }
export PYTHONPATH=/tmp/site:$PWD/src DS_ACCELERATOR=cuda PYTHONUNBUFFERED=1
[ -d "$W/base2b" ] || python3 -m vlmtune.model_builder --preset full --out "$W/base2b" | tail -1
[ -d "$W/ds" ] || {
  python3 -m vlmtune.demo clot-like --out "$W/zip" --records 400
  mkdir -p "$W/ds" && (cd "$W/ds" && python3 -c "import zipfile; zipfile.ZipFile('$W/zip/images.zip').extractall('.')")
  python3 - "$W" "$RECORDS" <<'PY'
import json, sys
w, n = sys.argv[1], int(sys.argv[2])
default = "请你根据这张图片,讲一个脑洞大开的梗。"
seen, out = set(), []
for line in open(f"{w}/zip/cn.jsonl", encoding="utf-8"):
    r = json.loads(line)
    if r["image"] in seen:
        continue
    seen.add(r["image"])
    out.append(dict(id=f"e{len(out)}", image=f"images/{r['image']}.jpg", question=r["question"] or default,
                    references=[dict(text=r["text"], star=r["star"])]))
with open(f"{w}/eval.jsonl", "w", encoding="utf-8") as fh:
    fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in out[:n])
PY
}
GEN='{"max_new_tokens": 128, "do_sample": false, "temperature": 1.0, "top_p": 1.0, "seed": 0}'
run() {  # run ENGINE BATCH
  python3 -m vlmtune.evaluate generate --model "$W/base2b" --eval "$W/eval.jsonl" --image-folder "$W/ds" \
    --engine "$1" --generation "$GEN" --batch-size "$2" --out "$W/$1_$2.jsonl" > "$W/$1_$2.log" 2>&1 \
    || { tail -30 "$W/$1_$2.log"; return 1; }
  grep "generation:" "$W/$1_$2.log" | tee -a "$OUT/throughput.txt"
}
run lmdeploy "${LMDEPLOY_BATCH:-64}"
run lmdeploy 16
run transformers 16
