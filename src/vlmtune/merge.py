"""Merge a trained XTuner checkpoint into an official-format InternVL2 model with XTuner's own
``convert_to_official``, copy the base model's ``*.py`` that transformers >= 4.45 drops
(docs/xtuner.md, "The merge"), and check the result, writing ``merge_report.json``:

- every tensor training changed differs from the base as the checkpoint says it must: LLM
  linears whose LoRA update is non-zero, the projector ``mlp1`` equal to its trained value;
  every other tensor is bit-identical (guards against ``convert_to_official`` loading with
  ``strict=False`` and silently saving the base);
- every base ``*.py`` is present.

The output folder is written atomically; its name keeps ``InternVL2`` (LMDeploy <= 0.9 picks
its chat template from the path).

    python -m vlmtune.merge --config results/xtuner/my/xtuner_config.py \
        --train-result results/train/my/train_result.json --base data/models/InternVL2-2B \
        --out results/merged/InternVL2-2B-my
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from .atomic import atomic_dir, write_json
from .envcheck import xtuner_root
from .provenance import write_for_merge

# LLM linears that LoRA (target_modules=None: every linear of the LLM) merges into.
LORA_TARGET = re.compile(
    r"^language_model\.(model\.layers\.\d+\.(attention\.(wqkv|wo)|feed_forward\.(w1|w2|w3))|output)\.weight$"
)
PROJECTOR = re.compile(r"^mlp1\.")


class MergeCheckError(RuntimeError):
    """The merged model is not what the merge should give (missing tensors, unchanged adapters, no reload)."""


def load_tensors(folder: Path) -> dict:
    """Every tensor of the ``*.safetensors`` files of ``folder``, by name; MergeCheckError if there are
    none."""
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    if not tensors:
        raise MergeCheckError(f"no *.safetensors in {folder}")
    return tensors


def load_checkpoint(checkpoint: Path) -> dict:
    """The trained state dict (a ``.pth`` file or a DeepSpeed checkpoint folder), through
    XTuner's own loader, with the ``model.`` prefix of ``InternVL_V1_5`` removed."""
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    from xtuner.model.utils import guess_load_checkpoint

    state = guess_load_checkpoint(str(checkpoint))
    return {k.removeprefix("model."): v for k, v in state.items()}


def expected_changes(trained: dict) -> tuple[dict, set]:
    """From the checkpoint: projector tensors (trained in full, by value) and the names of LLM
    weights whose LoRA update B·A is non-zero (so merging must change them)."""
    projector = {k: v for k, v in trained.items() if PROJECTOR.match(k)}
    lora_changed = set()
    for key, value in trained.items():
        if ".lora_B." in key and bool(value.abs().sum() > 0):
            # language_model.base_model.model.<path>.lora_B.default.weight -> language_model.<path>.weight
            path = key.split(".lora_B.")[0].replace("language_model.base_model.model.", "language_model.", 1)
            lora_changed.add(path + ".weight")
    return projector, lora_changed


def check_merged(base: Path, merged: Path, trained: dict) -> dict:
    """Compare merged weights with the base and the trained checkpoint, tensor by tensor;
    raise MergeCheckError on any fault."""
    import torch

    a, b = load_tensors(base), load_tensors(merged)
    projector, lora_changed = expected_changes(trained)
    problems = []
    if set(a) != set(b):
        problems.append(
            f"tensor names differ: only in base {sorted(set(a) - set(b))[:5]}, "
            f"only in merged {sorted(set(b) - set(a))[:5]}"
        )
    if not projector and not lora_changed:
        problems.append("the checkpoint holds no trained projector and no non-zero LoRA update")
    # Under strict=False, a checkpoint tensor without a counterpart is silently dropped.
    plain = {k for k in trained if ".lora_" not in k}
    unknown = sorted((plain | lora_changed) - set(b))
    if unknown:
        problems.append(
            f"{len(unknown)} trained tensor(s) have no counterpart in the model, e.g. {unknown[:3]}"
        )
    changed, not_applied, changed_frozen = [], [], []
    for name in sorted(set(a) & set(b)):
        same_as_base = a[name].shape == b[name].shape and torch.equal(a[name], b[name])
        if name in projector:
            if not torch.equal(projector[name].to(b[name].dtype), b[name]):
                not_applied.append(name)
            elif not same_as_base:
                changed.append(name)
        elif name in lora_changed:
            (not_applied if same_as_base else changed).append(name)
        elif not same_as_base:
            changed_frozen.append(name)
    if not_applied:
        problems.append(
            f"{len(not_applied)} trained tensor(s) do not carry the checkpoint's update, "
            f"e.g. {not_applied[:3]}: was the checkpoint applied (names drifted?)"
        )
    if changed_frozen:
        problems.append(
            f"{len(changed_frozen)} frozen tensor(s) differ from the base, e.g. {changed_frozen[:3]}"
        )
    missing_py = sorted(p.name for p in Path(base).glob("*.py") if not (Path(merged) / p.name).exists())
    if missing_py:
        problems.append(f"base *.py missing from the merged model: {missing_py}")
    report = dict(
        tensors=len(b),
        changed=len(changed),
        lora_merged=len(lora_changed),
        projector=len(projector),
        not_applied=not_applied,
        frozen_changed=changed_frozen,
        missing_py=missing_py,
        ok=not problems,
        problems=problems,
    )
    if problems:
        raise MergeCheckError("; ".join(problems))
    return report


def answer_one_image(model_dir: Path, max_new_tokens: int = 8) -> dict:
    """Reload the merged folder the way users will (``AutoModel``, remote code) and generate
    for one image with the training prompt: a model that loads but cannot answer fails here,
    not in evaluation hours later."""
    import tempfile
    import time

    from PIL import Image

    from .transformers_engine import TransformersEngine

    start = time.time()
    gen = dict(max_new_tokens=max_new_tokens, do_sample=False, temperature=1.0, top_p=1.0, seed=0)
    try:
        engine = TransformersEngine(Path(model_dir), gen)
        with tempfile.TemporaryDirectory() as tmp:
            # A gradient test card: one 448-px tile, no dataset needed.
            Image.linear_gradient("L").resize((448, 448)).convert("RGB").save(Path(tmp) / "card.png")
            out = engine.generate([dict(image="card.png", question="<image>\n这张图片里有什么?")], Path(tmp))[
                0
            ]
    except Exception as exc:
        raise MergeCheckError(
            f"the merged model does not reload and answer an image: {type(exc).__name__}: {exc}"
        ) from exc
    return dict(
        ok=True,
        device=engine.device,
        prompt_tokens=out["prompt_tokens"],
        completion_tokens=out["completion_tokens"],
        prediction=out["prediction"],
        seconds=round(time.time() - start, 2),
    )


def merge(config: Path, checkpoint: Path, base: Path, out: Path, report_path: Path | None = None) -> dict:
    """Merge the LoRA of XTuner ``checkpoint`` (trained with ``config``) into the base model with
    XTuner's own ``convert_to_official.py``, into ``out`` (atomically), with the base's remote code.
    Then check it: the tensors the training changed differ from ``base``, all others are identical,
    and the folder reloads and answers one image. Writes ``report_path`` (and a provenance record
    beside the model); returns the report. SystemExit if the conversion fails, MergeCheckError if a
    check does."""
    script = xtuner_root() / "configs" / "internvl" / "v1_5" / "convert_to_official.py"
    # convert_to_official rebuilds the model in bf16 on the CPU; it needs no GPU.
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    with atomic_dir(Path(out)) as tmp:
        target = tmp / "model"
        cmd = [sys.executable, str(script), str(config), str(checkpoint), str(target)]
        print("[vlmtune.merge] " + " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL)  # it prints the whole model
        if proc.returncode != 0:
            raise SystemExit(f"convert_to_official failed with exit status {proc.returncode}")
        copied = []
        for py in sorted(Path(base).glob("*.py")):
            if not (target / py.name).exists():
                shutil.copy2(py, target / py.name)
                copied.append(py.name)
        for extra in ("generation_config.json",):
            if (Path(base) / extra).exists() and not (target / extra).exists():
                shutil.copy2(Path(base) / extra, target / extra)
        report = check_merged(base, target, load_checkpoint(checkpoint))
        report["answer"] = answer_one_image(target)
        report.update(copied_py=copied, checkpoint=str(checkpoint), base=str(base))
        for item in target.iterdir():
            os.replace(item, tmp / item.name)
        target.rmdir()
    if report_path:
        write_json(report_path, report)
    return report


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, type=Path)
    ap.add_argument("--train-result", required=True, type=Path)
    ap.add_argument("--base", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--report", type=Path)
    a = ap.parse_args(argv)
    checkpoint = json.loads(a.train_result.read_text())["checkpoint"]
    try:
        report = merge(a.config, Path(checkpoint), a.base, a.out, a.report)
    except MergeCheckError as exc:
        raise SystemExit(f"merge check failed: {exc}") from None
    write_for_merge(a.config, a.train_result, a.base, a.out)  # <out>.provenance.json
    print(
        f"[vlmtune.merge] {a.out}: {report['changed']} of {report['tensors']} tensors changed by training, "
        f"the rest identical to the base; copied {report['copied_py']}"
    )


if __name__ == "__main__":
    main()
