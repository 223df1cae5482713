"""Run XTuner's own training entry point (``xtuner.tools.train``) in this process, with the
environment fixes it needs on current PyTorch (docs/xtuner.md, "Launching") and the project's
speed levers.

Fixes:
- torch >= 2.6 loads checkpoints with ``weights_only=True``, which rejects XTuner/mmengine
  checkpoints on resume: force the old behaviour (checkpoints are our own files);
- mmengine's ``pytorch`` launcher calls ``torch.cuda.set_device`` even on CPU: make it a
  no-op where no GPU exists, so the same torchrun command trains on gloo.

Levers, read from the ``vlmtune_launcher`` dict literal that ``vlmtune.xtuner_config`` renders
into the config (so the config stays a plain XTuner config: ``convert_to_official`` and any other
XTuner tool read it unchanged, and the weights the levers train are the same):
- ``cuda_expandable_segments``: ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` (set before
  torch is imported) against fragmentation with micro-batches of varying length;
- ``attention``: ``sdpa`` switches InternViT and InternLM2 to SDPA once XTuner built the model
  (``vlmtune.attention``);
- ``gradient_checkpointing``: false turns off the LLM recompute XTuner always enables;
- ``group_by_exact_length``: XTuner's length-grouped sampler sorts by ``modality_length``, which
  counts every image as the maximum 13 tiles unless a record has ``image_wh``; our records carry
  ``width``/``height``, from which the exact tile count follows (XTuner's own tiling arithmetic),
  so micro-batches hold samples of similar real length and padding shrinks;
- ``iteration_log``: registers ``vlmtune.iteration_log``'s hook (per-iteration figures);
- ``label_only_head``, ``qlora_compute_dtype``, ``quantize_head``, ``fused_elementwise``,
  ``fused_lora``, ``compile_layers``, ``shared_rope``: ``vlmtune.speed`` (the LLM's output head and
  loss only at labelled positions; bf16 compute for the 4-bit layers; the output head kept out of
  4-bit; fused RMSNorm/SwiGLU/RoPE; the LoRA output added inside the GEMM; compiled decoder
  layers; rotary cos/sin once per forward).

Benchmark-only environment variables (``benchmarks/train_gpu.py``): ``VLMTUNE_CUDA_MEMORY_GIB``
caps this process's CUDA memory (``torch.cuda.set_per_process_memory_fraction``: a smaller GPU's
tier on a big one); ``VLMTUNE_BENCH_HOOK=1`` replaces the iteration hook by
``vlmtune.speed.bench_hook_class()`` (labelled-position counts; a profiler window from
``VLMTUNE_PROFILE=START:COUNT``).

Used by ``vlmtune.train`` as ``torchrun ... -m vlmtune.xtuner_main CONFIG --launcher pytorch``.
"""

import ast
import os
import runpy
import sys

from vlmtune.levers import LAUNCHER_LEVERS as DEFAULTS

KEY = "vlmtune_launcher"


def launcher_settings(config_path: str) -> dict:
    """The ``vlmtune_launcher = {...}`` literal of a rendered config (parsed, not executed:
    this runs before torch is imported)."""
    tree = ast.parse(open(config_path, encoding="utf-8").read(), config_path)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == KEY for t in node.targets):
            found = ast.literal_eval(node.value)
            unknown = set(found) - set(DEFAULTS)
            if unknown:
                raise SystemExit(f"{config_path}: unknown {KEY} keys {sorted(unknown)}")
            return {**DEFAULTS, **found}
    return dict(DEFAULTS)


def exact_group_lengths(dataset) -> int:
    """Replace XTuner's 13-tile guess in ``group_length`` by the exact tile count for records
    with ``width``/``height``; returns how many lengths changed."""
    from xtuner.dataset.internvl_dataset import total_image_token

    guess = dataset.patch_token * (dataset.max_dynamic_patch + dataset.use_thumbnail)
    changed = 0
    for i, item in enumerate(dataset.data):
        if "length" in item or item.get("image_wh") or item.get("image") is None:
            continue
        if not item.get("width") or not item.get("height"):
            continue
        blocks = total_image_token(
            (item["width"], item["height"]),
            dataset.min_dynamic_patch,
            dataset.max_dynamic_patch,
            dataset.image_size,
            False,
        )
        # dynamic_preprocess adds the thumbnail only to images cut into more than one tile
        blocks += 1 if dataset.use_thumbnail and blocks > 1 else 0
        dataset.group_length[i] = dataset.group_length[i] - guess + dataset.patch_token * blocks
        changed += 1
    return changed


def install_levers(settings: dict) -> None:
    from mmengine.logging import print_log
    from xtuner.dataset import InternVL_V1_5_Dataset
    from xtuner.model import InternVL_V1_5

    from . import speed
    from .attention import apply

    if not settings["quantize_head"]:
        speed.keep_output_head_unquantized()
    model_init = InternVL_V1_5.__init__

    def init_model(self, *args, **kwargs):
        model_init(self, *args, **kwargs)
        switched = apply(self.model, settings["attention"])
        if not settings["gradient_checkpointing"]:
            self.gradient_checkpointing_disable()
        levers = speed.apply(self, settings)
        print_log(
            f"[vlmtune] attention {settings['attention']} {switched}; LLM gradient checkpointing "
            f"{'on' if settings['gradient_checkpointing'] else 'off'}; levers {levers}",
            logger="current",
        )

    InternVL_V1_5.__init__ = init_model
    if settings["group_by_exact_length"]:
        dataset_init = InternVL_V1_5_Dataset.__init__

        def init_dataset(self, *args, **kwargs):
            dataset_init(self, *args, **kwargs)
            n = exact_group_lengths(self)
            print_log(
                f"[vlmtune] exact image-token lengths for {n} of {len(self.data)} samples", logger="current"
            )

        InternVL_V1_5_Dataset.__init__ = init_dataset
    if settings["iteration_log"]:
        from mmengine.registry import HOOKS

        from .iteration_log import hook_class

        hook = speed.bench_hook_class() if os.environ.get("VLMTUNE_BENCH_HOOK") == "1" else hook_class()
        HOOKS.register_module(name="IterationLogHook", module=hook, force=True)


def main() -> None:
    settings = (
        launcher_settings(sys.argv[1])
        if len(sys.argv) > 1 and sys.argv[1].endswith(".py")
        else dict(DEFAULTS)
    )
    if settings["cuda_expandable_segments"]:
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    import torch

    if not torch.cuda.is_available():
        torch.cuda.set_device = lambda *args, **kwargs: None
    elif os.environ.get("VLMTUNE_CUDA_MEMORY_GIB"):
        device = int(os.environ.get("LOCAL_RANK", 0))
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, float(os.environ["VLMTUNE_CUDA_MEMORY_GIB"]) * 2**30 / total), device
        )
    install_levers(settings)
    sys.argv = ["xtuner.tools.train", *sys.argv[1:]]
    runpy.run_module("xtuner.tools.train", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
