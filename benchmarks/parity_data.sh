# Sourced by the LMDeploy benchmarks (engine_parity.sh, lmdeploy_sweep.sh), after gpu_env.sh:
# the exact-size InternVL2-2B with random weights in $W/base2b and held-out-style records of a
# CLoT-shaped dataset, one per image as vlmtune.convert writes eval.jsonl, in $W/eval.jsonl with
# the images under $W/ds. $DATA_RECORDS dataset records give about a third as many images; the
# first records (and their images) do not depend on it.
DATA_RECORDS=${DATA_RECORDS:-1000}
[ -d "$W/base2b" ] || python3 -m vlmtune.model_builder --preset full --device cuda --out "$W/base2b" | tail -1
[ -d "$W/ds" ] || {
  python3 -m vlmtune.demo clot-like --out "$W/zip" --records "$DATA_RECORDS"
  mkdir -p "$W/ds" && (cd "$W/ds" && python3 -c "import zipfile; zipfile.ZipFile('$W/zip/images.zip').extractall('.')")
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
