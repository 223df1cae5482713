"""Validate the converted training set against the model before training, because XTuner
0.2.0 hides both failures this catches (docs/xtuner.md, "Data"): an image that does not decode is
silently replaced by another random sample, and a sample longer than ``max_length`` is cut
(image tokens included) with only a warning.

1. Every image the samples use is fully decoded (``convert("RGB")``, as XTuner does), once per
   image, in a process pool; a failure drops its samples (``on_bad_image: skip``, reported with
   the sample ids) or stops the run (``error``). The decoded size must equal the header size the
   conversion recorded.
2. Each sample's token length is what XTuner will feed the model: its own
   ``InternVL_V1_5_Dataset.get_inputid_labels`` (training prompt, system prompt, stop-word
   suffix, the model's tokenizer) with the image expanded to ``tiles × tokens_per_tile``
   ``<IMG_CONTEXT>`` tokens, where ``tiles`` comes from XTuner's own ``dynamic_preprocess`` on the
   image's size and ``tokens_per_tile = (force_image_size / patch_size)² · downsample_ratio²``
   (256 for InternVL2), all read from the model's ``config.json``. ``<IMG_CONTEXT>`` is an atomic
   special token, so the prompt is tokenised with one and ``tokens - 1`` is added; the run checks
   that shortcut against the full expansion on its largest image.
3. Samples longer than ``max_length`` are reported and, per ``on_too_long``, dropped, kept
   (XTuner truncates them) or fatal. The length distribution is reported (percentiles, histogram
   bins, tiles per image) and drawn as a PNG.

    python -m vlmtune.validate --train results/converted/x/converted_train.json \
        --images data/datasets/x --model data/models/InternVL2-2B --max-length 8192 \
        --out-train results/converted/x/train.json --report results/converted/x/validation_report.json \
        --histogram results/converted/x/token_lengths.png
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from .atomic import atomic_file, write_json
from .images import BadImagePath, decode, image_path
from .jsonl import JsonlError, read_records, write_records
from .prompt import FORMATS, IMG_CONTEXT, IMG_END, IMG_START

PERCENTILES = (50, 90, 95, 99, 99.9)


class ValidationError(ValueError):
    """Training data that fails a check set to ``error`` (the step's one-line error naming the sample)."""


# ---------------------------------------------------------------------------- model geometry


def model_tiling(model_dir: Path) -> dict:
    """The image-tiling settings XTuner's InternVL dataset reads from the model's config."""
    path = Path(model_dir) / "config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    try:
        tiling = {
            "min_num": cfg["min_dynamic_patch"],
            "max_num": cfg["max_dynamic_patch"],
            "image_size": cfg["force_image_size"],
            "use_thumbnail": bool(cfg["use_thumbnail"]),
            "downsample_ratio": cfg["downsample_ratio"],
            "patch_size": cfg["vision_config"]["patch_size"],
            "architecture": cfg["llm_config"]["architectures"][0],
        }
    except KeyError as exc:
        raise ValidationError(f"{path}: no {exc.args[0]!r}: not an InternVL chat model config") from None
    tiling["tokens_per_tile"] = int(
        (tiling["image_size"] // tiling["patch_size"]) ** 2 * tiling["downsample_ratio"] ** 2
    )
    return tiling


class _SizeOnly:
    """Stands in for a PIL image in XTuner's ``dynamic_preprocess``: only the size matters to the
    tile count, so resizing and cropping pixels is skipped."""

    def __init__(self, size):
        self.size = tuple(size)

    def resize(self, size):
        return _SizeOnly(size)

    def crop(self, box):
        return _SizeOnly((box[2] - box[0], box[3] - box[1]))


def tile_count(width: int, height: int, tiling: dict) -> int:
    """Tiles XTuner cuts an image of this size into (its own aspect-ratio rule, thumbnail included)."""
    from xtuner.dataset.internvl_dataset import dynamic_preprocess

    return len(
        dynamic_preprocess(
            _SizeOnly((width, height)),
            tiling["min_num"],
            tiling["max_num"],
            tiling["image_size"],
            tiling["use_thumbnail"],
        )
    )


# ---------------------------------------------------------------------------- token lengths


class TokenLength:
    """Token count of one sample exactly as XTuner 0.2.0 builds its ``input_ids``."""

    def __init__(self, model_dir: Path, tiling: dict):
        from mmengine.config import ConfigDict
        from transformers import AutoTokenizer
        from xtuner.dataset.internvl_dataset import InternVL_V1_5_Dataset
        from xtuner.utils import PROMPT_TEMPLATE

        arch = tiling["architecture"]
        if arch not in FORMATS:
            raise ValidationError(f"{model_dir}: LLM {arch} is not one of {', '.join(FORMATS)}")
        fmt = FORMATS[arch]
        self._build = InternVL_V1_5_Dataset.get_inputid_labels
        # The attributes get_inputid_labels reads, set as InternVL_V1_5_Dataset.__init__ sets
        # them for the LLM (the config's template: internlm2_chat or, for Phi-3, phi3_chat).
        template = ConfigDict(getattr(PROMPT_TEMPLATE, fmt.xtuner_template))
        if arch == "Phi3ForCausalLM":
            template["INSTRUCTION"] = "<|user|>\n{input}<|end|><|assistant|>\n"
        else:
            template["SYSTEM"] = "<|im_start|>system\n{system}<|im_end|>"
            template["INSTRUCTION"] = "<|im_start|>user\n{input}<|im_end|><|im_start|>assistant\n"
        self._self = type("XTunerDataset", (), {})()
        self._self.template, self._self.max_length = template, 1 << 30  # no truncation: we measure
        self._self._system = fmt.system
        self._self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=True)
        self.tokens_per_tile = tiling["tokens_per_tile"]

    def __call__(self, conversations: list[dict], tiles: int, expand: bool = False) -> int:
        image_tokens = tiles * self.tokens_per_tile
        n = image_tokens if expand else 1  # <IMG_CONTEXT> is atomic: one stands for all of them
        image = f"{IMG_START}{IMG_CONTEXT * n}{IMG_END}"
        convs = [dict(c) for c in conversations]  # get_inputid_labels edits them in place
        return len(self._build(self._self, convs, image)["input_ids"]) + image_tokens - n


# ---------------------------------------------------------------------------- images


def load_samples(path: Path) -> list[dict]:
    """Converted samples (.json list or .jsonl, the package's one reader); ValidationError naming
    file:line for a line that is not a JSON record."""
    try:
        return read_records(path)
    except JsonlError as exc:
        raise ValidationError(str(exc)) from None


def decode_all(folder: Path, names: list[str], workers: int) -> dict[str, tuple[int, int] | str]:
    """Each image fully decoded once, in a process pool; an image path that leaves ``folder``
    is not opened and gets its error instead."""
    paths, decoded = {}, {}
    for name in names:
        try:
            paths[name] = str(image_path(folder, name))
        except BadImagePath as exc:
            decoded[name] = f"BadImagePath: {exc}"
    todo = list(paths)
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        chunk = max(1, len(todo) // (8 * max(1, workers)))
        decoded.update(zip(todo, pool.map(decode, [paths[n] for n in todo], chunksize=chunk)))
    return decoded


def renumbered(samples: list[dict]) -> list[dict]:
    """The samples with ids 0..n-1 in order (the tutorial's format) after some were dropped;
    the report keeps the converted file's ids."""
    return [{**s, "id": i} for i, s in enumerate(samples)]


def percentile(sorted_values: list[int], q: float) -> int:
    """The ``q``-th percentile (nearest rank) of ``sorted_values``; 0 for none."""
    if not sorted_values:
        return 0
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q / 100 * len(sorted_values)) - 1))]


def histogram(values: list[int], max_length: int, bins: int = 40) -> dict:
    """Counts of ``values`` in ``bins`` equal-width bins up to the larger of ``max_length`` and the longest
    value."""
    top = max([max_length, *values]) if values else max_length
    width = max(1, math.ceil(top / bins))
    counts = Counter(v // width for v in values)
    # Bin i holds lengths in [i·bin_width, (i+1)·bin_width).
    return {"bin_width": width, "counts": [counts.get(i, 0) for i in range(bins)]}


def plot(lengths: list[int], max_length: int, out: Path) -> None:
    """``token_lengths.png``: the histogram of sample lengths with ``max_length`` marked, written to
    ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist(lengths, bins=50, color="#4477aa")
    ax.axvline(max_length, color="#cc3311", linestyle="--", label=f"max_length {max_length}")
    ax.set_xlabel("tokens per sample (text + image)")
    ax.set_ylabel("samples")
    ax.set_title(f"{len(lengths)} samples")
    ax.legend()
    fig.tight_layout()
    with atomic_file(out, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------- the step


def check_images(
    samples: list[dict], image_folder: Path, decoded: dict, on_bad_image: str
) -> dict[str, dict]:
    """Stage 1: every sample's image decoded (``decoded``: name -> (width, height) or an error).
    Returns the images that do not decode, with the samples that use them (ValidationError with
    ``on_bad_image: error``); ValidationError if an image decodes to another size than the
    conversion recorded (the data changed since: reconvert)."""
    bad_images, size_mismatch = {}, {}
    for s in samples:
        got = decoded[s["image"]]
        if isinstance(got, str):
            bad_images.setdefault(s["image"], {"error": got, "sample_ids": []})["sample_ids"].append(s["id"])
        elif tuple(got) != (s["width"], s["height"]):
            size_mismatch.setdefault(
                s["image"], {"decoded": list(got), "recorded": [s["width"], s["height"]]}
            )
    if bad_images and on_bad_image == "error":
        name, info = next(iter(bad_images.items()))
        raise ValidationError(
            f"{Path(image_folder) / name}: does not decode ({info['error']}); "
            f"used by sample ids {info['sample_ids'][:10]}"
        )
    if size_mismatch:
        name, info = next(iter(size_mismatch.items()))
        raise ValidationError(
            f"{Path(image_folder) / name}: decodes to {info['decoded']} but the conversion "
            f"recorded {info['recorded']}: reconvert ({len(size_mismatch)} images differ)"
        )
    return bad_images


def check_lengths(
    samples: list[dict], bad_images: dict, tiles_of: dict[str, int], count, max_length: int, on_too_long: str
) -> tuple[list[dict], list[dict], list[int]]:
    """Stage 2: the token length XTuner will feed for each sample with a decodable image
    (``count``: text tokens + 256 per tile). Returns the samples to train on, those over
    ``max_length`` (dropped with ``on_too_long: drop``; ValidationError with ``error``) and every
    length."""
    kept, too_long, lengths = [], [], []
    for s in samples:
        if s["image"] in bad_images:
            continue
        length = count(s["conversations"], tiles_of[s["image"]])
        lengths.append(length)
        if length > max_length:
            too_long.append(
                {"id": s["id"], "image": s["image"], "tokens": length, "tiles": tiles_of[s["image"]]}
            )
            if on_too_long == "drop":
                continue
        kept.append(s)
    if too_long and on_too_long == "error":
        first = too_long[0]
        raise ValidationError(
            f"sample id {first['id']} ({first['image']}) is {first['tokens']} tokens, over "
            f"max_length {max_length}; {len(too_long)} samples are (validation.on_too_long)"
        )
    # The one-token shortcut, checked against the full expansion on the sample with most tiles.
    if samples and tiles_of:
        probe = max((s for s in samples if s["image"] in tiles_of), key=lambda s: tiles_of[s["image"]])
        full = count(probe["conversations"], tiles_of[probe["image"]], expand=True)
        if full != count(probe["conversations"], tiles_of[probe["image"]]):
            raise AssertionError(
                f"token count shortcut disagrees with the full expansion on sample {probe['id']}"
            )
    return kept, too_long, lengths


def validate(
    samples: list[dict],
    image_folder: Path,
    model_dir: Path,
    max_length: int,
    on_too_long: str = "drop",
    on_bad_image: str = "skip",
    workers: int = 2,
) -> tuple[list[dict], dict, list[int]]:
    """Check the converted training ``samples`` before training, in the stages above: images
    under ``image_folder`` decode (in ``workers`` processes), token lengths with ``model_dir``'s
    tokenizer and tiling against ``max_length``. Return (samples to train on, report, every
    checked sample's token length); the report accounts for every sample in. Raises
    ValidationError where the policy is ``error``."""
    tiling = model_tiling(model_dir)
    images = sorted({s["image"] for s in samples})
    decoded = decode_all(Path(image_folder), images, workers)
    bad_images = check_images(samples, image_folder, decoded, on_bad_image)
    count = TokenLength(model_dir, tiling)
    tiles_of = {
        name: tile_count(*decoded[name], tiling) for name in images if not isinstance(decoded[name], str)
    }
    kept, too_long, lengths = check_lengths(samples, bad_images, tiles_of, count, max_length, on_too_long)

    ordered = sorted(lengths)
    n_bad = sum(len(v["sample_ids"]) for v in bad_images.values())
    report = {
        "samples_in": len(samples),
        "samples_out": len(kept),
        "dropped_bad_image": n_bad,
        "dropped_too_long": len(too_long) if on_too_long == "drop" else 0,
        "too_long": len(too_long),
        "too_long_samples": too_long,
        "bad_images": bad_images,
        "images_checked": len(images),
        "model": {
            k: tiling[k] for k in ("min_num", "max_num", "image_size", "use_thumbnail", "tokens_per_tile")
        },
        "tiles_per_image": {str(k): v for k, v in sorted(Counter(tiles_of.values()).items())},
        "token_length": {
            "max_length": max_length,
            "min": ordered[0] if ordered else 0,
            "mean": round(sum(ordered) / len(ordered), 1) if ordered else 0,
            "max": ordered[-1] if ordered else 0,
            "percentiles": {f"p{q:g}": percentile(ordered, q) for q in PERCENTILES},
            "histogram": histogram(ordered, max_length),
        },
        "settings": {"max_length": max_length, "on_too_long": on_too_long, "on_bad_image": on_bad_image},
    }
    if report["samples_out"] + n_bad + report["dropped_too_long"] != len(samples):
        raise AssertionError("accounting error in validation")
    return kept, report, lengths


def check_eval_images(records: list[dict], image_folder: Path, workers: int = 2) -> int:
    """Fully decode every held-out image (conversion read only headers). The eval set is not
    rewritten here, so an image that does not decode stops the run naming it: evaluated as a
    grey-padded picture (LMDeploy loads truncated files) it would skew the metrics silently."""
    images = sorted({r["image"] for r in records})
    for name, got in decode_all(Path(image_folder), images, workers).items():
        if isinstance(got, str):
            ids = [r["id"] for r in records if r["image"] == name]
            raise ValidationError(
                f"{Path(image_folder) / name}: held-out image does not decode ({got}); "
                f"used by eval records {ids[:10]}: replace the file or reconvert"
            )
    return len(images)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", required=True, type=Path, help="converted samples (.json or .jsonl)")
    ap.add_argument(
        "--images", required=True, type=Path, help="folder the samples' image paths are relative to"
    )
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--max-length", required=True, type=int)
    ap.add_argument("--on-too-long", choices=["drop", "keep", "error"], default="drop")
    ap.add_argument("--on-bad-image", choices=["skip", "error"], default="skip")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--eval", type=Path, help="held-out records (eval.jsonl): their images are decoded too")
    ap.add_argument("--out-train", required=True, type=Path)
    ap.add_argument("--report", required=True, type=Path)
    ap.add_argument("--histogram", required=True, type=Path)
    a = ap.parse_args(argv)
    try:
        samples = load_samples(a.train)
        kept, report, lengths = validate(
            samples, a.images, a.model, a.max_length, a.on_too_long, a.on_bad_image, a.workers
        )
        if a.eval is not None:
            report["eval_images_checked"] = check_eval_images(load_samples(a.eval), a.images, a.workers)
    except ValidationError as exc:
        raise SystemExit(f"validate: {exc}") from None
    write_records(a.out_train, renumbered(kept))
    plot(lengths, a.max_length, a.histogram)
    write_json(a.report, report)
    tl = report["token_length"]
    print(
        f"{report['samples_in']} samples, {report['images_checked']} images decoded: "
        f"{report['samples_out']} kept, "
        f"{report['dropped_bad_image']} dropped (bad image), {report['too_long']} over max_length "
        f"{a.max_length} "
        f"({report['dropped_too_long']} dropped); tokens p50 {tl['percentiles']['p50']}, p99 "
        f"{tl['percentiles']['p99']}, max {tl['max']}"
    )


if __name__ == "__main__":
    main()
