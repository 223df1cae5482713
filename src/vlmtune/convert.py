"""Convert CLoT-Oogiri-GO ``<language>.jsonl`` into XTuner's InternVL (LLaVA-style) JSON,
with the tutorial's semantics (FIELD-NOTES §1), a held-out evaluation split by image and a
report that accounts for every input line.

Tutorial semantics: image ``images/{image}.jpg``; record skipped if the file is missing;
width/height from the image; human turn ``"<image>\\n" + question`` with a null question
replaced by the default question; gpt turn = ``text``; empty text skipped; ids 0..n-1.
Beyond it: malformed lines, wrong field types and unreadable images are counted (or, with
``--on-bad-record error``, stop the run naming file and line) instead of crashing.

    python -m vlmtune.convert --dataset data/datasets/CLoT-Oogiri-GO --language cn \
        --out-train results/converted/x/train.json --out-eval results/converted/x/eval.jsonl \
        --report results/converted/x/convert_report.json
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .atomic import atomic_file, write_json

DEFAULT_QUESTION = "请你根据这张图片,讲一个脑洞大开的梗。"
FIELD_TYPES = {"text": (str, type(None)), "question": (str, type(None)), "star": (int, type(None)),
               "type": (str, type(None)), "image": (str, type(None))}  # fmt: skip


class BadRecord(ValueError):
    def __init__(self, reason: str, where: str, detail: str):
        super().__init__(f"{where}: {reason}: {detail}")
        self.reason, self.where, self.detail = reason, where, detail


def image_size(path: Path) -> tuple[int, int] | str:
    """(width, height) from the image header only, or the skip reason."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.size
    except FileNotFoundError:
        return "missing_image"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return "corrupt_image"


def parse_line(line: str, where: str) -> dict:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        raise BadRecord("malformed_json", where, str(exc)) from None
    if not isinstance(rec, dict):
        raise BadRecord("malformed_json", where, f"a {type(rec).__name__}, not an object")
    for field, types in FIELD_TYPES.items():
        if not isinstance(rec.get(field), types) or isinstance(rec.get(field), bool):
            raise BadRecord("wrong_field_type", where, f"{field}={rec.get(field)!r}")
    return rec


def convert(dataset: Path, language: str = "cn", default_question: str = DEFAULT_QUESTION,
            on_bad_record: str = "skip", eval_images: int = 0, split_seed: int = 0,
            workers: int = 8) -> tuple[list[dict], list[dict], dict]:  # fmt: skip
    """Return (train samples, eval records, report). Nothing is written."""
    dataset = Path(dataset)
    source = dataset / f"{language}.jsonl"
    read, candidates, skipped, errors = 0, [], defaultdict(list), []

    def skip(err: BadRecord):
        if on_bad_record == "error":
            errors.append(err)  # raised below: the first bad line of the file, not of a pass
        skipped[err.reason].append(f"{err.where}: {err.detail}")

    with open(source, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue  # blank lines are not records
            read += 1
            where = f"{source}:{lineno}"
            try:
                rec = parse_line(line, where)
                if not rec.get("image"):
                    raise BadRecord("missing_image", where, "no image id")
                if not rec.get("text"):
                    raise BadRecord("empty_text", where, "empty text")
            except BadRecord as err:
                skip(err)
                continue
            candidates.append((where, rec))

    # Image headers, each image once, in parallel (I/O bound).
    names = sorted({rec["image"] for _, rec in candidates})
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        sizes = dict(zip(names, pool.map(lambda n: image_size(dataset / "images" / f"{n}.jpg"), names)))

    kept = []
    for where, rec in candidates:
        size = sizes[rec["image"]]
        if isinstance(size, str):
            skip(BadRecord(size, where, f"images/{rec['image']}.jpg"))
            continue
        kept.append((where, rec, size))

    if errors:
        raise min(errors, key=lambda e: int(e.where.rsplit(":", 1)[1]))

    images = sorted({rec["image"] for _, rec, _ in kept})
    held_out = set(random.Random(split_seed).sample(images, min(eval_images, len(images))))

    train, groups = [], {}
    for where, rec, (width, height) in kept:
        question = rec["question"] or default_question
        if rec["image"] in held_out:
            key = (rec["image"], question)
            if key not in groups:
                groups[key] = dict(id=f"eval-{len(groups)}", image=f"images/{rec['image']}.jpg",
                                   width=width, height=height, question=question,
                                   type=rec["type"], references=[])  # fmt: skip
            groups[key]["references"].append(dict(text=rec["text"], star=rec["star"], source=where))
            continue
        train.append({
            "id": len(train),
            "image": f"images/{rec['image']}.jpg",
            "width": width,
            "height": height,
            "conversations": [
                {"from": "human", "value": f"<image>\n{question}"},
                {"from": "gpt", "value": rec["text"]},
            ],
        })  # fmt: skip

    eval_records = list(groups.values())
    n_eval = sum(len(g["references"]) for g in eval_records)
    n_skipped = sum(len(v) for v in skipped.values())
    report = {
        "source": str(source),
        "read": read,
        "kept": len(train) + n_eval,
        "train_samples": len(train),
        "eval_records": n_eval,
        "eval_prompts": len(eval_records),
        "eval_images": sorted(held_out),
        "skipped": n_skipped,
        "skipped_by_reason": {k: len(v) for k, v in sorted(skipped.items())},
        "skipped_where": {k: v for k, v in sorted(skipped.items())},
        "train_types": dict(Counter(r["type"] for _, r, _ in kept if r["image"] not in held_out)),
        "settings": dict(language=language, default_question=default_question,
                         on_bad_record=on_bad_record, eval_images=eval_images, split_seed=split_seed),
    }  # fmt: skip
    if report["kept"] + n_skipped != read:
        raise AssertionError(f"accounting error: kept {report['kept']} + skipped {n_skipped} != read {read}")
    return train, eval_records, report


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", required=True, type=Path)
    ap.add_argument("--language", default="cn")
    ap.add_argument("--default-question", default=DEFAULT_QUESTION)
    ap.add_argument("--on-bad-record", choices=["skip", "error"], default="skip")
    ap.add_argument("--eval-images", type=int, default=0)
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--out-train", required=True, type=Path)
    ap.add_argument("--out-eval", required=True, type=Path)
    ap.add_argument("--report", required=True, type=Path)
    a = ap.parse_args(argv)
    try:
        train, eval_records, report = convert(a.dataset, a.language, a.default_question, a.on_bad_record,
                                              a.eval_images, a.split_seed, a.workers)  # fmt: skip
    except BadRecord as err:
        raise SystemExit(f"convert: bad record at {err.where}: {err.reason}: {err.detail}") from None
    with atomic_file(a.out_train) as fh:
        json.dump(train, fh, ensure_ascii=False)
    with atomic_file(a.out_eval) as fh:
        for rec in eval_records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    write_json(a.report, report)
    print(f"read {report['read']}: {report['train_samples']} train, {report['eval_records']} held out "
          f"({report['eval_prompts']} prompts), skipped {report['skipped_by_reason']}")  # fmt: skip


if __name__ == "__main__":
    main()
