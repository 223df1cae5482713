"""Batch generation over the held-out evaluation records, with the training prompt (the reference
answers' teacher-forced loss is ``vlmtune.reference_nll``).

Engines: ``transformers`` (CPU or GPU; the model's remote code, batched, left-padded) and
``lmdeploy`` (GPUs; its batch pipeline, ``vlmtune.lmdeploy_engine``). Both write the same
``predictions.jsonl`` fields: id, image, type, question, prompt (as sent, image tokens
abbreviated), a digest of the prompt token ids (equal across engines when the prompts are),
image tokens, references, prediction, generated token ids and counts, finish reason, engine and
version, generation config, model folder. The transformers engine adds the logit margin of its
first generated token over the runner-up (how clear the greedy choice was).

    python -m vlmtune.evaluate generate --model results/merged/InternVL2-2B-my \
        --eval results/converted/x/eval.jsonl --image-folder data/datasets/x \
        --engine transformers --generation '{"max_new_tokens": 64, ...}' \
        --out results/eval/my/finetuned/predictions.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .atomic import atomic_file
from .heldout import read_eval
from .provenance import write_for_evaluation
from .transformers_engine import (  # noqa: F401 (evaluate.TransformersEngine, as before)
    ENGINE_ENVS,
    EvaluateError,
    TransformersEngine,
    abbreviate,
    require,
)

# The schema's enums of evaluate.engine and evaluate.lmdeploy_backend (tests/test_cli_choices.py
# holds them equal; this module runs in the LMDeploy env, which does not read the schema).
ENGINES = ("lmdeploy", "transformers")
LMDEPLOY_BACKENDS = ("pytorch", "turbomind")
GENERATION_KEYS = ("max_new_tokens", "do_sample", "temperature", "top_p", "seed")


def check_generation(gen: dict) -> dict:
    """The generation settings of ``gen`` (``GENERATION_KEYS``); EvaluateError naming the missing ones."""
    missing = [k for k in GENERATION_KEYS if k not in gen]
    if missing:
        raise EvaluateError(f"evaluate: --generation lacks {', '.join(missing)}")
    return {k: gen[k] for k in GENERATION_KEYS}


def generate(
    model: Path,
    eval_path: Path,
    image_folder: Path,
    engine: str,
    out: Path,
    gen: dict,
    batch_size: int = 8,
    session_len: int = 8192,
    max_records: int | None = None,
    lmdeploy_backend: str = "pytorch",
    threads: int = 1,
) -> int:
    """Answer the held-out records with ``engine`` and write ``predictions.jsonl`` (atomically).

    ``threads``: CPU workers LMDeploy prepares the images on (the job's cores).

    Prints the generation throughput (prompts/s, model loading excluded). Raises EvaluateError
    for a missing engine, image or record key.
    """
    import time

    from tqdm import tqdm

    gen = check_generation(gen)
    records = read_eval(eval_path, max_records)
    if engine == "transformers":
        runner = TransformersEngine(model, gen)
    elif engine == "lmdeploy":
        require("lmdeploy", engine)
        from .lmdeploy_engine import LMDeployEngine, LMDeployError

        try:
            runner = LMDeployEngine(
                model, gen, session_len, batch_size, lmdeploy_backend, preprocess_threads=threads
            )
        except LMDeployError as exc:
            raise EvaluateError(str(exc)) from None
    else:
        raise EvaluateError(f"evaluate: unknown engine {engine!r}; choose lmdeploy or transformers")
    # The engine is closed on every way out: LMDeploy's engine is a process of its own that
    # holds the GPU's memory until it is.
    try:
        started = time.perf_counter()
        # tqdm writes to stderr, which the rule sends to the log.
        with (
            atomic_file(out) as fh,
            tqdm(
                total=len(records), desc=f"generate ({engine})", unit="prompt", mininterval=5, file=sys.stderr
            ) as bar,
        ):
            # LMDeploy schedules its own batches (continuous batching up to batch_size): hand it
            # many requests at once; the transformers engine pads and runs batch_size at a time.
            chunk = batch_size if engine == "transformers" else max(batch_size, 256)
            for start in range(0, len(records), chunk):
                batch = records[start : start + chunk]
                for rec, res in zip(batch, runner.generate(batch, Path(image_folder)), strict=True):
                    row = dict(
                        id=rec["id"],
                        image=rec["image"],
                        type=rec.get("type"),
                        question=rec["question"],
                        references=rec["references"],
                        **res,
                        engine=engine,
                        engine_version=runner.version,
                        generation=gen,
                        model=str(model),
                    )
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                bar.update(len(batch))
        elapsed = time.perf_counter() - started
        print(
            f"[vlmtune.evaluate] generation: {len(records)} prompts in {elapsed:.2f} s = "
            f"{len(records) / max(elapsed, 1e-9):.2f} prompts/s ({engine}, batch {batch_size}, model loading "
            "excluded)"
        )
    finally:
        if hasattr(runner, "close"):
            runner.close()
    return len(records)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("task", choices=["generate"], help="kept for the commands of earlier runs")
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--eval", required=True, type=Path)
    ap.add_argument("--image-folder", required=True, type=Path)
    ap.add_argument("--max-records", type=int)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--engine", required=True, choices=ENGINES)
    ap.add_argument("--generation", required=True, help="JSON: " + ", ".join(GENERATION_KEYS))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--session-len", type=int, default=8192)
    ap.add_argument("--lmdeploy-backend", choices=LMDEPLOY_BACKENDS, default="pytorch")
    ap.add_argument("--threads", type=int, default=1, help="CPU workers for LMDeploy's image preprocessing")
    a = ap.parse_args(argv)
    generation = json.loads(a.generation)
    try:
        n = generate(
            a.model,
            a.eval,
            a.image_folder,
            a.engine,
            a.out,
            generation,
            a.batch_size,
            a.session_len,
            a.max_records,
            a.lmdeploy_backend,
            a.threads,
        )
    except EvaluateError as exc:
        raise SystemExit(str(exc)) from None
    print(f"[vlmtune.evaluate] generate: {n} records -> {a.out}")
    write_for_evaluation(a.model, a.eval, a.image_folder, a.out, a.engine, generation)


if __name__ == "__main__":
    main()
