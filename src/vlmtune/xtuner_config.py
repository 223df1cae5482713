"""Render a complete XTuner config file (the whole file, never ``--cfg-options``: the model
``path`` is used in three places, docs/xtuner.md, "The config file") from the workflow's YAML
config.

Device-aware: on CUDA, QLoRA (4-bit LLM) or LoRA with ``AmpOptimWrapper`` and NCCL (DeepSpeed
replaces the optimizer wrapper when enabled); on CPU, LoRA, ``OptimWrapper`` and gloo. The
iteration plan (world size, global batch, iterations, warmup) is computed here and written
beside the config, so a too-short warmup fails before any GPU time is spent.

    python -m vlmtune.xtuner_config --model data/models/InternVL2-2B \
        --train-json results/converted/x/train.json --image-folder data/datasets/x \
        --workflow-config config/config.yaml --out results/xtuner/my/xtuner_config.py \
        --plan results/xtuner/my/plan.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from string import Template

from .atomic import atomic_file, write_json
from .levers import LAUNCHER_LEVERS

# The train keys render() reads. The workflow passes only these to render_xtuner_config, so a
# change to any other train key (resources, deepspeed) does not re-render the config.
SETTINGS = (
    "device",
    "gpus",
    "nodes",
    "cpu_processes",
    "method",
    "max_length",
    "batch_size",
    "accumulative_counts",
    "global_batch_size",
    "dataloader_num_workers",
    "max_epochs",
    "lr",
    "betas",
    "weight_decay",
    "max_norm",
    "warmup_ratio",
    "lora",
    "save_steps",
    "save_total_limit",
    "log_interval",
    "seed",
    "max_iters",
    "pin_memory",
    *LAUNCHER_LEVERS,  # the launcher's levers (attention, recompute, ...), rendered into the config
)

TEMPLATE = Template("""\
# Rendered by vlmtune.xtuner_config from the workflow config; do not edit (edit the YAML).
# Based on xtuner 0.2.0 configs/internvl/v2/internvl_v2_internlm2_2b_qlora_finetune.py.
import torch
from mmengine.hooks import (CheckpointHook, DistSamplerSeedHook, IterTimerHook,
                            LoggerHook, ParamSchedulerHook)
from mmengine.optim import $optim_wrapper_type, CosineAnnealingLR, LinearLR
from peft import LoraConfig
from torch.optim import AdamW
from transformers import AutoTokenizer

from xtuner.dataset import InternVL_V1_5_Dataset
from xtuner.dataset.collate_fns import default_collate_fn
from xtuner.dataset.samplers import LengthGroupedSampler
from xtuner.engine.hooks import DatasetInfoHook
from xtuner.engine.runner import TrainLoop
from xtuner.model import InternVL_V1_5
from xtuner.utils import PROMPT_TEMPLATE

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
path = $path

data_path = $data_path
image_folder = $image_folder
prompt_template = PROMPT_TEMPLATE.$prompt_template
max_length = $max_length

batch_size = $batch_size  # per device
accumulative_counts = $accumulative_counts
dataloader_num_workers = $dataloader_num_workers
max_epochs = $max_epochs
optim_type = AdamW
lr = $lr
betas = $betas
weight_decay = $weight_decay
max_norm = $max_norm  # grad clip
warmup_ratio = $warmup_ratio

save_steps = $save_steps
save_total_limit = $save_total_limit  # maximum checkpoints to keep (-1: unlimited)

#######################################################################
#            PART 2  Model & Tokenizer & Image Processor              #
#######################################################################
model = dict(
    type=InternVL_V1_5,
    model_path=path,
    freeze_llm=True,
    freeze_visual_encoder=True,
    quantization_llm=$quantization_llm,
    quantization_vit=False,
    llm_lora=dict(
        type=LoraConfig,
        r=$lora_r,
        lora_alpha=$lora_alpha,
        lora_dropout=$lora_dropout,
        target_modules=None,
        task_type="CAUSAL_LM",
    ),
)

#######################################################################
#                      PART 3  Dataset & Dataloader                   #
#######################################################################
llava_dataset = dict(
    type=InternVL_V1_5_Dataset,
    model_path=path,
    data_paths=data_path,
    image_folders=image_folder,
    template=prompt_template,
    max_length=max_length,
)

train_dataloader = dict(
    batch_size=batch_size,
    num_workers=dataloader_num_workers,
    pin_memory=$pin_memory,
    dataset=llava_dataset,
    sampler=dict(
        type=LengthGroupedSampler,
        length_property="modality_length",
        per_device_batch_size=batch_size * accumulative_counts,
    ),
    collate_fn=dict(type=default_collate_fn),
)

#######################################################################
#                    PART 4  Scheduler & Optimizer                    #
#######################################################################
optim_wrapper = dict(
    type=$optim_wrapper_type,
    optimizer=dict(type=optim_type, lr=lr, betas=betas, weight_decay=weight_decay),
    clip_grad=dict(max_norm=max_norm, error_if_nonfinite=False),
    accumulative_counts=accumulative_counts,$amp_options
)

param_scheduler = [
    dict(
        type=LinearLR,
        start_factor=1e-5,
        by_epoch=True,
        begin=0,
        end=warmup_ratio * max_epochs,
        convert_to_iter_based=True,
    ),
    dict(
        type=CosineAnnealingLR,
        eta_min=0.0,
        by_epoch=True,
        begin=warmup_ratio * max_epochs,
        end=max_epochs,
        convert_to_iter_based=True,
    ),
]

train_cfg = dict(type=TrainLoop, $train_length)

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
tokenizer = dict(
    type=AutoTokenizer.from_pretrained,
    pretrained_model_name_or_path=path,
    trust_remote_code=True,
)

custom_hooks = [
    dict(type=DatasetInfoHook, tokenizer=tokenizer),$extra_hooks
]

default_hooks = dict(
    timer=dict(type=IterTimerHook),
    logger=dict(type=LoggerHook, log_metric_by_epoch=False, interval=$log_interval),
    param_scheduler=dict(type=ParamSchedulerHook),
    checkpoint=dict(
        type=CheckpointHook,
        save_optimizer=True,  # stock: False, which makes a resume restart the optimizer
        by_epoch=False,
        interval=save_steps,
        max_keep_ckpts=save_total_limit,
    ),
    sampler_seed=dict(type=DistSamplerSeedHook),
)

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
    dist_cfg=dict(backend=$dist_backend),
)

visualizer = dict(type="Visualizer", vis_backends=[dict(type="LocalVisBackend")])
log_level = "INFO"
load_from = None
resume = False
randomness = dict(seed=$seed, deterministic=False)
log_processor = dict(by_epoch=False)
# Read (not executed) by the launcher vlmtune.xtuner_main; XTuner ignores it.
vlmtune_launcher = $launcher
$model_wrapper
""")


def iteration_plan(
    samples: int,
    world_size: int,
    batch_size: int,
    accumulative_counts: int,
    max_epochs: int,
    warmup_ratio: float,
) -> dict:
    """XTuner's arithmetic (docs/xtuner.md, "Batch arithmetic"): an epoch is
    ceil(samples / global batch) optimizer steps of ``accumulative_counts`` iterations each."""
    global_batch = batch_size * accumulative_counts * world_size
    iters_per_epoch = math.ceil(samples / global_batch) * accumulative_counts
    warmup_iters = int(warmup_ratio * max_epochs * iters_per_epoch)
    return dict(
        samples=samples,
        world_size=world_size,
        batch_size=batch_size,
        accumulative_counts=accumulative_counts,
        global_batch_size=global_batch,
        iterations_per_epoch=iters_per_epoch,
        max_epochs=max_epochs,
        iterations=iters_per_epoch * max_epochs,
        warmup_iterations=warmup_iters,
    )


def world_size(train: dict) -> int:
    """Training processes over all nodes: GPUs per node on CUDA, ``cpu_processes`` per node on CPU."""
    per_node = train["gpus"] if train["device"] == "cuda" else train.get("cpu_processes", 1)
    return per_node * train.get("nodes", 1)


def accumulation(train: dict) -> int:
    """``accumulative_counts``, derived from ``global_batch_size`` when that is set, so the
    global batch stays fixed whatever the number of processes."""
    global_batch = train.get("global_batch_size")
    if not global_batch:
        return train["accumulative_counts"]
    per_step = train["batch_size"] * world_size(train)
    if global_batch % per_step:
        raise ValueError(
            f"train.global_batch_size {global_batch} is not a multiple of batch_size "
            f"{train['batch_size']} x {world_size(train)} process(es) = {per_step}; choose a "
            f"multiple of {per_step} or change batch_size"
        )
    return global_batch // per_step


def prompt_template(model: Path, preset: str | None = None) -> str:
    """XTuner's prompt template for the model's LLM (``internlm2_chat`` or ``phi3_chat``: its
    SYSTEM and SUFFIX are used by the dataset), checked against ``model.preset`` when given."""
    from .presets import get
    from .prompt import UnsupportedLLM, chat_format

    if not (Path(model) / "config.json").is_file():  # not fetched yet (tests): the preset's
        return get(preset).xtuner_template
    try:
        fmt = chat_format(model)
    except UnsupportedLLM as exc:
        raise ValueError(str(exc)) from None
    if preset is not None and get(preset).chat != fmt:
        raise ValueError(
            f"model.preset {preset} expects a {get(preset).chat.llm_architecture} LLM, but {model} "
            f"holds a {fmt.llm_architecture}: set model.preset to the model's"
        )
    return fmt.xtuner_template


def render(
    model: Path, train_json: Path, image_folder: Path, train: dict, preset: str | None = None
) -> tuple[str, dict]:
    """The XTuner config text for training ``model`` on ``train_json`` (images under
    ``image_folder``) with the ``train`` settings (the workflow config's ``train`` section), and the
    iteration plan (samples, processes, accumulation, iterations, warm-up). The prompt template
    comes from ``preset`` (or the model's LLM). ValueError for an empty training file, a warm-up
    of fewer than two iterations or a model of another LLM than the preset's."""
    text = Path(train_json).read_text(encoding="utf-8")  # .json (a list) or .jsonl (XTuner reads both)
    samples = (
        sum(1 for line in text.splitlines() if line.strip())
        if str(train_json).endswith(".jsonl")
        else len(json.loads(text))
    )
    if samples == 0:
        raise ValueError(f"{train_json} holds no training samples")
    cuda = train["device"] == "cuda"
    plan = iteration_plan(
        samples,
        world_size(train),
        train["batch_size"],
        accumulation(train),
        train["max_epochs"],
        train["warmup_ratio"],
    )
    if train.get("max_iters"):
        # a fixed number of iterations (benchmarks, smoke runs): the schedule still spans the epoch
        plan["iterations"] = min(plan["iterations"], train["max_iters"])
    if plan["warmup_iterations"] < 2:
        # 0 makes mmengine fail ("end should be larger than begin"); 1 keeps lr at 1e-5 x lr.
        raise ValueError(
            f"train.warmup_ratio {train['warmup_ratio']} gives {plan['warmup_iterations']} warmup "
            f"iteration(s) of {plan['iterations_per_epoch'] * plan['max_epochs']}; at least 2 are needed: "
            f"raise warmup_ratio to >= {2 / (plan['iterations_per_epoch'] * plan['max_epochs']):.3g} or "
            "lower the batch"
        )
    lora = train.get("lora", {})
    launcher = {k: train.get(k, default) for k, default in LAUNCHER_LEVERS.items()}
    values = dict(
        prompt_template=prompt_template(model, preset),
        path=repr(str(Path(model).resolve())),
        data_path=repr(str(Path(train_json).resolve())),
        image_folder=repr(str(Path(image_folder).resolve())),
        max_length=train["max_length"],
        batch_size=train["batch_size"],
        accumulative_counts=plan["accumulative_counts"],
        dataloader_num_workers=train.get("dataloader_num_workers", 0),
        # page-locked batches: the host-to-device copy of the image tiles runs at full PCIe speed
        pin_memory=cuda and train.get("pin_memory", False),
        max_epochs=train["max_epochs"],
        lr=repr(float(train["lr"])),
        betas=repr(tuple(train.get("betas", (0.9, 0.999)))),
        weight_decay=train.get("weight_decay", 0.05),
        max_norm=train.get("max_norm", 1),
        warmup_ratio=train["warmup_ratio"],
        save_steps=train.get("save_steps", 1000),
        save_total_limit=train.get("save_total_limit", 1),
        quantization_llm=cuda and train["method"] == "qlora",
        lora_r=lora.get("r", 128),
        lora_alpha=lora.get("alpha", 256),
        lora_dropout=lora.get("dropout", 0.05),
        # AmpOptimWrapper asserts a GPU; DeepSpeed replaces the wrapper anyway.
        optim_wrapper_type="AmpOptimWrapper" if cuda else "OptimWrapper",
        amp_options='\n    loss_scale="dynamic",\n    dtype="float16",' if cuda else "",
        dist_backend=repr("nccl" if cuda else "gloo"),
        log_interval=train.get("log_interval", 10),
        seed=train["seed"],
        train_length=f"max_iters={train['max_iters']}" if train.get("max_iters") else "max_epochs=max_epochs",
        extra_hooks='\n    dict(type="IterationLogHook"),' if launcher["iteration_log"] else "",
        launcher=repr(launcher),
        # mmengine's default DDP wrapper passes device_ids=[LOCAL_RANK], which CPU modules reject.
        model_wrapper=""
        if cuda
        else 'model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None, '
        "broadcast_buffers=False)\n",
    )
    return TEMPLATE.substitute(values), plan


def main(argv=None) -> None:
    from .config import load, validate_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--train-json", required=True, type=Path)
    ap.add_argument("--image-folder", required=True, type=Path)
    ap.add_argument("--train-settings", help="the config's train section, as JSON text")
    ap.add_argument("--workflow-config", nargs="*", default=[], help="layered YAML configs")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--plan", required=True, type=Path)
    ap.add_argument("--preset", help="model.preset: its LLM must be the model's")
    a = ap.parse_args(argv)
    if a.train_settings:
        train = json.loads(a.train_settings)
    else:
        train = validate_config(load(*a.workflow_config))["train"]
    try:
        text, plan = render(a.model, a.train_json, a.image_folder, train, a.preset)
    except ValueError as exc:
        raise SystemExit(f"render_xtuner_config: {exc}") from None
    with atomic_file(a.out) as fh:
        fh.write(text)
    write_json(a.plan, plan)
    print(json.dumps(plan))


if __name__ == "__main__":
    main()
