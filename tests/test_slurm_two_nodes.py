"""Multi-node training on a real two-node Slurm (tests/slurm_cluster.py TwoNodeSlurm: two
slurmd in two network namespaces joined by a veth pair, each node with its own address and
hostname). The demo's training runs as ONE Slurm job over both nodes (`train.nodes: 2`, one
CPU process per node, gloo): the executor's step starts one torchrun per node through srun,
both meet at a c10d rendezvous on the first node. The job is cancelled after its first
checkpoint; the profile's retry resumes it on both nodes. Its checkpoints are compared with a
one-node run of 2 processes at the same global batch."""

import json
import os
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from slurm_cluster import DAEMONS, TwoNodeSlurm, running
from test_slurm import copy_workflow, job_blocks, resources, snakemake, submission

DEMO = "config/demo.yaml"
# 2 epochs of 28 samples at global batch 2: 28 iterations, a checkpoint every 3, all kept.
# One CPU per process: both runs' 2 processes get a core each of this 2-core machine, and the
# same thread count, which the bitwise comparison needs (docs/machines.md: the CPU run is
# deterministic for a fixed seed and thread count).
COMMON = {
    "batch_size": 1,
    "max_epochs": 2,
    "save_steps": 3,
    "save_total_limit": -1,
    "cpus_per_task": 1,
    "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
}
TWO_NODES = {**COMMON, "nodes": 2, "cpu_processes": 1}
ONE_NODE = {**COMMON, "nodes": 1, "cpu_processes": 2}
TRAIN = "results/train/demo"
LORA_RTOL = 0  # bitwise: 2-rank gloo sums (a+b) do not depend on which host holds which rank


def overlay(workdir, name, train):
    path = workdir / "config" / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"train": train}))
    return str(path.relative_to(workdir))


def slurm_profile(workdir):
    """The test's workflow profile over profiles/slurm (as tests/test_slurm.py's)."""
    profile = yaml.safe_load((workdir / "profiles/slurm/config.yaml").read_text())
    folder = workdir / "two-node-profile"
    folder.mkdir()
    (folder / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "set-resources": profile.get("set-resources", {}),
                "slurm-status-command": "squeue",  # no slurmdbd
                "slurm-init-seconds-before-status-checks": 2,
                "latency-wait": 5,
            }
        )
    )
    return str(folder)


def train_log(workdir):
    return next(workdir.glob("logs/**/train.log"))


def lora(path):
    import torch

    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if "lora_" in k}


def nodes_and_ranks(log):
    """From a two-node attempt's log (srun --label): srun task -> the host it announced, and
    task -> the global ranks and world size its torchrun agent got at the rendezvous."""
    hosts = dict(re.findall(r"^(\d+): \[vlmtune\.train\] node (\S+) ", log, re.M))
    ranks = {
        task: json.loads(r) for task, r in re.findall(r"^(\d+): .*\]\s+global_ranks=(\[[\d, ]*\])", log, re.M)
    }
    worlds = set(re.findall(r"^\d+: .*\]\s+group_world_size=(\d+)", log, re.M))
    return hosts, ranks, worlds


def run_two_node_training(workdir, cluster, config, timeout=600):
    """Snakemake under profiles/slurm, submitting from the first node, with the training job
    cancelled once it has saved a checkpoint. Returns Snakemake's log, the cancelled job id,
    the first attempt's training log (copied before the retry overwrites it) and the
    `scontrol show job` of every training job, read while the cluster is still up."""
    env = dict(
        os.environ,
        SLURM_PARTITION=cluster.partition,
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    )
    cmd = cluster.client(
        [
            sys.executable,
            "-m",
            "snakemake",
            "--profile",
            "profiles/slurm",
            "--workflow-profile",
            slurm_profile(workdir),
            "--configfile",
            DEMO,
            config,
            "--",
            f"{TRAIN}/train_result.json",
        ]
    )
    out = workdir / "snakemake-slurm.log"
    marker = workdir / TRAIN / "work_dir" / "last_checkpoint"
    cancelled, first_log, deadline = None, "", time.time() + timeout
    with out.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=workdir, stdout=fh, stderr=subprocess.STDOUT, env=env)
        try:
            while proc.poll() is None and time.time() < deadline:
                if cancelled is None and marker.exists():
                    queue = subprocess.run(
                        cluster.client(["squeue", "-h", "-t", "R", "-o", "%i %k"]),
                        capture_output=True,
                        text=True,
                    ).stdout
                    jobs = [line.split()[0] for line in queue.splitlines() if "rule_train" in line]
                    if jobs:
                        subprocess.run(cluster.client(["scancel", jobs[0]]), check=True)
                        cancelled = jobs[0]
                        time.sleep(1)  # the cancelled torchruns' last words
                        first_log = train_log(workdir).read_text()
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                proc.kill()
    log = out.read_text()
    assert proc.wait() == 0, log[-6000:] + cluster.logs()
    ids = re.findall(r"SLURM jobid (\d+)", log)
    records = {
        i: subprocess.run(
            cluster.client(["scontrol", "show", "job", i]), capture_output=True, text=True
        ).stdout
        for i in ids
    }
    return log, cancelled, first_log, records


def gpu_spread_check(workdir, cluster):
    """The sbatch line the plugin builds for a 2-node GPU training job (one fake GPU per node),
    submitted to the cluster with a script that starts the step as the executor does and then
    vlmtune.train's per-node srun: each node's process must see its own node's GPU."""
    path = overlay(
        workdir,
        "gpu-two-nodes",
        {"nodes": 2, "gpus": 1, "gpu_model": cluster.gpu_model, "mem_mb": 1000, "cpus_per_task": 1},
    )
    out = snakemake(
        workdir,
        "-n",
        "--profile",
        "profiles/slurm",
        "--configfile",
        path,
        "--",
        "results/merged/InternVL2-2B-my",
    ).stdout
    res = resources(job_blocks(out)["train"])
    sbatch = submission(res, threads=1)
    assert (
        "--nodes=2" in sbatch and f"--gres=gpu:{cluster.gpu_model}:1" in sbatch and "--gpus=" not in sbatch
    ), sbatch
    inner = (
        "import os, subprocess\n"
        "from vlmtune.train import slurm_launch, srun_env\n"
        "srun, endpoint = slurm_launch(2)\n"
        "print('rendezvous', endpoint, flush=True)\n"
        "subprocess.run(srun + ['sh', '-c', 'echo gpus=$CUDA_VISIBLE_DEVICES'], "
        "env=srun_env(dict(os.environ)), check=True)\n"
    )
    # as the executor's jobstep: srun -n1 with the job's identity only
    step = (
        f"from vlmtune.train import srun_env; import os, subprocess, sys; sys.exit(subprocess.run("
        f"['srun', '-n1', '--nodes=2', sys.executable, '-c', {inner!r}], "
        "env=srun_env(dict(os.environ))).returncode)"
    )
    script = workdir / "gpu-spread.sh"
    script.write_text(
        f"#!/bin/sh\nexport PYTHONPATH={ROOT / 'src'}\nexec {sys.executable} -c {shlex.quote(step)}\n"
    )
    log = workdir / "gpu-spread.out"
    args = shlex.split(sbatch)
    args = [a for a in args if a != "--parsable"]
    # the helper's stand-ins for the plugin's parameters: this cluster's partition, a real log/workdir
    args[args.index("-p") + 1] = cluster.partition
    args[args.index("--output") + 1] = str(log)
    args[args.index("-D") + 1] = str(workdir)
    proc = subprocess.run(
        cluster.client([*args, "--wait", str(script)]), capture_output=True, text=True, timeout=120
    )
    text = log.read_text() if log.exists() else ""
    assert proc.returncode == 0, proc.stdout + proc.stderr + text + cluster.logs()
    return text


@pytest.mark.slow
def test_two_node_training_resumes_and_equals_a_one_node_run(tmp_path):
    started = time.time()
    two = copy_workflow(tmp_path / "two-nodes")
    one = copy_workflow(tmp_path / "one-node")
    two_cfg, one_cfg = overlay(two, "two-nodes", TWO_NODES), overlay(one, "one-node", ONE_NODE)
    cluster = TwoNodeSlurm(tmp_path / "cluster", gpus=1)
    with ThreadPoolExecutor(1) as pool:
        # the one-node reference (2 gloo processes, 1 thread each) runs alongside
        reference = pool.submit(
            snakemake, one, "-j2", "--configfile", DEMO, one_cfg, "--", f"{TRAIN}/train_result.json"
        )
        # the training's inputs are made here; the cluster gets the training job alone
        snakemake(two, "-j1", "--configfile", DEMO, two_cfg, "--", "results/xtuner/demo/plan.json")
        try:
            cluster.start()
            log, cancelled, first_log, records = run_two_node_training(two, cluster, two_cfg)
            spread = gpu_spread_check(two, cluster)
        finally:
            cluster.stop()
        reference.result()
    print(f"\ntwo-node test: {time.time() - started:.0f} s")
    # torn down: no daemon, no namespace, nothing left in them
    assert not any(running(name) for name in DAEMONS), {name: running(name) for name in DAEMONS}
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in listed for ns in cluster.netns), listed

    # one training job over both nodes, cancelled after its first checkpoint, then resubmitted
    jobs = re.findall(r"SLURM jobid (\d+)", log)
    assert cancelled and len(jobs) == 2 and jobs[0] == cancelled, log[-4000:]
    assert "JobState=CANCELLED" in records[jobs[0]] and "JobState=COMPLETED" in records[jobs[1]], records
    for record in records.values():
        assert (
            "NumNodes=2 " in record
            and " NodeList=vn[1-2]" in record
            and f"Partition={cluster.partition}" in record
        ), record

    # both attempts: one torchrun per node, on two hosts, ranks 0 and 1 in one world of 2
    second_log = train_log(two).read_text()
    for attempt in (first_log, second_log):
        hosts, ranks, worlds = nodes_and_ranks(attempt)
        assert sorted(hosts.values()) == ["vn1", "vn2"] and hosts.keys() == ranks.keys(), attempt[-4000:]
        assert sorted(r for rs in ranks.values() for r in rs) == [0, 1] and worlds == {"2"}, attempt[-4000:]
        assert re.search(r"rdzv_endpoint\s*: vn1:\d+", attempt), attempt[-4000:]
        print("ranks by host:", {hosts[t]: ranks[t] for t in hosts})
    result = json.loads((two / TRAIN / "train_result.json").read_text())
    resumed = Path(result["resumed_from"] or "")
    assert re.fullmatch(r"iter_\d+\.pth", resumed.name), result
    assert f"[vlmtune.train] resuming from {result['resumed_from']}" in second_log
    # the resumed attempt's mmengine log: 2 processes, first logged step right after the checkpoint
    resumed_at = int(resumed.stem.split("_")[1])
    assert 0 < resumed_at < result["iteration"]
    steps = [int(s) for s in re.findall(r"Iter\(train\) \[\s*(\d+)/", second_log)]
    assert steps and steps[0] == resumed_at + 1 and steps[-1] == result["iteration"], steps
    run_logs = sorted((two / TRAIN / "work_dir").glob("*/*.log"))
    assert len(run_logs) == 2 and all("GPU number: 2" in p.read_text() for p in run_logs), run_logs

    # equal to the one-node 2-process run: same plan, iterations, and LoRA weights at every
    # checkpoint both kept (the cancelled attempt's, before the resume, and the resumed ones)
    ref = json.loads((one / TRAIN / "train_result.json").read_text())
    for key in ("iteration", "global_batch_size", "optimizer_steps", "processes"):
        assert result[key] == ref[key], (key, result, ref)
    assert (result["nodes"], ref["nodes"], result["global_batch_size"]) == (2, 1, 2)
    import torch

    shared = sorted(
        {p.name for p in (two / TRAIN / "work_dir").glob("iter_*.pth")}
        & {p.name for p in (one / TRAIN / "work_dir").glob("iter_*.pth")},
        key=lambda n: int(n[5:-4]),
    )
    assert resumed.name in shared and f"iter_{result['iteration']}.pth" in shared, shared
    worst = 0.0
    for name in shared:
        a, b = lora(two / TRAIN / "work_dir" / name), lora(one / TRAIN / "work_dir" / name)
        assert a.keys() == b.keys() and len(a) > 0
        for key in a:
            diff = (a[key] - b[key]).abs().max().item()
            worst = max(worst, diff / max(b[key].abs().max().item(), 1e-12))
            assert torch.allclose(a[key], b[key], rtol=LORA_RTOL, atol=0), f"{name} {key}: max |diff| {diff}"
    print(f"checkpoints compared: {shared}; worst relative LoRA difference {worst:.3g}")

    # GPUs per node: the plugin's sbatch line for a 2-node GPU job, on the real cluster
    hosts = dict(re.findall(r"^(\d+): \[vlmtune\.train\] node (\S+) ", spread, re.M))
    gpus = dict(re.findall(r"^(\d+): gpus=(\S*)$", spread, re.M))
    assert sorted(hosts.values()) == ["vn1", "vn2"] and gpus == {"0": "0", "1": "0"}, spread
    print("GPU job over 2 nodes:", {hosts[t]: f"CUDA_VISIBLE_DEVICES={gpus[t]}" for t in hosts})


def test_two_node_cluster_tears_down_on_failure(tmp_path):
    """A test failing while a job runs on both nodes: leaving the cluster's `with` block ends
    the daemons, the job's processes in both namespaces and the namespaces themselves."""
    cluster = TwoNodeSlurm(tmp_path / "cluster")
    job = None
    with pytest.raises(RuntimeError, match="test failed"):
        with cluster:
            job = subprocess.Popen(
                cluster.client(["srun", "--nodes=2", "--ntasks-per-node=1", "sleep", "600"]),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.time() + 30
            while time.time() < deadline and any(len(pids) < 3 for pids in cluster.namespace_pids().values()):
                time.sleep(0.2)  # the step's slurmstepd and sleep on each node
            busy = cluster.namespace_pids()
            assert all(len(pids) >= 3 for pids in busy.values()), busy
            raise RuntimeError("test failed")
    assert job.wait(timeout=20) is not None
    assert not any(running(name) for name in DAEMONS), {name: running(name) for name in DAEMONS}
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in listed for ns in cluster.netns), listed
    for pid in (pid for pids in busy.values() for pid in pids):  # gone, or a zombie awaiting its reaper
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z", (
            pid,
            stat.read_text(),
        )
