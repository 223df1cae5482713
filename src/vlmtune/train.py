"""Launch XTuner training: ``torchrun`` over ``xtuner.tools.train`` (through
``vlmtune.xtuner_main``), one process per GPU (or ``cpu_processes`` gloo processes on CPU),
with DeepSpeed on GPUs. Not the ``xtuner train`` CLI, which ignores its child's exit status.

The work dir is kept outside the rule's outputs, so checkpoints survive a failed job and the
next attempt resumes from ``work_dir/last_checkpoint``. On success the final checkpoint is
recorded in ``train_result.json``; any failure exits non-zero.

    python -m vlmtune.train --config results/xtuner/my/xtuner_config.py \
        --work-dir results/train/my/work_dir --gpus 4 --deepspeed zero1 \
        --result results/train/my/train_result.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from .atomic import write_json


def last_checkpoint(work_dir: Path) -> Path | None:
    """The checkpoint XTuner's ``last_checkpoint`` marker in ``work_dir`` names, if it exists; else None."""
    marker = Path(work_dir) / "last_checkpoint"
    if not marker.is_file():
        return None
    path = Path(marker.read_text().strip())
    return path if path.exists() else None


def checkpoint_iteration(path: Path) -> int:
    """The iteration of an XTuner checkpoint path (``iter_<n>.pth``); ValueError for any other name."""
    match = re.search(r"iter_(\d+)\.pth$", str(path))
    if not match:
        raise ValueError(f"not an XTuner iteration checkpoint: {path}")
    return int(match.group(1))


def command(
    config: Path,
    work_dir: Path,
    nproc: int,
    deepspeed: str | None,
    resume: Path | None = None,
    nnodes: int = 1,
    rdzv_endpoint: str | None = None,
    node_rank: int | None = None,
) -> list[str]:
    """The ``torchrun`` command that runs ``vlmtune.xtuner_main`` with ``config`` in ``work_dir``:
    ``nproc`` processes per node (GPUs, or CPU processes), DeepSpeed ``deepspeed`` (None or
    ``none``: no DeepSpeed), resuming from ``resume``; with ``nnodes`` > 1 a c10d rendezvous at
    ``rdzv_endpoint`` (ValueError without one)."""
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if nnodes > 1:
        if not rdzv_endpoint:
            raise ValueError("multi-node training needs a rendezvous endpoint (host:port)")
        cmd += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}"]
        if node_rank is not None:
            cmd += [f"--node-rank={node_rank}"]
    else:
        cmd += ["--standalone", "--nnodes=1"]
    cmd += [
        f"--nproc-per-node={nproc}",
        "-m",
        "vlmtune.xtuner_main",
        str(config),
        "--work-dir",
        str(work_dir),
        "--launcher",
        "pytorch",
    ]
    if deepspeed and deepspeed != "none":
        cmd += ["--deepspeed", f"deepspeed_{deepspeed}"]
    if resume is not None:
        cmd += ["--resume", str(resume)]
    return cmd


def gpu_types(gpus: int) -> list[str]:
    """Names of the GPUs this job trained on (for train_summary.json and provenance)."""
    if gpus <= 0:
        return []
    import torch

    return [torch.cuda.get_device_name(i) for i in range(min(gpus, torch.cuda.device_count()))]


def run_fingerprint(config: Path, inputs: list[Path] = ()) -> str:
    """What a run's checkpoints belong to: the rendered config and the content of what it
    reads. The config names the data and model by path only, so a changed conversion or model
    revision must enter through ``inputs`` (the training file, the plan, the model folder,
    represented by its fetch manifest of sha256s)."""
    digest = hashlib.sha256(Path(config).read_bytes())
    for item in map(Path, inputs):
        if item.is_dir():
            manifest = item / "manifest.json"
            parts = [manifest] if manifest.is_file() else sorted(p for p in item.rglob("*") if p.is_file())
        else:
            parts = [item]
        for part in parts:
            digest.update(str(part.relative_to(item) if item.is_dir() else part.name).encode() + b"\0")
            with open(part, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def claim_work_dir(work_dir: Path, config: Path, inputs: list[Path] = ()) -> None:
    """Resume only checkpoints of the same rendered config and inputs: a work dir left by
    another config (say, a changed lr) or other data is moved aside, never deleted, and
    training starts afresh."""
    digest = run_fingerprint(config, inputs)
    stamp = work_dir / "config.sha256"
    if work_dir.exists() and (not stamp.is_file() or stamp.read_text().strip() != digest):
        if any(work_dir.iterdir()):
            old = work_dir.with_name(f"{work_dir.name}.superseded")
            if old.exists():
                shutil.rmtree(old)
            os.replace(work_dir, old)
            print(
                f"[vlmtune.train] the config or its inputs changed: previous checkpoints moved to {old}",
                flush=True,
            )
    work_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(digest + "\n")


# Each node's srun task announces itself before it becomes that node's torchrun, so the job's
# log shows which host ran which node's processes (with srun --label: "<task>: ...").
NODE_BANNER = (
    'echo "[vlmtune.train] node $(hostname) (Slurm node ${SLURMD_NODENAME:-?}, '
    'index ${SLURM_NODEID:-?}) starts torchrun"; exec "$@"'
)


def rendezvous_port(job_id: str | None = None, base: int = 29500) -> int:
    """A port per Slurm job (base + job id mod 1000): jobs sharing a first node, or a retried
    job starting while its predecessor's port is still held, do not collide."""
    job_id = job_id if job_id is not None else os.environ.get("SLURM_JOB_ID", "")
    return base + int(job_id) % 1000 if job_id.isdigit() else base


# What an `srun` inside a step keeps of the step's environment: the job's identity only. The
# rest describes the step the workflow runs in (the Slurm executor's `srun -n1`, one node),
# and srun would take it for the allocation ("Only allocated 1 nodes asked for 2").
SLURM_IDENTITY = {
    "SLURM_JOB_ID",
    "SLURM_JOBID",
    "SLURM_CLUSTER_NAME",
    "SLURM_CONF",
    "SLURM_SUBMIT_DIR",
    "SLURM_SUBMIT_HOST",
}


def job_hosts(job_id: str) -> list[str]:
    """The hosts of the whole job, from the controller: inside the executor's step,
    SLURM_JOB_NODELIST names only the step's node."""
    record = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True
    ).stdout
    nodelist = re.search(r"(?:^|\s)NodeList=(\S+)", record)
    if not nodelist or nodelist.group(1) == "(null)":
        raise SystemExit(f"Slurm job {job_id} has no node list yet: {record.strip()}")
    return subprocess.run(
        ["scontrol", "show", "hostnames", nodelist.group(1)], capture_output=True, text=True, check=True
    ).stdout.split()


def srun_env(env: dict) -> dict:
    """``env`` without the Slurm variables of the batch step that would make ``srun`` inherit the wrong job
    step."""
    return {
        k: v
        for k, v in env.items()
        if not (k.startswith(("SRUN_", "SBATCH_")) or (k.startswith("SLURM_") and k not in SLURM_IDENTITY))
    }


def slurm_launch(nodes: int, port: int | None = None) -> tuple[list[str], str]:
    """For a job over several nodes: the `srun` prefix that starts one torchrun per node
    (sharing the step the workflow runs in, hence --overlap; one node failing ends the
    others, --kill-on-bad-exit; each task with the step's CPUs) and the rendezvous endpoint
    on the job's first node. Run it with srun_env(): srun then asks the controller for the
    job's allocation."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        raise SystemExit(
            f"train.nodes is {nodes}: multi-node training runs inside a Slurm job "
            "(--profile profiles/slurm); SLURM_JOB_ID is not set"
        )
    hosts = job_hosts(job_id)
    if len(hosts) < nodes:
        raise SystemExit(f"train.nodes is {nodes} but the Slurm job holds {len(hosts)} node(s): {hosts}")
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    srun = [
        "srun",
        "--overlap",
        f"--nodes={nodes}",
        f"--ntasks={nodes}",
        "--ntasks-per-node=1",
        *([f"--cpus-per-task={cpus}"] if cpus else []),
        "--kill-on-bad-exit=1",
        "--label",
        "sh",
        "-c",
        NODE_BANNER,
        "vlmtune-node",
    ]
    return srun, f"{hosts[0]}:{rendezvous_port(job_id) if port is None else port}"


def run(
    config: Path,
    work_dir: Path,
    result: Path,
    gpus: int,
    cpu_processes: int = 1,
    deepspeed: str | None = None,
    plan: Path | None = None,
    summary: Path | None = None,
    curves: Path | None = None,
    nodes: int = 1,
    inputs: list[Path] = (),
) -> dict:
    """Train with XTuner: run ``command`` (through ``srun`` over ``nodes`` nodes when > 1) on the
    rendered ``config`` in ``work_dir``, resuming from the last checkpoint there, and write
    ``result`` (``train_result.json``: final checkpoint, iteration, processes, global batch) and,
    when given, ``summary``/``curves`` from the training log. ``gpus`` per node (0: CPU with
    ``cpu_processes`` processes), ``plan`` is the renderer's iteration plan, ``inputs`` the files
    the work folder is claimed for (a work folder of other inputs is refused). Returns the result;
    SystemExit if training fails (checkpoints are kept) or leaves no checkpoint."""
    work_dir = Path(work_dir)
    claim_work_dir(work_dir, config, [*([plan] if plan else []), *inputs])
    p = json.loads(Path(plan).read_text()) if plan is not None else None
    resume = last_checkpoint(work_dir)
    nproc = gpus if gpus > 0 else cpu_processes
    if nodes > 1:
        srun, endpoint = slurm_launch(nodes)
        cmd = srun + command(config, work_dir, nproc, deepspeed, resume, nnodes=nodes, rdzv_endpoint=endpoint)
    else:
        cmd = command(config, work_dir, nproc, deepspeed, resume)
    if p is not None:
        print(
            f"[vlmtune.train] plan: {p['world_size']} process(es) x batch {p['batch_size']} x "
            f"accumulation {p['accumulative_counts']} = global batch {p['global_batch_size']}; "
            f"{p['samples']} samples -> {p['iterations']} iterations "
            f"({p['warmup_iterations']} warmup)",
            flush=True,
        )
    if resume is not None:
        print(f"[vlmtune.train] resuming from {resume}", flush=True)
    print("[vlmtune.train] " + " ".join(cmd), flush=True)
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1", PYTHONUNBUFFERED="1")
    if nodes > 1:
        env = srun_env(env)
        # torchrun's agents log the rendezvous result (group rank, global ranks) at INFO
        env.setdefault("LOGLEVEL", "INFO")
    if gpus == 0:
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise SystemExit(
            f"training failed with exit status {proc.returncode}; "
            f"checkpoints in {work_dir} are kept and the next run resumes from them"
        )
    final = last_checkpoint(work_dir)
    if final is None:
        raise SystemExit(f"training exited 0 but left no checkpoint in {work_dir}")
    out = dict(
        checkpoint=str(final.resolve()),
        iteration=checkpoint_iteration(final),
        work_dir=str(work_dir.resolve()),
        resumed_from=str(resume) if resume else None,
    )
    if p is not None:
        # XTuner counts micro-batch iterations: with accumulation (which global_batch_size
        # adjusts to the process count) the comparable figure is the optimizer step.
        out.update(
            processes=nproc * nodes,
            nodes=nodes,
            global_batch_size=p["global_batch_size"],
            accumulative_counts=p["accumulative_counts"],
            optimizer_steps=out["iteration"] // p["accumulative_counts"],
        )
    if summary is not None and curves is not None:
        from .telemetry import write_summary

        out["summary"] = write_summary(
            work_dir,
            summary,
            curves,
            extra=dict(
                gpus=gpus,
                processes=nproc * nodes,
                nodes=nodes,
                deepspeed=deepspeed,
                gpu_types=gpu_types(gpus),
                plan=p,
            ),
        )
    write_json(result, out)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, type=Path)
    ap.add_argument("--work-dir", required=True, type=Path)
    ap.add_argument("--result", required=True, type=Path)
    ap.add_argument("--plan", type=Path)
    ap.add_argument("--summary", type=Path, help="train_summary.json (from vis_data/scalars.json)")
    ap.add_argument("--curves", type=Path, help="PNG of the loss and learning-rate curves")
    ap.add_argument("--gpus", type=int, default=0)
    ap.add_argument("--nodes", type=int, default=1, help="> 1: one torchrun per node of the Slurm job")
    ap.add_argument("--cpu-processes", type=int, default=1)
    ap.add_argument(
        "--inputs",
        type=Path,
        nargs="*",
        default=[],
        help="training data file and model folder: checkpoints of other content are not resumed",
    )
    ap.add_argument(
        "--deepspeed",
        default="none",
        choices=["none", "zero1", "zero2", "zero2_offload", "zero3", "zero3_offload"],
    )
    a = ap.parse_args(argv)
    out = run(
        a.config,
        a.work_dir,
        a.result,
        a.gpus,
        a.cpu_processes,
        a.deepspeed,
        a.plan,
        a.summary,
        a.curves,
        a.nodes,
        a.inputs,
    )
    print(f"[vlmtune.train] done: iteration {out['iteration']}, checkpoint {out['checkpoint']}")


if __name__ == "__main__":
    main()
