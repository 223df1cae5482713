"""Summary of a benchmarks/gpu_workflow.sh run: the job table (wall time of every Snakemake job,
from Snakemake's own log), the peak GPU memory of the run, and the comparison of the LMDeploy
and transformers engines on the same held-out records:

- prompt token ids: LMDeploy's (as its engine built them) against the transformers engine's and
  against XTuner's training dataset code for the same record (digests of the id sequences);
- greedy outputs: first generated token on the records where the transformers engine's top-1
  logit leads the runner-up by at least each of --margins; whole-output agreement and, for each record
  whose outputs differ, the first position where they do;
- prompts/s of each engine (generation only, model loading excluded) and their ratio.

    python benchmarks/gpu_workflow_report.py --run RUN_DIR --transformers preds.jsonl \
        --transformers-log tf.log --gpu-memory mem.txt --versions versions.txt --out summary.md
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import tempfile
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")
RULE = re.compile(r"^(?:local)?rule (\w+):$")
JOBID = re.compile(r"^\s+jobid: (\d+)$")
WILDCARDS = re.compile(r"^\s+wildcards: (.+)$")
FINISHED = re.compile(r"^Finished jobid: (\d+)")
THROUGHPUT = re.compile(r"generation: (\d+) prompts in ([\d.]+) s = ([\d.]+) prompts/s")


def jobs(log: Path) -> list[dict]:
    """Jobs of a Snakemake log in start order: rule, wildcards, start, end, seconds."""
    started, order, stamp, current = {}, [], None, None
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        if m := STAMP.match(line):
            stamp = datetime.strptime(m.group(1), "%a %b %d %H:%M:%S %Y")
            current = None
        elif m := RULE.match(line):
            current = dict(rule=m.group(1), wildcards="", start=stamp, end=None)
        elif (m := WILDCARDS.match(line)) and current is not None:
            current["wildcards"] = m.group(1)
        elif (m := JOBID.match(line)) and current is not None and current not in order:
            started[m.group(1)] = current
            order.append(current)
        elif m := FINISHED.match(line):
            if m.group(1) in started:
                started[m.group(1)]["end"] = stamp
    for job in order:
        job["seconds"] = (job["end"] - job["start"]).total_seconds() if job["end"] else None
    return order


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def throughput(log: Path) -> tuple[int, float, float]:
    m = THROUGHPUT.search(log.read_text(encoding="utf-8", errors="replace"))
    if not m:
        raise SystemExit(f"{log}: no generation throughput line")
    return int(m.group(1)), float(m.group(2)), float(m.group(3))


def training_digests(model: Path, image_folder: Path, records: list[dict]) -> dict[str, str]:
    """Prompt ids of each record through XTuner's own InternVL dataset code (up to the answer)."""
    from mmengine.config import ConfigDict
    from xtuner.dataset.internvl_dataset import InternVL_V1_5_Dataset
    from xtuner.utils import IGNORE_INDEX, PROMPT_TEMPLATE

    from vlmtune.hashing import ids_digest

    samples = [
        dict(
            id=i,
            image=rec["image"],
            conversations=[
                {"from": "human", "value": "<image>\n" + rec["question"]},
                {"from": "gpt", "value": rec["references"][0]["text"] or "x"},
            ],
        )
        for i, rec in enumerate(records)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.json"
        data.write_text(json.dumps(samples, ensure_ascii=False), encoding="utf-8")
        ds = InternVL_V1_5_Dataset(
            str(model),
            ConfigDict(copy.deepcopy(PROMPT_TEMPLATE.internlm2_chat)),
            str(data),
            image_folders=str(image_folder),
            max_length=8192,
        )
        out = {}
        for i, rec in enumerate(records):
            item = ds.prepare_data(i)
            first_label = next(k for k, lab in enumerate(item["labels"]) if lab != IGNORE_INDEX)
            out[rec["id"]] = ids_digest(item["input_ids"][:first_label])
    return out


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for k, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return k
    return None if len(a) == len(b) else min(len(a), len(b))


def greedy_divergence(transformers_rows: list[dict], other_rows: list[dict]) -> list[int | None]:
    """Per record (same order), the first token position where another engine's greedy output
    departs from the transformers engine's (None: identical). The transformers engine keeps its
    stop token and LMDeploy's ids may not: the stop tokens are left out of both."""
    stops = {
        r["completion_ids"][-1]
        for r in transformers_rows
        if r["finish_reason"] == "stop" and r["completion_ids"]
    }
    return [
        first_divergence(
            [t for t in o["completion_ids"] if t not in stops],
            [t for t in h["completion_ids"] if t not in stops],
        )
        for h, o in zip(transformers_rows, other_rows, strict=True)
    ]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--transformers", required=True, type=Path)
    ap.add_argument("--transformers-log", required=True, type=Path)
    ap.add_argument("--gpu-memory", required=True, type=Path)
    ap.add_argument("--versions", type=Path)
    ap.add_argument(
        "--margins",
        type=lambda v: [float(x) for x in v.split(",")],
        default=[0.05, 0.1, 0.25, 1.0],
        help="clear-margin thresholds (logits), comma-separated",
    )
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args(argv)
    lines = []
    say = lines.append

    logs = sorted((a.run / ".snakemake" / "log").glob("*.snakemake.log"))
    table = jobs(logs[-1])
    say("| job | wildcards | wall time (s) |\n|---|---|---|")
    for j in table:
        say(
            f"| {j['rule']} | {j['wildcards']} | {j['seconds']:.0f} |"
            if j["seconds"] is not None
            else f"| {j['rule']} | {j['wildcards']} | (did not finish) |"
        )
    done = [j for j in table if j["seconds"] is not None]
    total = (max(j["end"] for j in done) - min(j["start"] for j in done)).total_seconds() if done else 0
    say(f"\n{len(done)} of {len(table)} jobs finished; workflow wall time {total:.0f} s.")
    mem = [int(x) for x in a.gpu_memory.read_text().split() if x.strip().isdigit()]
    say(f"Peak GPU memory in use during the run (nvidia-smi, every 200 ms): {max(mem) / 1024:.1f} GiB.\n")

    lmd = {r["id"]: r for r in read_jsonl(a.run / "results/eval/gpu/finetuned/predictions.jsonl")}
    tf = {r["id"]: r for r in read_jsonl(a.transformers)}
    ids = [i for i in tf if i in lmd]
    eval_records = {r["id"]: r for r in read_jsonl(a.run / "results/converted/clot-cn/eval.jsonl")}
    train = training_digests(
        a.run / "results/merged/base2b-gpu", a.run / "data/datasets/clot", [eval_records[i] for i in ids]
    )
    same_tf = sum(lmd[i]["prompt_ids_digest"] == tf[i]["prompt_ids_digest"] for i in ids)
    same_train = sum(lmd[i]["prompt_ids_digest"] == train[i] for i in ids)
    tiles = sorted({lmd[i]["image_tokens"] // 256 for i in ids})
    say(
        f"Prompt token ids, {len(ids)} records (fine-tuned model, folder `base2b-gpu`): LMDeploy = "
        "transformers "
        f"engine on {same_tf}/{len(ids)}; LMDeploy = XTuner's training dataset on {same_train}/{len(ids)}; "
        f"image tiles per record {tiles[0]}-{tiles[-1]} (256 tokens each)."
    )
    first_same = {i: lmd[i]["completion_ids"][:1] == tf[i]["completion_ids"][:1] for i in ids}
    by_margin = []
    for margin in a.margins:
        clear = [i for i in ids if (tf[i]["first_token_margin"] or 0.0) >= margin]
        agreed = sum(first_same[i] for i in clear)
        share = f"{100 * agreed / len(clear):.1f} %" if clear else "no such record"
        by_margin.append(f"margin >= {margin}: {agreed}/{len(clear)} ({share})")
    say(
        "First generated token, by the transformers engine's top-1/top-2 logit margin: "
        f"{'; '.join(by_margin)}; "
        f"over all {len(ids)} records {sum(first_same.values())}; the records that differ have margins "
        f"{sorted(tf[i]['first_token_margin'] for i in ids if not first_same[i])}."
    )
    where = greedy_divergence([tf[i] for i in ids], [lmd[i] for i in ids])
    diverge = [(i, k, tf[i]["first_token_margin"]) for i, k in zip(ids, where) if k is not None]
    say(
        f"Whole greedy output identical on {len(ids) - len(diverge)}/{len(ids)} records; first divergence "
        "(record: token position, transformers first-token margin): "
        + (", ".join(f"{i}: {k} ({m})" for i, k, m in diverge) or "none")
        + "."
    )
    n_l, s_l, r_l = throughput(a.run / "logs/gpu/evaluate_finetuned.log")
    n_t, s_t, r_t = throughput(a.transformers_log)
    say(
        f"\nThroughput on the same {n_l} records and generation settings: LMDeploy {r_l:.2f} prompts/s "
        f"({s_l:.1f} s), transformers {r_t:.2f} prompts/s ({s_t:.1f} s): {r_l / r_t:.1f}x."
    )
    if a.versions and a.versions.exists():
        say("\nVersions: " + "; ".join(a.versions.read_text().splitlines()))
    text = "\n".join(lines) + "\n"
    a.out.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
