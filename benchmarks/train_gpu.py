"""Training throughput on one GPU: the tutorial's stock XTuner settings against the project's
GPU defaults (``config/config.yaml``), in the same run, through the workflow's own commands
(``vlmtune.xtuner_config`` renders, ``vlmtune.train`` trains).

    PYTHONPATH=src python benchmarks/train_gpu.py --work /tmp/train_gpu --out results/bench

Steps:
1. build the exact-size InternVL2-2B with random weights (``vlmtune.model_builder``, preset
   ``full``; its tokenizer is trained on the generated answers too, so Chinese text tokenises
   at a realistic rate) and CLoT-shaped samples: images 300-1200 px of varied aspect, answers
   of 10-60 Chinese characters, the tutorial's prompt, in the converter's record format;
2. equivalence: SDPA against the original attention on random inputs in bf16 (InternViT layer,
   InternLM2 layer, whole InternLM2 with a right-padded batch), and the first-iteration loss of
   one real batch (bf16 LoRA, dropout off) with eager and with SDPA attention, identical weights;
3. for each setting: render, train ``--iters`` iterations with ``train.iteration_log`` on, and
   summarise ``iterations.jsonl`` (median s/iteration after ``--warmup``, samples/s, real
   tokens/s, padding share, peak memory, MFU).

FLOP model (per iteration, real tokens only: padding is not useful work):
- InternViT, frozen, forward only: 2 * P_vit * 1025 tokens per tile + attention 4 * 1025^2 * d per
  layer per tile;
- projector mlp1, trained in full: 3 x forward = 6 * P_mlp1 * 256 tokens per tile;
- LLM frozen weights (incl. the output head): 2 x forward (forward + input gradients) = 4 * P_llm * T;
- LoRA adapters, trainable: 3 x forward = 6 * P_lora * T;
- LLM causal attention: forward 2 * L^2 * d per layer per sample, 3 x with the backward;
- gradient checkpointing recomputes the LLM forward (2 * (P_llm + P_lora) * T + attention forward):
  counted only in the hardware figure (HFU), not in MFU.
Peak: dense bf16 of the GPU (H100 SXM / H200: 989.4 TFLOP/s).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

QUESTION = "请你根据这张图片,讲一个脑洞大开的梗。"
STOCK = dict(  # the tutorial's XTuner settings (FIELD-NOTES §1), one GPU
    device="cuda", gpus=1, deepspeed="zero1", method="qlora", max_length=8192, batch_size=8,
    accumulative_counts=2, global_batch_size=None, dataloader_num_workers=4, max_epochs=1, lr=2e-5,
    warmup_ratio=0.15, lora=dict(r=128, alpha=256, dropout=0.05), save_steps=100000, save_total_limit=1,
    log_interval=1, seed=0, attention="eager", gradient_checkpointing=True, group_by_exact_length=False,
    cuda_expandable_segments=False, iteration_log=True,
)  # fmt: skip
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


def project_settings(per_gpu_global_batch: int) -> dict:
    """The shipped GPU defaults (config/config.yaml), on one GPU with the tutorial's per-GPU
    share of the global batch."""
    from vlmtune.config import load

    train = dict(load(ROOT / "config" / "config.yaml")["train"])
    for key in ("mem_mb", "runtime", "cpus_per_task", "nodes", "gpu_model"):
        train.pop(key, None)
    train.update(gpus=1, global_batch_size=per_gpu_global_batch, save_steps=100000, log_interval=1, seed=0,
                 iteration_log=True, warmup_ratio=0.15)  # fmt: skip
    return train


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
        w, h = (long_side, max(300, int(long_side / aspect))) if aspect >= 1 else (max(300, int(long_side * aspect)), long_side)
        w, h = min(w, 1200), min(h, 1200)
        base = np.random.default_rng(seed + i).integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.BILINEAR)  # smooth, photo-like JPEG sizes
        name = f"images/b{i:05d}.jpg"
        img.save(out / name, quality=85)
        answer = "".join(rng.choice(chars) for _ in range(rng.randint(10, 60)))
        answers.append(answer)
        records.append(dict(id=i, image=name, width=w, height=h, conversations=[
            dict(**{"from": "human"}, value="<image>\n" + QUESTION), dict(**{"from": "gpt"}, value=answer)]))  # fmt: skip
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
    linears = [(d, qkv_out), (d, d), (d, l["intermediate_size"]), (d, l["intermediate_size"]), (l["intermediate_size"], d)]
    p_llm = l["num_hidden_layers"] * sum(i * o for i, o in linears) + d * l["vocab_size"]
    p_lora = l["num_hidden_layers"] * sum(lora_r * (i + o) for i, o in linears) + lora_r * (d + l["vocab_size"])
    return dict(p_vit=p_vit, vit_tokens=vit_tokens, vit_layers=lv, vit_hidden=dv, p_mlp1=merged * d + d * d,
                tokens_per_tile=int((cfg["force_image_size"] // v["patch_size"]) ** 2 * cfg["downsample_ratio"] ** 2),
                p_llm=p_llm, p_lora=p_lora, llm_layers=l["num_hidden_layers"], llm_hidden=d)  # fmt: skip


def iteration_flops(f: dict, rec: dict, recompute: bool) -> tuple[float, float]:
    tiles, t = rec["tiles"], rec["real_tokens"]
    vit = tiles * (2 * f["p_vit"] * f["vit_tokens"] + 4 * f["vit_tokens"] ** 2 * f["vit_hidden"] * f["vit_layers"])
    mlp1 = 6 * f["p_mlp1"] * f["tokens_per_tile"] * tiles
    attn_fwd = sum(2 * n * n * f["llm_hidden"] * f["llm_layers"] for n in rec["lengths"])
    model = vit + mlp1 + 4 * f["p_llm"] * t + 6 * f["p_lora"] * t + 3 * attn_fwd
    extra = 2 * (f["p_llm"] + f["p_lora"]) * t + attn_fwd if recompute else 0.0
    return model, model + extra


# ---------------------------------------------------------------- runs
def sh(cmd: list[str], log: Path, env=None) -> int:
    with log.open("w") as fh:
        return subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode


def run_setting(name: str, settings: dict, model: Path, data: Path, work: Path, iters: int, gpus: int) -> dict:
    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    settings = dict(settings, max_iters=iters or None)
    py = sys.executable
    rc = sh([py, "-m", "vlmtune.xtuner_config", "--model", str(model), "--train-json", str(data), "--image-folder",
             str(data.parent), "--train-settings", json.dumps(settings), "--out", str(d / "cfg.py"), "--plan",
             str(d / "plan.json")], d / "render.log")  # fmt: skip
    if rc:
        raise SystemExit(f"{name}: render failed, see {d / 'render.log'}:\n" + (d / "render.log").read_text()[-2000:])
    t0 = time.time()
    rc = sh([py, "-m", "vlmtune.train", "--config", str(d / "cfg.py"), "--plan", str(d / "plan.json"), "--work-dir",
             str(d / "work"), "--result", str(d / "result.json"), "--gpus", str(gpus), "--deepspeed", settings["deepspeed"]],
            d / "train.log")  # fmt: skip
    return dict(name=name, settings=settings, rc=rc, wall_s=time.time() - t0, dir=str(d))


def summarise_run(run: dict, f: dict, warmup: int, peak: float) -> dict:
    from vlmtune.iteration_log import read, summarise

    path = Path(run["dir"]) / "work" / "iterations.jsonl"
    if run["rc"] or not path.exists() or not path.read_text().strip():
        tail = (Path(run["dir"]) / "train.log").read_text(errors="replace")[-3000:]
        oom = "out of memory" in tail.lower()
        return dict(name=run["name"], failed=True, oom=oom, log_tail=tail)
    recs = read(path)
    # warm-up: the first optimizer step (one global batch), whatever the micro-batch
    warmup = warmup if warmup >= 0 else json.loads((Path(run["dir"]) / "plan.json").read_text())["accumulative_counts"]
    s = summarise(recs, warmup)
    window = recs[warmup:]
    recompute = bool(run["settings"].get("gradient_checkpointing", True))
    model_flops = sum(iteration_flops(f, r, recompute)[0] for r in window)
    hw_flops = sum(iteration_flops(f, r, recompute)[1] for r in window)
    s.update(name=run["name"], failed=False, mfu=model_flops / s["seconds"] / peak,
             hfu=hw_flops / s["seconds"] / peak, tflops=model_flops / s["seconds"] / 1e12)  # fmt: skip
    return s


EQUIVALENCE = r"""
import json, os, sys, torch
sys.path.insert(0, os.path.join(sys.argv[3], "src"))
from vlmtune.attention import compare, apply
cuda = torch.cuda.is_available()  # CPU: the dry run of this script (--cpu), fp32
dev = "cuda" if cuda else "cpu"
# single attention layers in bf16 (the training dtype); the whole 24-layer LLM with a right-padded
# batch in fp32 as well, where the comparison is not drowned by bf16 rounding compounding over layers
out = {"random_inputs_bf16": compare(sys.argv[1], device=dev, dtype=torch.bfloat16 if cuda else torch.float32,
                                     batch=2, seq=2048 if cuda else 64, tiles=4 if cuda else 1),
       "random_inputs_fp32": compare(sys.argv[1], device=dev, dtype=torch.float32, batch=2, seq=2048 if cuda else 64, tiles=1)}
# one real batch through XTuner's model and dataset (bf16 LoRA, dropout off), eager then SDPA
os.environ.setdefault("MASTER_ADDR", "127.0.0.1"); os.environ.setdefault("MASTER_PORT", "29533")
torch.distributed.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
from mmengine.config import Config
from xtuner.registry import BUILDER
from xtuner.dataset.collate_fns import default_collate_fn
cfg = Config.fromfile(sys.argv[2])
model = BUILDER.build(cfg.model).to(dev).eval()
dataset = BUILDER.build(cfg.llava_dataset)
batch = default_collate_fn([dataset[i] for i in range(4)])["data"]
batch = {k: (v.to(dev) if torch.is_tensor(v) else [x.to(dev) for x in v]) for k, v in batch.items()}
losses = {}
with torch.no_grad():
    losses["eager"] = float(model(batch)["loss"])
    out["switched"] = apply(model.model, "sdpa")
    losses["sdpa"] = float(model(batch)["loss"])
out["first_batch_loss"] = dict(losses, rel_diff=abs(losses["sdpa"] - losses["eager"]) / abs(losses["eager"]),
                               real_tokens=int(batch["attention_mask"].sum()), padded=int(batch["attention_mask"].numel()))
print("EQUIVALENCE " + json.dumps(out))
"""


def equivalence(model: Path, cfg: Path, log: Path) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-c", EQUIVALENCE, str(model), str(cfg), str(ROOT)],
                          capture_output=True, text=True, env=env)  # fmt: skip
    log.write_text(proc.stdout + proc.stderr)
    for line in proc.stdout.splitlines():
        if line.startswith("EQUIVALENCE "):
            return json.loads(line[len("EQUIVALENCE "):])
    return dict(failed=True, log_tail=(proc.stdout + proc.stderr)[-3000:])


def table(rows: list[dict]) -> str:
    head = ("setting", "s/iter (median)", "samples/s", "real tokens/s", "padding", "tiles/sample",
            "data wait", "peak alloc GiB", "peak reserved GiB", "MFU", "HFU")  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.get("failed"):
            lines.append(f"| {r['name']} | failed{' (out of memory)' if r.get('oom') else ''} |" + " |" * (len(head) - 2))
            continue
        lines.append(f"| {r['name']} | {r['median_s_per_iter']:.3f} | {r['samples_per_s']:.2f} | "
                     f"{r['real_tokens_per_s']:,.0f} | {r['padding_share']:.1%} | {r['tiles_per_sample']:.2f} | {r['data_wait_share']:.1%} | "
                     f"{r['max_allocated_gib']:.1f} | {r['max_reserved_gib']:.1f} | {r['mfu']:.1%} | {r['hfu']:.1%} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/train_gpu"))
    ap.add_argument("--out", type=Path, default=Path("results/bench"))
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--iters", type=int, default=0, help="iterations per setting (0: one epoch, so every setting "
                    "trains on the same samples and samples/s compare)")  # fmt: skip
    ap.add_argument("--warmup", type=int, default=-1, help="iterations left out of the figures (-1: the first optimizer step)")
    ap.add_argument("--variants", default="{}", help='JSON {name: {train overrides}} run after (a) and (b)')
    ap.add_argument("--only", default="", help="comma-separated settings to run (default: all)")
    ap.add_argument("--skip-equivalence", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpu", action="store_true", help="dry run of this script: tiny model, CPU, LoRA")
    a = ap.parse_args(argv)
    import torch

    from vlmtune.model_builder import build

    a.out.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    gpu = "cpu (dry run)" if a.cpu else torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16.items() if k in gpu), 989.4e12)
    t0 = time.time()
    data, answers = make_samples(a.work / "data", a.samples, a.seed)
    model = a.work / "InternVL2-2B"
    if not (model / "config.json").exists():
        build(model, "tiny" if a.cpu else "full", seed=a.seed, corpus=answers)
    print(f"[bench] {gpu}; data + model in {time.time() - t0:.0f} s", flush=True)
    f = flop_model(model, STOCK["lora"]["r"])
    per_gpu_global = STOCK["batch_size"] * STOCK["accumulative_counts"]
    settings = {"a_stock": STOCK, "b_project": project_settings(per_gpu_global)}
    for name, over in json.loads(a.variants).items():
        settings[name] = {**settings["b_project"], **over}
    if a.cpu:
        cpu = dict(device="cpu", gpus=0, cpu_processes=1, deepspeed="none", method="lora", batch_size=2,
                   accumulative_counts=1, global_batch_size=None, dataloader_num_workers=0, lora=dict(r=8, alpha=16, dropout=0.05),
                   warmup_ratio=0.4)
        settings = {k: {**v, **cpu} for k, v in settings.items()}
    only = set(filter(None, a.only.split(",")))
    results = dict(gpu=gpu, peak_flops=peak, flop_model=f, torch=torch.__version__, samples=a.samples,
                   iters=a.iters, warmup=a.warmup, date=time.strftime("%Y-%m-%d"), settings=settings, runs=[])  # fmt: skip
    for name, s in settings.items():
        if only and name not in only:
            continue
        run = run_setting(name, s, model, data, a.work, a.iters, 0 if a.cpu else 1)
        row = summarise_run(run, f, a.warmup, peak)
        row["wall_s"] = run["wall_s"]
        results["runs"].append(row)
        print(f"[bench] {name}: " + json.dumps({k: v for k, v in row.items() if k != "log_tail"}), flush=True)
        if row.get("failed"):
            print(row["log_tail"][-1500:], flush=True)
        if name == "b_project" and not a.skip_equivalence:
            results["equivalence"] = equivalence(model, Path(run["dir"]) / "cfg.py", a.out / "equivalence.log")
            print("[bench] equivalence: " + json.dumps(results["equivalence"])[:1500], flush=True)
        (a.out / "train_gpu.json").write_text(json.dumps(results, indent=1, default=str))  # partial results survive a kill
    ok = {r["name"]: r for r in results["runs"] if not r.get("failed")}
    print("\n" + table(results["runs"]))
    if "a_stock" in ok:
        for name, r in ok.items():
            if name != "a_stock":
                print(f"{name}: {r['samples_per_s'] / ok['a_stock']['samples_per_s']:.2f}x the stock samples/s, "
                      f"{r['real_tokens_per_s'] / ok['a_stock']['real_tokens_per_s']:.2f}x its real tokens/s")
    eq = results.get("equivalence")
    if eq and not eq.get("failed"):
        rnd, full, loss = eq["random_inputs_bf16"], eq["random_inputs_fp32"], eq["first_batch_loss"]
        print(f"equivalence: SDPA vs original attention, rel. err. in bf16: ViT layer {rnd['vit_attention']:.2e}, "
              f"LLM layer {rnd['llm_attention']:.2e} (limit 1e-2: "
              f"{'pass' if max(rnd['vit_attention'], rnd['llm_attention']) <= 1e-2 else 'FAIL'}); whole LLM, right-padded "
              f"batch without mask: {full['llm_model_right_padded']:.2e} in fp32 "
              f"({'pass' if full['llm_model_right_padded'] <= 1e-4 else 'FAIL'} at 1e-4; bf16: {rnd['llm_model_right_padded']:.2e}); "
              f"first-batch loss eager {loss['eager']:.5f} vs sdpa {loss['sdpa']:.5f}, rel. diff {loss['rel_diff']:.2e} "
              f"({'pass' if loss['rel_diff'] <= 1e-2 else 'FAIL'})")  # fmt: skip
    elif eq:
        print("equivalence FAILED to run:\n" + eq["log_tail"][-1500:])
    (a.out / "train_gpu.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
