"""Training throughput on one GPU, round 2 (issue 14): the tutorial's stock XTuner settings, the
QLoRA default with and without the speed levers of ``vlmtune.speed``, the bf16 LoRA choice and the
24 GiB tier, each trained at least twice in the same invocation (median reported), through the
workflow's own commands (``vlmtune.xtuner_config`` renders, ``vlmtune.train`` trains).

    PYTHONPATH=src python benchmarks/train_gpu.py --work /tmp/train_gpu --out results/bench --samples 64

Settings (one GPU, global batch 16 = the tutorial's per-GPU share; every setting trains one epoch
over the same samples, so samples/s compare):
- ``a_stock``: the tutorial (QLoRA fp16 compute, eager attention, recompute, 8 x 2, XTuner grouping);
- ``q_base``: ``config/config.yaml`` with ``method: qlora`` and the new levers off (the "before");
- ``q_default``: the same with ``label_only_head: true``, ``qlora_compute_dtype: bfloat16`` and
  ``quantize_head: false`` (the shipped QLoRA default);
- ``b_lora``: ``config/config.yaml`` with ``method: lora`` (bf16 LoRA) and ``label_only_head: true``;
- ``gpu24g``: ``config/config.yaml`` + ``config/gpu-24g.yaml``, the process capped at 24 GiB
  (``VLMTUNE_CUDA_MEMORY_GIB``: ``torch.cuda.set_per_process_memory_fraction``); peak reserved reported;
- ``--variants`` adds settings (train overrides on ``q_default``), e.g.
  ``{"q_fused": {"fused_elementwise": true}}``.

Runs go in rounds (every setting once per round, ``--repeats`` rounds); a run that would not finish
within ``--budget-s`` (estimated from its first round) is skipped and listed. In the first round
``q_base`` and ``q_default`` also profile ``--profile-iters`` iterations after the warm-up
(``torch.profiler``; device time by kernel category: GEMM, attention, 4-bit dequantize,
element-wise, casts/copies, optimizer, idle); a profiled run is no speed figure (it ran at 2.2
samples/s where the same setting ran at 9.0 unprofiled), so those settings get one extra round and
their medians leave the profiled run out.

Equivalence (printed by the same invocation, bf16 on the GPU): XTuner's ``InternVL_V1_5`` built from
``q_default``'s rendered config (4-bit, SDPA, cast to bf16 as DeepSpeed does, eval mode), one real
batch of 4 samples: first-iteration loss unpatched vs each lever alone and all together (limit:
relative difference 1e-3); and patched modules vs originals on random inputs (a 4-bit layer with
bf16 vs fp16 compute, RMSNorm and SwiGLU fused vs the modules, the head on labelled rows vs the rows
of the full logits).

FLOP model (per iteration, real tokens only: padding is not useful work; T = real tokens,
n = positions carrying a label):
- InternViT, frozen, forward only: 2 * P_vit * 1025 tokens per tile + attention 4 * 1025^2 * d per
  layer per tile;
- projector mlp1, trained in full: 3 x forward = 6 * P_mlp1 * 256 tokens per tile;
- LLM decoder frozen weights (without the output head): forward + input gradients = 4 * P_llm * T;
- LoRA adapters of the decoder, trainable: 3 x forward = 6 * P_lora * T;
- output head (92,553 x 2,048) and its LoRA adapter: 4 * P_head * n + 6 * P_head_lora * n -- only the
  labelled positions, the work the loss needs, in every setting alike (so that skipping the rest
  is not counted as extra utilisation);
- LLM causal attention: forward 2 * L^2 * d per layer per sample, 3 x with the backward;
- gradient checkpointing recomputes the decoder forward (2 * (P_llm + P_lora) * T + attention
  forward): counted only in the hardware figure (HFU), not in MFU.
Peak: dense bf16 of the GPU (H100 SXM / H200: 989.4 TFLOP/s).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from vlmtune.levers import LAUNCHER_LEVERS  # noqa: E402  (no imports of its own: no torch here)

QUESTION = "请你根据这张图片,讲一个脑洞大开的梗。"
STOCK = dict(  # the tutorial's XTuner settings (docs/reference-run.md), one GPU
    device="cuda",
    gpus=1,
    deepspeed="zero1",
    method="qlora",
    max_length=8192,
    batch_size=8,
    accumulative_counts=2,
    global_batch_size=None,
    dataloader_num_workers=4,
    max_epochs=1,
    lr=2e-5,
    warmup_ratio=0.3,
    lora=dict(r=128, alpha=256, dropout=0.05),
    save_steps=100000,
    save_total_limit=1,
    log_interval=1,
    seed=0,
    attention="eager",
    gradient_checkpointing=True,
    group_by_exact_length=False,
    cuda_expandable_segments=False,
    iteration_log=True,
)
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


ROUND1_LEVERS = ("attention", "gradient_checkpointing", "group_by_exact_length", "cuda_expandable_segments")
# the levers since round 2 at XTuner's stock values (config/config.yaml ships its own choice)
NEW_LEVERS_OFF = {
    **{k: v for k, v in LAUNCHER_LEVERS.items() if k not in (*ROUND1_LEVERS, "iteration_log")},
    "pin_memory": False,
}


def project_settings(per_gpu_global_batch: int, *overlays: str) -> dict:
    """``config/config.yaml`` (+ overlays), on one GPU with the tutorial's per-GPU share of the
    global batch."""
    from vlmtune.config import load, validate_config

    # validate fills what the config leaves null (deepspeed, gpus, ...) from the model preset
    train = dict(
        validate_config(load(ROOT / "config" / "config.yaml", *(ROOT / "config" / o for o in overlays)))[
            "train"
        ]
    )
    for key in ("mem_mb", "runtime", "cpus_per_task", "nodes", "gpu_model"):
        train.pop(key, None)
    train.update(
        gpus=1,
        global_batch_size=per_gpu_global_batch,
        save_steps=100000,
        log_interval=1,
        seed=0,
        iteration_log=True,
        warmup_ratio=0.3,
        max_epochs=1,
    )
    return train


def all_settings(per_gpu_global: int) -> dict:
    base = project_settings(per_gpu_global)
    return {
        "a_stock": STOCK,
        "q_base": {**base, "method": "qlora", **NEW_LEVERS_OFF},
        "q_default": {**base, "method": "qlora"},
        "b_lora": {**base, "method": "lora", "label_only_head": True},
        "gpu24g": project_settings(per_gpu_global, "gpu-24g.yaml"),
    }


# ---------------------------------------------------------------- data and model
def make_samples(out: Path, n: int, seed: int) -> tuple[Path, list[str]]:
    import numpy as np
    from PIL import Image

    from vlmtune.model_builder import _CORPUS

    rng = random.Random(seed)
    chars = sorted({c for line in _CORPUS for c in line if "\u4e00" <= c <= "\u9fff"})
    (out / "images").mkdir(parents=True, exist_ok=True)
    records, answers = [], []
    for i in range(n):
        long_side = rng.randint(300, 1200)
        aspect = rng.choice([1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16, 2.0, 0.5, 1.5, 2 / 3]) * rng.uniform(0.9, 1.1)
        w, h = (
            (long_side, max(300, int(long_side / aspect)))
            if aspect >= 1
            else (max(300, int(long_side * aspect)), long_side)
        )
        w, h = min(w, 1200), min(h, 1200)
        base = np.random.default_rng(seed + i).integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.BILINEAR)  # smooth, photo-like JPEG sizes
        name = f"images/b{i:05d}.jpg"
        img.save(out / name, quality=85)
        answer = "".join(rng.choice(chars) for _ in range(rng.randint(10, 60)))
        answers.append(answer)
        records.append(
            dict(
                id=i,
                image=name,
                width=w,
                height=h,
                conversations=[
                    dict(**{"from": "human"}, value="<image>\n" + QUESTION),
                    dict(**{"from": "gpt"}, value=answer),
                ],
            )
        )
    path = out / "train.json"
    path.write_text(json.dumps(records, ensure_ascii=False))
    return path, answers


# ---------------------------------------------------------------- FLOPs
def flop_model(model_dir: Path, lora_r: int) -> dict:
    cfg = json.loads((model_dir / "config.json").read_text())
    v, l = cfg["vision_config"], cfg["llm_config"]
    dv, lv = v["hidden_size"], v["num_hidden_layers"]
    p_vit = lv * (3 * dv * dv + dv * dv + 2 * dv * v["intermediate_size"]) + 3 * v["patch_size"] ** 2 * dv
    vit_tokens = (cfg["force_image_size"] // v["patch_size"]) ** 2 + 1
    merged = dv * int(1 / cfg["downsample_ratio"]) ** 2
    d, hd = l["hidden_size"], l["hidden_size"] // l["num_attention_heads"]
    qkv_out = (l["num_attention_heads"] + 2 * l["num_key_value_heads"]) * hd
    linears = [
        (d, qkv_out),
        (d, d),
        (d, l["intermediate_size"]),
        (d, l["intermediate_size"]),
        (l["intermediate_size"], d),
    ]
    return dict(
        p_vit=p_vit,
        vit_tokens=vit_tokens,
        vit_layers=lv,
        vit_hidden=dv,
        p_mlp1=merged * d + d * d,
        tokens_per_tile=int((cfg["force_image_size"] // v["patch_size"]) ** 2 * cfg["downsample_ratio"] ** 2),
        p_llm=l["num_hidden_layers"] * sum(i * o for i, o in linears),
        p_lora=l["num_hidden_layers"] * sum(lora_r * (i + o) for i, o in linears),
        p_head=d * l["vocab_size"],
        p_head_lora=lora_r * (d + l["vocab_size"]),
        llm_layers=l["num_hidden_layers"],
        llm_hidden=d,
    )


def iteration_flops(f: dict, rec: dict, recompute: bool) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) of one iteration record (``labelled``: positions with a label)."""
    tiles, t, n = rec["tiles"], rec["real_tokens"], rec["labelled"]
    vit = tiles * (
        2 * f["p_vit"] * f["vit_tokens"] + 4 * f["vit_tokens"] ** 2 * f["vit_hidden"] * f["vit_layers"]
    )
    mlp1 = 6 * f["p_mlp1"] * f["tokens_per_tile"] * tiles
    attn_fwd = sum(2 * L * L * f["llm_hidden"] * f["llm_layers"] for L in rec["lengths"])
    head = 4 * f["p_head"] * n + 6 * f["p_head_lora"] * n
    model = vit + mlp1 + 4 * f["p_llm"] * t + 6 * f["p_lora"] * t + head + 3 * attn_fwd
    extra = 2 * (f["p_llm"] + f["p_lora"]) * t + attn_fwd if recompute else 0.0
    return model, model + extra


# ---------------------------------------------------------------- runs
def sh(cmd: list[str], log: Path, env=None) -> int:
    with log.open("w") as fh:
        return subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode


def run_setting(
    name: str, settings: dict, model: Path, data: Path, d: Path, iters: int, gpus: int, env: dict
) -> dict:
    d.mkdir(parents=True, exist_ok=True)
    settings = dict(settings, max_iters=iters or None)
    settings.pop("memory_gib", None)
    py = sys.executable
    rc = sh(
        [
            py,
            "-m",
            "vlmtune.xtuner_config",
            "--model",
            str(model),
            "--train-json",
            str(data),
            "--image-folder",
            str(data.parent),
            "--train-settings",
            json.dumps(settings),
            "--out",
            str(d / "cfg.py"),
            "--plan",
            str(d / "plan.json"),
        ],
        d / "render.log",
    )
    if rc:
        raise SystemExit(
            f"{name}: render failed, see {d / 'render.log'}:\n" + (d / "render.log").read_text()[-2000:]
        )
    t0 = time.time()
    rc = sh(
        [
            py,
            "-m",
            "vlmtune.train",
            "--config",
            str(d / "cfg.py"),
            "--plan",
            str(d / "plan.json"),
            "--work-dir",
            str(d / "work"),
            "--result",
            str(d / "result.json"),
            "--gpus",
            str(gpus),
            "--deepspeed",
            settings["deepspeed"],
        ],
        d / "train.log",
        env={**os.environ, "VLMTUNE_BENCH_HOOK": "1", **env},
    )
    return dict(name=name, settings=settings, rc=rc, wall_s=time.time() - t0, dir=str(d))


def summarise_run(run: dict, f: dict, warmup: int, peak: float, skip: range = range(0)) -> dict:
    """Figures of one run after the warm-up (the first optimizer step), leaving out the iterations in
    ``skip`` (a profiler window)."""
    from vlmtune.iteration_log import read, summarise

    work = Path(run["dir"]) / "work"
    path = work / "iterations.jsonl"
    if run["rc"] or not path.exists() or not path.read_text().strip():
        tail = (Path(run["dir"]) / "train.log").read_text(errors="replace")[-3000:]
        return dict(name=run["name"], failed=True, oom="out of memory" in tail.lower(), log_tail=tail)
    labelled = (
        {r["iteration"]: r["labelled"] for r in read(work / "labels.jsonl")}
        if (work / "labels.jsonl").exists()
        else {}
    )
    recs = [dict(r, labelled=labelled.get(r["iteration"], 0)) for r in read(path)]
    warmup = (
        warmup
        if warmup >= 0
        else json.loads((Path(run["dir"]) / "plan.json").read_text())["accumulative_counts"]
    )
    recs = recs[:warmup] + [r for r in recs[warmup:] if r["iteration"] not in skip]
    s = summarise(recs, warmup)
    window = recs[warmup:]
    recompute = bool(run["settings"].get("gradient_checkpointing", True))
    model_flops = sum(iteration_flops(f, r, recompute)[0] for r in window)
    hw_flops = sum(iteration_flops(f, r, recompute)[1] for r in window)
    s.update(
        name=run["name"],
        failed=False,
        mfu=model_flops / s["seconds"] / peak,
        hfu=hw_flops / s["seconds"] / peak,
        tflops=model_flops / s["seconds"] / 1e12,
        labelled_per_sample=sum(r["labelled"] for r in window) / sum(r["samples"] for r in window),
        samples_measured=sum(r["samples"] for r in window),
        profiled_left_out=len(skip),
    )
    prof = work / "profile.json"
    if prof.exists():
        s["profile"] = json.loads(prof.read_text())
    return s


EQUIVALENCE = r"""
import json, os, sys, torch
sys.path.insert(0, os.path.join(sys.argv[3], "src"))
from vlmtune import speed
from vlmtune.attention import apply as apply_attention
from vlmtune.xtuner_main import launcher_settings
cuda = torch.cuda.is_available()  # CPU: the dry run of this script (--cpu): fp32, no 4-bit layers
dev = "cuda" if cuda else "cpu"
dtype = torch.bfloat16 if cuda else torch.float32
def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))
os.environ.setdefault("MASTER_ADDR", "127.0.0.1"); os.environ.setdefault("MASTER_PORT", "29533")
torch.distributed.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
from mmengine.config import Config
from xtuner.registry import BUILDER
from xtuner.dataset.collate_fns import default_collate_fn
cfg = Config.fromfile(sys.argv[2])
launcher = launcher_settings(sys.argv[2])
if not launcher["quantize_head"]:
    speed.keep_output_head_unquantized()  # as the launcher does before XTuner builds the model
model = BUILDER.build(cfg.model)
model = model.to(dev).to(dtype).eval()  # DeepSpeed casts the module to bf16 the same way
apply_attention(model.model, launcher["attention"])
dataset = BUILDER.build(cfg.llava_dataset)
batch = default_collate_fn([dataset[i] for i in range(4)])["data"]
batch = {k: (v.to(dev) if torch.is_tensor(v) else [x.to(dev) for x in v]) for k, v in batch.items()}
out, losses = {}, {}
def loss():
    with torch.no_grad():
        return float(model(batch)["loss"])
speed.install_label_only_head(type(model))
model.vlmtune_label_only_head = False
losses["unpatched"] = loss()
model.vlmtune_label_only_head = True
losses["label_only_head"] = loss()
model.vlmtune_label_only_head = False
n4 = speed.set_4bit_compute_dtype(model, "bfloat16")
losses["bf16_compute"] = loss()
model.vlmtune_label_only_head = True
losses["label_only_head+bf16_compute"] = loss()
# one PEFT LoRA layer over a 4-bit base, training mode (dropout on): output and gradients of PEFT's
# forward vs the fused one, with the same dropout mask (same seed)
# XTuner's adapters are PEFT's plain lora.Linear, over a bitsandbytes Linear4bit base (docs/xtuner.md)
lora_layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
lora_layer = next((m for m in lora_layers if type(m.base_layer).__name__ == "Linear4bit"), lora_layers[0])
saved_b = lora_layer.lora_B.default.weight.detach().clone()
def lora_run(seed):
    torch.manual_seed(seed)
    x = torch.randn(3, 700, lora_layer.in_features, device=dev, dtype=dtype, requires_grad=True)
    g = torch.randn(3, 700, lora_layer.out_features, device=dev, dtype=dtype)
    for p in lora_layer.parameters():
        p.grad = None
    a_w, b_w = lora_layer.lora_A.default.weight, lora_layer.lora_B.default.weight
    a_w.requires_grad_(True); b_w.requires_grad_(True)
    with torch.no_grad():  # B starts at zero: give the adapter an output (restored below)
        b_w.copy_(0.02 * torch.randn(saved_b.shape, device=dev, dtype=dtype))
    lora_layer.train()
    y = lora_layer(x); y.backward(g); lora_layer.eval()
    return [y.detach(), x.grad, a_w.grad.clone(), b_w.grad.clone()]
ref_lora = lora_run(0)
model.vlmtune_label_only_head = False
speed.set_4bit_compute_dtype(model, "float16")
out["fused_lora_layers"] = speed.apply_fused_lora(model)
speed.set_4bit_compute_dtype(model, "bfloat16")
for name, a, b in zip(("output", "grad_input", "grad_A", "grad_B"), lora_run(0), ref_lora):
    out["module_lora_4bit_fused_" + name] = rel(a, b)
out["module_lora_layer"] = f"{type(lora_layer).__name__} over {type(lora_layer.base_layer).__name__}"
out["module_lora_fallbacks"] = lora_layer.__dict__.get("_vlmtune_fallbacks", 0)
with torch.no_grad():
    lora_layer.lora_B.default.weight.copy_(saved_b)
for p in model.parameters():
    p.grad = None
speed.set_4bit_compute_dtype(model, "float16")
losses["fused_lora"] = loss()
speed.set_4bit_compute_dtype(model, "bfloat16")
model.vlmtune_label_only_head = True
losses["label_only_head+bf16_compute+fused_lora"] = loss()
out["shared_rope_modules"] = speed.share_rotary_embedding(model.model.language_model)
losses["label_only_head+bf16_compute+fused_lora+shared_rope"] = loss()
# modules on random inputs
torch.manual_seed(0)
lm = speed.causal_lm(model.model.language_model)
hidden = torch.randn(2, 256, lm.config.hidden_size, device=dev, dtype=dtype)
labels = torch.full((2, 256), -100, device=dev); labels[:, 200:240] = 5
pos, _ = speed.label_positions(labels)
head = lm.get_output_embeddings()
with torch.no_grad():
    full = head(hidden).float().reshape(-1, lm.config.vocab_size).index_select(0, pos)
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, pos)
    out["module_head_label_rows"] = rel(head(rows).float(), full)
    lin = next(
        (m for m in model.modules() if type(m).__name__ == "Linear4bit" and hasattr(m, "compute_dtype")), None
    )
    if lin is not None:
        x = torch.randn(512, lin.in_features, device=dev, dtype=dtype)
        lin.compute_dtype = torch.float16; ref = lin(x)
        lin.compute_dtype = torch.bfloat16; out["module_4bit_bf16_vs_fp16"] = rel(lin(x), ref)
    layer = lm.model.layers[0]
    x = torch.randn(2, 300, lm.config.hidden_size, device=dev, dtype=dtype)
    positions = torch.arange(300, device=dev).unsqueeze(0).expand(2, -1)
    ref_norm, ref_mlp = layer.attention_norm(x), layer.feed_forward(x)
    ref_layer = layer(x, position_ids=positions)[0]
    out["fused_elementwise_switched"] = speed.apply_fused_elementwise(model, compile=cuda)
    out["module_rms_norm_fused"] = rel(layer.attention_norm(x), ref_norm)
    out["module_swiglu_fused"] = rel(layer.feed_forward(x), ref_mlp)
    out["module_decoder_layer_fused"] = rel(layer(x, position_ids=positions)[0], ref_layer)
losses["all_with_fused_elementwise"] = loss()
if cuda:  # compiled decoder layers (graph breaks and failures reported, not fatal)
    try:
        out["compiled_layers"] = speed.compile_decoder_layers(model.model.language_model)
        losses["all_with_compiled_layers"] = loss()
    except Exception as exc:  # noqa: BLE001
        out["compile_error"] = repr(exc)[-800:]
ref = losses["unpatched"]
out["losses"] = losses
out["rel_diff"] = {k: abs(v - ref) / abs(ref) for k, v in losses.items() if k != "unpatched"}
out["layers_4bit"] = n4
out["batch"] = dict(real_tokens=int(batch["attention_mask"].sum()),
                    padded=int(batch["attention_mask"].numel()),
                    labelled=int((batch["labels"][:, 1:] != -100).sum()))
print("EQUIVALENCE " + json.dumps(out))
"""


def equivalence(model: Path, cfg: Path, log: Path) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-c", EQUIVALENCE, str(model), str(cfg), str(ROOT)],
        capture_output=True,
        text=True,
        env=env,
    )
    log.write_text(proc.stdout + proc.stderr)
    for line in proc.stdout.splitlines():
        if line.startswith("EQUIVALENCE "):
            return json.loads(line[len("EQUIVALENCE ") :])
    return dict(failed=True, log_tail=(proc.stdout + proc.stderr)[-3000:])


def equivalence_text(eq: dict) -> str:
    if eq.get("failed"):
        return "equivalence FAILED to run:\n" + eq["log_tail"][-1500:]
    lines = [
        f"equivalence (first batch: {eq['batch']['real_tokens']:,} real of {eq['batch']['padded']:,} tokens, "
        f"{eq['batch']['labelled']} labelled; {eq['layers_4bit']} 4-bit layers), loss unpatched "
        f"{eq['losses']['unpatched']:.5f}:"
    ]
    for k, d in eq["rel_diff"].items():
        lines.append(
            f"  {k}: loss {eq['losses'][k]:.5f}, rel. diff {d:.2e} ({'pass' if d <= 1e-3 else 'FAIL'} at "
            "1e-3)"
        )
    for k in (
        "module_head_label_rows",
        "module_4bit_bf16_vs_fp16",
        "module_rms_norm_fused",
        "module_swiglu_fused",
        "module_decoder_layer_fused",
        "module_lora_4bit_fused_output",
        "module_lora_4bit_fused_grad_input",
        "module_lora_4bit_fused_grad_A",
        "module_lora_4bit_fused_grad_B",
    ):
        if k in eq:
            lines.append(
                f"  {k}: rel. err. {eq[k]:.2e} ({'pass' if eq[k] <= 1e-2 else 'FAIL'} at 1e-2, bf16)"
            )
    if "module_lora_fallbacks" in eq:
        lines.append(
            f"  fused LoRA: {eq['fused_lora_layers']} layers patched; the checked {eq['module_lora_layer']} "
            f"layer fell back to PEFT's forward {eq['module_lora_fallbacks']} time(s)"
        )
    if "compile_error" in eq:
        lines.append("  compiled decoder layers FAILED: " + eq["compile_error"])
    return "\n".join(lines)


def aggregate(name: str, rows: list[dict], stock: dict | None) -> dict:
    """Median over a setting's runs."""
    ok = [r for r in rows if not r.get("failed")]
    if not ok:
        return dict(name=name, failed=True, oom=any(r.get("oom") for r in rows), runs=len(rows))
    timed = [r for r in ok if not r.get("profile")]
    left_out = len(ok) - len(timed) if timed else 0
    ok = timed or ok
    med = lambda k: statistics.median(r[k] for r in ok)  # noqa: E731
    agg = dict(
        name=name,
        failed=False,
        runs=len(ok),
        failed_runs=len(rows) - len(ok) - left_out,
        profiled_runs_left_out=left_out,
        samples_per_s_each=[round(r["samples_per_s"], 3) for r in ok],
    )
    for k in (
        "median_s_per_iter",
        "samples_per_s",
        "real_tokens_per_s",
        "padding_share",
        "tiles_per_sample",
        "data_wait_share",
        "mfu",
        "hfu",
        "tflops",
        "labelled_per_sample",
        "samples_measured",
    ):
        agg[k] = med(k)
    agg["max_allocated_gib"] = max(r["max_allocated_gib"] for r in ok)
    agg["max_reserved_gib"] = max(r["max_reserved_gib"] for r in ok)
    if stock and not stock.get("failed"):
        agg["x_stock"] = agg["samples_per_s"] / stock["samples_per_s"]
    return agg


def table(rows: list[dict]) -> str:
    head = (
        "setting",
        "runs",
        "samples/s (median)",
        "each run",
        "× stock",
        "real tokens/s",
        "padding",
        "tiles/sample",
        "data wait",
        "peak alloc GiB",
        "peak reserved GiB",
        "MFU",
        "HFU",
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.get("failed"):
            lines.append(
                f"| {r['name']} | {r['runs']} | failed{' (out of memory)' if r.get('oom') else ''} |"
                + " |" * (len(head) - 3)
            )
            continue
        each = " / ".join(f"{x:.2f}" for x in r["samples_per_s_each"])
        lines.append(
            f"| {r['name']} | {r['runs']} | {r['samples_per_s']:.2f} | {each} | "
            f"{r.get('x_stock', float('nan')):.2f} | "
            f"{r['real_tokens_per_s']:,.0f} | {r['padding_share']:.1%} | {r['tiles_per_sample']:.2f} | "
            f"{r['data_wait_share']:.1%} | "
            f"{r['max_allocated_gib']:.1f} | {r['max_reserved_gib']:.1f} | {r['mfu']:.1%} | {r['hfu']:.1%} |"
        )
    return "\n".join(lines)


def profile_table(profiles: dict) -> str:
    from vlmtune.speed import CATEGORIES

    cats = (*CATEGORIES, "idle")
    lines = ["| setting | s/iter (profiled) | " + " | ".join(cats) + " |", "|" + "---|" * (len(cats) + 2)]
    for name, p in profiles.items():
        lines.append(
            f"| {name} | {p['wall_s'] / p['iterations']:.3f} | "
            + " | ".join(
                f"{p['share'][c]:.1%} "
                f"({p['seconds'].get(c, p['wall_s'] * p['share'][c]) / p['iterations'] * 1e3:.0f} ms)"
                for c in cats
            )
            + " |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/train_gpu"))
    ap.add_argument("--out", type=Path, default=Path("results/bench"))
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument(
        "--iters",
        type=int,
        default=0,
        help="iterations per setting (0: one epoch, so every setting "
        "trains on the same samples and samples/s compare)",
    )
    ap.add_argument(
        "--warmup",
        type=int,
        default=-1,
        help="iterations left out of the figures (-1: the first optimizer step)",
    )
    ap.add_argument(
        "--repeats", type=int, default=2, help="runs per setting (rounds); the median is reported"
    )
    ap.add_argument(
        "--budget-s", type=float, default=500, help="skip runs that would end after this many seconds"
    )
    ap.add_argument(
        "--profile-iters", type=int, default=3, help="profiled iterations of q_base and q_default (0: none)"
    )
    ap.add_argument("--variants", default="{}", help="JSON {name: {train overrides of q_default}}")
    ap.add_argument("--only", default="", help="comma-separated settings to run (default: all)")
    ap.add_argument("--skip-equivalence", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpu", action="store_true", help="dry run of this script: tiny model, CPU, LoRA")
    a = ap.parse_args(argv)
    import torch

    from vlmtune.model_builder import build

    t_start = time.time()
    a.out.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    gpu = "cpu (dry run)" if a.cpu else torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16.items() if k in gpu), 989.4e12)
    data, answers = make_samples(a.work / "data", a.samples, a.seed)
    model = a.work / "InternVL2-2B"
    if not (model / "config.json").exists():
        build(
            model, "tiny" if a.cpu else "full", seed=a.seed, corpus=answers, device="cpu" if a.cpu else "cuda"
        )
    print(f"[bench] {gpu}; data + model in {time.time() - t_start:.0f} s", flush=True)
    f = flop_model(model, STOCK["lora"]["r"])
    settings = all_settings(STOCK["batch_size"] * STOCK["accumulative_counts"])
    for name, over in json.loads(a.variants).items():
        settings[name] = {**settings["q_default"], **over}
    memory = {"gpu24g": 24}
    if a.cpu:
        cpu = dict(
            device="cpu",
            gpus=0,
            cpu_processes=1,
            deepspeed="none",
            method="lora",
            batch_size=2,
            accumulative_counts=1,
            global_batch_size=None,
            dataloader_num_workers=0,
            lora=dict(r=8, alpha=16, dropout=0.05),
            warmup_ratio=0.4,
        )
        settings = {k: {**v, **cpu} for k, v in settings.items()}
    only = set(filter(None, a.only.split(",")))
    names = [n for n in settings if not only or n in only]
    results = dict(
        gpu=gpu,
        peak_flops=peak,
        flop_model=f,
        torch=torch.__version__,
        samples=a.samples,
        iters=a.iters,
        warmup=a.warmup,
        repeats=a.repeats,
        date=time.strftime("%Y-%m-%d"),
        settings=settings,
        runs=[],
        skipped=[],
        command=" ".join(sys.argv),
    )
    save = lambda: (a.out / "train_gpu.json").write_text(json.dumps(results, indent=1, default=str))  # noqa: E731
    first_wall: dict = {}
    profiled: set = set()
    # The profiled run of a setting is no speed figure (the profiler slows the run around its
    # window): such a setting gets one extra round, and aggregate() leaves its profiled run out.
    for rnd in range(a.repeats + 1):
        if rnd == a.repeats and not profiled:
            break
        order = (
            names
            if rnd == 0
            else sorted(
                names,
                key=lambda n: (
                    ["q_default", "a_stock", "b_lora", "gpu24g", "q_base"].index(n)
                    if n in ("q_default", "a_stock", "b_lora", "gpu24g", "q_base")
                    else 9
                ),
            )
        )
        if rnd == a.repeats:
            order = [n for n in order if n in profiled]
        for name in order:
            s = settings[name]
            if rnd and time.time() - t_start + first_wall.get(name, 60) * 1.1 > a.budget_s:
                results["skipped"].append(f"{name} round {rnd + 1}")
                print(f"[bench] skip {name} round {rnd + 1}: over --budget-s {a.budget_s:.0f}", flush=True)
                continue
            env, skip = {}, range(0)
            if name in memory and not a.cpu:
                env["VLMTUNE_CUDA_MEMORY_GIB"] = str(memory[name])
            if rnd == 0 and a.profile_iters and name in ("q_base", "q_default") and not a.cpu:
                acc = max(1, (STOCK["batch_size"] * STOCK["accumulative_counts"]) // s["batch_size"])
                env["VLMTUNE_PROFILE"] = f"{acc + 1}:{a.profile_iters}"
                skip = range(acc + 1, acc + 1 + a.profile_iters)
                profiled.add(name)
            run = run_setting(
                name, s, model, data, a.work / f"{name}-r{rnd + 1}", a.iters, 0 if a.cpu else 1, env
            )
            first_wall.setdefault(name, run["wall_s"] + 5)
            row = summarise_run(run, f, a.warmup, peak, skip)
            row.update(wall_s=run["wall_s"], round=rnd + 1)
            results["runs"].append(row)
            print(
                f"[bench] {name} r{rnd + 1}: "
                + json.dumps({k: v for k, v in row.items() if k not in ("log_tail", "profile")}),
                flush=True,
            )
            if row.get("failed"):
                print(row["log_tail"][-1500:], flush=True)
            if rnd == 0 and name == "q_default" and not a.skip_equivalence:
                results["equivalence"] = equivalence(
                    model, Path(run["dir"]) / "cfg.py", a.out / "equivalence.log"
                )
                print("[bench] " + equivalence_text(results["equivalence"]), flush=True)
            save()
    by_name: dict = {}
    for r in results["runs"]:
        by_name.setdefault(r["name"], []).append(r)
    stock = aggregate("a_stock", by_name["a_stock"], None) if "a_stock" in by_name else None
    results["summary"] = [aggregate(n, by_name[n], stock) for n in names if n in by_name]
    profiles = {r["name"]: r["profile"] for r in results["runs"] if r.get("profile")}
    results["profiles"] = profiles
    md = [
        f"GPU: {gpu}; torch {torch.__version__}; {a.samples} samples, one epoch per run, global batch 16; "
        f"{time.strftime('%Y-%m-%d')}; command: `{results['command']}`",
        "",
        table(results["summary"]),
    ]
    if profiles:
        md += [
            "",
            "Profile (device time by kernel category, share of the profiled wall time; ms per iteration):",
            "",
            profile_table(profiles),
        ]
        for name, p in profiles.items():
            md += ["", f"Top kernels, {name}:", ""] + [
                f"- {t * 1e3 / p['iterations']:.1f} ms/iter  {k[:140]}" for k, t in p["top_kernels"][:12]
            ]
    if results.get("equivalence"):
        md += ["", "```", equivalence_text(results["equivalence"]), "```"]
    if results["skipped"]:
        md += ["", "Skipped (budget): " + ", ".join(results["skipped"])]
    gains = {r["name"]: r for r in results["summary"] if not r.get("failed")}
    if "q_base" in gains and "q_default" in gains:
        md += [
            "",
            "Levers: q_default / q_base = "
            f"{gains['q_default']['samples_per_s'] / gains['q_base']['samples_per_s']:.2f}x samples/s",
        ]
    if "gpu24g" in gains:
        md += [
            f"gpu24g peak reserved {gains['gpu24g']['max_reserved_gib']:.1f} GiB "
            f"({'within' if gains['gpu24g']['max_reserved_gib'] <= 24 else 'OVER'} 24 GiB)"
        ]
    text = "\n".join(md)
    (a.out / "train_gpu.md").write_text(text + "\n")
    save()
    print("\n" + text)
    print(f"[bench] total {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
