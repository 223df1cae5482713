"""The transformers evaluation engine: the model's own remote code, batched and left-padded, on
CPU or GPU, with the pixels and prompt as XTuner builds them. Used by ``vlmtune.evaluate`` (rules
evaluate and reference_nll) and by ``vlmtune.merge``'s reload check, which runs this engine and
nothing else of the evaluation step.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path

from .hashing import ids_digest
from .heldout import EvaluateError
from .prompt import IMG_CONTEXT, chat_format, image_tokens

ENGINE_ENVS = {"lmdeploy": "envs/lmdeploy.yaml", "transformers": "envs/xtuner.yaml"}


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
