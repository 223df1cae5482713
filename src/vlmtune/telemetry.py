"""Training telemetry from XTuner/mmengine's ``vis_data/scalars.json``: loss and learning-rate
curves as a PNG and ``train_summary.json`` (seconds per iteration, data time, peak memory).

    python -m vlmtune.telemetry --work-dir results/train/my/work_dir \
        --summary results/train/my/train_summary.json --png results/train/my/curves.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from .atomic import atomic_file, write_json


def read_scalars(work_dir: Path) -> list[dict]:
    """Every logged iteration, across resumed attempts (a later attempt's value wins)."""
    rows: dict[int, dict] = {}
    for path in sorted(Path(work_dir).glob("*/vis_data/scalars.json")):
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if "step" in row and "loss" in row:
                    rows[int(row["step"])] = row
    return [rows[k] for k in sorted(rows)]


def summarise(rows: list[dict], skip_first: int = 1) -> dict:
    timed = rows[skip_first:] or rows
    times = [r["time"] for r in timed if "time" in r]
    data = [r["data_time"] for r in timed if "data_time" in r]
    memory = [r["memory"] for r in rows if "memory" in r]
    return dict(
        logged_iterations=len(rows),
        last_iteration=rows[-1]["step"] if rows else None,
        final_loss=rows[-1]["loss"] if rows else None,
        median_seconds_per_iteration=statistics.median(times) if times else None,
        median_data_seconds=statistics.median(data) if data else None,
        peak_memory_mb=max(memory) if memory else None,  # mmengine logs MB of CUDA memory
    )


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    ax_loss.plot(steps, [r["loss"] for r in rows], marker=".", lw=1)
    ax_loss.set_ylabel("loss")
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(steps, [r.get("lr", float("nan")) for r in rows], color="tab:orange", lw=1)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("iteration")
    ax_lr.grid(alpha=0.3)
    fig.suptitle("training loss and learning rate")
    fig.tight_layout()
    with atomic_file(png, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)


def write_summary(work_dir: Path, summary: Path, png: Path, extra: dict | None = None) -> dict:
    rows = read_scalars(work_dir)
    if not rows:
        raise SystemExit(f"no logged iterations in {work_dir}/*/vis_data/scalars.json")
    out = {**summarise(rows), **(extra or {})}
    write_json(summary, out)
    plot(rows, png)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work-dir", required=True, type=Path)
    ap.add_argument("--summary", required=True, type=Path)
    ap.add_argument("--png", required=True, type=Path)
    a = ap.parse_args(argv)
    print(json.dumps(write_summary(a.work_dir, a.summary, a.png)))


if __name__ == "__main__":
    main()
