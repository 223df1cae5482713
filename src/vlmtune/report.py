"""Base vs fine-tuned: a self-contained ``report.html`` (inline CSS, images as data URIs; the
metrics with their 95% intervals and the delta; one card per record with the image, prompt,
references and each model's output) and ``summary.png`` (matplotlib).

    python -m vlmtune.report --variant base results/eval/my/base \
        --variant finetuned results/eval/my/finetuned --image-folder data/datasets/x \
        --html results/eval/my/report.html --png results/eval/my/summary.png

Each variant folder holds ``predictions.jsonl`` and ``metrics.json``.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
from pathlib import Path

from .atomic import atomic_file

# (key in metrics.json, label, higher is better)
METRICS = [
    ("bleu", "BLEU (zh)", True),
    ("chrf", "chrF", True),
    ("rouge_l", "ROUGE-L (characters)", True),
    ("cider_d", "CIDEr-D (jieba words)", True),
    ("distinct_1", "distinct-1", True),
    ("distinct_2", "distinct-2", True),
    ("reference_nll", "reference NLL / token", False),
    ("reference_perplexity", "reference perplexity", False),
    ("preference_accuracy", "preference accuracy (starred pairs)", True),
    ("train_copy_rate", "copies a training response", False),
    ("empty_rate", "empty outputs", False),
    ("prediction_chars", "output length (characters)", None),
    ("reference_chars", "reference length (characters)", None),
]
SUMMARY = [
    "bleu",
    "chrf",
    "rouge_l",
    "cider_d",
    "distinct_2",
    "reference_nll",
    "preference_accuracy",
    "prediction_chars",
]
THUMBNAIL = 256
# CJK fonts first (the records are Chinese): Noto Sans CJK comes with the system packages of the
# tests (.ci/apt-packages.txt: fonts-noto-cjk); the others are their names on macOS/Windows.
FONTS = [
    '"Noto Sans CJK SC"',
    '"Source Han Sans SC"',
    '"PingFang SC"',
    '"Microsoft YaHei"',
    '"WenQuanYi Micro Hei"',
    "system-ui",
    "sans-serif",
]
# The delta's precision: a difference that rounds to zero there is neutral, not better or worse.
DELTA_DIGITS = 3

CSS = """
body{font-family:FONTS;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px}h2{font-size:18px;margin-top:28px}
table{border-collapse:collapse;background:#fff}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#eef}
.ci{color:#777;font-size:12px}.better{color:#08702a;font-weight:bold}.worse{color:#b00020;font-weight:bold}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border:1px solid #ccc;border-radius:6px;padding:10px;width:420px;display:flex;gap:10px}
.card img{width:160px;height:auto;max-height:220px;object-fit:contain;border:1px solid #ddd;\
align-self:flex-start}
.card .text{flex:1;font-size:13px;overflow-wrap:anywhere}.label{color:#555;font-weight:bold}
.out{background:#f3f3ff;padding:3px;margin:2px 0}.refs{margin:2px 0;padding-left:18px}
.note{background:#fff6d6;border:1px solid #e0c060;padding:6px 10px}
""".replace("FONTS", ",".join(FONTS))
# Marks the page once every image has decoded (read by the headless-browser test).
SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images-decoded', ok + '/' + imgs.length);
});
"""


class ReportError(Exception):
    """A missing or unusable input of the report (the step's one-line error)."""


def read_variant(folder: Path) -> tuple[list[dict], dict]:
    """The predictions and metrics of one evaluated model's folder; ReportError if either file is missing."""
    folder = Path(folder)
    pred, met = folder / "predictions.jsonl", folder / "metrics.json"
    for p in (pred, met):
        if not p.is_file():
            raise ReportError(f"report: {p} does not exist")
    rows = [json.loads(l) for l in pred.read_text(encoding="utf-8").splitlines() if l.strip()]
    return rows, json.loads(met.read_text(encoding="utf-8"))


def thumbnail_uri(path: Path) -> str:
    """A JPEG thumbnail as a data URI, so the page needs no other file."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        img.thumbnail((THUMBNAIL, THUMBNAIL))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def fmt(x, digits=2) -> str:
    """``x`` with ``digits`` decimals, or a dash for a missing value."""
    return "–" if x is None else f"{x:.{digits}f}"


DEMO_NOTE = (
    "Demo: these outputs come from a tiny model with random weights (vlmtune.model_builder, preset "
    "tiny), not from InternVL2; the numbers only show that the pipeline runs."
)


def is_demo_model(model_dir) -> bool:
    """A model of model_builder's ``tiny`` preset (the demo's; random weights, then a few demo
    training steps): its config has exactly the preset's vision and LLM shapes."""
    from .model_builder import PRESETS

    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    tiny = PRESETS["tiny"]
    return all(
        all((config.get(f"{part}_config") or {}).get(k) == v for k, v in tiny[part].items())
        for part in ("vision", "llm")
    )


def delta_cell(d: float, higher: bool | None) -> str:
    """The delta, green when better and red when worse; one that shows as 0.000 is neutral
    (no sign, no colour: -0.0004 is not "worse")."""
    if round(d, DELTA_DIGITS) == 0:
        return f"<td>{0:.{DELTA_DIGITS}f}</td>"
    cls = "" if higher is None else ("better" if (d > 0) == higher else "worse")
    return f'<td class="{cls}">{d:+.{DELTA_DIGITS}f}</td>'


def metric_table(metrics: dict[str, dict], variants: list[str]) -> str:
    """Rows: metrics; columns: each variant (value and interval), then the delta last - first."""
    head = "".join(f"<th>{html.escape(v)}</th>" for v in variants)
    delta_head = (
        f"<th>Δ {html.escape(variants[-1])} − {html.escape(variants[0])}</th>" if len(variants) > 1 else ""
    )
    rows = []
    for key, label, higher in METRICS:
        cells = [metrics[v].get(key) for v in variants]
        if all(c is None for c in cells):
            continue
        tds = []
        for c in cells:
            if c is None or c.get("value") is None:
                tds.append("<td>–</td>")
                continue
            ci = c.get("ci95")
            ci_text = f' <span class="ci">[{fmt(ci[0])}, {fmt(ci[1])}]</span>' if ci else ""
            tds.append(f"<td>{fmt(c['value'], 3 if abs(c['value']) < 10 else 2)}{ci_text}</td>")
        delta = ""
        if len(variants) > 1:
            a, b = cells[0], cells[-1]
            if a and b and a.get("value") is not None and b.get("value") is not None:
                delta = delta_cell(b["value"] - a["value"], higher)
            else:
                delta = "<td>–</td>"
        rows.append(f"<tr><td>{html.escape(label)}</td>{''.join(tds)}{delta}</tr>")
    return f"<table><tr><th>metric</th>{head}{delta_head}</tr>{''.join(rows)}</table>"


def card(rec: dict, outputs: dict[str, str | None], image_uri: str | None) -> str:
    """The HTML card of one record: its image (``image_uri``), question, references and each model's
    output."""
    refs = "".join(
        f"<li>{html.escape(r['text'])}"
        + (f' <span class="ci">★{r["star"]}</span>' if r.get("star") is not None else "")
        + "</li>"
        for r in rec["references"]
    )
    outs = "".join(
        f'<div class="label">{html.escape(v)}</div><div '
        f'class="out">{html.escape(o) if o is not None else "–"}</div>'
        for v, o in outputs.items()
    )
    img = (
        f'<img alt="{html.escape(rec["image"])}" src="{image_uri}">'
        if image_uri
        else "<div>(image missing)</div>"
    )
    return (
        f'<div class="card">{img}<div class="text"><div class="label">{html.escape(str(rec["id"]))} · '
        f"{html.escape(str(rec.get('type')))}</div><div>{html.escape(rec['question'])}</div>"
        f'<div class="label">references</div><ul class="refs">{refs}</ul>{outs}</div></div>'
    )


def render_html(
    run: str, variants: dict[str, tuple[list[dict], dict]], image_folder: Path, max_cards: int
) -> str:
    """The whole ``report.html`` of ``run``: metric tables with intervals, per-type figures and up to
    ``max_cards`` record cards."""
    names = list(variants)
    first_rows, first_metrics = variants[names[0]]
    overall = {v: variants[v][1]["overall"] for v in names}
    parts = [f"<h1>Evaluation of run {html.escape(run)}: {' vs '.join(map(html.escape, names))}</h1>"]
    models = {r.get("model") for v in names for r in variants[v][0][:1]}
    if models and all(m and is_demo_model(m) for m in models):
        parts.append(f'<p class="note">{html.escape(DEMO_NOTE)}</p>')
    m = first_metrics
    parts.append(
        f"<p>{m['records']} held-out records; engine {html.escape(str(m.get('engine')))} "
        f"{html.escape(str(m.get('engine_version')))}; generation "
        f"{html.escape(json.dumps(m.get('generation')))}; "
        f"95% percentile bootstrap intervals over records ({m['bootstrap']['resamples']} resamples).</p>"
    )
    parts.append("<h2>All records</h2>" + metric_table(overall, names))
    types = sorted({t for v in names for t in variants[v][1]["by_type"]})
    for t in types:
        per = {v: variants[v][1]["by_type"].get(t, {}).get("metrics", {}) for v in names}
        n = max(variants[v][1]["by_type"].get(t, {}).get("records", 0) for v in names)
        parts.append(
            f"<h2>Type {html.escape(t)} ({n} record{'s' if n != 1 else ''})</h2>" + metric_table(per, names)
        )
    by_id = {v: {r["id"]: r for r in variants[v][0]} for v in names}
    shown = first_rows[:max_cards]
    parts.append(f'<h2>Outputs ({len(shown)} of {len(first_rows)} records)</h2><div class="cards">')
    uris: dict[str, str | None] = {}
    for rec in shown:
        if rec["image"] not in uris:
            path = Path(image_folder) / rec["image"]
            uris[rec["image"]] = thumbnail_uri(path) if path.is_file() else None
        outputs = {v: (by_id[v].get(rec["id"]) or {}).get("prediction") for v in names}
        parts.append(card(rec, outputs, uris[rec["image"]]))
    parts.append("</div>")
    return (
        '<!DOCTYPE html><html lang="zh"><head><meta charset="utf-8">'
        f"<title>vlmtune evaluation: {html.escape(run)}</title>"
        f"<style>{CSS}</style><script>{SCRIPT}</script></head><body>{''.join(parts)}</body></html>\n"
    )


def render_png(variants: dict[str, tuple[list[dict], dict]], out: Path) -> None:
    """``summary.png``: the headline metrics of each variant as bars with their 95 % intervals, written to
    ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {k: label for k, label, _ in METRICS}
    names = list(variants)
    keys = [
        k
        for k in SUMMARY
        if any(variants[v][1]["overall"].get(k, {}).get("value") is not None for v in names)
    ]
    cols = 4
    rows = max(1, -(-len(keys) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    colors = ["#8c8c8c", "#3b6fd4", "#d4823b", "#3bd48c"]
    for ax, key in zip(axes.flat, keys):
        for i, v in enumerate(names):
            c = variants[v][1]["overall"].get(key) or {}
            val = c.get("value")
            if val is None:
                continue
            ci = c.get("ci95")
            err = [[max(val - ci[0], 0)], [max(ci[1] - val, 0)]] if ci else None
            ax.bar(i, val, yerr=err, color=colors[i % len(colors)], capsize=4, label=v)
        ax.set_xticks(range(len(names)), names)
        ax.set_title(labels[key], fontsize=9)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.suptitle("base vs fine-tuned (95% bootstrap intervals)", fontsize=11)
    fig.tight_layout()
    with atomic_file(out, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100)
    plt.close(fig)


def build(
    run: str,
    variant_dirs: dict[str, Path],
    image_folder: Path,
    html_out: Path,
    png_out: Path,
    max_cards: int = 60,
) -> None:
    """Write ``html_out`` (``report.html``) and ``png_out`` (``summary.png``) for ``run`` from the
    evaluated folders of ``variant_dirs`` (name -> folder with ``predictions.jsonl`` and
    ``metrics.json``), with images from ``image_folder``. ReportError if no variant is given or a
    file is missing."""
    if not variant_dirs:
        raise ReportError("report: no --variant given")
    variants = {name: read_variant(folder) for name, folder in variant_dirs.items()}
    with atomic_file(html_out) as fh:
        fh.write(render_html(run, variants, image_folder, max_cards))
    render_png(variants, png_out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="")
    ap.add_argument(
        "--variant",
        nargs=2,
        action="append",
        metavar=("NAME", "FOLDER"),
        required=True,
        help="a model's evaluation folder (predictions.jsonl, metrics.json); the first is the baseline",
    )
    ap.add_argument("--image-folder", required=True, type=Path)
    ap.add_argument("--max-cards", type=int, default=60)
    ap.add_argument("--html", required=True, type=Path)
    ap.add_argument("--png", required=True, type=Path)
    a = ap.parse_args(argv)
    try:
        build(a.run, {n: Path(f) for n, f in a.variant}, a.image_folder, a.html, a.png, a.max_cards)
    except ReportError as exc:
        raise SystemExit(str(exc)) from None
    print(f"[vlmtune.report] {a.html}, {a.png}")


if __name__ == "__main__":
    main()
