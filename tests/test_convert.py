"""Conversion against hand-computed expectations on the demo data.

The demo's cn.jsonl (vlmtune.demo.demo_records) holds 12 images with 2,3,4,2,3,4,... responses
(i % 3 + 2 for image i: 36 good records) and three bad ones: a missing image (line 37), a
corrupt image (line 38) and an empty text (line 39)."""

import json

import pytest

from vlmtune.convert import DEFAULT_QUESTION, BadRecord, convert
from vlmtune.demo import IMAGE_SIZES, JOKES

JOKE0 = JOKES[0]


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


# --- Each bad-record kind: counted with file:line under `skip`, fatal naming file:line under `error`.

GOOD = {"text": "好梗", "question": None, "star": 1, "type": "I2T", "image": "demo000"}
BAD_LINES = {
    "malformed_json": '{"text": "半截',
    "wrong_field_type": json.dumps({**GOOD, "star": "many"}),
    "empty_text": json.dumps({**GOOD, "text": "  "}),
    "missing_image": json.dumps({**GOOD, "image": "not_in_the_archive"}),
    "corrupt_image": json.dumps({**GOOD, "image": "demo_corrupt_image"}),
    "duplicate_record": json.dumps({**GOOD, "text": JOKE0}),  # demo line 1: demo000, null question
}


def dataset_with(demo_dataset, tmp_path, *lines: str):
    """A copy of the demo dataset whose cn.jsonl has ``lines`` appended (after its 39 lines)."""
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(demo_dataset, ds)
    (ds / "cn.jsonl").write_text((demo_dataset / "cn.jsonl").read_text(encoding="utf-8")
                                 + "".join(line + "\n" for line in lines), encoding="utf-8")  # fmt: skip
    return ds


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_each_bad_record_kind_is_counted_with_file_and_line(demo_dataset, tmp_path, reason):
    ds = dataset_with(demo_dataset, tmp_path, json.dumps(GOOD | {"text": "新的梗"}), BAD_LINES[reason])
    _, _, report = convert(ds)
    baseline = {"missing_image": 1, "corrupt_image": 1, "empty_text": 1}  # the demo's own three
    assert report["skipped_by_reason"][reason] == baseline.get(reason, 0) + 1
    assert report["skipped_where"][reason][-1].startswith(f"{ds / 'cn.jsonl'}:41: ")
    assert report["read"] == 41 and report["kept"] == 37
    assert report["kept"] + report["skipped"] == report["read"]


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_error_mode_stops_at_the_bad_line(demo_dataset, tmp_path, reason):
    import subprocess
    import sys

    ds = dataset_with(demo_dataset, tmp_path, BAD_LINES[reason])
    lines = (ds / "cn.jsonl").read_text(encoding="utf-8").splitlines()
    # Without the demo's own bad lines 37-39, the appended one is the first bad line: 37.
    (ds / "cn.jsonl").write_text("\n".join(lines[:36] + lines[39:]) + "\n", encoding="utf-8")
    with pytest.raises(BadRecord) as err:
        convert(ds, on_bad_record="error")
    assert err.value.reason == reason and err.value.where == f"{ds / 'cn.jsonl'}:37"
    # The CLI exits non-zero with the file and line, and writes nothing.
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "vlmtune.convert", "--dataset", str(ds), "--on-bad-record", "error",
                          "--out-train", str(out / "t.json"), "--out-eval", str(out / "e.jsonl"),
                          "--report", str(out / "r.json")], capture_output=True, text=True)  # fmt: skip
    assert run.returncode != 0 and f"cn.jsonl:37: {reason}" in run.stderr
    assert not out.exists() or not list(out.iterdir())


def test_same_image_with_other_texts_is_not_a_duplicate(demo_dataset, tmp_path):
    ds = dataset_with(demo_dataset, tmp_path, json.dumps({**GOOD, "text": JOKE0, "question": "另一个问题"}))
    _, _, report = convert(ds)
    assert "duplicate_record" not in report["skipped_by_reason"] and report["kept"] == 37


def test_types_filter_is_counted_not_fatal(demo_dataset):
    train, _, report = convert(demo_dataset, types=["I2T"], on_bad_record="skip")
    assert set(report["train_types"]) == {"I2T"} and report["settings"]["types"] == ["I2T"]
    assert report["skipped_by_reason"]["type_not_selected"] == 36 - len(train)
    assert report["kept"] + report["skipped"] == report["read"] == 39
    assert all(s["conversations"][0]["value"] == "<image>\n" + DEFAULT_QUESTION for s in train)


def test_jsonl_output_holds_the_same_samples(demo_dataset, tmp_path):
    from vlmtune.convert import main

    for fmt in ("json", "jsonl"):
        main(["--dataset", str(demo_dataset), "--output-format", fmt, "--out-train", str(tmp_path / f"t.{fmt}"),
              "--out-eval", str(tmp_path / "e.jsonl"), "--report", str(tmp_path / "r.json")])  # fmt: skip
    as_json = json.loads((tmp_path / "t.json").read_text(encoding="utf-8"))
    as_jsonl = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text(encoding="utf-8").splitlines()]
    assert as_json == as_jsonl and len(as_json) == 36


def test_missing_language_file_is_named(demo_dataset):
    with pytest.raises(FileNotFoundError, match="en.jsonl"):
        convert(demo_dataset, language="en")


@pytest.mark.parametrize("fmt, kwargs", [
    ("JPEG", {}), ("JPEG", {"progressive": True}), ("JPEG", {"exif": b"Exif\0\0" + b"\0" * 30000}),
    ("PNG", {}), ("WEBP", {}),
])  # fmt: skip
def test_header_size_matches_pil(tmp_path, fmt, kwargs):
    from PIL import Image

    from vlmtune.convert import image_size

    path = tmp_path / "x.jpg"  # the dataset names every image .jpg, whatever it holds
    Image.new("RGB", (317, 129), (9, 99, 199)).save(path, fmt, **kwargs)
    with Image.open(path) as img:
        assert image_size(path) == img.size == (317, 129)
    path.write_bytes(path.read_bytes()[:40])  # a truncated header
    assert image_size(path) == "corrupt_image"


def test_held_out_references_keep_every_response_with_its_star(demo_dataset):
    from vlmtune.demo import demo_records

    _, evals, report = convert(demo_dataset, eval_images=4, split_seed=3)
    records = demo_records(0)
    for group in evals:
        image = group["image"][len("images/"):-len(".jpg")]
        question = group["question"]
        expected = [(r["text"], r["star"]) for r in records
                    if r["image"] == image and (r["question"] or DEFAULT_QUESTION) == question and r["text"]]  # fmt: skip
        assert [(ref["text"], ref["star"]) for ref in group["references"]] == expected
    assert any(ref["star"] is None for g in evals for ref in g["references"])  # null stars stay null
    assert len(report["eval_images"]) == 4


@pytest.mark.parametrize("eval_images", [0, 11])
def test_a_record_without_question_and_star_keys_counts_as_null_not_a_crash(demo_dataset, tmp_path, eval_images):
    """Absent optional keys read as null (the default question, no star), in train and in eval."""
    bare = {k: v for k, v in GOOD.items() if k not in ("question", "star")} | {"text": "没有问题字段的梗"}
    ds = dataset_with(demo_dataset, tmp_path, json.dumps(bare, ensure_ascii=False))
    train, evals, report = convert(ds, eval_images=eval_images)
    assert report["read"] == 40 and report["kept"] + report["skipped"] == 40 and report["kept"] == 37
    assert ("demo000" in report["eval_images"]) == bool(eval_images)  # 11 of 12 images: seed 0 holds it out
    if eval_images:
        refs = [r for e in evals for r in e["references"] if r["text"] == bare["text"]]
        assert refs and refs[0]["star"] is None
    else:
        sample = next(s for s in train if s["conversations"][1]["value"] == bare["text"])
        assert sample["conversations"][0]["value"].endswith(DEFAULT_QUESTION)
