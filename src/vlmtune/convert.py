"""Convert CLoT-Oogiri-GO ``<language>.jsonl`` into XTuner's InternVL (LLaVA-style) JSON,
with the tutorial's semantics (docs/reference-run.md), a held-out evaluation split by image and a
report that accounts for every input line.

Tutorial semantics: image ``images/{image}.jpg``; record skipped if the file is missing;
width/height from the image; human turn ``"<image>\\n" + question`` with a null question
replaced by the default question; gpt turn = ``text``; empty text skipped; ids 0..n-1.
Beyond it: lines that are not UTF-8 or not JSON (read by ``vlmtune.jsonl``: split on ``\\n``
only, BOM dropped), wrong field types, image ids that leave the image folder, unreadable
images and duplicate records are counted (or, with ``--on-bad-record error``, stop the run
naming file and line) instead of crashing or training twice on the same sample. Filters come
first: a record of a type not in ``--types`` is counted as ``type_not_selected`` whatever else
is wrong with it. Every non-blank input line ends up kept or skipped with its reason.

Held-out images are fully decoded before the split is fixed (``held_out_images``): an image
whose header reads but whose pixels do not is never held out (its records are skipped as
``corrupt_image``), so evaluation never meets it and a ``skip`` run does not stop on it.
``--eval-images`` must leave at least one training image.

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
import random
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .atomic import write_json
from .images import BadImagePath, decode, image_path
from .jsonl import iter_jsonl, write_records

DEFAULT_QUESTION = "请你根据这张图片,讲一个脑洞大开的梗。"
RECORD_TYPES = ("I2T", "T2T", "IT2T")
# Reasons that are not defects of the record: never fatal under on_bad_record=error.
NOT_BAD = {"type_not_selected"}
FIELD_TYPES = {
    "text": (str, type(None)),
    "question": (str, type(None)),
    "star": (int, type(None)),
    "type": (str, type(None)),
    "image": (str, type(None)),
}


class BadRecord(ValueError):
    """A record the converter cannot use: the ``reason`` counted in the report, where (file:line) and what."""

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
            height, width = (
                int.from_bytes(head[i + 5 : i + 7], "big"),
                int.from_bytes(head[i + 7 : i + 9], "big"),
            )
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


def parse_record(value, where: str, types: list[str]) -> dict:
    """The record of one parsed line, checked in this order: an object; its type selected
    (filters first: a record the run excludes is counted as excluded, never as bad); its
    fields of the right types and valid Unicode (a lone surrogate such as ``"\\ud800"`` is
    legal JSON but cannot be written back as UTF-8)."""
    if not isinstance(value, dict):
        raise BadRecord("malformed_json", where, f"a {type(value).__name__}, not an object")
    kind = value.get("type")
    if isinstance(kind, (str, type(None))) and kind not in types:
        raise BadRecord("type_not_selected", where, f"type {kind!r} not in {types}")
    for field, allowed in FIELD_TYPES.items():
        got = value.get(field)
        if not isinstance(got, allowed) or isinstance(got, bool):
            raise BadRecord("wrong_field_type", where, f"{field}={got!r}")
        if isinstance(got, str):
            try:
                got.encode("utf-8")
            except UnicodeEncodeError:
                raise BadRecord("invalid_unicode", where, f"{field}={got!r}") from None
    return value


def image_file(images: Path, image_id: str, where: str) -> Path:
    """``images/<id>.jpg``, or a bad record when the id is absent or leaves the folder."""
    if not image_id:
        raise BadRecord("missing_image", where, "no image id")
    try:
        image_path(images, image_id)  # the id itself names no parent ("..") or root
        return image_path(images, f"{image_id}.jpg")
    except BadImagePath as exc:
        raise BadRecord("bad_image_id", where, f"{image_id!r}: {exc}") from None


class ConversionError(ValueError):
    """A setting that cannot work with this dataset (names the config key)."""


def held_out_images(
    images: list[str], folder: Path, eval_images: int, split_seed: int
) -> tuple[list[str], dict]:
    """The seeded draw of ``eval_images`` images, drawn only from images whose pixels decode:
    the drawn images are fully decoded (conversion reads only headers; an evaluation image
    must decode because the eval set is not filtered later), and while any does not, it is
    removed and the draw repeated with the same seed over the rest. Deterministic for a given
    dataset and seed (reconverting holds out the same images), and the same draw as before when
    every image decodes. Returns (held-out images, {undecodable image: error})."""
    decoded, bad, pool = {}, {}, list(images)
    while True:
        if eval_images >= len(pool):
            raise ConversionError(
                f"conversion.eval_images: {eval_images} is not below the {len(pool)} images with "
                f"usable records{f' ({len(bad)} more do not decode)' if bad else ''}: "
                "no training image would be left; lower it (0 holds nothing out)"
            )
        held = random.Random(split_seed).sample(pool, eval_images)
        for name in held:
            if name not in decoded:
                decoded[name] = decode(str(folder / f"{name}.jpg"))
        failed = {n: decoded[n] for n in held if isinstance(decoded[n], str)}
        if not failed:
            return held, bad
        bad.update(failed)
        pool = [n for n in pool if n not in failed]


class Skips:
    """The records left out, by reason, with where each was; with ``on_bad_record: error`` the
    bad ones (not the merely unselected) are kept to raise the first of the file, not of a pass."""

    def __init__(self, on_bad_record: str):
        self.on_bad_record = on_bad_record
        self.by_reason: dict[str, list[str]] = defaultdict(list)
        self.errors: list[BadRecord] = []

    def add(self, err: BadRecord) -> None:
        if self.on_bad_record == "error" and err.reason not in NOT_BAD:
            self.errors.append(err)
        self.by_reason[err.reason].append(f"{err.where}: {err.detail}")

    def raise_first_error(self) -> None:
        if self.errors:
            raise min(self.errors, key=lambda e: int(e.where.rsplit(":", 1)[1]))

    def __len__(self) -> int:
        return sum(len(v) for v in self.by_reason.values())


def read_candidates(
    source: Path, images_dir: Path, types: list[str], default_question: str, skips: Skips
) -> tuple[int, list[tuple[str, dict]]]:
    """Stage 1: the lines of ``source`` that parse as records of the selected ``types`` with a
    confined image id, a text, and no duplicate (image, question, text). Returns the count of
    records read and the candidates as (file:line, record); the rest go to ``skips``."""
    read, candidates, first_seen = 0, [], {}
    for line in iter_jsonl(source):  # split on "\n" only; BOM dropped; blank lines are not records
        read += 1
        where = line.where
        try:
            if line.error is not None:
                raise BadRecord(line.error.reason, where, line.error.detail)
            rec = parse_record(line.value, where, types)
            image_file(images_dir, rec.get("image"), where)
            if not (rec.get("text") or "").strip():
                raise BadRecord("empty_text", where, "empty text")
            key = (rec["image"], rec.get("question") or default_question, rec["text"])
            if key in first_seen:
                raise BadRecord(
                    "duplicate_record", where, f"same image, question and text as line {first_seen[key]}"
                )
            first_seen[key] = line.lineno
        except BadRecord as err:
            skips.add(err)
            continue
        candidates.append((where, rec))
    return read, candidates


def with_image_sizes(
    candidates: list[tuple[str, dict]], images_dir: Path, workers: int, skips: Skips
) -> list[tuple[str, dict, tuple[int, int]]]:
    """Stage 2: the candidates whose image header reads, with its (width, height); each image is
    read once (many records share one), in ``workers`` processes."""
    sizes = image_sizes(images_dir, sorted({rec["image"] for _, rec in candidates}), workers)
    kept = []
    for where, rec in candidates:
        size = sizes[rec["image"]]
        if isinstance(size, str):
            skips.add(BadRecord(size, where, f"images/{rec['image']}.jpg"))
            continue
        kept.append((where, rec, size))
    return kept


def hold_out(
    kept: list, images_dir: Path, eval_images: int, split_seed: int, skips: Skips
) -> tuple[list, list[str], set[str], dict[str, str]]:
    """Stage 3: draw ``eval_images`` held-out images (seeded) among those whose pixels decode;
    a drawn image that does not decode is replaced and its records skipped as corrupt. Returns
    the records left, all images left, the held-out images and the undecodable ones."""
    images = sorted({rec["image"] for _, rec, _ in kept})
    held, undecodable = (
        held_out_images(images, images_dir, eval_images, split_seed) if eval_images else ([], {})
    )
    if undecodable:
        still = []
        for where, rec, size in kept:
            if rec["image"] in undecodable:
                detail = f"images/{rec['image']}.jpg: pixels do not decode ({undecodable[rec['image']]})"
                skips.add(BadRecord("corrupt_image", where, detail))
            else:
                still.append((where, rec, size))
        kept, images = still, [n for n in images if n not in undecodable]
    return kept, images, set(held), undecodable


def build_samples(kept: list, held_out: set[str], default_question: str) -> tuple[list[dict], list[dict]]:
    """Stage 4: the training samples (the tutorial's conversation format, with the image's
    width/height) and the evaluation records (one per held-out image and question, with all its
    answers as references)."""
    train, groups = [], {}
    for where, rec, (width, height) in kept:
        question = rec.get("question") or default_question
        if rec["image"] in held_out:
            key = (rec["image"], question)
            if key not in groups:
                groups[key] = {
                    "id": f"eval-{len(groups)}",
                    "image": f"images/{rec['image']}.jpg",
                    "width": width,
                    "height": height,
                    "question": question,
                    "type": rec.get("type"),
                    "references": [],
                }
            groups[key]["references"].append({"text": rec["text"], "star": rec.get("star"), "source": where})
            continue
        train.append(
            {
                "id": len(train),
                "image": f"images/{rec['image']}.jpg",
                "width": width,
                "height": height,
                "conversations": [
                    {"from": "human", "value": f"<image>\n{question}"},
                    {"from": "gpt", "value": rec["text"]},
                ],
            }
        )
    return train, list(groups.values())


def convert(
    dataset: Path,
    language: str = "cn",
    default_question: str = DEFAULT_QUESTION,
    on_bad_record: str = "skip",
    eval_images: int = 0,
    split_seed: int = 0,
    workers: int = 8,
    types: list[str] | None = None,
) -> tuple[list[dict], list[dict], dict]:
    """Convert ``dataset``'s ``<language>.jsonl`` (upstream CLoT layout) in the stages above and
    return (train samples, eval records, report); nothing is written. The report accounts for
    every record read: kept (train or eval) or skipped with its reason and file:line.
    FileNotFoundError without the file; with ``on_bad_record: error`` the first bad record
    (BadRecord, naming file:line)."""
    dataset = Path(dataset)
    source = dataset / f"{language}.jsonl"
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such file (conversion.language {language!r})")
    types = list(types) if types else list(RECORD_TYPES)
    images_dir = dataset / "images"
    skips = Skips(on_bad_record)
    read, candidates = read_candidates(source, images_dir, types, default_question, skips)
    kept = with_image_sizes(candidates, images_dir, workers, skips)
    skips.raise_first_error()
    kept, images, held_out, undecodable = hold_out(kept, images_dir, eval_images, split_seed, skips)
    skips.raise_first_error()
    train, eval_records = build_samples(kept, held_out, default_question)

    n_eval = sum(len(g["references"]) for g in eval_records)
    report = {
        "source": str(source),
        "read": read,
        "kept": len(train) + n_eval,
        "train_samples": len(train),
        "eval_records": n_eval,
        "eval_prompts": len(eval_records),
        "eval_images": sorted(held_out),
        "eval_images_undecodable": {f"images/{k}.jpg": v for k, v in sorted(undecodable.items())},
        "skipped": len(skips),
        "skipped_by_reason": {k: len(v) for k, v in sorted(skips.by_reason.items())},
        "skipped_where": {k: v for k, v in sorted(skips.by_reason.items())},
        "train_types": dict(Counter(r.get("type") for _, r, _ in kept if r["image"] not in held_out)),
        "images": {"train": len(set(images) - held_out), "eval": len(held_out)},
        "settings": {
            "language": language,
            "default_question": default_question,
            "types": types,
            "on_bad_record": on_bad_record,
            "eval_images": eval_images,
            "split_seed": split_seed,
        },
    }
    if report["kept"] + len(skips) != read:
        raise AssertionError(f"accounting error: kept {report['kept']} + skipped {len(skips)} != read {read}")
    return train, eval_records, report


write_samples = write_records  # the training file: json (one list) or jsonl


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
        train, eval_records, report = convert(
            a.dataset,
            a.language,
            a.default_question,
            a.on_bad_record,
            a.eval_images,
            a.split_seed,
            a.workers,
            [t for t in a.types.split(",") if t],
        )
    except BadRecord as err:
        raise SystemExit(f"convert: bad record at {err.where}: {err.reason}: {err.detail}") from None
    except (FileNotFoundError, ConversionError) as err:
        raise SystemExit(f"convert: {err}") from None
    write_samples(a.out_train, train, a.output_format)
    write_samples(a.out_eval, eval_records, "jsonl")
    write_json(a.report, report)
    print(
        f"read {report['read']}: {report['train_samples']} train, {report['eval_records']} held out "
        f"({report['eval_prompts']} prompts), skipped {report['skipped_by_reason']}"
    )


if __name__ == "__main__":
    main()
