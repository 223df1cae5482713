"""Scores of one model's predictions on the held-out set (docs/dataset.md, "Metrics that work
offline"), overall and per record type, with bootstrap 95% intervals, into ``metrics.json``.

Every overlap metric comes from its library: BLEU and chrF from sacrebleu (``tokenize='zh'``:
Chinese characters are tokens), ROUGE-L from rouge-score with a character tokenizer (its default
tokenizer drops every Chinese character), CIDEr-D from pycocoevalcap (its ``Cider`` class is the
CIDEr-D of coco-caption: clipped counts, Gaussian length penalty, sigma 6, x10) on jieba words.
Beside them: distinct-1/2 over jieba words, lengths in characters, the rate of predictions
that repeat a training response verbatim, the reference NLL/perplexity (teacher-forced, from
``vlmtune.reference_nll``) and the pairwise preference accuracy over starred references.
Intervals: percentile bootstrap over records (over pairs for preferences) by scipy.

    python -m vlmtune.metrics --predictions results/eval/my/base/predictions.jsonl \
        --nll results/eval/my/base/reference_nll.jsonl --train results/converted/x/train.json \
        --out results/eval/my/base/metrics.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from . import jsonl
from .atomic import atomic_file

LIBRARIES = ("sacrebleu", "rouge-score", "jieba", "pycocoevalcap", "scipy")


class MetricsError(Exception):
    """Unusable predictions or reference NLL files (the step's one-line error)."""


# ---------------------------------------------------------------- tokenisation


def char_tokens(text: str) -> list[str]:
    """Characters, blanks dropped: the unit of ROUGE-L and of the length statistics."""
    return [c for c in text if not c.isspace()]


class CharTokenizer:
    """The ``tokenize`` interface rouge-score expects, one token per character."""

    def tokenize(self, text: str) -> list[str]:
        return char_tokens(text)


def words(text: str) -> list[str]:
    """jieba's words (precise mode), blanks dropped: the unit of CIDEr-D and distinct-n."""
    import jieba

    jieba.setLogLevel(60)  # its "Building prefix dict" notes on stderr
    return [w for w in jieba.lcut(text) if w.strip()]


# ---------------------------------------------------------------- corpus and record metrics


def _reference_streams(refs: list[list[str]]) -> list[list[str | None]]:
    """sacrebleu wants one stream per reference position; records with fewer references
    get ``None`` there (sacrebleu skips it)."""
    width = max((len(r) for r in refs), default=0)
    return [[r[i] if i < len(r) else None for r in refs] for i in range(width)]


def bleu(preds: list[str], refs: list[list[str]]) -> float:
    """Corpus BLEU (sacrebleu, ``zh`` tokenisation) of ``preds`` against their reference lists."""
    import sacrebleu

    return sacrebleu.corpus_bleu(preds, _reference_streams(refs), tokenize="zh").score


def chrf(preds: list[str], refs: list[list[str]]) -> float:
    """Corpus chrF (sacrebleu) of ``preds`` against their reference lists."""
    import sacrebleu

    return sacrebleu.corpus_chrf(preds, _reference_streams(refs)).score


def corpus_statistic(name: str, preds: list[str], refs: list[list[str]]):
    """BLEU or chrF of any subset of the records (indices), from per-record sufficient statistics
    extracted once: how sacrebleu's own significance tests resample a corpus score."""
    from sacrebleu.metrics import BLEU, CHRF

    metric = BLEU(tokenize="zh") if name == "bleu" else CHRF()
    stats = np.array(metric._extract_corpus_statistics(preds, _reference_streams(refs)))
    return lambda idx: metric._compute_score_from_stats(list(stats[idx].sum(0))).score


def rouge_l(pred: str, refs: list[str]) -> float:
    """Character-level ROUGE-L F1 against the best-matching reference (x100)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=CharTokenizer())
    return 100 * scorer.score_multi(refs, pred)["rougeL"].fmeasure


def cider_d(preds: list[str], refs: list[list[str]]) -> tuple[float, list[float]]:
    """Corpus CIDEr-D and the per-record scores (document frequencies from this corpus)."""
    from pycocoevalcap.cider.cider import Cider

    gts = {i: [" ".join(words(r)) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [" ".join(words(p))] for i, p in enumerate(preds)}
    score, scores = Cider().compute_score(gts, res)
    return float(score), [float(s) for s in scores]


def distinct(token_lists: list[list[str]], n: int) -> float:
    """Distinct n-grams over all n-grams of all predictions."""
    grams = [tuple(t[i : i + n]) for t in token_lists for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def normalise(text: str) -> str:
    """``text`` as its character tokens joined (whitespace and punctuation dropped), for exact-match tests."""
    return "".join(char_tokens(text))


def preference_pairs(nll_refs: list[dict]) -> list[float]:
    """For one record: 1 per pair of starred references with different stars where the higher
    starred one has the lower loss per token, 0 where it has the higher, 0.5 on a tie."""
    starred = [r for r in nll_refs if r.get("star") is not None and r["tokens"] > 0]
    out = []
    for i, a in enumerate(starred):
        for b in starred[i + 1 :]:
            if a["star"] == b["star"]:
                continue
            hi, lo = (a, b) if a["star"] > b["star"] else (b, a)
            hi_loss, lo_loss = hi["nll"] / hi["tokens"], lo["nll"] / lo["tokens"]
            out.append(1.0 if hi_loss < lo_loss else 0.0 if hi_loss > lo_loss else 0.5)
    return out


# ---------------------------------------------------------------- bootstrap


def bootstrap_ci(n: int, statistic, resamples: int, seed: int) -> list[float] | None:
    """Percentile 95% interval of ``statistic(indices)`` over resampled units (scipy)."""
    from scipy.stats import bootstrap

    if n < 2 or resamples < 1:
        return None
    res = bootstrap(
        (np.arange(n),),
        lambda idx: statistic(idx.astype(int)),
        vectorized=False,
        n_resamples=resamples,
        method="percentile",
        confidence_level=0.95,
        random_state=np.random.default_rng(seed),
    )
    lo, hi = res.confidence_interval
    if math.isnan(lo) or math.isnan(hi):  # a constant statistic
        value = float(statistic(np.arange(n)))
        return [value, value]
    return [float(lo), float(hi)]


# ---------------------------------------------------------------- scoring


def score_group(
    rows: list[dict], nll: dict[str, list[dict]] | None, train: set[str] | None, resamples: int, seed: int
) -> dict:
    """Every metric of one group of prediction ``rows`` (overall or one record type), each with its
    value and a bootstrap 95 % interval (``resamples`` draws from ``seed``): BLEU, chrF, ROUGE-L,
    CIDEr-D, distinct-n, lengths, copies of training answers (``train``) and, with ``nll``,
    perplexity and preference accuracy."""
    preds = [r["prediction"] for r in rows]
    refs = [[x["text"] for x in r["references"]] for r in rows]
    n = len(rows)
    pred_words = [words(p) for p in preds]
    rouge = np.array([rouge_l(p, rs) for p, rs in zip(preds, refs)])
    _, cider_scores = cider_d(preds, refs)
    cider = np.array(cider_scores)
    pred_len = np.array([len(char_tokens(p)) for p in preds], dtype=float)
    ref_len = np.array([np.mean([len(char_tokens(x)) for x in rs]) if rs else 0.0 for rs in refs])
    out: dict[str, dict] = {}

    def put(name, value, statistic, units=n, unit="record"):
        out[name] = dict(
            value=float(value) if value is not None else None,
            n=units,
            unit=unit,
            ci95=bootstrap_ci(units, statistic, resamples, seed) if value is not None else None,
        )

    for name in ("bleu", "chrf"):
        of_records = corpus_statistic(name, preds, refs)
        put(name, of_records(np.arange(n)), of_records)
    put("rouge_l", rouge.mean(), lambda i: rouge[i].mean())
    # CIDEr-D's interval resamples the per-record scores (its document frequencies stay those
    # of the whole set, as in coco-caption).
    put("cider_d", cider.mean(), lambda i: cider[i].mean())
    put("distinct_1", distinct(pred_words, 1), lambda i: distinct([pred_words[k] for k in i], 1))
    put("distinct_2", distinct(pred_words, 2), lambda i: distinct([pred_words[k] for k in i], 2))
    put("prediction_chars", pred_len.mean(), lambda i: pred_len[i].mean())
    put("reference_chars", ref_len.mean(), lambda i: ref_len[i].mean())
    out["prediction_chars"].update(
        median=float(np.median(pred_len)), min=float(pred_len.min()), max=float(pred_len.max())
    )
    put("empty_rate", float((pred_len == 0).mean()), lambda i: (pred_len[i] == 0).mean())
    if train is not None:
        copied = np.array([normalise(p) in train for p in preds], dtype=float)
        put("train_copy_rate", copied.mean(), lambda i: copied[i].mean())
    if nll is not None:
        sums = np.array([sum(x["nll"] for x in nll[r["id"]]) for r in rows])
        toks = np.array([sum(x["tokens"] for x in nll[r["id"]]) for r in rows], dtype=float)
        per_token = lambda i: sums[i].sum() / toks[i].sum() if toks[i].sum() else float("nan")  # noqa: E731
        value = per_token(np.arange(n)) if toks.sum() else None
        put("reference_nll", value, per_token)
        put(
            "reference_perplexity",
            math.exp(value) if value is not None else None,
            lambda i: math.exp(per_token(i)),
        )
        pairs = np.array([p for r in rows for p in preference_pairs(nll[r["id"]])])
        put(
            "preference_accuracy",
            pairs.mean() if len(pairs) else None,
            lambda i: pairs[i].mean(),
            len(pairs),
            "pair",
        )
    return out


def read_jsonl(path: Path) -> list[dict]:
    """The package's JSONL reader (split on "\\n" only); a bad line is an error naming file:line."""
    try:
        return jsonl.read_jsonl(path)
    except jsonl.JsonlError as exc:
        raise MetricsError(str(exc)) from None


def train_responses(path: Path) -> set[str]:
    """Every gpt turn of the training file (XTuner's LLaVA format, .json or .jsonl), normalised."""
    with open(path, "rb") as fh:
        is_list = fh.read(64).removeprefix(jsonl.BOM).lstrip().startswith(b"[")
    records = json.loads(Path(path).read_bytes().removeprefix(jsonl.BOM)) if is_list else read_jsonl(path)
    return {
        normalise(t["value"])
        for rec in records
        for t in rec.get("conversations", [])
        if t.get("from") == "gpt"
    }


def score(
    predictions: Path,
    out: Path,
    nll_path: Path | None = None,
    train_path: Path | None = None,
    resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """Score ``predictions`` (``predictions.jsonl`` of ``vlmtune.evaluate``), with the reference NLL
    of ``nll_path`` and the training answers of ``train_path`` when given, overall and per record
    type, into ``out`` (``metrics.json``, atomically). Returns the metrics; raises MetricsError for
    an empty file or a record without id, prediction or references."""
    rows = read_jsonl(predictions)
    if not rows:
        raise MetricsError(f"{predictions}: no predictions")
    for k, r in enumerate(rows, 1):
        missing = [f for f in ("id", "prediction", "references") if f not in r]
        if missing:
            raise MetricsError(f"{predictions}:{k}: lacks {', '.join(missing)}")
        if not r["references"]:
            raise MetricsError(f"{predictions}:{k}: record {r['id']} has no references")
    nll = None
    if nll_path is not None:
        nll = {r["id"]: r["references"] for r in read_jsonl(nll_path)}
        lacking = [r["id"] for r in rows if r["id"] not in nll]
        if lacking:
            raise MetricsError(
                f"{nll_path}: no reference NLL for records {lacking[:5]} ({len(lacking)} in all)"
            )
    train = train_responses(train_path) if train_path is not None else None
    by_type = defaultdict(list)
    for r in rows:
        by_type[r.get("type") or "unknown"].append(r)
    first = rows[0]
    result = dict(
        predictions=str(predictions),
        records=len(rows),
        model=first.get("model"),
        engine=first.get("engine"),
        engine_version=first.get("engine_version"),
        generation=first.get("generation"),
        bootstrap=dict(resamples=resamples, seed=seed, confidence=0.95, method="percentile"),
        overall=score_group(rows, nll, train, resamples, seed),
        by_type={
            t: dict(records=len(g), metrics=score_group(g, nll, train, resamples, seed))
            for t, g in sorted(by_type.items())
        },
        libraries={lib: importlib.metadata.version(lib) for lib in LIBRARIES},
    )
    with atomic_file(out) as fh:
        json.dump(result, fh, ensure_ascii=False, indent=1)
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--predictions", required=True, type=Path)
    ap.add_argument("--nll", type=Path, help="reference_nll.jsonl of vlmtune.reference_nll")
    ap.add_argument("--train", type=Path, help="the training file, for the copy rate")
    ap.add_argument("--bootstrap", type=int, default=1000, help="resamples (0: no intervals)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args(argv)
    try:
        res = score(a.predictions, a.out, a.nll, a.train, a.bootstrap, a.seed)
    except MetricsError as exc:
        raise SystemExit(f"metrics: {exc}") from None
    o = res["overall"]
    print(
        f"[vlmtune.metrics] {res['records']} records: BLEU {o['bleu']['value']:.2f}, chrF "
        f"{o['chrf']['value']:.2f}, "
        f"ROUGE-L {o['rouge_l']['value']:.2f}, CIDEr-D {o['cider_d']['value']:.3f} -> {a.out}"
    )


if __name__ == "__main__":
    main()
