"""Cluster execution: the Slurm profile's resources in dry runs, the generated 2-node
submission, and the demo workflow on a real single-node Slurm (tests/slurm_cluster.py) whose
outputs must equal a local run's."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import ROOT
from slurm_cluster import DAEMONS, SingleNodeSlurm, running

COPIED = ["Snakefile", "workflow", "config", "envs", "src", "profiles", "requirements"]


def copy_workflow(dest):
    dest.mkdir(parents=True, exist_ok=True)
    for item in COPIED:
        src = ROOT / item
        if src.exists():
            (shutil.copytree if src.is_dir() else shutil.copy)(src, dest / item)
    return dest


def snakemake(workdir, *args, env=None, check=True):
    # rules call `python`: the interpreter running the tests (make test puts it first on PATH;
    # Slurm jobs inherit this environment through sbatch --export=ALL)
    env = dict(env or os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", *args], cwd=workdir, capture_output=True, text=True, env=env
    )
    if check and proc.returncode != 0:
        logs = (
            "\n".join(f"== {p}\n{p.read_text()[-3000:]}" for p in sorted((workdir / "logs").rglob("*.log")))
            if (workdir / "logs").exists()
            else ""
        )
        raise AssertionError(proc.stdout[-6000:] + proc.stderr[-6000:] + logs)
    return proc


def job_blocks(dry_run_output):
    """rule name -> its block in a dry run's listing."""
    return {
        m.group(1): m.group(2)
        for m in re.finditer(r"^(?:local)?rule (\w+):\n(.*?)(?=\n\n|\Z)", dry_run_output, re.S | re.M)
    }


LOCAL_RULES = """
import sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings
with SnakemakeApi(OutputSettings()) as api:
    wf = api.workflow(resource_settings=ResourceSettings(), snakefile=Path("Snakefile"),
                      config_settings=ConfigSettings(configfiles=[Path(p) for p in sys.argv[1:]]))
    print(" ".join(sorted(wf._workflow._localrules)))
"""


def local_rules(workdir, *configfiles):
    """The workflow's `localrules` (a dry run prints every job as local, so ask the parsed
    workflow; Snakemake keeps them in Workflow._localrules)."""
    proc = subprocess.run(
        [sys.executable, "-c", LOCAL_RULES, *configfiles], cwd=workdir, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return set(proc.stdout.split())


def resources(block):
    line = next(l for l in block.splitlines() if l.strip().startswith("resources:"))
    pairs = [p.split("=", 1) for p in line.split("resources:", 1)[1].split(", ")]
    return {k.strip(): v.strip() for k, v in pairs}


@pytest.fixture(scope="module")
def dry_copy(tmp_path_factory):
    return copy_workflow(tmp_path_factory.mktemp("slurm-dry"))


def test_slurm_profile_dry_run_shows_the_training_jobs_resources(dry_copy):
    """Without a cluster: the default (tutorial) config under profiles/slurm asks for 4 GPUs,
    one task holding them, and the config's memory, time and CPUs; downloads stay local."""
    out = snakemake(dry_copy, "-n", "--profile", "profiles/slurm", "results/merged/InternVL2-2B-my").stdout
    train = job_blocks(out)["train"]
    res = resources(train)
    assert (res["gpu"], res["nodes"], res["tasks_per_gpu"]) == ("4", "1", "0")
    assert (res["mem_mb"], res["runtime"], res["cpus_per_task"]) == ("160000", "360", "16")
    assert "--gpus 4 --nodes 1" in train
    assert local_rules(dry_copy, "config/config.yaml") == {"fetch_model", "fetch_dataset"}


def test_local_profile_holds_the_workstations_gpus(dry_copy):
    """profiles/local declares 4 GPUs: the training job (4 GPUs) fits and runs alone."""
    profile = yaml.safe_load((dry_copy / "profiles/local/config.yaml").read_text())
    assert profile["resources"]["gpu"] == 4 and profile["rerun-incomplete"] and profile["retries"] >= 1
    out = snakemake(dry_copy, "-n", "--profile", "profiles/local", "results/merged/InternVL2-2B-my").stdout
    assert resources(job_blocks(out)["train"])["gpu"] == "4"


def test_fetches_go_to_the_cluster_when_configured(dry_copy):
    overlay = dry_copy / "config" / "fetch-on-nodes.yaml"
    overlay.write_text("cluster: {fetch_on_submit_host: false}\n")
    assert local_rules(dry_copy, "config/config.yaml", str(overlay)) == set()


def submission(res, threads):
    """The sbatch line the real plugin builds for a job with these resources (a stand-in for
    Snakemake's job object: only what get_submit_command reads)."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    typed = {k: int(v) if v.isdigit() else v for k, v in res.items() if "<TBD>" not in v}
    job = SimpleNamespace(resources=SimpleNamespace(get=typed.get, **typed), threads=threads)
    params = dict(
        run_uuid="uuid",
        slurm_logfile="log",
        comment_str="rule_train",
        account="",
        partition=" -p gpu",
        workdir="/w",
    )
    return get_submit_command(job, params) + set_gres_string(job)


def test_two_node_training_submission(dry_copy, monkeypatch):
    """train.nodes: 2 with 4 H100 per node: one sbatch over 2 nodes asking 4 GPUs on EACH node
    (--gres is per node; a job total, --gpus=h100:8, may be placed 5+3), one task per node, and
    inside the job one torchrun per node (srun) meeting at a rendezvous on the first node.
    tests/test_slurm_two_nodes.py runs this on a real two-node Slurm."""
    overlay = dry_copy / "config" / "two-nodes.yaml"
    overlay.write_text("train: {nodes: 2, gpus: 4, gpu_model: h100}\n")
    out = snakemake(
        dry_copy,
        "-n",
        "--profile",
        "profiles/slurm",
        "results/merged/InternVL2-2B-my",
        "--configfile",
        str(overlay),
    ).stdout
    train = job_blocks(out)["train"]
    res = resources(train)
    assert (res["nodes"], res["gres"], res["tasks"]) == ("2", "gpu:h100:4", "2")
    assert res["gpu"] == "0" and res["gpu_model"] == ""  # no job-wide --gpus besides --gres
    assert "--gpus 4 --nodes 2" in train  # torchrun processes per node, nodes
    sbatch = submission(res, threads=16)
    print("sbatch for 2 nodes:", sbatch)
    assert "--nodes=2" in sbatch and " --gres=gpu:h100:4" in sbatch and "--gpus=" not in sbatch
    assert "--cpus-per-task=16" in sbatch and "--mem 160000" in sbatch and "-t 360" in sbatch
    assert "--ntasks" not in sbatch  # sbatch's default with --nodes: one task per node
    # without GPUs (CPU training) the one task per node is explicit
    cpu = submission({**res, "gres": "", "cpus_per_task": "2"}, threads=2)
    assert "--nodes=2" in cpu and "--ntasks=2" in cpu and "--gres" not in cpu and "--gpus" not in cpu, cpu
    # one node keeps the job-wide request
    one = resources(
        job_blocks(
            snakemake(dry_copy, "-n", "--profile", "profiles/slurm", "results/merged/InternVL2-2B-my").stdout
        )["train"]
    )
    assert "--gpus=4" in submission(one, threads=16) and "--gres" not in submission(one, threads=16)
    plan = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json,sys; sys.path.insert(0,'src');"
            "from vlmtune.xtuner_config import world_size; print(world_size(json.loads(sys.argv[1])))",
            json.dumps({"device": "cuda", "gpus": 4, "nodes": 2}),
        ],
        cwd=dry_copy,
        capture_output=True,
        text=True,
    )
    assert plan.stdout.strip() == "8", plan.stderr  # the rendered plan counts 8 processes

    from vlmtune import train
    from vlmtune.xtuner_config import world_size

    assert world_size({"device": "cpu", "gpus": 0, "cpu_processes": 2, "nodes": 2}) == 4

    # The job's hosts come from the controller (inside the executor's step SLURM_JOB_NODELIST
    # names the step's one node); stand-ins for scontrol here.
    answers = {"job": "JobId=4242 JobName=x NodeList=gpu[01-02] NumNodes=2\n", "hostnames": "gpu01\ngpu02\n"}
    calls = []
    monkeypatch.setattr(
        train.subprocess, "run", lambda cmd, **k: calls.append(cmd) or SimpleNamespace(stdout=answers[cmd[2]])
    )
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu01")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "16")
    srun, endpoint = train.slurm_launch(2)
    cmd = srun + train.command("cfg.py", "work", 4, "zero1", nnodes=2, rdzv_endpoint=endpoint)
    print("in the job:", " ".join(map(str, cmd)))
    assert calls == [
        ["scontrol", "show", "job", "-o", "4242"],
        ["scontrol", "show", "hostnames", "gpu[01-02]"],
    ]
    assert srun[:8] == [
        "srun",
        "--overlap",
        "--nodes=2",
        "--ntasks=2",
        "--ntasks-per-node=1",
        "--cpus-per-task=16",
        "--kill-on-bad-exit=1",
        "--label",
    ]
    assert endpoint == "gpu01:29742" and "--nnodes=2" in cmd and "--nproc-per-node=4" in cmd  # port per job
    # srun inside the step must not take the step's one-node environment for the allocation
    env = train.srun_env(
        {
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": "gpu01",
            "SLURM_NNODES": "1",
            "SRUN_CPUS_PER_TASK": "16",
            "PATH": "/bin",
            "OMP_NUM_THREADS": "16",
        }
    )
    assert env == {"SLURM_JOB_ID": "4242", "PATH": "/bin", "OMP_NUM_THREADS": "16"}
    answers["hostnames"] = "gpu01\n"
    with pytest.raises(SystemExit, match="holds 1 node"):
        train.slurm_launch(2)
    monkeypatch.delenv("SLURM_JOB_ID")
    with pytest.raises(SystemExit, match="SLURM_JOB_ID"):
        train.slurm_launch(2)


# -- the demo on a real Slurm ------------------------------------------------------------------

SLURM_GPUS = 2
GPU_MODEL = "fakegpu"


def slurm_overlay(workdir):
    """A workflow profile over profiles/slurm for the test cluster. Snakemake replaces (does not
    merge) set-resources given twice, so the profile's own entries are carried over."""
    profile = yaml.safe_load((workdir / "profiles/slurm/config.yaml").read_text())
    set_resources = profile.get("set-resources", {})
    set_resources.setdefault("train", {}).update(gpu=SLURM_GPUS, gpu_model=GPU_MODEL)  # fake GPUs to allocate
    set_resources.setdefault("merge_lora", {}).update(mem_mb=4000)  # the node has < 32 GB
    overlay = workdir / "slurm-test-profile"
    overlay.mkdir()
    (overlay / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "set-resources": set_resources,
                # no slurmdbd here: squeue answers status queries while MinJobAge keeps jobs listed
                "slurm-status-command": "squeue",
                "slurm-init-seconds-before-status-checks": 2,
                "latency-wait": 5,
            }
        )
    )
    return overlay


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def scontrol_job(job_id):
    out = subprocess.run(["scontrol", "-d", "show", "job", str(job_id)], capture_output=True, text=True)
    return out.stdout + out.stderr


def run_on_slurm(workdir, cluster_dir):
    """The demo under profiles/slurm on a fresh test cluster, then the training again with its
    job cancelled after its first checkpoint; the cluster is torn down afterwards. Returns the
    `scontrol -d show job` record of every job of the demo run, Snakemake's output of both
    runs, the partition and the Slurm ids of the cancelled and the retried training job."""
    cluster = SingleNodeSlurm(cluster_dir, gpus=SLURM_GPUS, gpu_model=GPU_MODEL)
    try:
        cluster.start()
        env = dict(os.environ, SLURM_PARTITION=cluster.partition)  # the profile reads it
        args = ["--profile", "profiles/slurm", "--workflow-profile", str(slurm_overlay(workdir))]
        proc = snakemake(workdir, *args, "--configfile", "config/demo.yaml", env=env, check=False)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log[-8000:] + cluster.logs()
        jobs = {i: scontrol_job(i) for i in re.findall(r"SLURM jobid (\d+)", log)}
        preempted = preempt_training(workdir, args, env)
        assert preempted["returncode"] == 0, preempted["log"][-8000:] + cluster.logs()
        preempted["jobs"] = {i: scontrol_job(i) for i in preempted["train_jobs"]}
        return jobs, log, cluster.partition, preempted
    finally:
        cluster.stop()


def preempt_training(workdir, args, env, timeout=900):
    """Train afresh under the profile and `scancel` the job once it has saved a checkpoint (as
    a preemption would): the profile's retries resubmit it and it resumes from the checkpoint."""
    shutil.rmtree(workdir / "results/train/demo/work_dir")
    out = workdir / "preempt.log"
    with out.open("w") as fh:
        env = dict(env, PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "snakemake",
                *args,
                "--configfile",
                "config/demo.yaml",
                "--forcerun",
                "train",
                "--",
                "results/train/demo/train_result.json",
            ],
            cwd=workdir,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
        )
        marker, cancelled, deadline = (
            workdir / "results/train/demo/work_dir/last_checkpoint",
            None,
            time.time() + timeout,
        )
        while proc.poll() is None and time.time() < deadline:
            if cancelled is None and marker.exists():
                queue = subprocess.run(
                    ["squeue", "-h", "-t", "R", "-o", "%i %k"], capture_output=True, text=True
                ).stdout
                running_train = [line.split()[0] for line in queue.splitlines() if "rule_train" in line]
                if running_train:
                    cancelled = running_train[0]
                    subprocess.run(["scancel", cancelled], check=True)
            time.sleep(0.5)
        if proc.poll() is None:
            proc.kill()
    log = out.read_text()
    ids = re.findall(r"SLURM jobid (\d+)", log)
    return dict(
        returncode=proc.wait(),
        log=log,
        cancelled=cancelled,
        train_jobs=ids,
        result=json.loads((workdir / "results/train/demo/train_result.json").read_text()),
    )


def report_timeline(jobs):
    """Per job: seconds from the first submission to its submission, start and end (figures;
    the gaps between one job's end and the next one's submission are status polling)."""
    rows = []
    for job_id, text in sorted(jobs.items(), key=lambda kv: int(kv[0])):
        t = {
            k: datetime.fromisoformat(v) for k, v in re.findall(r"(SubmitTime|StartTime|EndTime)=(\S+)", text)
        }
        rule = re.search(r"Comment=rule_(\w+?)(_wildcards|\s)", text)
        rows.append((job_id, rule.group(1) if rule else "?", t))
    first = min(t["SubmitTime"] for _, _, t in rows)
    print("\nslurm job  rule                  submit_s  start_s  end_s")
    for job_id, rule, t in rows:
        s, b, e = ((t[k] - first).total_seconds() for k in ("SubmitTime", "StartTime", "EndTime"))
        print(f"{job_id:>9}  {rule:<20} {s:>8.0f} {b:>8.0f} {e:>6.0f}")


@pytest.mark.slow
def test_demo_on_slurm_equals_a_local_run(tmp_path):
    local = copy_workflow(tmp_path / "local")
    on_slurm = copy_workflow(tmp_path / "slurm")
    # The local reference run goes alongside: the Slurm run mostly waits on status polling.
    with ThreadPoolExecutor(1) as pool:
        # -j2: training then gets 2 threads, as the Slurm job (cpus_per_task 2). The CPU run is
        # deterministic for a fixed seed and thread count; another thread count changes the
        # float reduction order and so the last bits of the trained weights.
        local_run = pool.submit(snakemake, local, "-j2", "--configfile", "config/demo.yaml")
        jobs, log, partition, preempted = run_on_slurm(on_slurm, tmp_path / "cluster")
        local_run.result()
    assert not any(running(name) for name in DAEMONS), {name: running(name) for name in DAEMONS}
    report_timeline(jobs)

    # every compute job went through sbatch and completed on the test partition
    by_rule = {}
    for job_id, text in jobs.items():
        rule = re.search(r"Comment=rule_(\w+?)(_wildcards|\s)", text)
        assert rule and "JobState=COMPLETED" in text and f"Partition={partition}" in text, text
        by_rule.setdefault(rule.group(1), []).append(job_id)
    # each job of the run's plan (Snakemake's "Job stats") but the local rules was an sbatch job
    stats = log.split("Job stats:")[1].split("\n\n")[0]
    planned = {rule: int(n) for rule, n in re.findall(r"^(\w+)\s+(\d+)$", stats, re.M) if rule != "total"}
    local_rules = set(re.findall(r"^localrule (\w+):", log, re.M))
    assert local_rules == {"all", "fetch_model", "fetch_dataset"}, local_rules
    compute = {rule: n for rule, n in planned.items() if rule not in local_rules}
    assert {r: len(v) for r, v in by_rule.items()} == compute, (by_rule, compute)
    assert compute["train"] == compute["merge_lora"] == 1 and compute["evaluate"] == 2, compute
    # the training job held the GPUs asked for (gres backed by /dev/null), in one task
    train_job = jobs[by_rule["train"][0]]
    assert f"TresPerJob=gres:gpu:{GPU_MODEL}:{SLURM_GPUS}" in train_job, train_job
    assert f"JOB_GRES=gpu:{GPU_MODEL}:{SLURM_GPUS}" in train_job and "NumTasks=1 " in train_job, train_job
    assert "TresPerJob=gres:gpu" not in jobs[by_rule["evaluate"][0]]

    # outputs equal the local run's
    conv = "results/converted/CLoT-Oogiri-GO-demo-cn"
    for name in ["train.json", "eval.jsonl"]:
        assert digest(local / conv / name) == digest(on_slurm / conv / name), name
    results = [
        json.loads((w / "results/train/demo/train_result.json").read_text()) for w in (local, on_slurm)
    ]
    assert results[0]["iteration"] == results[1]["iteration"] > 0
    from safetensors.torch import load_file

    merged = [
        load_file(str(w / "results/merged/InternVL2-tiny-demo/model.safetensors")) for w in (local, on_slurm)
    ]
    assert merged[0].keys() == merged[1].keys()
    for name in merged[0]:
        assert (merged[0][name] == merged[1][name]).all(), (
            f"{name} differs between the local and the Slurm run"
        )
    for variant in ["base", "finetuned"]:
        rows = [
            [json.loads(l) for l in (w / f"results/eval/demo/{variant}/predictions.jsonl").open()]
            for w in (local, on_slurm)
        ]
        assert [(r["id"], r["prediction"]) for r in rows[0]] == [
            (r["id"], r["prediction"]) for r in rows[1]
        ] and rows[0]

    # a training job cancelled after its first checkpoint is resubmitted (retries) and resumes
    cancelled, train_jobs = preempted["cancelled"], preempted["train_jobs"]
    assert cancelled and cancelled in train_jobs and len(train_jobs) == 2, preempted["log"][-5000:]
    assert "JobState=CANCELLED" in preempted["jobs"][cancelled]
    assert "JobState=COMPLETED" in preempted["jobs"][train_jobs[-1]] and train_jobs[-1] != cancelled
    resumed = preempted["result"]
    assert re.search(r"iter_\d+\.pth$", resumed["resumed_from"] or ""), resumed
    assert resumed["iteration"] == results[0]["iteration"]
    print(
        f"preempted: job {cancelled} cancelled, job {train_jobs[-1]} resumed from "
        f"{Path(resumed['resumed_from']).name}"
    )
