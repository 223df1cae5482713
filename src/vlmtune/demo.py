"""The embedded demo: a tiny InternVL2 model and a small CLoT-Oogiri-GO-shaped dataset,
built locally and deterministically from a seed, in the exact upstream layouts.

    python -m vlmtune.demo dataset --out data/demo/CLoT-Oogiri-GO --seed 0
    python -m vlmtune.demo model --out data/demo/InternVL2-tiny --seed 0
    python -m vlmtune.demo model --out data/demo/InternVL2-tiny-4b --preset tiny-4b  # Phi-3 LLM
    python -m vlmtune.demo clot-like --out /tmp/clot --records 2000   # realistic size, zipped

Dataset layout (as on the hub after extraction): ``cn.jsonl`` with records
``{"text", "question", "star", "type", "image"}`` and ``images/<id>.jpg``. It holds I2T,
T2T and IT2T records, null questions and stars, one record whose image is missing, one whose
image is corrupt and one with an empty text, so every skip reason of the tutorial occurs.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from .atomic import atomic_dir

# (width, height): varied sizes and aspect ratios, portrait, landscape, square, tiny, wide.
IMAGE_SIZES = [
    (450, 404),
    (897, 1152),
    (640, 480),
    (300, 900),
    (1200, 300),
    (512, 512),
    (200, 260),
    (1024, 768),
    (768, 1024),
    (333, 222),
    (980, 420),
    (420, 980),
]
JOKES = [
    "住手!现在的你还不是那家伙的对手!先撤吧!!",
    "小猫咪,你的猫爪好臭啊",
    "老板说今天加班,我说我的电脑先下班了。",
    "月亮不睡你不睡,你是秃头小宝贝。",
    "我不是胖,我只是对地球的爱比较沉重。",
    "别看了,再看我就要收费了。",
    "这是我周一早上的真实状态。",
    "钱包:我已经尽力了。",
    "减肥第一天,先吃顿好的。",
    "我的快乐,来得快去得也快。",
]
QUESTIONS = ["这张图片里的人在想什么?", "给这张图配一句话。", "如果这只狗会说话,它会说什么?"]
MISSING_IMAGE = "demo_missing_image"
CORRUPT_IMAGE = "demo_corrupt_image"


def image_id(i: int) -> str:
    """The demo dataset's image id of image ``i``."""
    return f"demo{i:03d}"


def demo_records(seed: int) -> list[dict]:
    """The demo's cn.jsonl records. Images 0..11 each get 2-4 responses of mixed types."""
    rng = random.Random(seed)
    records = []
    for i in range(len(IMAGE_SIZES)):
        for k in range(2 + i % 3):
            kind = ["I2T", "I2T", "IT2T", "T2T"][(i + k) % 4]
            question = None if kind == "I2T" else QUESTIONS[(i + k) % len(QUESTIONS)]
            star = None if (i + k) % 3 == 0 else rng.randint(0, 300)
            text = JOKES[(i * 3 + k) % len(JOKES)]
            records.append(dict(text=text, question=question, star=star, type=kind, image=image_id(i)))
    # Bad records, one per reason the tutorial skips (or would crash on).
    records.append(dict(text="图片不见了", question=None, star=3, type="I2T", image=MISSING_IMAGE))
    records.append(dict(text="图片坏掉了", question=None, star=None, type="I2T", image=CORRUPT_IMAGE))
    records.append(dict(text="", question=None, star=None, type="I2T", image=image_id(0)))
    return records


def make_image(path, size: tuple[int, int], rng: random.Random) -> None:
    """A JPEG of ``size`` with coloured ellipses at ``path`` (a path or a binary file object)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rng.randrange(size[0]), rng.randrange(size[1])
        x1, y1 = x0 + rng.randrange(20, 200), y0 + rng.randrange(20, 200)
        draw.ellipse((x0, y0, x1, y1), fill=tuple(rng.randrange(256) for _ in range(3)))
    img.save(path, "JPEG", quality=85)


def build_dataset(out: Path, seed: int = 0) -> Path:
    """Write the embedded demo dataset to ``out`` (atomically): ``cn.jsonl`` in the upstream
    layout with awkward records on purpose, and its JPEGs under ``images/`` (one corrupt). The same
    ``seed`` gives the same files."""
    rng = random.Random(seed)
    with atomic_dir(Path(out)) as tmp:
        images = tmp / "images"
        images.mkdir()
        for i, size in enumerate(IMAGE_SIZES):
            make_image(images / f"{image_id(i)}.jpg", size, rng)
        # A JPEG name holding bytes no decoder accepts.
        (images / f"{CORRUPT_IMAGE}.jpg").write_bytes(b"\x00not a jpeg\xff" * 16)
        with open(tmp / "cn.jsonl", "w", encoding="utf-8") as fh:
            for rec in demo_records(seed):
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return Path(out)


def clot_like_records(n_records: int, seed: int) -> list[dict]:
    """``n_records`` records shaped like CLoT-Oogiri-GO's ``cn.jsonl``: about 3 responses per
    image, I2T/T2T/IT2T in the dataset's proportions (65/32/3 %), null questions for I2T, null
    stars for about a fifth, answers of 10-60 Chinese characters."""
    rng = random.Random(seed)
    chars = sorted({c for line in JOKES + QUESTIONS for c in line if "\u4e00" <= c <= "\u9fff"})
    records, image = [], 0
    while len(records) < n_records:
        for _ in range(rng.randint(1, 5)):
            kind = rng.choices(["I2T", "T2T", "IT2T"], weights=[65, 32, 3])[0]
            text = (
                rng.choice(JOKES)
                if rng.random() < 0.3
                else "".join(rng.choice(chars) for _ in range(rng.randint(10, 60)))
            )
            records.append(
                dict(
                    text=text,
                    question=None if kind == "I2T" else rng.choice(QUESTIONS),
                    star=None if rng.random() < 0.22 else rng.randint(0, 500),
                    type=kind,
                    image=f"clot{image:05d}",
                )
            )
        image += 1
    return records[:n_records]


def build_clot_like(
    out: Path, n_records: int = 2000, seed: int = 0, min_side: int = 200, max_side: int = 1200
) -> Path:
    """A CLoT-Oogiri-GO-shaped dataset in the hub's layout (``cn.jsonl`` + ``images.zip`` holding
    ``images/<id>.jpg``, sides ``min_side``-``max_side`` px of varied aspect), for measuring the
    workflow at a realistic size (benchmarks/gpu_workflow.sh)."""
    import io
    import zipfile

    rng = random.Random(seed + 1)
    records = clot_like_records(n_records, seed)
    with atomic_dir(Path(out)) as tmp:
        with zipfile.ZipFile(tmp / "images.zip", "w", zipfile.ZIP_STORED) as zf:
            for name in sorted({r["image"] for r in records}):
                buf = io.BytesIO()
                size = (rng.randint(min_side, max_side), rng.randint(min_side, max_side))
                make_image(buf, size, rng)
                zf.writestr(f"images/{name}.jpg", buf.getvalue())
        with open(tmp / "cn.jsonl", "w", encoding="utf-8") as fh:
            for rec in records:
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return Path(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        description="Build the embedded demo's dataset (its model: vlmtune.demo_model)."
    )
    ap.add_argument("what", choices=["dataset", "clot-like"])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--records", type=int, default=2000, help="clot-like: number of records")
    args = ap.parse_args(argv)
    if args.what == "clot-like":
        path = build_clot_like(args.out, args.records, args.seed)
    else:
        path = build_dataset(args.out, args.seed)
    print(f"built demo {args.what} at {path}")


if __name__ == "__main__":
    main()
