"""LMDeploy against the transformers engine on one GPU, logit by logit and prompt by prompt.

For the same held-out records and model folder it measures:

- the first generated position's full logit vector from the transformers engine in bf16 (the
  evaluation engine), the same model in fp32 (the reference: how far bf16 alone moves the
  logits), and LMDeploy's PyTorch engine (its top-20 log-probs over the full vocabulary:
  ``logprobs_mode='raw_logprobs'``, without which 0.18's PyTorch engine returns none, and it
  returns logits only for prompt scoring); with the image and, to tell the vision path from the
  language model, the same questions without it;
- per pair: argmax agreement by the fp32 reference's top-1/top-2 margin, the largest log-prob
  difference (over the vocabulary; over LMDeploy's top 20 for LMDeploy) and the correlation of
  the log-probs there;
- greedy outputs (``--max-new-tokens``): per record, where LMDeploy's tokens first differ from
  the transformers engine's;
- throughput with the evaluation's generation settings: the transformers engine after a
  one-batch warm-up, LMDeploy twice in a row on the same engine (first pass: with its kernels'
  first-call compilation; second: warm), for each ``--lmdeploy-runs`` setting of max_batch_size
  and image-preprocessing threads;
- LMDeploy's image preprocessing on one CPU thread (what its own single-worker executor does).

    PYTHONPATH=src python benchmarks/engine_parity.py --model M --eval eval.jsonl \
        --image-folder ds --records 64 --out results/parity
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from gpu_workflow_report import greedy_divergence  # noqa: E402  (this script's folder)

from vlmtune.heldout import read_eval  # noqa: E402
from vlmtune.prompt import user_text  # noqa: E402
from vlmtune.transformers_engine import TransformersEngine  # noqa: E402

MARGIN_BINS = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, float("inf"))
TOP_K = 20  # LMDeploy's log-probs per position compared with the full rows of the other two


def hf_first_logits(engine: TransformersEngine, records: list[dict], folder: Path, image: bool, batch: int):
    """fp32 copies of the logits of the first generated position, one row per record, and the
    prompt lengths."""
    import torch

    rows, lengths = [], []
    for start in range(0, len(records), batch):
        chunk = records[start : start + batch]
        if image:
            pixels, _, enc = engine.prepare(chunk, folder)
            px = torch.cat(pixels).to(engine.device, engine.dtype)
        else:
            prompts = [engine.chat.prompt(r["question"], None) for r in chunk]
            enc = engine.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=True)
            px = None
        with torch.inference_mode():
            out = engine.model.generate(
                pixel_values=px,
                input_ids=enc.input_ids.to(engine.device),
                attention_mask=enc.attention_mask.to(engine.device),
                max_new_tokens=1,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=engine.tokenizer.pad_token_id,
            )
        rows.append(out.logits[0].float().cpu())
        lengths += enc.attention_mask.sum(-1).tolist()
    return torch.cat(rows), lengths


def lmdeploy_first_logprobs(runner, records: list[dict], folder: Path, image: bool):
    """LMDeploy's top-20 log-probs of the first generated position: (token ids, log-probs), one
    row each per record, best first; and the prompt lengths."""
    import torch
    from lmdeploy import GenerationConfig
    from PIL import Image

    from vlmtune.lmdeploy_engine import messages

    requests = []
    for rec in records:
        if image:
            with Image.open(folder / rec["image"]) as img:
                requests.append(messages(rec["question"], img.convert("RGB"), runner.tiling["max_tiles"]))
        else:
            requests.append([dict(role="user", content=user_text(rec["question"]))])
    gen = GenerationConfig(max_new_tokens=1, do_sample=False, logprobs=TOP_K)
    responses = runner.pipe(requests, gen_config=gen)
    ids, values = [], []
    for n, r in enumerate(responses):
        if not r.logprobs or len(r.logprobs[0]) < TOP_K:
            raise SystemExit(
                f"[parity] LMDeploy returned {len(r.logprobs[0]) if r.logprobs else 'no'} log-probs for "
                f"record {n} (asked for {TOP_K}; is logprobs_mode set on its engine config?)"
            )
        best = sorted(r.logprobs[0].items(), key=lambda kv: -kv[1])[:TOP_K]
        ids.append([int(t) for t, _ in best])
        values.append([float(v) for _, v in best])
    return (torch.tensor(ids), torch.tensor(values)), [r.input_token_len for r in responses]


def compare(a, b, reference) -> dict:
    """Agreement of ``a`` and ``b`` by the margin of ``reference``'s top-1. ``b`` and
    ``reference`` are full logit rows; ``a`` is one too, or LMDeploy's (token ids, log-probs) of
    its top 20, best first: then the log-prob difference and correlation are taken at those ids."""
    import torch

    top2 = reference.topk(2, dim=-1).values
    margin = (top2[:, 0] - top2[:, 1]).tolist()
    lb = torch.log_softmax(b, -1)
    if isinstance(a, tuple):
        ids, la = a
        lb = lb.gather(-1, ids)
        agree = (ids[:, 0] == b.argmax(-1)).tolist()
    else:
        la = torch.log_softmax(a, -1)
        agree = (a.argmax(-1) == b.argmax(-1)).tolist()
    diff = (la - lb).abs().max(-1).values.tolist()
    corr = [float(torch.corrcoef(torch.stack([x, y]))[0, 1]) for x, y in zip(la, lb)]
    bins = []
    for lo, hi in zip(MARGIN_BINS, MARGIN_BINS[1:]):
        idx = [i for i, m in enumerate(margin) if lo <= m < hi]
        if idx:
            bins.append(dict(margin=f"[{lo}, {hi})", records=len(idx), agree=sum(agree[i] for i in idx)))
    return dict(
        agree=sum(agree),
        records=len(agree),
        by_margin=bins,
        max_logprob_diff_median=statistics.median(diff),
        max_logprob_diff_max=max(diff),
        logprob_corr_min=min(corr),
        logprob_corr_median=statistics.median(corr),
        margins_median=statistics.median(margin),
        margins_max=max(margin),
    )


def save(out: Path, result: dict, logits: dict) -> None:
    """Write what is measured so far (the comparisons of the logits at hand) to engine_parity.json."""
    for image in (True, False):
        kind = "image" if image else "text"
        ref = logits.get(("hf_fp32", image))
        if ref is None:
            continue
        result[f"compare_{kind}"] = {"hf_bf16_vs_hf_fp32": compare(logits[("hf_bf16", image)], ref, ref)}
        if ("lmdeploy", image) in logits:
            result[f"compare_{kind}"].update(
                lmdeploy_vs_hf_fp32=compare(logits[("lmdeploy", image)], ref, ref),
                lmdeploy_vs_hf_bf16=compare(logits[("lmdeploy", image)], logits[("hf_bf16", image)], ref),
            )
    (out / "engine_parity.json").write_text(json.dumps(result, indent=1))


def lmdeploy_preprocess_seconds(model: Path, records: list[dict], folder: Path) -> float:
    """Seconds LMDeploy's InternVL preprocessing (tiling, resize, normalisation) takes for the
    records' images on one thread, as its single-worker executor runs it."""
    import asyncio

    import torch
    from lmdeploy.serve.processors.multimodal import MultimodalProcessor
    from lmdeploy.vl.model.internvl import InternVLVisionModel
    from PIL import Image

    from vlmtune.lmdeploy_engine import messages, tiling

    vision = InternVLVisionModel(str(model), trust_remote_code=True)
    vision.build_preprocessor()
    vision.set_mm_feature_dtype(torch.bfloat16)
    max_tiles = tiling(model)["max_tiles"]
    t = time.perf_counter()
    for rec in records:
        with Image.open(folder / rec["image"]) as img:
            request = messages(rec["question"], img.convert("RGB"), max_tiles)
        vision.preprocess(asyncio.run(MultimodalProcessor.async_parse_multimodal_item(request)))
    return round(time.perf_counter() - t, 2)


def greedy_settings(max_new_tokens: int) -> dict:
    """The evaluation's generation settings for greedy answers of ``max_new_tokens``."""
    return dict(max_new_tokens=max_new_tokens, do_sample=False, temperature=1.0, top_p=1.0, seed=0)


def transformers_throughput(
    engine: TransformersEngine, records: list[dict], folder: Path, batch: int
) -> tuple[dict, list[dict]]:
    """The transformers engine over ``records`` at ``batch`` after a one-batch warm-up: its
    seconds and prompts/s, and its rows."""
    engine.generate(records[:batch], folder)  # warm-up
    t = time.perf_counter()
    rows = []
    for i in range(0, len(records), batch):
        rows += engine.generate(records[i : i + batch], folder)
    s = time.perf_counter() - t
    return dict(batch=batch, seconds=round(s, 2), prompts_per_s=round(len(records) / s, 2)), rows


def greedy_summary(hf_rows: list[dict], lmd_rows: list[dict]) -> dict:
    """Per record, the first position where LMDeploy's greedy tokens differ from the transformers
    engine's (None: identical; gpu_workflow_report's comparison, stop tokens left out)."""
    where = greedy_divergence(hf_rows, lmd_rows)
    diverging = [w for w in where if w is not None]
    return dict(
        records=len(where),
        identical=len(where) - len(diverging),
        first_divergence=where,
        first_divergence_median=statistics.median(diverging) if diverging else None,
    )


def lmdeploy_pass(a, batch: int, threads: int, first: bool, records, gen, result: dict, logits: dict):
    """One LMDeploy engine at ``max_batch_size=batch`` preparing images on ``threads`` workers:
    two timed generation passes (the first with the kernels' first-call compilation), then
    (``first``) the first-position log-probs. Returns the warm pass's rows."""
    import torch

    from vlmtune.lmdeploy_engine import LMDeployEngine

    t = time.perf_counter()
    runner = LMDeployEngine(
        a.model, gen, 8192, batch, "pytorch", preprocess_threads=threads, logprobs_mode="raw_logprobs"
    )
    built = time.perf_counter() - t
    passes = []
    for _ in range(2):
        t = time.perf_counter()
        rows = runner.generate(records, a.image_folder)
        passes.append(time.perf_counter() - t)
    row = dict(
        max_batch_size=batch,
        preprocess_threads=threads,
        build_s=round(built, 1),
        first_pass_s=round(passes[0], 2),
        second_pass_s=round(passes[1], 2),
        prompts_per_s_first=round(len(records) / passes[0], 2),
        prompts_per_s_warm=round(len(records) / passes[1], 2),
    )
    result["lmdeploy"].append(row)
    print(f"[parity] lmdeploy {row}", flush=True)
    if first:
        for image in (True, False):
            top, lens = lmdeploy_first_logprobs(runner, records, a.image_folder, image)
            logits[("lmdeploy", image)] = top
            result[f"lmdeploy_prompt_lengths_{'image' if image else 'text'}"] = lens
    runner.close()
    del runner
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--eval", required=True, type=Path)
    ap.add_argument("--image-folder", required=True, type=Path)
    ap.add_argument("--records", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument(
        "--lmdeploy-runs",
        default="16:1,16:16,64:16",
        help="LMDeploy engines to time, max_batch_size:preprocessing threads, comma-separated",
    )
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args(argv)

    import torch

    a.out.mkdir(parents=True, exist_ok=True)
    records = read_eval(a.eval, a.records)
    gen = greedy_settings(a.max_new_tokens)
    result: dict = dict(
        records=len(records),
        generation=gen,
        gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    )
    logits: dict = {}

    hf = TransformersEngine(a.model, gen)
    for image in (True, False):
        logits[("hf_bf16", image)], lens = hf_first_logits(hf, records, a.image_folder, image, a.batch_size)
        result[f"hf_prompt_lengths_{'image' if image else 'text'}"] = lens
    result["transformers"], hf_rows = transformers_throughput(hf, records, a.image_folder, a.batch_size)
    print(
        f"[parity] transformers: {len(records)} prompts in {result['transformers']['seconds']} s", flush=True
    )
    hf.model.float()
    hf.dtype = torch.float32
    for image in (True, False):
        logits[("hf_fp32", image)] = hf_first_logits(hf, records, a.image_folder, image, 8)[0]
    del hf
    gc.collect()
    torch.cuda.empty_cache()

    save(a.out, result, logits)
    result["lmdeploy_preprocess_s"] = lmdeploy_preprocess_seconds(a.model, records, a.image_folder)

    result["lmdeploy"] = []
    try:
        for n, run in enumerate(a.lmdeploy_runs.split(",")):
            batch, threads = (int(x) for x in run.split(":"))
            rows = lmdeploy_pass(a, batch, threads, n == 0, records, gen, result, logits)
            if n == 0:
                result["greedy"] = greedy_summary(hf_rows, rows)
                print(f"[parity] greedy outputs {result['greedy']}", flush=True)
            save(a.out, result, logits)
    except Exception:  # keep what was measured
        import traceback

        result["lmdeploy_error"] = traceback.format_exc()
        print(result["lmdeploy_error"], flush=True)

    save(a.out, result, logits)
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("lmdeploy_prompt")}, indent=1))


if __name__ == "__main__":
    main()
