"""Per-iteration training figures, written by an mmengine hook to ``work_dir/iterations.jsonl``
(rank 0): wall time since the previous iteration ended (data loading and hooks included; device
synchronised) and the model step alone, samples, image tiles, real and
padded token counts of the micro-batch, each sample's real length (for the attention FLOPs),
loss, and the peak GPU memory so far. Enabled by ``train.iteration_log``; the launcher
(``vlmtune.xtuner_main``) registers the hook. ``summarise()`` turns the file into throughput
figures (used by ``benchmarks/train_gpu.py``).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

FILE = "iterations.jsonl"


def hook_class():
    """The hook class (built lazily: importing mmengine imports torch, and the launcher sets
    allocator options before that)."""
    import torch
    from mmengine.dist import get_rank
    from mmengine.hooks import Hook

    class IterationLogHook(Hook):
        # first among the hooks: mmengine's logger resets the CUDA peak-memory counters each
        # time it logs, so the peak is read before it does
        priority = "HIGHEST"

        def __init__(self):
            self._start = None
            self._last_end = None
            self._path = None

        def _sync(self):
            if torch.cuda.is_available():
                torch.cuda.synchronize()

        def before_train_iter(self, runner, batch_idx, data_batch=None):
            self._sync()
            self._start = time.perf_counter()

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            self._sync()
            end = time.perf_counter()
            step_seconds = end - self._start
            seconds = end - (self._last_end if self._last_end is not None else self._start)
            self._last_end = end
            if get_rank() != 0:
                return
            data = data_batch["data"]
            mask = data["attention_mask"]
            pixels = data["pixel_values"]
            # a list of (tiles, 3, H, W), or one (batch, tiles, 3, H, W) when all samples tile alike
            if isinstance(pixels, (list, tuple)):
                tiles = sum(int(p.shape[0]) if p.ndim == 4 else 1 for p in pixels)
            else:
                tiles = int(pixels.shape[0] * pixels.shape[1]) if pixels.ndim == 5 else int(pixels.shape[0])
            loss = outputs.get("loss") if isinstance(outputs, dict) else None
            cuda = torch.cuda.is_available()
            record = dict(
                iteration=runner.iter + 1,
                seconds=seconds,
                step_seconds=step_seconds,
                samples=int(mask.shape[0]),
                tiles=tiles,
                real_tokens=int(mask.sum()),
                padded_tokens=int(mask.numel()),
                lengths=[int(n) for n in mask.sum(dim=1).tolist()],
                loss=float(loss) if loss is not None else None,
                max_allocated=torch.cuda.max_memory_allocated() if cuda else None,
                max_reserved=torch.cuda.max_memory_reserved() if cuda else None,
            )
            if self._path is None:
                self._path = Path(runner.work_dir) / FILE
                self._path.write_text("")
            with self._path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")

    return IterationLogHook


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def summarise(records: list[dict], warmup: int) -> dict:
    """Throughput after ``warmup`` iterations: median seconds per iteration, and samples/s and
    real tokens/s over the measured window (totals over the total wall time, data loading
    included, so optimizer steps and long micro-batches weigh in by their real cost)."""
    window = records[warmup:]
    if not window:
        raise ValueError(f"{len(records)} iteration(s) logged, none left after {warmup} warm-up iteration(s)")
    seconds = sum(r["seconds"] for r in window)
    real = sum(r["real_tokens"] for r in window)
    padded = sum(r["padded_tokens"] for r in window)
    return dict(
        iterations=len(window),
        warmup=warmup,
        median_s_per_iter=statistics.median(r["seconds"] for r in window),
        data_wait_share=1 - sum(r.get("step_seconds", r["seconds"]) for r in window) / seconds,
        samples_per_s=sum(r["samples"] for r in window) / seconds,
        real_tokens_per_s=real / seconds,
        padding_share=1 - real / padded,
        tiles_per_sample=sum(r["tiles"] for r in window) / sum(r["samples"] for r in window),
        max_allocated_gib=max((r["max_allocated"] or 0) for r in records) / 2**30,
        max_reserved_gib=max((r["max_reserved"] or 0) for r in records) / 2**30,
        first_loss=records[0]["loss"],
        seconds=seconds,
    )
