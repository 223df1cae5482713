"""Conversion against hand-computed expectations on the demo data.

The demo's cn.jsonl (vlmtune.demo.demo_records) holds 12 images with 2,3,4,2,3,4,... responses
(i % 3 + 2 for image i: 36 good records) and three bad ones: a missing image (line 37), a
corrupt image (line 38) and an empty text (line 39)."""

import json

import pytest

from vlmtune.convert import DEFAULT_QUESTION, BadRecord, convert
from vlmtune.demo import IMAGE_SIZES


def test_counts_and_reasons(demo_dataset):
    train, evals, report = convert(demo_dataset, eval_images=0)
    assert report["read"] == 39
    assert report["kept"] == 36 == len(train)
    assert report["skipped_by_reason"] == {"missing_image": 1, "corrupt_image": 1, "empty_text": 1}
    assert report["skipped_where"]["missing_image"][0].split(": ")[0].endswith("cn.jsonl:37")
    assert report["skipped_where"]["corrupt_image"][0].split(": ")[0].endswith("cn.jsonl:38")
    assert report["skipped_where"]["empty_text"][0].split(": ")[0].endswith("cn.jsonl:39")
    assert evals == []


def test_tutorial_fields(demo_dataset):
    train, _, _ = convert(demo_dataset, eval_images=0)
    assert [s["id"] for s in train] == list(range(36))
    first = train[0]
    # Record 1: image demo000 (450x404), type I2T with a null question -> the default prompt.
    assert first["image"] == "images/demo000.jpg"
    assert (first["width"], first["height"]) == IMAGE_SIZES[0] == (450, 404)
    assert first["conversations"][0] == {"from": "human", "value": "<image>\n" + DEFAULT_QUESTION}
    assert first["conversations"][1]["from"] == "gpt"
    assert first["conversations"][1]["value"] == "住手!现在的你还不是那家伙的对手!先撤吧!!"
    # Record 4 (image demo001, second response) is IT2T with its own question.
    assert train[3]["image"] == "images/demo001.jpg"
    assert train[3]["conversations"][0]["value"] == "<image>\n如果这只狗会说话,它会说什么?"
    sizes = {s["image"]: (s["width"], s["height"]) for s in train}
    assert sizes == {f"images/demo{i:03d}.jpg": IMAGE_SIZES[i] for i in range(12)}


def test_split_by_image_is_disjoint_and_deterministic(demo_dataset):
    train, evals, report = convert(demo_dataset, eval_images=3, split_seed=7)
    again = convert(demo_dataset, eval_images=3, split_seed=7)
    assert (train, evals) == again[:2]
    held = {e["image"] for e in evals}
    assert len(held) == 3 and not held & {s["image"] for s in train}
    assert report["train_samples"] + report["eval_records"] == 36
    # All responses of a held-out image are its references.
    n_refs = sum(len(e["references"]) for e in evals)
    expected = sum(i % 3 + 2 for i in range(12) if f"images/demo{i:03d}.jpg" in held)
    assert n_refs == expected
    assert convert(demo_dataset, eval_images=3, split_seed=8)[1] != evals


def test_error_mode_names_file_and_line(demo_dataset):
    with pytest.raises(BadRecord) as err:
        convert(demo_dataset, on_bad_record="error")
    assert err.value.where.endswith("cn.jsonl:37") and err.value.reason == "missing_image"


def test_malformed_lines_are_counted(demo_dataset, tmp_path):
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(demo_dataset, ds)
    with open(ds / "cn.jsonl", "a", encoding="utf-8") as fh:
        fh.write("{not json\n")
        fh.write(json.dumps({"text": 5, "question": None, "star": None, "type": "I2T", "image": "demo000"}) + "\n")
    _, _, report = convert(ds)
    assert report["read"] == 41
    assert report["skipped_by_reason"]["malformed_json"] == 1
    assert report["skipped_by_reason"]["wrong_field_type"] == 1
    assert report["kept"] + report["skipped"] == report["read"]


def test_cli_writes_outputs_and_leaves_input_untouched(demo_dataset, tmp_path):
    from vlmtune.convert import main

    before = (demo_dataset / "cn.jsonl").read_bytes()
    main(["--dataset", str(demo_dataset), "--eval-images", "2", "--out-train", str(tmp_path / "t.json"),
          "--out-eval", str(tmp_path / "e.jsonl"), "--report", str(tmp_path / "r.json")])
    assert (demo_dataset / "cn.jsonl").read_bytes() == before
    train = json.loads((tmp_path / "t.json").read_text())
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(train) == report["train_samples"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.jsonl", "r.json", "t.json"]  # no temp files left
