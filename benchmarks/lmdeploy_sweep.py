"""Where LMDeploy's evaluation time goes, and which engine settings move it (one GPU).

Each ``--run`` builds one ``vlmtune.lmdeploy_engine.LMDeployEngine`` (PyTorch back end) with the
given settings and times passes over the same records: the first (with the kernels' first-call
work), then ``repeats`` warm ones (median reported); with ``prefill_only`` it also times a warm
pass with one new token (image preprocessing, vision encoder and prefill, no decoding); with
``profile`` it sums the GPU's kernel and copy time in a warm pass (torch.profiler, this
process's only: the engine runs in its own process unless ``enable_mp_engine=false``) to tell
GPU work from waiting. Every timed pass also reports when the last request's prompt and tiles
were ready and NVML's mean GPU utilisation. ``--transformers`` batch sizes time the
transformers engine on the same records (after a one-batch warm-up) for the ratio.

    PYTHONPATH=src python benchmarks/lmdeploy_sweep.py --model M --eval eval.jsonl \
        --image-folder ds --out results/sweep \
        --run batch=64,threads=16,records=64,profile=1 \
        --run batch=128,threads=16,records=256,max_prefill_token_num=32768

Settings of a run: ``batch`` (max_batch_size), ``threads`` (image preprocessing workers),
``repeats`` (warm passes, default 1), ``records``, ``max_new_tokens``, ``prefill_only``,
``profile``, ``spy`` (py-spy samples this process and the engine's during the warm passes, into
``spy-<n>.txt`` of ``--out``: collapsed stacks per process and thread, idle ones included); any
other key is passed to LMDeploy's ``PytorchEngineConfig`` or ``LMDeployEngine``. Two undo
what ``LMDeployEngine`` changes in LMDeploy's own behaviour, for comparison: ``lmdeploy_detokenize=1``
(LMDeploy makes the text of each answer again) and ``trim_count=N`` (its engine trims host memory
every N image requests)
(``max_prefill_token_num``, ``prefill_interval``, ``eager_mode``, ``cache_max_entry_count``, ...).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from engine_parity import greedy_settings, transformers_throughput  # noqa: E402  (this folder)

from vlmtune.heldout import read_eval  # noqa: E402

OWN_KEYS = {
    "batch",
    "threads",
    "records",
    "repeats",
    "max_new_tokens",
    "prefill_only",
    "profile",
    "spy",
    "lmdeploy_detokenize",
    "trim_count",
}


def parse_run(text: str) -> dict:
    """``key=value,...`` with ints, floats and booleans (0/1 for the flags) read as such."""
    run = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if not value:
            raise SystemExit(f"[sweep] {item!r} in --run {text!r} is not key=value")
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                pass
        if value in ("true", "false"):
            value = value == "true"
        run[key.strip()] = value
    return run


def rounded(seconds: float | None) -> float | None:
    """Seconds to 0.01, None (not measured) kept."""
    return None if seconds is None else round(seconds, 2)


def timed(fn, *args) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


class GpuBusy:
    """Mean of NVML's GPU utilisation (share of time a kernel ran), sampled every 50 ms on a
    thread: it sees the engine's own process too, which torch.profiler here does not. None
    without NVML (nvidia-ml-py)."""

    def __init__(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle, self.nvml = pynvml.nvmlDeviceGetHandleByIndex(0), pynvml
        except Exception:  # no NVML: no figure
            self.nvml = None

    def __enter__(self):
        import threading

        self.samples, self.stop = [], threading.Event()

        def sample():
            while not self.stop.wait(0.05):
                self.samples.append(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)

        if self.nvml:
            self.thread = threading.Thread(target=sample, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.nvml:
            self.thread.join()

    @property
    def percent(self) -> float | None:
        return round(statistics.mean(self.samples), 1) if self.samples else None


def engine_pass(runner, records, image_folder) -> dict:
    """One timed pass: its seconds, when the last request's prompt (and image tiles) was ready,
    and the GPU's mean utilisation."""
    t = time.perf_counter()
    with GpuBusy() as busy:
        outputs = runner.generate(records, image_folder)
    seconds = time.perf_counter() - t
    built = max(runner.fed_at) - t if runner.fed_at else None
    return dict(s=seconds, outputs=outputs, last_prompt_built_s=built, gpu_util=busy.percent)


class PySpy:
    """py-spy sampling this process and its children (LMDeploy's engine) without pausing them,
    into ``path`` as collapsed stacks per process and thread, idle samples included."""

    def __init__(self, path: Path | None):
        self.path = path

    def __enter__(self):
        import subprocess

        if self.path:
            self.proc = subprocess.Popen(
                ["py-spy", "record", "--pid", str(os.getpid()), "--subprocesses", "--threads", "--idle",
                 "--nonblocking", "--rate", "200", "--format", "raw", "--output", str(self.path)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            time.sleep(1.0)  # py-spy attaches
        return self

    def __exit__(self, *exc):
        import signal

        if self.path:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            _, err = self.proc.communicate(timeout=60)
            print(f"[sweep] py-spy: {err.strip()[-300:]}", flush=True)


def kernel_seconds(fn, *args) -> tuple[float, float]:
    """Wall seconds of ``fn(*args)`` and the summed device time (kernels, copies) within it."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        fn(*args)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    busy = sum(e.self_device_time_total for e in prof.key_averages()) / 1e6
    return wall, busy


def lmdeploy_run(a, index: int, run: dict, eval_records: list[dict]) -> dict:
    import torch
    from lmdeploy import GenerationConfig

    from vlmtune.lmdeploy_engine import TRIM_COUNT_VARIABLE, LMDeployEngine

    records = eval_records[: int(run.get("records", 64))]
    if len(records) < int(run.get("records", 64)):
        raise SystemExit(f"[sweep] {a.eval} holds {len(records)} records, fewer than {run['records']}")
    options = {k: v for k, v in run.items() if k not in OWN_KEYS}
    gen = greedy_settings(int(run.get("max_new_tokens", 128)))
    os.environ.pop(TRIM_COUNT_VARIABLE, None)  # LMDeployEngine's default unless the run sets one
    if "trim_count" in run:
        os.environ[TRIM_COUNT_VARIABLE] = str(run["trim_count"])
    t, runner = timed(
        lambda: LMDeployEngine(
            a.model,
            gen,
            8192,
            int(run.get("batch", 64)),
            "pytorch",
            preprocess_threads=int(run.get("threads", 1)),
            **options,
        )
    )
    if run.get("lmdeploy_detokenize"):
        del runner.pipe.async_engine.tokenizer.detokenize_incrementally  # LMDeploy's own method again
    row = dict(run, records=len(records), build_s=round(t, 1))
    passes = [engine_pass(runner, records, a.image_folder)]
    spy = a.out / f"spy-{index}.txt" if run.get("spy") else None
    with PySpy(spy):
        passes += [engine_pass(runner, records, a.image_folder) for _ in range(int(run.get("repeats", 1)))]
    outputs = passes[1]["outputs"]
    warm = statistics.median(p["s"] for p in passes[1:])
    row.update(
        first_pass_s=round(passes[0]["s"], 2),
        warm_passes_s=[round(p["s"], 2) for p in passes[1:]],
        warm_pass_s=round(warm, 2),
        last_prompt_built_s=[rounded(p["last_prompt_built_s"]) for p in passes[1:]],
        gpu_util_percent=[p["gpu_util"] for p in passes[1:]],
        prompts_per_s_warm=round(len(records) / warm, 2),
        prompt_tokens=sum(r["prompt_tokens"] for r in outputs),
        completion_tokens=sum(r["completion_tokens"] for r in outputs),
    )
    if run.get("profile"):
        wall, busy = kernel_seconds(runner.generate, records, a.image_folder)
        row.update(profiled_pass_s=round(wall, 2), gpu_kernel_s=round(busy, 2))
    if run.get("prefill_only"):
        full = runner.gen_config
        runner.gen_config = GenerationConfig(max_new_tokens=1, do_sample=False)
        runner.generate(records, a.image_folder)  # the one-token shape's first call
        one = engine_pass(runner, records, a.image_folder)
        row.update(
            prefill_only_pass_s=round(one["s"], 2),
            prefill_only_last_prompt_built_s=rounded(one["last_prompt_built_s"]),
            prefill_only_gpu_util_percent=one["gpu_util"],
        )
        runner.gen_config = full
    runner.close()
    del runner
    gc.collect()
    torch.cuda.empty_cache()
    return row


def transformers_run(a, batch: int, records: list[dict]) -> dict:
    import torch

    from vlmtune.transformers_engine import TransformersEngine

    engine = TransformersEngine(a.model, greedy_settings(128))
    row = transformers_throughput(engine, records, a.image_folder, batch)[0]
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return dict(engine="transformers", records=len(records), **row)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--eval", required=True, type=Path)
    ap.add_argument("--image-folder", required=True, type=Path)
    ap.add_argument("--run", action="append", default=[], type=parse_run, help="key=value,... (see above)")
    ap.add_argument("--transformers", default="", help="batch sizes, comma-separated")
    ap.add_argument("--transformers-records", type=int, default=64)
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    records = read_eval(a.eval, max(int(r.get("records", 64)) for r in a.run + [{}]))
    rows = []

    def keep(row: dict) -> None:
        rows.append(row)
        print(f"[sweep] {json.dumps(row)}", flush=True)
        (a.out / "lmdeploy_sweep.json").write_text(json.dumps(rows, indent=1))

    for index, run in enumerate(a.run):
        try:
            keep(dict(engine="lmdeploy", **lmdeploy_run(a, index, run, records)))
        except Exception as e:  # keep the other runs' figures
            keep(dict(engine="lmdeploy", run=run, error=f"{type(e).__name__}: {e}"))
    for batch in filter(None, a.transformers.split(",")):
        keep(transformers_run(a, int(batch), records[: a.transformers_records]))


if __name__ == "__main__":
    main()
