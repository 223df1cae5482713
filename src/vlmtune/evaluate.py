"""Batch generation over the held-out evaluation records, with the training prompt.

Engines: ``transformers`` (CPU or GPU; the model's remote code, batched, left-padded) and
``lmdeploy`` (GPUs; its batch pipeline). Both write the same ``predictions.jsonl`` fields:
id, image, question, prompt (as sent, image tokens abbreviated), references, prediction,
token counts, engine and version, generation config, model folder.

    python -m vlmtune.evaluate --model results/merged/InternVL2-2B-my \
        --eval results/converted/x/eval.jsonl --image-folder data/datasets/x \
        --engine transformers --out results/eval/my/finetuned/predictions.jsonl
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
from pathlib import Path

from .atomic import atomic_file
from .provenance import write_for_evaluation
from .prompt import IMG_CONTEXT, SYSTEM_PROMPT, image_tokens, training_prompt

ENGINE_ENVS = {"lmdeploy": "envs/lmdeploy.yaml", "transformers": "envs/xtuner.yaml"}


def _require(module: str, engine: str):
    try:
        return __import__(module)
    except ImportError:
        raise SystemExit(f"evaluate: engine {engine!r} needs the Python package {module!r}, which is not "
                         f"installed here; run with --sdm conda (env {ENGINE_ENVS[engine]}) or "
                         f"choose evaluate.engine: {'transformers' if engine == 'lmdeploy' else 'lmdeploy'}") from None  # fmt: skip


def abbreviate(prompt: str) -> str:
    return re.sub(f"({re.escape(IMG_CONTEXT)})+", lambda m: f"{IMG_CONTEXT}*{len(m.group(0)) // len(IMG_CONTEXT)}", prompt)


def read_eval(path: Path, limit: int | None) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    return records[:limit] if limit else records


class TransformersEngine:
    name = "transformers"

    def __init__(self, model_dir: Path, gen: dict):
        torch = _require("torch", self.name)
        _require("transformers", self.name)
        import torchvision.transforms as T
        from torchvision.transforms.functional import InterpolationMode
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.cfg = AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
        self.model = AutoModel.from_pretrained(model_dir, trust_remote_code=True, torch_dtype=dtype).eval().to(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
        self.tokenizer.padding_side = "left"
        self.model.img_context_token_id = self.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
        size = self.cfg.force_image_size
        self.tokens_per_tile = int((size // self.cfg.vision_config.patch_size) ** 2 * self.cfg.downsample_ratio**2)
        # The transform of XTuner's InternVL dataset: the same pixels as in training.
        self.transform = T.Compose([
            T.Lambda(lambda img: img.convert("RGB") if img.mode != "RGB" else img),
            T.Resize((size, size), interpolation=InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
        ])  # fmt: skip
        self.dtype = dtype
        self.gen = gen
        self.version = importlib.metadata.version("transformers")

    def tiles(self, path: Path):
        from PIL import Image
        from xtuner.dataset.internvl_dataset import dynamic_preprocess

        with Image.open(path) as img:
            img = img.convert("RGB")
            tiles = dynamic_preprocess(img, self.cfg.min_dynamic_patch, self.cfg.max_dynamic_patch,
                                       self.cfg.force_image_size, self.cfg.use_thumbnail)  # fmt: skip
        return self.torch.stack([self.transform(t) for t in tiles])

    def generate(self, batch: list[dict], image_folder: Path) -> list[dict]:
        torch = self.torch
        pixels, prompts = [], []
        for rec in batch:
            px = self.tiles(image_folder / rec["image"])
            pixels.append(px)
            prompts.append(training_prompt(rec["question"], image_tokens(len(px), self.tokens_per_tile)))
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=True)
        eos = [self.tokenizer.eos_token_id, self.tokenizer.convert_tokens_to_ids("<|im_end|>")]
        torch.manual_seed(self.gen["seed"])
        kwargs = dict(max_new_tokens=self.gen["max_new_tokens"], do_sample=self.gen["do_sample"],
                      eos_token_id=eos, pad_token_id=self.tokenizer.pad_token_id)  # fmt: skip
        if self.gen["do_sample"]:
            kwargs.update(temperature=self.gen["temperature"], top_p=self.gen["top_p"])
        with torch.inference_mode():
            out = self.model.generate(
                pixel_values=torch.cat(pixels).to(self.device, self.dtype),
                input_ids=enc.input_ids.to(self.device),
                attention_mask=enc.attention_mask.to(self.device),
                **kwargs,
            )
        results = []
        for i, rec in enumerate(batch):
            ids = [t for t in out[i].tolist() if t not in eos and t != self.tokenizer.pad_token_id]
            results.append(dict(prompt=abbreviate(prompts[i]), prediction=self.tokenizer.decode(ids, skip_special_tokens=True).strip(),
                                prompt_tokens=int(enc.attention_mask[i].sum()), completion_tokens=len(ids)))  # fmt: skip
        return results


class LMDeployEngine:
    name = "lmdeploy"

    def __init__(self, model_dir: Path, gen: dict, session_len: int, batch_size: int):
        _require("lmdeploy", self.name)
        from lmdeploy import ChatTemplateConfig, GenerationConfig, TurbomindEngineConfig, pipeline

        # Name the template and the system prompt explicitly: neither the folder name nor the
        # LMDeploy version may change the prompt (FIELD-NOTES §5).
        self.pipe = pipeline(
            str(model_dir),
            backend_config=TurbomindEngineConfig(session_len=session_len, max_batch_size=batch_size),
            chat_template_config=ChatTemplateConfig(model_name="internvl2-internlm2", meta_instruction=SYSTEM_PROMPT),
        )
        self.gen_config = GenerationConfig(max_new_tokens=gen["max_new_tokens"], do_sample=gen["do_sample"],
                                           top_p=gen["top_p"], temperature=gen["temperature"], random_seed=gen["seed"])  # fmt: skip
        self.version = importlib.metadata.version("lmdeploy")

    def generate(self, batch: list[dict], image_folder: Path) -> list[dict]:
        from lmdeploy.vl import load_image

        inputs = [(rec["question"], load_image(str(image_folder / rec["image"]))) for rec in batch]
        responses = self.pipe(inputs, gen_config=self.gen_config)
        return [dict(prompt=rec["question"], prediction=r.text.strip(), prompt_tokens=r.input_token_len,
                     completion_tokens=r.generate_token_len) for rec, r in zip(batch, responses)]  # fmt: skip


def evaluate(model: Path, eval_path: Path, image_folder: Path, engine: str, out: Path, gen: dict,
             batch_size: int = 8, session_len: int = 8192, max_records: int | None = None) -> int:  # fmt: skip
    from tqdm import tqdm

    records = read_eval(eval_path, max_records)
    if engine == "transformers":
        runner = TransformersEngine(model, gen)
    elif engine == "lmdeploy":
        runner = LMDeployEngine(model, gen, session_len, batch_size)
    else:
        raise SystemExit(f"evaluate: unknown engine {engine!r}; choose lmdeploy or transformers")
    with atomic_file(out) as fh, tqdm(total=len(records), desc=f"generate ({engine})", unit="prompt") as bar:
        for start in range(0, len(records), batch_size):
            batch = records[start : start + batch_size]
            for rec, res in zip(batch, runner.generate(batch, Path(image_folder))):
                row = dict(id=rec["id"], image=rec["image"], type=rec.get("type"), question=rec["question"],
                           references=rec["references"], **res, engine=engine, engine_version=runner.version,
                           generation=gen, model=str(model))  # fmt: skip
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            bar.update(len(batch))
    return len(records)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--eval", required=True, type=Path)
    ap.add_argument("--image-folder", required=True, type=Path)
    ap.add_argument("--engine", required=True, choices=["transformers", "lmdeploy"])
    ap.add_argument("--generation", required=True, help="JSON: max_new_tokens, do_sample, temperature, top_p, seed")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--session-len", type=int, default=8192)
    ap.add_argument("--max-records", type=int)
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args(argv)
    n = evaluate(a.model, a.eval, a.image_folder, a.engine, a.out, json.loads(a.generation),
                 a.batch_size, a.session_len, a.max_records)  # fmt: skip
    print(f"[vlmtune.evaluate] {n} predictions -> {a.out}")
    write_for_evaluation(a.model, a.eval, a.image_folder, a.out, a.engine, json.loads(a.generation))


if __name__ == "__main__":
    main()
