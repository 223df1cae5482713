"""Batch generation over the held-out evaluation records, with the training prompt, and the
teacher-forced loss of every reference answer (reference NLL, for perplexity and preferences).

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
    python -m vlmtune.evaluate nll --model ... --eval ... --image-folder ... \
        --out results/eval/my/finetuned/reference_nll.jsonl
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import sys
from pathlib import Path

from .atomic import atomic_file
from .jsonl import iter_jsonl
from .lmdeploy_engine import ids_digest
from .prompt import IMG_CONTEXT, chat_format, image_tokens
from .provenance import write_for_evaluation

ENGINE_ENVS = {"lmdeploy": "envs/lmdeploy.yaml", "transformers": "envs/xtuner.yaml"}
GENERATION_KEYS = ("max_new_tokens", "do_sample", "temperature", "top_p", "seed")


class EvaluateError(Exception):
    pass


def require(module: str, engine: str):
    """Import ``module`` or stop with the env that has it."""
    try:
        return __import__(module)
    except ImportError:
        other = "transformers" if engine == "lmdeploy" else "lmdeploy"
        raise EvaluateError(
            f"evaluate: engine {engine!r} needs the Python package {module!r}, which is not "
            f"installed in this environment ({sys.executable}); run the workflow with "
            f"--sdm conda (env {ENGINE_ENVS[engine]}) or set evaluate.engine: {other}"
        ) from None


def abbreviate(prompt: str) -> str:
    """``<IMG_CONTEXT>`` x N written as ``<IMG_CONTEXT>*N``: the prompt stays readable in the log."""
    return re.sub(
        f"({re.escape(IMG_CONTEXT)})+",
        lambda m: f"{IMG_CONTEXT}*{len(m.group(0)) // len(IMG_CONTEXT)}",
        prompt,
    )


def read_eval(path: Path, limit: int | None = None) -> list[dict]:
    """The held-out records (``eval.jsonl``, the project's one JSONL reader: lines split on
    ``\\n`` only, BOM tolerated); EvaluateError naming file:line for a bad line or a missing key."""
    records = []
    for line in iter_jsonl(path):
        if line.error is not None:
            raise EvaluateError(str(line.error))
        rec = line.value
        missing = [
            k for k in ("id", "image", "question", "references") if not isinstance(rec, dict) or k not in rec
        ]
        if missing:
            raise EvaluateError(f"{line.where}: record lacks {', '.join(missing)}")
        records.append(rec)
    return records[:limit] if limit else records


def check_generation(gen: dict) -> dict:
    missing = [k for k in GENERATION_KEYS if k not in gen]
    if missing:
        raise EvaluateError(f"evaluate: --generation lacks {', '.join(missing)}")
    return {k: gen[k] for k in GENERATION_KEYS}


class TransformersEngine:
    """The model's own remote code through transformers; pixels and prompt as XTuner builds them."""

    name = "transformers"

    def __init__(self, model_dir: Path, gen: dict | None = None, device: str | None = None):
        torch = require("torch", self.name)
        require("transformers", self.name)
        import torchvision.transforms as T
        from torchvision.transforms.functional import InterpolationMode
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.cfg = AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
        self.model = AutoModel.from_pretrained(model_dir, trust_remote_code=True, torch_dtype=self.dtype)
        self.model = self.model.eval().to(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
        self.tokenizer.padding_side = "left"
        # the training prompt of the model's LLM (InternLM2 or Phi-3), as XTuner's dataset picks it
        self.chat = chat_format(model_dir)
        self.model.img_context_token_id = self.tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
        size = self.cfg.force_image_size
        self.tokens_per_tile = int(
            (size // self.cfg.vision_config.patch_size) ** 2 * self.cfg.downsample_ratio**2
        )
        # The transform of XTuner's InternVL dataset: the same pixels as in training.
        self.transform = T.Compose(
            [
                T.Lambda(lambda img: img.convert("RGB") if img.mode != "RGB" else img),
                T.Resize((size, size), interpolation=InterpolationMode.BICUBIC),
                T.ToTensor(),
                T.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
            ]
        )
        self.gen = gen
        stops = list(self.chat.stop_words)
        self.stop_ids = [self.tokenizer.eos_token_id] + self.tokenizer.convert_tokens_to_ids(stops)
        self.version = importlib.metadata.version("transformers")

    def tiles(self, path: Path):
        from PIL import Image
        from xtuner.dataset.internvl_dataset import dynamic_preprocess

        if not path.is_file():
            raise EvaluateError(f"evaluate: image {path} does not exist")
        with Image.open(path) as img:
            img = img.convert("RGB")
            tiles = dynamic_preprocess(
                img,
                self.cfg.min_dynamic_patch,
                self.cfg.max_dynamic_patch,
                self.cfg.force_image_size,
                self.cfg.use_thumbnail,
            )
        return self.torch.stack([self.transform(t) for t in tiles])

    def prepare(self, batch: list[dict], image_folder: Path):
        """Pixels, prompt texts and the (left-padded) prompt token ids of a batch."""
        pixels, prompts = [], []
        for rec in batch:
            px = self.tiles(Path(image_folder) / rec["image"])
            pixels.append(px)
            prompts.append(self.chat.prompt(rec["question"], image_tokens(len(px), self.tokens_per_tile)))
        # add_special_tokens: the <s> XTuner's dataset puts in front (tokenizer.encode default).
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=True)
        return pixels, prompts, enc

    def generate(self, batch: list[dict], image_folder: Path) -> list[dict]:
        torch = self.torch
        pixels, prompts, enc = self.prepare(batch, image_folder)
        torch.manual_seed(self.gen["seed"])
        kwargs = dict(
            max_new_tokens=self.gen["max_new_tokens"],
            do_sample=self.gen["do_sample"],
            eos_token_id=self.stop_ids,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        if self.gen["do_sample"]:
            kwargs.update(temperature=self.gen["temperature"], top_p=self.gen["top_p"])
        with torch.inference_mode():
            out = self.model.generate(
                pixel_values=torch.cat(pixels).to(self.device, self.dtype),
                input_ids=enc.input_ids.to(self.device),
                attention_mask=enc.attention_mask.to(self.device),
                output_scores=True,
                return_dict_in_generate=True,
                **kwargs,
            )
        # The remote code's generate (inputs_embeds) returns only the new tokens.
        top2 = out.scores[0].float().topk(2, dim=-1).values
        img_ctx = self.model.img_context_token_id
        results = []
        for i in range(len(batch)):
            prompt_ids = enc.input_ids[i][enc.attention_mask[i].bool()].tolist()
            ids = out.sequences[i].tolist()
            stop = next((k for k, t in enumerate(ids) if t in self.stop_ids), None)
            kept = ids[: stop + 1] if stop is not None else ids
            ids = [t for t in ids[:stop] if t != self.tokenizer.pad_token_id]
            results.append(
                dict(
                    prompt=abbreviate(prompts[i]),
                    prediction=self.tokenizer.decode(ids, skip_special_tokens=True).strip(),
                    prompt_tokens=len(prompt_ids),
                    prompt_ids_digest=ids_digest(prompt_ids),
                    image_tokens=prompt_ids.count(img_ctx),
                    completion_tokens=len(ids),
                    completion_ids=[t for t in kept if t != self.tokenizer.pad_token_id],
                    first_token_margin=round(float(top2[i, 0] - top2[i, 1]), 4),
                    finish_reason="stop" if stop is not None else "length",
                    engine_backend=None,
                )
            )
        return results

    def reference_nll(self, rec: dict, image_folder: Path) -> list[dict]:
        """Teacher-forced loss of each reference given prompt + image, labelled as in training
        (the response and its stop word, ``<|im_end|>`` or Phi-3's ``<|end|>``; the prompt masked)."""
        torch = self.torch
        pixels, prompts, enc = self.prepare([rec], image_folder)
        prompt_ids = enc.input_ids[0].tolist()
        px = pixels[0].to(self.device, self.dtype)
        out = []
        for ref in rec["references"]:
            target = self.tokenizer.encode(ref["text"].strip() + self.chat.suffix, add_special_tokens=False)
            ids = torch.tensor([prompt_ids + target], device=self.device)
            with torch.inference_mode():
                logits = self.model(
                    pixel_values=px,
                    input_ids=ids,
                    image_flags=torch.ones(len(px), 1, dtype=torch.long, device=self.device),
                ).logits
            # Position t predicts token t+1: the target's logits start one before it.
            pred = logits[0, len(prompt_ids) - 1 : -1].float()
            nll = torch.nn.functional.cross_entropy(pred, ids[0, len(prompt_ids) :], reduction="sum").item()
            out.append(dict(text=ref["text"], star=ref.get("star"), nll=nll, tokens=len(target)))
        return out


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
) -> int:
    """Answer the held-out records with ``engine`` and write ``predictions.jsonl`` (atomically).

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
            runner = LMDeployEngine(model, gen, session_len, batch_size, lmdeploy_backend)
        except LMDeployError as exc:
            raise EvaluateError(str(exc)) from None
    else:
        raise EvaluateError(f"evaluate: unknown engine {engine!r}; choose lmdeploy or transformers")
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
    if hasattr(runner, "close"):
        runner.close()
    return len(records)


def reference_nll(
    model: Path, eval_path: Path, image_folder: Path, out: Path, max_records: int | None = None
) -> int:
    from tqdm import tqdm

    records = read_eval(eval_path, max_records)
    runner = TransformersEngine(model)
    with atomic_file(out) as fh:
        for rec in tqdm(records, desc="reference NLL", unit="record", mininterval=5, file=sys.stderr):
            row = dict(
                id=rec["id"],
                type=rec.get("type"),
                references=runner.reference_nll(rec, image_folder),
                engine="transformers",
                engine_version=runner.version,
                model=str(model),
            )
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(records)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="task", required=True)
    for task in ("generate", "nll"):
        p = sub.add_parser(task)
        p.add_argument("--model", required=True, type=Path)
        p.add_argument("--eval", required=True, type=Path)
        p.add_argument("--image-folder", required=True, type=Path)
        p.add_argument("--max-records", type=int)
        p.add_argument("--out", required=True, type=Path)
        if task == "generate":
            p.add_argument("--engine", required=True, choices=["transformers", "lmdeploy"])
            p.add_argument("--generation", required=True, help="JSON: " + ", ".join(GENERATION_KEYS))
            p.add_argument("--batch-size", type=int, default=8)
            p.add_argument("--session-len", type=int, default=8192)
            p.add_argument("--lmdeploy-backend", choices=["pytorch", "turbomind"], default="pytorch")
    a = ap.parse_args(argv)
    try:
        if a.task == "generate":
            n = generate(
                a.model,
                a.eval,
                a.image_folder,
                a.engine,
                a.out,
                json.loads(a.generation),
                a.batch_size,
                a.session_len,
                a.max_records,
                a.lmdeploy_backend,
            )
        else:
            n = reference_nll(a.model, a.eval, a.image_folder, a.out, a.max_records)
    except EvaluateError as exc:
        raise SystemExit(str(exc)) from None
    print(f"[vlmtune.evaluate] {a.task}: {n} records -> {a.out}")
    if a.task == "generate":
        write_for_evaluation(a.model, a.eval, a.image_folder, a.out, a.engine, json.loads(a.generation))


if __name__ == "__main__":
    main()
