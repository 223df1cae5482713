"""Convert CLoT-Oogiri-GO ``<language>.jsonl`` into XTuner's InternVL (LLaVA-style) JSON,
with the tutorial's semantics (FIELD-NOTES §1), a held-out evaluation split by image and a
report that accounts for every input line.

Tutorial semantics: image ``images/{image}.jpg``; record skipped if the file is missing;
width/height from the image; human turn ``"<image>\\n" + question`` with a null question
replaced by the default question; gpt turn = ``text``; empty text skipped; ids 0..n-1.
Beyond it: malformed lines, wrong field types, unreadable images and duplicate records are
counted (or, with ``--on-bad-record error``, stop the run naming file and line) instead of
crashing or training twice on the same sample; records of types not in ``--types`` are counted
as ``type_not_selected``. Every non-blank input line ends up kept or skipped with its reason.

Duplicates: the dataset's records carry no id (the tutorial numbers samples 0..n-1), so a
record's identity is what it trains on, ``(image, question, text)``; the second and later
copies of an identical triple are skipped as ``duplicate_record`` naming the first line. The
same image with several different texts is the normal case (many jokes per picture), not a
duplicate. Text that is empty or only whitespace is ``empty_text``.

Speed: each distinct image's header is read once (many records share an image), by a pool of
threads; the output is serialised by the C JSON encoder (no ``indent``) as ``json`` (the
tutorial's list) or ``jsonl`` (one sample per line; XTuner reads both).

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
RECORD_TYPES = ("I2T", "T2T", "IT2T")
# Reasons that are not defects of the record: never fatal under on_bad_record=error.
NOT_BAD = {"type_not_selected"}
FIELD_TYPES = {"text": (str, type(None)), "question": (str, type(None)), "star": (int, type(None)),
               "type": (str, type(None)), "image": (str, type(None))}  # fmt: skip


class BadRecord(ValueError):
    def __init__(self, reason: str, where: str, detail: str):
        super().__init__(f"{where}: {reason}: {detail}")
        self.reason, self.where, self.detail = reason, where, detail


# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic); C4/C8/CC are not frames.
SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
HEADER_BYTES = 1 << 16  # the frame header follows APPn segments (EXIF ≤ 64 KiB) in practice


def jpeg_header_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, walking the marker segments of the file's
    first bytes; None when it is not a JPEG or the frame header is not within ``head``."""
    if head[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(head)
    while i + 4 <= n:
        if head[i] != 0xFF:
            return None
        marker = head[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in SOF_MARKERS:
            if i + 9 > n:
                return None
            height, width = int.from_bytes(head[i + 5 : i + 7], "big"), int.from_bytes(head[i + 7 : i + 9], "big")
            return (width, height) if width and height else None
        i += 2 + int.from_bytes(head[i + 2 : i + 4], "big")
    return None


def image_size(path: Path) -> tuple[int, int] | str:
    """(width, height) from the image header only, or the skip reason. JPEG frame headers are
    parsed directly (the same numbers PIL reports, ~10x cheaper than ``Image.open``); anything
    else (PNG under a .jpg name, a frame header beyond the first 64 KiB) goes through PIL."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as fh:
            size = jpeg_header_size(fh.read(HEADER_BYTES))
        if size:
            return size
        with Image.open(path) as img:
            return img.size
    except FileNotFoundError:
        return "missing_image"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return "corrupt_image"


def image_sizes(folder: Path, names: list[str], workers: int) -> dict[str, tuple[int, int] | str]:
    """Header sizes of ``folder/<name>.jpg``, each name once, in batches over a thread pool
    (file reads release the GIL: this overlaps the I/O of a cold cache on a network disk)."""
    batch = max(64, len(names) // (8 * max(1, workers)) + 1)
    chunks = [names[i : i + batch] for i in range(0, len(names), batch)]

    def sizes(chunk):
        return [image_size(folder / f"{n}.jpg") for n in chunk]

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return dict(zip(names, (size for part in pool.map(sizes, chunks) for size in part)))


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
            workers: int = 8, types: list[str] | None = None) -> tuple[list[dict], list[dict], dict]:  # fmt: skip
    """Return (train samples, eval records, report). Nothing is written."""
    dataset = Path(dataset)
    source = dataset / f"{language}.jsonl"
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such file (conversion.language {language!r})")
    types = list(types) if types else list(RECORD_TYPES)
    read, candidates, skipped, errors, first_seen = 0, [], defaultdict(list), [], {}

    def skip(err: BadRecord):
        if on_bad_record == "error" and err.reason not in NOT_BAD:
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
                if not (rec.get("text") or "").strip():
                    raise BadRecord("empty_text", where, "empty text")
                if rec.get("type") not in types:
                    raise BadRecord("type_not_selected", where, f"type {rec.get('type')!r} not in {types}")
                key = (rec["image"], rec.get("question") or default_question, rec["text"])
                if key in first_seen:
                    raise BadRecord("duplicate_record", where, f"same image, question and text as line {first_seen[key]}")
                first_seen[key] = lineno
            except BadRecord as err:
                skip(err)
                continue
            candidates.append((where, rec))

    # Image headers, each image once (many records share one), in parallel.
    sizes = image_sizes(dataset / "images", sorted({rec["image"] for _, rec in candidates}), workers)

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
        question = rec.get("question") or default_question
        if rec["image"] in held_out:
            key = (rec["image"], question)
            if key not in groups:
                groups[key] = dict(id=f"eval-{len(groups)}", image=f"images/{rec['image']}.jpg",
                                   width=width, height=height, question=question,
                                   type=rec.get("type"), references=[])  # fmt: skip
            groups[key]["references"].append(dict(text=rec["text"], star=rec.get("star"), source=where))
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
        "train_types": dict(Counter(r.get("type") for _, r, _ in kept if r["image"] not in held_out)),
        "images": {"train": len(set(images) - held_out), "eval": len(held_out)},
        "settings": dict(language=language, default_question=default_question, types=types,
                         on_bad_record=on_bad_record, eval_images=eval_images, split_seed=split_seed),
    }  # fmt: skip
    if report["kept"] + n_skipped != read:
        raise AssertionError(f"accounting error: kept {report['kept']} + skipped {n_skipped} != read {read}")
    return train, eval_records, report


def write_samples(path: Path, samples: list[dict], output_format: str) -> None:
    """``json``: one list (the tutorial's layout, without its indent); ``jsonl``: a line each."""
    with atomic_file(path) as fh:
        if output_format == "json":
            fh.write(json.dumps(samples, ensure_ascii=False))
        else:
            fh.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", required=True, type=Path)
    ap.add_argument("--language", default="cn")
    ap.add_argument("--default-question", default=DEFAULT_QUESTION)
    ap.add_argument("--on-bad-record", choices=["skip", "error"], default="skip")
    ap.add_argument("--eval-images", type=int, default=0)
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--types", default=",".join(RECORD_TYPES), help="record types to keep, comma-separated")
    ap.add_argument("--output-format", choices=["json", "jsonl"], default="json")
    ap.add_argument("--out-train", required=True, type=Path)
    ap.add_argument("--out-eval", required=True, type=Path)
    ap.add_argument("--report", required=True, type=Path)
    a = ap.parse_args(argv)
    try:
        train, eval_records, report = convert(a.dataset, a.language, a.default_question, a.on_bad_record,
                                              a.eval_images, a.split_seed, a.workers,
                                              [t for t in a.types.split(",") if t])  # fmt: skip
    except BadRecord as err:
        raise SystemExit(f"convert: bad record at {err.where}: {err.reason}: {err.detail}") from None
    except FileNotFoundError as err:
        raise SystemExit(f"convert: {err}") from None
    write_samples(a.out_train, train, a.output_format)
    write_samples(a.out_eval, eval_records, "jsonl")
    write_json(a.report, report)
    print(f"read {report['read']}: {report['train_samples']} train, {report['eval_records']} held out "
          f"({report['eval_prompts']} prompts), skipped {report['skipped_by_reason']}")  # fmt: skip


if __name__ == "__main__":
    main()
