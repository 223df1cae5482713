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
[ -d "$W/base2b" ] || python3 -m vlmtune.model_builder --preset full --device cuda --out "$W/base2b" | tail -1
[ -d "$W/ds" ] || {
  python3 -m vlmtune.demo clot-like --out "$W/zip" --records 400
  mkdir -p "$W/ds" && (cd "$W/ds" && python3 -c "import zipfile; zipfile.ZipFile('$W/zip/images.zip').extractall('.')")
  # one held-out record per image, as vlmtune.convert writes eval.jsonl
  python3 - "$W" <<'PY'
import json, sys
w = sys.argv[1]
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
    fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in out)
PY
}
python3 benchmarks/engine_parity.py --model "$W/base2b" --eval "$W/eval.jsonl" --image-folder "$W/ds" \
  --records "$RECORDS" --lmdeploy-runs "${LMDEPLOY_RUNS:-16:1,16:16,64:16}" --out "$OUT" 2>&1 | tee "$OUT/engine_parity.log" \
  | grep -v "Warning\|warn(" | tail -150
