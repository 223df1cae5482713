"""The teacher-forced loss of every reference answer of the held-out records (reference NLL:
perplexity and preferences in ``vlmtune.metrics``), with the training prompt, by the transformers
engine (the model's remote code; CPU or GPU).

    python -m vlmtune.reference_nll --model results/merged/InternVL2-2B-my \
        --eval results/converted/x/eval.jsonl --image-folder data/datasets/x \
        --out results/eval/my/finetuned/reference_nll.jsonl

One JSON line per record: id, type, the NLL of each reference, engine and version, model folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .atomic import atomic_file
from .heldout import EvaluateError, read_eval
from .transformers_engine import TransformersEngine


def reference_nll(
    model: Path, eval_path: Path, image_folder: Path, out: Path, max_records: int | None = None
) -> int:
    """Write ``out`` (atomically): the NLL of every reference answer of the first
    ``max_records`` records of ``eval_path`` under ``model``. Returns the record count; raises
    EvaluateError for a bad record file or a missing image."""
    from tqdm import tqdm

    records = read_eval(eval_path, max_records)
    runner = TransformersEngine(model)
    with atomic_file(out) as fh:
        for rec in tqdm(records, desc="reference NLL", unit="record", mininterval=5, file=sys.stderr):
            row = dict(
                id=rec["id"],
                type=rec.get("type"),
                references=runner.reference_nll(rec, image_folder),
                engine="transformers",
                engine_version=runner.version,
                model=str(model),
            )
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(records)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--eval", required=True, type=Path)
    ap.add_argument("--image-folder", required=True, type=Path)
    ap.add_argument("--max-records", type=int)
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args(argv)
    try:
        n = reference_nll(a.model, a.eval, a.image_folder, a.out, a.max_records)
    except EvaluateError as exc:
        raise SystemExit(str(exc)) from None
    print(f"[vlmtune.reference_nll] {n} records -> {a.out}")


if __name__ == "__main__":
    main()
