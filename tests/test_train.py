"""Training on CPU through the workflow's own launcher (torchrun over xtuner.tools.train)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from vlmtune.config import deep_merge
from vlmtune.train import command
from vlmtune.xtuner_config import accumulation, iteration_plan, render


def test_global_batch_fixes_accumulation_across_gpu_counts(configs):
    train = deep_merge(configs[0]["train"], {"global_batch_size": 64, "batch_size": 8})
    assert [accumulation({**train, "gpus": g}) for g in (1, 2, 4, 8)] == [8, 4, 2, 1]
    with pytest.raises(ValueError, match="not a multiple of batch_size 8 x 3"):
        accumulation({**train, "gpus": 3})
    # The same global batch gives the same number of optimizer steps on any GPU count.
    steps = {g: iteration_plan(1000, g, 8, accumulation({**train, "gpus": g}), 1, 0.03) for g in (1, 2, 4)}
    assert {p["iterations"] // p["accumulative_counts"] for p in steps.values()} == {16}
    assert {p["global_batch_size"] for p in steps.values()} == {64}


def test_two_node_command():
    cmd = command("cfg.py", "work", 4, "zero1", nnodes=2, rdzv_endpoint="node0:29500", node_rank=1)
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert "--nnodes=2" in cmd and "--rdzv-backend=c10d" in cmd and "--rdzv-endpoint=node0:29500" in cmd
    assert "--nproc-per-node=4" in cmd and "--node-rank=1" in cmd and "--standalone" not in cmd
    assert cmd[-6:] == ["--work-dir", "work", "--launcher", "pytorch", "--deepspeed", "deepspeed_zero1"]


@pytest.fixture(scope="module")
def training_setup(tiny_model, demo_dataset, configs, tmp_path_factory):
    from vlmtune.convert import convert

    root = tmp_path_factory.mktemp("train")
    train, _, _ = convert(demo_dataset, eval_images=0)
    (root / "train.json").write_text(json.dumps(train, ensure_ascii=False))
    settings = deep_merge(configs[1]["train"], {"save_steps": 4, "save_total_limit": -1})
    text, plan = render(tiny_model, root / "train.json", demo_dataset, settings)
    (root / "cfg.py").write_text(text)
    (root / "plan.json").write_text(json.dumps(plan))
    return root, plan


def train_cmd(root, name):
    return [
        sys.executable,
        "-m",
        "vlmtune.train",
        "--config",
        str(root / "cfg.py"),
        "--plan",
        str(root / "plan.json"),
        "--work-dir",
        str(root / name),
        "--result",
        str(root / f"{name}.json"),
        "--summary",
        str(root / f"{name}.summary.json"),
        "--curves",
        str(root / f"{name}.png"),
    ]


def lr_by_step(work_dir):
    from vlmtune.telemetry import read_scalars

    return {r["step"]: r["lr"] for r in read_scalars(work_dir)}


@pytest.mark.slow
def test_killed_training_resumes_from_its_checkpoint(training_setup):
    root, plan = training_setup
    subprocess.run(train_cmd(root, "straight"), check=True, capture_output=True)
    straight = json.loads((root / "straight.json").read_text())
    assert straight["iteration"] == plan["iterations"] == 18 and straight["resumed_from"] is None

    # Start, wait for the first checkpoint, kill the whole process group (as a preemption would).
    proc = subprocess.Popen(
        train_cmd(root, "killed"),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    marker = root / "killed" / "last_checkpoint"
    deadline = time.time() + 300
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert marker.exists(), "no checkpoint was written"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (root / "killed.json").exists()
    first_ckpt = int(marker.read_text().strip().rsplit("iter_", 1)[1].split(".")[0])
    assert first_ckpt < plan["iterations"]

    out = subprocess.run(train_cmd(root, "killed"), check=True, capture_output=True, text=True)
    assert "resuming from" in out.stdout
    resumed = json.loads((root / "killed.json").read_text())
    assert resumed["resumed_from"].endswith(f"iter_{first_ckpt}.pth")
    assert resumed["iteration"] == straight["iteration"]
    # The resumed attempt's log starts right after the checkpoint, on the same LR schedule.
    runs = sorted(p for p in (root / "killed").iterdir() if p.is_dir() and (p / "vis_data").exists())
    second = [
        json.loads(l)
        for l in (runs[-1] / "vis_data" / "scalars.json").read_text().splitlines()
        if '"loss"' in l
    ]
    assert second[0]["step"] == first_ckpt + 1
    reference = lr_by_step(root / "straight")
    for row in second:
        assert row["lr"] == pytest.approx(reference[row["step"]], rel=1e-6)
    summary = json.loads((root / "killed.summary.json").read_text())
    assert summary["last_iteration"] == 18 and (root / "killed.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_two_process_gloo_run_matches_one_process_at_the_same_global_batch(
    training_setup, tiny_model, demo_dataset, configs
):
    """Two CPU processes (gloo, torchrun) and one process with the same global_batch_size take
    the same optimizer steps over the same samples. XTuner counts micro-batch iterations, so
    the single process, accumulating twice as many micro-batches, logs twice the iterations."""
    root, _ = training_setup
    results = {}
    for nproc in (1, 2):
        settings = deep_merge(
            configs[1]["train"],
            {
                "cpu_processes": nproc,
                "global_batch_size": 4,
                "batch_size": 2,
                "save_steps": 100,
                "warmup_ratio": 0.3,
            },
        )
        text, plan = render(tiny_model, root / "train.json", demo_dataset, settings)
        name = f"procs{nproc}"
        (root / f"{name}.py").write_text(text)
        (root / f"{name}.plan.json").write_text(json.dumps(plan))
        cmd = [
            sys.executable,
            "-m",
            "vlmtune.train",
            "--config",
            str(root / f"{name}.py"),
            "--plan",
            str(root / f"{name}.plan.json"),
            "--work-dir",
            str(root / name),
            "--result",
            str(root / f"{name}.json"),
            "--cpu-processes",
            str(nproc),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert (
            f"{nproc} process(es) x batch 2 x accumulation {4 // (2 * nproc)} = global batch 4" in out.stdout
        )
        # mmengine's run log records the process group it trained in (two gloo workers for 2).
        run_log = next((root / name).glob("*/*.log")).read_text()
        assert "Distributed training: True" in run_log and f"GPU number: {nproc}" in run_log
        results[nproc] = json.loads((root / f"{name}.json").read_text())
        assert results[nproc]["iteration"] == plan["iterations"]
    one, two = results[1], results[2]
    assert one["global_batch_size"] == two["global_batch_size"] == 4
    assert (one["accumulative_counts"], two["accumulative_counts"]) == (2, 1)
    assert one["optimizer_steps"] == two["optimizer_steps"] > 0
    assert one["iteration"] == 2 * two["iteration"]


def test_checkpoints_of_other_data_or_model_are_not_resumed(tmp_path):
    """The rendered config names data and model by path only: a new conversion or model
    revision (same paths, other content) must start afresh, not resume the old run."""
    from vlmtune.train import claim_work_dir, last_checkpoint

    config, data, model = tmp_path / "cfg.py", tmp_path / "train.json", tmp_path / "model"
    config.write_text("lr = 2e-5\n")
    data.write_text('[{"id": 0}]')
    model.mkdir()
    (model / "manifest.json").write_text('{"commit": "a"}')
    work = tmp_path / "work_dir"

    def start():
        claim_work_dir(work, config, [data, model])
        return last_checkpoint(work)

    start()
    (work / "iter_5.pth").write_bytes(b"x")
    (work / "last_checkpoint").write_text(str(work / "iter_5.pth"))
    assert start() == work / "iter_5.pth"  # same config and inputs: resume
    data.write_text('[{"id": 0}, {"id": 1}]')
    assert start() is None and (tmp_path / "work_dir.superseded" / "iter_5.pth").exists()
    (work / "iter_2.pth").write_bytes(b"x")
    (work / "last_checkpoint").write_text(str(work / "iter_2.pth"))
    (model / "manifest.json").write_text('{"commit": "b"}')
    assert start() is None
