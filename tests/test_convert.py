"""Conversion against hand-computed expectations on the demo data.

The demo's cn.jsonl (vlmtune.demo.demo_records) holds 12 images with 2,3,4,2,3,4,... responses
(i % 3 + 2 for image i: 36 good records) and three bad ones: a missing image (line 37), a
corrupt image (line 38) and an empty text (line 39)."""

import json

import pytest

from vlmtune.convert import DEFAULT_QUESTION, BadRecord, convert, write_samples
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
        fh.write(
            json.dumps({"text": 5, "question": None, "star": None, "type": "I2T", "image": "demo000"}) + "\n"
        )
    _, _, report = convert(ds)
    assert report["read"] == 41
    assert report["skipped_by_reason"]["malformed_json"] == 1
    assert report["skipped_by_reason"]["wrong_field_type"] == 1
    assert report["kept"] + report["skipped"] == report["read"]


def test_cli_writes_outputs_and_leaves_input_untouched(demo_dataset, tmp_path):
    from vlmtune.convert import main

    before = (demo_dataset / "cn.jsonl").read_bytes()
    main(
        [
            "--dataset",
            str(demo_dataset),
            "--eval-images",
            "2",
            "--out-train",
            str(tmp_path / "t.json"),
            "--out-eval",
            str(tmp_path / "e.jsonl"),
            "--report",
            str(tmp_path / "r.json"),
        ]
    )
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
    (ds / "cn.jsonl").write_text(
        (demo_dataset / "cn.jsonl").read_text(encoding="utf-8") + "".join(line + "\n" for line in lines),
        encoding="utf-8",
    )
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
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "vlmtune.convert",
            "--dataset",
            str(ds),
            "--on-bad-record",
            "error",
            "--out-train",
            str(out / "t.json"),
            "--out-eval",
            str(out / "e.jsonl"),
            "--report",
            str(out / "r.json"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
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
        main(
            [
                "--dataset",
                str(demo_dataset),
                "--output-format",
                fmt,
                "--out-train",
                str(tmp_path / f"t.{fmt}"),
                "--out-eval",
                str(tmp_path / "e.jsonl"),
                "--report",
                str(tmp_path / "r.json"),
            ]
        )
    as_json = json.loads((tmp_path / "t.json").read_text(encoding="utf-8"))
    as_jsonl = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text(encoding="utf-8").splitlines()]
    assert as_json == as_jsonl and len(as_json) == 36


def test_missing_language_file_is_named(demo_dataset):
    with pytest.raises(FileNotFoundError, match="en.jsonl"):
        convert(demo_dataset, language="en")


@pytest.mark.parametrize(
    "fmt, kwargs",
    [
        ("JPEG", {}),
        ("JPEG", {"progressive": True}),
        ("JPEG", {"exif": b"Exif\0\0" + b"\0" * 30000}),
        ("PNG", {}),
        ("WEBP", {}),
    ],
)
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
        image = group["image"][len("images/") : -len(".jpg")]
        question = group["question"]
        expected = [
            (r["text"], r["star"])
            for r in records
            if r["image"] == image and (r["question"] or DEFAULT_QUESTION) == question and r["text"]
        ]
        assert [(ref["text"], ref["star"]) for ref in group["references"]] == expected
    assert any(ref["star"] is None for g in evals for ref in g["references"])  # null stars stay null
    assert len(report["eval_images"]) == 4


@pytest.mark.parametrize("eval_images", [0, 11])
def test_a_record_without_question_and_star_keys_counts_as_null_not_a_crash(
    demo_dataset, tmp_path, eval_images
):
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


# --- Hostile and odd inputs (issue 15): each through the CLI, asserting the outcome and the report line.


def run_cli(ds, tmp_path, *extra):
    """``python -m vlmtune.convert`` on ``ds``; (process, report or None, out folder)."""
    import subprocess
    import sys

    out = tmp_path / "out"
    train = out / ("t.jsonl" if "jsonl" in extra else "t.json")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vlmtune.convert",
            "--dataset",
            str(ds),
            *extra,
            "--out-train",
            str(train),
            "--out-eval",
            str(out / "e.jsonl"),
            "--report",
            str(out / "r.json"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    report = json.loads((out / "r.json").read_text(encoding="utf-8")) if (out / "r.json").exists() else None
    return proc, report, out


def test_line_separators_inside_texts_survive_conversion_and_every_reader(demo_dataset, tmp_path):
    """U+2028/U+2029/U+0085 are legal raw inside JSON strings (ensure_ascii=False writes them):
    the reader does not split on them, and the outputs escape them for readers that would."""
    from vlmtune.jsonl import read_jsonl
    from vlmtune.validate import load_samples

    texts = [f"第一行{sep}第二行" for sep in ("\u2028", "\u2029", "\u0085")]
    lines = [
        json.dumps({**GOOD, "image": f"demo00{i + 1}", "text": t}, ensure_ascii=False)
        for i, t in enumerate(texts)
    ]
    ds = dataset_with(demo_dataset, tmp_path, *lines)
    assert "\u2028" in (ds / "cn.jsonl").read_text(encoding="utf-8")  # raw in the input
    before = (ds / "cn.jsonl").read_bytes()
    proc, report, out = run_cli(
        ds, tmp_path, "--eval-images", "3", "--split-seed", "0", "--output-format", "jsonl"
    )
    assert proc.returncode == 0, proc.stderr
    assert report["read"] == 42 and report["kept"] == 39 and report["kept"] + report["skipped"] == 42
    assert (ds / "cn.jsonl").read_bytes() == before
    train = load_samples(out / "t.jsonl")
    evals = read_jsonl(out / "e.jsonl")
    got = {t["conversations"][1]["value"] for t in train} | {
        r["text"] for e in evals for r in e["references"]
    }
    assert set(texts) <= got
    for f, n in (
        (out / "t.jsonl", len(train)),
        (out / "e.jsonl", len(evals)),
    ):  # one line a record for any splitter
        assert len(f.read_text(encoding="utf-8").splitlines()) == n


def test_a_type_excluded_record_with_a_null_image_is_excluded_not_bad(demo_dataset, tmp_path):
    t2t = json.dumps({"text": "纯文字的梗", "question": "问题", "star": None, "type": "T2T", "image": None})
    ds = dataset_with(demo_dataset, tmp_path, t2t)
    lines = (ds / "cn.jsonl").read_text(encoding="utf-8").splitlines()
    (ds / "cn.jsonl").write_text(
        "\n".join(lines[:36] + lines[39:]) + "\n", encoding="utf-8"
    )  # no demo bad lines
    proc, report, _ = run_cli(ds, tmp_path, "--types", "I2T,IT2T", "--on-bad-record", "error")
    assert proc.returncode == 0, proc.stderr
    assert report["skipped_where"]["type_not_selected"][-1].startswith(f"{ds / 'cn.jsonl'}:37: type 'T2T'")
    assert "missing_image" not in report["skipped_by_reason"]
    # Selected, the same record is bad (no image) and error mode stops at its line.
    proc, _, _ = run_cli(ds, tmp_path, "--on-bad-record", "error")
    assert proc.returncode != 0 and "cn.jsonl:37: missing_image" in proc.stderr


def truncated_copy(demo_dataset, tmp_path, name="demo003"):
    """A copy of the demo whose ``name``.jpg keeps its header (conversion reads it) but not its pixels."""
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(demo_dataset, ds)
    jpg = ds / "images" / f"{name}.jpg"
    jpg.write_bytes(jpg.read_bytes()[:700])
    return ds


def test_an_image_whose_pixels_do_not_decode_is_never_held_out(demo_dataset, tmp_path):
    import random

    images = sorted(f"demo{i:03d}" for i in range(12))
    seed = next(
        s for s in range(100) if "demo003" in random.Random(s).sample(images, 3)
    )  # a draw that hits it
    ds = truncated_copy(demo_dataset, tmp_path)
    users = [
        i + 1
        for i, r in enumerate((ds / "cn.jsonl").read_text(encoding="utf-8").splitlines())
        if json.loads(r)["image"] == "demo003"
    ]
    proc, report, out = run_cli(ds, tmp_path, "--eval-images", "3", "--split-seed", str(seed))
    assert proc.returncode == 0, proc.stderr
    assert "demo003" not in report["eval_images"] and len(report["eval_images"]) == 3
    assert list(report["eval_images_undecodable"]) == ["images/demo003.jpg"]
    where = [w for w in report["skipped_where"]["corrupt_image"] if "pixels do not decode" in w]
    assert [int(w.split(": ")[0].rsplit(":", 1)[1]) for w in where] == users
    assert report["kept"] + report["skipped"] == report["read"]
    assert all(
        s["image"] != "images/demo003.jpg" for s in json.loads((out / "t.json").read_text(encoding="utf-8"))
    )
    again = convert(ds, eval_images=3, split_seed=seed)[2]  # reconverting: the same split
    assert again["eval_images"] == report["eval_images"]
    lines = (ds / "cn.jsonl").read_text(encoding="utf-8").splitlines()
    (ds / "cn.jsonl").write_text(
        "\n".join(lines[:36]) + "\n", encoding="utf-8"
    )  # without the demo's bad lines
    proc, _, _ = run_cli(
        ds, tmp_path, "--eval-images", "3", "--split-seed", str(seed), "--on-bad-record", "error"
    )
    assert proc.returncode != 0 and f"cn.jsonl:{users[0]}: corrupt_image" in proc.stderr


def test_a_line_that_is_not_utf8_is_a_counted_bad_record(demo_dataset, tmp_path):
    ds = dataset_with(demo_dataset, tmp_path, json.dumps(GOOD | {"text": "新的梗"}))
    with open(ds / "cn.jsonl", "ab") as fh:
        fh.write(b'{"text": "\xff\xfe broken", "image": "demo000", "type": "I2T"}\n')
    proc, report, _ = run_cli(ds, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert report["skipped_by_reason"]["not_utf8"] == 1 and report["read"] == 41
    assert report["skipped_where"]["not_utf8"][0].startswith(f"{ds / 'cn.jsonl'}:41: byte 0xff")
    lines = (ds / "cn.jsonl").read_bytes().split(b"\n")
    (ds / "cn.jsonl").write_bytes(b"\n".join(lines[:36] + lines[39:]))
    proc, _, out = run_cli(ds, tmp_path / "error-mode", "--on-bad-record", "error")
    assert proc.returncode != 0 and "cn.jsonl:38: not_utf8" in proc.stderr and not (out / "t.json").exists()


@pytest.mark.parametrize(
    "image_id",
    [
        "../../outside/secret",
        "ABSOLUTE",
        "..",
        "sub/../../outside/secret",
        "a\\..\\..\\secret",
        "demo000\0x",
        "./demo000",
    ],
)
def test_an_image_id_that_leaves_the_image_folder_is_refused(demo_dataset, tmp_path, image_id):
    from PIL import Image

    secret = tmp_path / "outside" / "secret.jpg"  # a real JPEG where the id points
    secret.parent.mkdir()
    Image.new("RGB", (64, 64)).save(secret)
    image_id = str(secret.with_suffix("")) if image_id == "ABSOLUTE" else image_id
    ds = dataset_with(demo_dataset, tmp_path / "x", json.dumps(GOOD | {"image": image_id, "text": "越界"}))
    proc, report, out = run_cli(ds, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert report["skipped_by_reason"]["bad_image_id"] == 1
    assert report["skipped_where"]["bad_image_id"][0].startswith(f"{ds / 'cn.jsonl'}:40: ")
    assert "secret" not in (out / "t.json").read_text(encoding="utf-8") and report["kept"] == 36


def test_a_symlink_out_of_the_image_folder_is_refused(demo_dataset, tmp_path):
    from PIL import Image

    secret = tmp_path / "secret.jpg"
    Image.new("RGB", (64, 64)).save(secret)
    ds = dataset_with(demo_dataset, tmp_path, json.dumps(GOOD | {"image": "link", "text": "链接"}))
    (ds / "images" / "link.jpg").symlink_to(secret)
    _, _, report = convert(ds)
    assert (
        report["skipped_by_reason"]["bad_image_id"] == 1
        and "symbolic link" in report["skipped_where"]["bad_image_id"][0]
    )


def test_a_byte_order_mark_costs_no_record(demo_dataset, tmp_path):
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(demo_dataset, ds)
    (ds / "cn.jsonl").write_bytes(b"\xef\xbb\xbf" + (demo_dataset / "cn.jsonl").read_bytes())
    assert convert(ds)[2]["skipped_by_reason"] == convert(demo_dataset)[2]["skipped_by_reason"]
    assert convert(ds)[0] == convert(demo_dataset)[0]


@pytest.mark.parametrize("eval_images", [12, 13, 1000])
def test_eval_images_not_below_the_image_count_is_a_config_error(demo_dataset, tmp_path, eval_images):
    proc, report, _ = run_cli(demo_dataset, tmp_path, "--eval-images", str(eval_images))
    assert proc.returncode != 0 and report is None
    assert f"conversion.eval_images: {eval_images} is not below the 12 images" in proc.stderr
    assert convert(demo_dataset, eval_images=11)[2]["images"] == {"train": 1, "eval": 11}


# --- Property: arbitrary lines through conversion in skip mode never raise, account for every
# line, and name file:line for every skip.

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
    max_leaves=6,
)
TEXT = st.text(alphabet=st.characters(codec=None, blacklist_categories=()), max_size=12)
RECORDS = st.fixed_dictionaries(
    {},
    optional={
        "text": st.one_of(TEXT, JSON_VALUES),
        "question": st.one_of(st.none(), TEXT, JSON_VALUES),
        "star": st.one_of(st.none(), st.integers(), JSON_VALUES),
        "type": st.one_of(st.sampled_from(["I2T", "T2T", "IT2T", "X"]), JSON_VALUES),
        "image": st.one_of(
            st.sampled_from(["demo000", "demo001", "demo_corrupt_image", "nope", "../x", "/etc/x", ""]),
            TEXT,
            JSON_VALUES,
        ),
    },
).flatmap(
    lambda d: st.dictionaries(st.text(max_size=4), JSON_VALUES, max_size=2).map(lambda extra: {**extra, **d})
)
LINES = st.one_of(
    RECORDS.map(lambda r: json.dumps(r, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    RECORDS.map(lambda r: json.dumps(r).encode()),  # \\ud800-style escapes: lone surrogates
    JSON_VALUES.map(lambda v: json.dumps(v, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    st.binary(max_size=30).filter(lambda b: b"\n" not in b),
    TEXT.map(lambda t: t.replace("\n", " ").encode("utf-8", "surrogatepass")),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(LINES, max_size=12), eval_images=st.integers(0, 3))
def test_arbitrary_lines_never_crash_and_are_all_accounted_for(
    demo_dataset, tmp_path_factory, lines, eval_images
):
    import shutil

    ds = tmp_path_factory.mktemp("prop") / "ds"
    shutil.copytree(demo_dataset, ds)
    (ds / "cn.jsonl").write_bytes((demo_dataset / "cn.jsonl").read_bytes() + b"\n".join(lines) + b"\n")
    train, evals, report = convert(ds, eval_images=eval_images, split_seed=1)
    assert report["kept"] + report["skipped"] == report["read"]
    assert report["read"] == 39 + sum(1 for line in lines if line.strip(b" \t\r\n\x0b\x0c"))
    where = [w for ws in report["skipped_where"].values() for w in ws]
    assert len(where) == report["skipped"]
    assert all(
        w.startswith(f"{ds / 'cn.jsonl'}:") and w.split(": ")[0].rsplit(":", 1)[1].isdigit() for w in where
    )
    assert [s["id"] for s in train] == list(range(len(train)))
    out = tmp_path_factory.mktemp("prop-out")
    from vlmtune.jsonl import read_jsonl, write_jsonl

    write_samples(out / "t.json", train, "json")  # everything kept can be written and read back
    write_jsonl(out / "e.jsonl", evals)
    assert (
        json.loads((out / "t.json").read_text(encoding="utf-8")) == train
        and read_jsonl(out / "e.jsonl") == evals
    )


def test_a_line_of_unicode_whitespace_is_a_counted_bad_record(demo_dataset, tmp_path):
    """Found by the property test: a line holding only \\x1c (str.isspace, not ASCII whitespace)
    was dropped as blank; it is a malformed record, counted with file:line."""
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(demo_dataset, ds)
    (ds / "cn.jsonl").write_bytes((demo_dataset / "cn.jsonl").read_bytes() + b"\x1c\n\xc2\x85\n \t\n")
    _, _, report = convert(ds, eval_images=0, split_seed=1)
    assert report["read"] == 39 + 2 and report["kept"] + report["skipped"] == report["read"]
    where = [w for ws in report["skipped_where"].values() for w in ws]
    assert sum(w.startswith((f"{ds / 'cn.jsonl'}:40:", f"{ds / 'cn.jsonl'}:41:")) for w in where) == 2
