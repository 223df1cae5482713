"""Validation before training, checked against XTuner 0.2.0's own InternVL dataset on the tiny
demo model (max_dynamic_patch 4 + thumbnail, 448-px tiles: 256 tokens per tile)."""

import json
import shutil

import pytest

from vlmtune.convert import convert, write_samples
from vlmtune.validate import ValidationError, main, model_tiling, tile_count, validate


@pytest.fixture(scope="module")
def train_samples(demo_dataset):
    return convert(demo_dataset, eval_images=0)[0]


def test_tiling_is_read_from_the_model_config(tiny_model):
    tiling = model_tiling(tiny_model)
    assert (tiling["min_num"], tiling["max_num"], tiling["use_thumbnail"]) == (1, 4, True)
    assert tiling["tokens_per_tile"] == 256  # (448 / 14)^2 * 0.5^2


@pytest.mark.parametrize("size", [(450, 404), (1200, 300), (300, 900), (200, 260), (897, 1152), (2000, 100)])
def test_tile_count_equals_xtuners_on_real_pixels(tiny_model, size):
    from PIL import Image
    from xtuner.dataset.internvl_dataset import dynamic_preprocess

    tiling = model_tiling(tiny_model)
    real = dynamic_preprocess(
        Image.new("RGB", size),
        tiling["min_num"],
        tiling["max_num"],
        tiling["image_size"],
        tiling["use_thumbnail"],
    )
    assert tile_count(*size, tiling) == len(real)


def test_token_lengths_equal_xtuners_input_ids(demo_dataset, tiny_model, train_samples, tmp_path):
    """The lengths validation reports are the lengths of the input_ids XTuner's InternVL
    dataset builds for the same samples (untruncated)."""
    from xtuner.dataset.internvl_dataset import InternVL_V1_5_Dataset
    from xtuner.utils import PROMPT_TEMPLATE

    write_samples(tmp_path / "train.json", train_samples, "json")
    dataset = InternVL_V1_5_Dataset(
        str(tiny_model),
        PROMPT_TEMPLATE.internlm2_chat,
        [str(tmp_path / "train.json")],
        [str(demo_dataset)],
        max_length=100000,
    )
    _, report, lengths = validate(train_samples, demo_dataset, tiny_model, max_length=100000)
    expected = [len(dataset.prepare_data(i)["input_ids"]) for i in range(len(train_samples))]
    assert lengths == expected
    assert (
        report["token_length"]["max"] == max(expected)
        and sum(report["token_length"]["histogram"]["counts"]) == 36
    )


@pytest.mark.parametrize("policy", ["drop", "keep", "error"])
def test_samples_over_max_length(demo_dataset, tiny_model, train_samples, policy):
    _, _, lengths = validate(train_samples, demo_dataset, tiny_model, max_length=100000)
    limit = sorted(lengths)[len(lengths) // 2]  # about half the samples are longer
    over = [s["id"] for s, n in zip(train_samples, lengths) if n > limit]
    assert over
    if policy == "error":
        with pytest.raises(ValidationError, match=f"sample id {over[0]} .* over max_length {limit}"):
            validate(train_samples, demo_dataset, tiny_model, max_length=limit, on_too_long="error")
        return
    kept, report, _ = validate(train_samples, demo_dataset, tiny_model, max_length=limit, on_too_long=policy)
    assert [t["id"] for t in report["too_long_samples"]] == over and report["too_long"] == len(over)
    assert all(t["tokens"] > limit for t in report["too_long_samples"])
    if policy == "drop":
        assert [s["id"] for s in kept] == [s["id"] for s in train_samples if s["id"] not in over]
    else:
        assert kept == train_samples


@pytest.mark.parametrize("lenient_pillow", [False, True])
def test_image_that_does_not_decode(
    demo_dataset, tiny_model, train_samples, tmp_path, monkeypatch, lenient_pillow
):
    """A JPEG whose header is intact (so conversion accepts it) but whose data is cut; also
    when an imported library (lmdeploy does) made Pillow accept truncated files process-wide."""
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", lenient_pillow)
    images = tmp_path / "ds"
    shutil.copytree(demo_dataset, images)
    jpg = images / "images" / "demo003.jpg"
    jpg.write_bytes(jpg.read_bytes()[:700])
    users = [s["id"] for s in train_samples if s["image"] == "images/demo003.jpg"]
    kept, report, _ = validate(train_samples, images, tiny_model, max_length=4096)
    assert report["bad_images"]["images/demo003.jpg"]["sample_ids"] == users
    assert report["dropped_bad_image"] == len(users) and len(kept) == 36 - len(users)
    assert report["samples_out"] + report["dropped_bad_image"] + report["dropped_too_long"] == 36
    with pytest.raises(ValidationError, match="demo003.jpg: does not decode"):
        validate(train_samples, images, tiny_model, max_length=4096, on_bad_image="error")


def test_cli_writes_the_training_file_report_and_histogram(demo_dataset, tiny_model, train_samples, tmp_path):
    write_samples(tmp_path / "in.jsonl", train_samples, "jsonl")
    main(
        [
            "--train",
            str(tmp_path / "in.jsonl"),
            "--images",
            str(demo_dataset),
            "--model",
            str(tiny_model),
            "--max-length",
            "2048",
            "--out-train",
            str(tmp_path / "train.jsonl"),
            "--report",
            str(tmp_path / "r.json"),
            "--histogram",
            str(tmp_path / "h.png"),
        ]
    )
    out = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert out == train_samples
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["samples_out"] == 36 and report["too_long"] == 0 and report["images_checked"] == 12
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_jsonl_training_file_renders_with_its_sample_count(configs, train_samples, tmp_path):
    """conversion.output_format: jsonl reaches training: the renderer counts samples per line."""
    from vlmtune.xtuner_config import render

    write_samples(tmp_path / "train.jsonl", train_samples, "jsonl")
    write_samples(tmp_path / "train.json", train_samples, "json")
    plans = [
        render(tmp_path / "m", tmp_path / f"train.{fmt}", tmp_path / "ds", configs[1]["train"])[1]
        for fmt in ("json", "jsonl")
    ]
    assert plans[0] == plans[1] and plans[0]["samples"] == 36


def test_a_held_out_image_that_does_not_decode_stops_the_run_naming_it(
    demo_dataset, tiny_model, train_samples, tmp_path
):
    images = tmp_path / "ds"
    shutil.copytree(demo_dataset, images)
    write_samples(
        tmp_path / "in.jsonl", [s for s in train_samples if s["image"] != "images/demo003.jpg"], "jsonl"
    )
    evals = tmp_path / "eval.jsonl"
    evals.write_text(
        json.dumps({"id": "eval-0", "image": "images/demo003.jpg", "question": "q", "references": []}) + "\n"
    )
    args = [
        "--train",
        str(tmp_path / "in.jsonl"),
        "--images",
        str(images),
        "--model",
        str(tiny_model),
        "--max-length",
        "4096",
        "--eval",
        str(evals),
        "--out-train",
        str(tmp_path / "train.jsonl"),
        "--report",
        str(tmp_path / "r.json"),
        "--histogram",
        str(tmp_path / "h.png"),
    ]
    main(args)
    assert json.loads((tmp_path / "r.json").read_text())["eval_images_checked"] == 1
    jpg = images / "images" / "demo003.jpg"
    jpg.write_bytes(jpg.read_bytes()[:700])
    (tmp_path / "r.json").unlink()
    with pytest.raises(SystemExit, match=r"demo003.jpg: held-out image does not decode .*\['eval-0'\]"):
        main(args)
    assert not (tmp_path / "r.json").exists()


def cli_args(tmp_path, train, images, model, *extra):
    return [
        "--train",
        str(train),
        "--images",
        str(images),
        "--model",
        str(model),
        "--max-length",
        "4096",
        "--out-train",
        str(tmp_path / "train.json"),
        "--report",
        str(tmp_path / "r.json"),
        "--histogram",
        str(tmp_path / "h.png"),
        *extra,
    ]


def test_training_file_ids_are_contiguous_after_drops(demo_dataset, tiny_model, train_samples, tmp_path):
    """XTuner's format numbers samples 0..n-1: validation renumbers what it keeps; the report
    keeps the converted file's ids."""
    images = tmp_path / "ds"
    shutil.copytree(demo_dataset, images)
    jpg = images / "images" / "demo003.jpg"
    jpg.write_bytes(jpg.read_bytes()[:700])
    write_samples(tmp_path / "in.json", train_samples, "json")
    main(cli_args(tmp_path, tmp_path / "in.json", images, tiny_model))
    out = json.loads((tmp_path / "train.json").read_text(encoding="utf-8"))
    report = json.loads((tmp_path / "r.json").read_text())
    dropped = report["bad_images"]["images/demo003.jpg"]["sample_ids"]
    assert dropped and [s["id"] for s in out] == list(range(36 - len(dropped)))
    assert [s["conversations"] for s in out] == [
        s["conversations"] for s in train_samples if s["id"] not in dropped
    ]


@pytest.mark.parametrize("path", ["../outside.jpg", "/etc/hostname", "images/../../outside.jpg"])
def test_a_sample_image_path_outside_the_folder_is_not_opened(
    demo_dataset, tiny_model, train_samples, tmp_path, path
):
    from PIL import Image

    Image.new("RGB", (450, 404)).save(demo_dataset.parent / "outside.jpg")  # a real image where it points
    samples = [*train_samples, {**train_samples[0], "id": 36, "image": path}]
    kept, report, _ = validate(samples, demo_dataset, tiny_model, max_length=4096)
    assert "BadImagePath" in report["bad_images"][path]["error"] and report["bad_images"][path][
        "sample_ids"
    ] == [36]
    assert len(kept) == 36
    with pytest.raises(ValidationError, match="BadImagePath"):
        validate(samples, demo_dataset, tiny_model, max_length=4096, on_bad_image="error")


def test_a_broken_line_in_the_training_file_is_named(demo_dataset, tiny_model, train_samples, tmp_path):
    write_samples(tmp_path / "in.jsonl", train_samples[:3], "jsonl")
    with open(tmp_path / "in.jsonl", "ab") as fh:
        fh.write(b"\xef\xbb{not json\n")
    with pytest.raises(SystemExit, match=r"in.jsonl:4: not_utf8"):
        main(cli_args(tmp_path, tmp_path / "in.jsonl", demo_dataset, tiny_model))
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "train.json").exists()


def test_held_out_texts_with_line_separators_are_read_whole(
    demo_dataset, tiny_model, train_samples, tmp_path
):
    """The held-out file is JSONL: a raw U+2028 in a reference (legal JSON) stopped validation
    when it was read with splitlines()."""
    write_samples(tmp_path / "in.json", train_samples, "json")
    raw = json.dumps(
        {
            "id": "eval-0",
            "image": "images/demo001.jpg",
            "question": "q",
            "references": [{"text": "一\u2028二\u2029三\u0085四", "star": None}],
        },
        ensure_ascii=False,
    )
    (tmp_path / "eval.jsonl").write_text(raw + "\n", encoding="utf-8")
    main(
        cli_args(
            tmp_path, tmp_path / "in.json", demo_dataset, tiny_model, "--eval", str(tmp_path / "eval.jsonl")
        )
    )
    assert json.loads((tmp_path / "r.json").read_text())["eval_images_checked"] == 1
