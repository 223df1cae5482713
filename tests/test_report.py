"""End to end on the demo tiny model: both models evaluated (generate + reference NLL), scored,
reported; the report rendered by headless Chromium, its screenshot checked."""

import base64
import io
import json
import os
import re
import shutil
import subprocess

import pytest

from conftest import PREDICTION_FIELDS as FIELDS
from vlmtune import evaluate, metrics, reference_nll, report

GEN = dict(max_new_tokens=6, do_sample=False, temperature=1.0, top_p=1.0, seed=0)


def perturbed_copy(model_dir, out):
    """A second model: the tiny model with its LM head changed (stands in for the fine-tuned one)."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out)
    weights = load_file(out / "model.safetensors")
    gen = torch.Generator().manual_seed(1)
    key = next(k for k in weights if k.endswith("output.weight"))
    weights[key] = weights[key] + 0.5 * torch.randn(weights[key].shape, generator=gen)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def eval_records(dataset):
    """Three held-out records: two on one image (one with two starred references), one I2T."""
    ref = lambda text, star: dict(text=text, star=star)  # noqa: E731
    return [
        dict(
            id="eval-0",
            image="images/demo003.jpg",
            type="I2T",
            question="请你根据这张图片,讲一个脑洞大开的梗。",
            references=[
                ref("月亮不睡你不睡,你是秃头小宝贝。", 120),
                ref("钱包:我已经尽力了。", 7),
                ref("别看了。", None),
            ],
        ),
        dict(
            id="eval-1",
            image="images/demo003.jpg",
            type="T2T",
            question="给这张图配一句话。",
            references=[ref("我的快乐,来得快去得也快。", 40)],
        ),
        dict(
            id="eval-2",
            image="images/demo000.jpg",
            type="IT2T",
            question="这张图片里的人在想什么?",
            references=[ref("减肥第一天,先吃顿好的。", None)],
        ),
    ]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model, demo_dataset):
    root = tmp_path_factory.mktemp("eval")
    eval_path = root / "eval.jsonl"
    eval_path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in eval_records(demo_dataset)),
        encoding="utf-8",
    )
    train = [
        dict(
            id=0,
            image="images/demo001.jpg",
            conversations=[
                {"from": "human", "value": "<image>\nq"},
                {"from": "gpt", "value": "我的快乐,来得快去得也快。"},
            ],
        )
    ]
    (root / "train.json").write_text(json.dumps(train, ensure_ascii=False), encoding="utf-8")
    models = {"base": tiny_model, "finetuned": perturbed_copy(tiny_model, root / "InternVL2-tiny-ft")}
    for variant, model in models.items():
        out = root / variant
        evaluate.generate(
            model, eval_path, demo_dataset, "transformers", out / "predictions.jsonl", GEN, batch_size=2
        )
        reference_nll.reference_nll(model, eval_path, demo_dataset, out / "reference_nll.jsonl")
        metrics.score(
            out / "predictions.jsonl",
            out / "metrics.json",
            out / "reference_nll.jsonl",
            root / "train.json",
            100,
            0,
        )
    report.build(
        "test", {v: root / v for v in models}, demo_dataset, root / "report.html", root / "summary.png"
    )
    return root


def rows(path):
    return [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines()]


def test_both_models_get_the_same_prompts_and_settings(run):
    base, ft = rows(run / "base" / "predictions.jsonl"), rows(run / "finetuned" / "predictions.jsonl")
    assert [r["id"] for r in base] == [r["id"] for r in ft] == ["eval-0", "eval-1", "eval-2"]
    for b, f in zip(base, ft):
        assert set(b) == set(f) == FIELDS
        assert b["prompt"] == f["prompt"] and b["generation"] == f["generation"] == GEN
        assert b["prompt_ids_digest"] == f["prompt_ids_digest"] and b["image_tokens"] == f["image_tokens"] > 0
        assert b["prompt"].startswith(
            "<|im_start|>system\nYou are an AI assistant whose name is InternLM (书生·浦语).<|im_end|>"
        )
        assert re.search(r"<img><IMG_CONTEXT>\*\d+</img>\n", b["prompt"])
        assert 1 <= b["completion_tokens"] <= GEN["max_new_tokens"] and b["prompt_tokens"] > 256
    assert [b["prediction"] for b in base] != [f["prediction"] for f in ft]


def test_reference_nll_covers_every_reference(run):
    for variant in ("base", "finetuned"):
        nll = rows(run / variant / "reference_nll.jsonl")
        assert [len(r["references"]) for r in nll] == [3, 1, 1]
        assert all(x["nll"] > 0 and x["tokens"] > 1 for r in nll for x in r["references"])


def test_metrics_json_has_overall_per_type_and_intervals(run):
    m = json.loads((run / "finetuned" / "metrics.json").read_text(encoding="utf-8"))
    assert m["records"] == 3 and set(m["by_type"]) == {"I2T", "T2T", "IT2T"}
    o = m["overall"]
    for key in (
        "bleu",
        "chrf",
        "rouge_l",
        "cider_d",
        "distinct_1",
        "distinct_2",
        "reference_nll",
        "reference_perplexity",
        "train_copy_rate",
        "prediction_chars",
    ):
        assert o[key]["value"] is not None, key
        assert o[key]["ci95"] is not None and o[key]["ci95"][0] <= o[key]["ci95"][1], key
    assert o["preference_accuracy"]["n"] == 1  # one pair: stars 120 vs 7 (the unstarred one is left out)


def test_report_html_is_self_contained(run):
    text = (run / "report.html").read_text(encoding="utf-8")
    srcs = re.findall(r'src="([^"]*)"', text)
    assert len(srcs) == 3 and all(s.startswith("data:image/jpeg;base64,") for s in srcs)
    assert not re.search(r'(href|src)="(http|file|/)', text)
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(srcs[0].split(",", 1)[1]))) as img:
        assert max(img.size) == report.THUMBNAIL
    for needle in (
        "<th>base</th>",
        "<th>finetuned</th>",
        "Δ finetuned − base",
        "CIDEr-D",
        "月亮不睡你不睡",
        "★120",
    ):
        assert needle in text, needle


def test_summary_png_is_a_plot(run):
    from PIL import Image

    with Image.open(run / "summary.png") as img:
        assert img.format == "PNG" and img.size[0] >= 800
        assert len(img.convert("RGB").getcolors(1 << 20)) > 50


def chromium():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    # Not skipped: CI installs it from .ci/apt-packages.txt.
    assert exe, (
        "chromium is not installed: make test installs it (.ci/apt-packages.txt through "
        ".ci/install-system-packages)"
    )
    return [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--virtual-time-budget=10000",
        "--enable-logging=stderr",
        "--v=0",
    ]


def test_report_renders_in_headless_chromium(run, tmp_path):
    from PIL import Image

    url = (run / "report.html").as_uri()
    dom = subprocess.run(chromium() + ["--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    # The page's own script counts images that finished decoding (complete and naturalWidth > 0).
    assert 'data-images-decoded="3/3"' in dom.stdout
    assert "Uncaught" not in dom.stderr, dom.stderr[-2000:]
    # The check can fail: a copy with one corrupt image reports 2 of 3 decoded.
    broken = tmp_path / "broken.html"
    text = (run / "report.html").read_text(encoding="utf-8")
    broken.write_text(
        re.sub(r'src="data:image/jpeg;base64,[^"]+"', 'src="data:image/jpeg;base64,AAAA"', text, count=1),
        encoding="utf-8",
    )
    bad = subprocess.run(
        chromium() + ["--dump-dom", broken.as_uri()], capture_output=True, text=True, timeout=120
    )
    assert 'data-images-decoded="2/3"' in bad.stdout

    shot = tmp_path / "shot.png"
    width, height = 1280, 4000
    res = subprocess.run(
        chromium() + [f"--window-size={width},{height}", f"--screenshot={shot}", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    with Image.open(shot) as img:
        page = img.convert("RGB")
    assert page.size == (width, height)
    colors = page.getcolors(1 << 22)
    assert len(colors) > 200, "blank screenshot"
    # The table header's background (#eef) is on screen: the metric tables rendered.
    assert page.getpixel((0, 0)) != (238, 238, 255)
    header = sum(n for n, c in colors if c == (238, 238, 255))
    assert header > 2000, header
    # Each thumbnail's dominant colour (the demo images' flat background) is on screen.
    for name in ("demo003", "demo000"):
        with Image.open(_image(run, name)) as im:
            thumb = im.convert("RGB").resize((64, 64))
        bg = max(thumb.getcolors(1 << 16))[1]
        near = sum(n for n, c in colors if all(abs(a - b) <= 10 for a, b in zip(c, bg)))
        assert near > 1000, (name, bg, near)


def _image(run, name):
    html_text = (run / "report.html").read_text(encoding="utf-8")
    uri = re.search(rf'alt="images/{name}.jpg" src="data:image/jpeg;base64,([^"]+)"', html_text).group(1)
    return io.BytesIO(base64.b64decode(uri))


# Distinct characters of the demo's records, and private-use code points that no font has: those
# render as the missing-glyph box, the reference of a page without a CJK font.
CJK = "月亮不睡你秃头"
BOXES = "".join(chr(0xE000 + i) for i in range(len(CJK)))
CELL = 64


def glyph_probe(page_html: str) -> str:
    """The page with a grid on top, in the page's own body font: row 0 the CJK characters, row 1
    the boxes, one per fixed cell (48 px text in a 64 px cell)."""
    cells = "".join(
        f'<span style="position:absolute;left:{CELL * i}px;top:{CELL * row}px;width:{CELL}px;height:{CELL}px;'
        f'font-size:48px;line-height:{CELL}px;text-align:center;color:#000">{ch}</span>'
        for row, text in enumerate((CJK, BOXES))
        for i, ch in enumerate(text)
    )
    grid = (
        f'<div style="position:fixed;left:0;top:0;width:{CELL * len(CJK)}px;height:{2 * CELL}px;'
        f'background:#fff;z-index:9">{cells}</div>'
    )
    return page_html.replace("</body>", grid + "</body>")


def glyph_masks(html_path, tmp_path, env=None):
    """Screenshot of the probe page; each cell as the set of its dark pixels: (CJK row, box row)."""
    from PIL import Image

    shot = tmp_path / f"glyphs-{len(list(tmp_path.glob('glyphs-*')))}.png"
    res = subprocess.run(
        chromium() + ["--window-size=800,300", f"--screenshot={shot}", html_path.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    with Image.open(shot) as img:
        grey = img.convert("L")

    def mask(row, i):  # noqa: E306
        box = grey.crop((CELL * i, CELL * row, CELL * (i + 1), CELL * (row + 1)))
        return frozenset(j for j, v in enumerate(box.getdata()) if v < 128)

    return [mask(0, i) for i in range(len(CJK))], [mask(1, i) for i in range(len(CJK))]


def differ(a, b) -> int:
    return len(a ^ b)


def assert_glyphs(cjk, boxes):
    """Real glyphs: inked, different from one another and from the missing-glyph box."""
    assert all(boxes) and len(set(boxes)) == 1, "the box reference did not render as one box shape"
    assert all(len(m) > 40 for m in cjk), [len(m) for m in cjk]
    assert min(differ(m, boxes[0]) for m in cjk) > 100, "a CJK character rendered as a box (no CJK font?)"
    assert min(differ(a, b) for i, a in enumerate(cjk) for b in cjk[i + 1 :]) > 100, (
        "CJK characters look alike"
    )


def no_cjk_fontconfig(tmp_path) -> dict:
    """The system's fontconfig without the fonts that cover Chinese: a machine without them."""
    files = subprocess.run(["fc-list", ":lang=zh", "file"], capture_output=True, text=True).stdout.split()
    rejects = "".join(f"<glob>{f.rstrip(':')}</glob>" for f in files)
    conf = tmp_path / "fonts.conf"
    conf.write_text(
        '<?xml version="1.0"?><!DOCTYPE fontconfig SYSTEM "fonts.dtd"><fontconfig>'
        '<include ignore_missing="yes">/etc/fonts/fonts.conf</include>'
        f"<selectfont><rejectfont>{rejects}</rejectfont></selectfont></fontconfig>"
    )
    return dict(os.environ, FONTCONFIG_FILE=str(conf))


def test_report_renders_chinese_as_glyphs_not_boxes(run, tmp_path):
    """The report's Chinese, in the report's own CSS font stack, renders as glyphs in headless
    Chromium: each character's pixels differ from the others' and from the missing-glyph box.
    Without a CJK font (fontconfig told to reject them) the same check sees boxes."""
    text = (run / "report.html").read_text(encoding="utf-8")
    assert CJK[:4] in text
    probe = tmp_path / "probe.html"
    probe.write_text(glyph_probe(text), encoding="utf-8")
    cjk, boxes = glyph_masks(probe, tmp_path)
    assert_glyphs(cjk, boxes)
    # The same page where no font covers Chinese: every character is the box.
    cjk_none, boxes_none = glyph_masks(probe, tmp_path, env=no_cjk_fontconfig(tmp_path))
    with pytest.raises(AssertionError, match="rendered as a box"):
        assert_glyphs(cjk_none, boxes_none)
    assert all(differ(m, boxes_none[0]) < 20 for m in cjk_none)


def test_a_delta_that_rounds_to_zero_is_neutral():
    assert report.delta_cell(-0.0004, True) == report.delta_cell(0.0004, False) == "<td>0.000</td>"
    assert report.delta_cell(-0.002, True) == '<td class="worse">-0.002</td>'
    assert report.delta_cell(-0.002, False) == '<td class="better">-0.002</td>'
    assert report.delta_cell(0.5, None) == '<td class="">+0.500</td>'
    table = report.metric_table(
        {"base": {"bleu": {"value": 1.2344}}, "finetuned": {"bleu": {"value": 1.2341}}}, ["base", "finetuned"]
    )
    assert "-0.000" not in table and "worse" not in table and "<td>0.000</td>" in table


def test_a_demo_report_says_its_outputs_come_from_a_tiny_random_model(run, tmp_path):
    assert report.DEMO_NOTE in (run / "report.html").read_text(encoding="utf-8")
    # A model with other shapes (InternVL2-2B's) gets no such line.
    from vlmtune.model_builder import model_config

    big = tmp_path / "InternVL2-2B"
    big.mkdir()
    (big / "config.json").write_text(json.dumps(model_config("full", 92553)))
    variants = {v: report.read_variant(run / v) for v in ("base", "finetuned")}
    assert all(report.is_demo_model(rows[0]["model"]) for rows, _ in variants.values())
    assert not report.is_demo_model(big) and not report.is_demo_model(tmp_path / "missing")
    for rows, _ in variants.values():
        for r in rows:
            r["model"] = str(big)
    assert report.DEMO_NOTE not in report.render_html("x", variants, run, 1)
