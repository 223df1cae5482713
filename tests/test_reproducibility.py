"""Rerun semantics, provenance, the planted-token leak check and the Snakemake report.

The slow tests share one demo run (conftest `demo_run`) and ask Snakemake, by dry run with an
overlay config, which jobs a change would run; a test that edits the copy restores it."""

import json
import os
import re
import subprocess
import time
import zipfile
from collections import Counter

import pytest

from conftest import PLANTED_TOKEN, run_snakemake
from vlmtune import provenance
from vlmtune.fetch import sha256

DEMO = ["--configfile", "config/demo.yaml"]
FETCHED = ["data/models/InternVL2-tiny", "data/datasets/CLoT-Oogiri-GO-demo"]


# --- unit tests (no demo) ------------------------------------------------------------------------
def test_code_digest_follows_the_step_imports_and_ignores_mtimes(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "util.py").write_text("X = 1\n")
    (pkg / "other.py").write_text("Y = 1\n")
    (pkg / "step.py").write_text("from .util import X\n\ndef main():\n    from . import other\n")
    (pkg / "lone.py").write_text("import json\n")
    assert [p.name for p in provenance.module_closure("step", package=pkg)] == [
        "other.py",
        "step.py",
        "util.py",
    ]
    before = provenance.code_digest("step", package=pkg)
    lone = provenance.code_digest("lone", package=pkg)
    os.utime(pkg / "util.py", (time.time() + 100, time.time() + 100))
    assert provenance.code_digest("step", package=pkg) == before  # a touch is no change
    (pkg / "util.py").write_text("X = 2\n")
    assert provenance.code_digest("step", package=pkg) != before
    assert provenance.code_digest("lone", package=pkg) == lone  # not imported by lone
    with pytest.raises(FileNotFoundError, match="no module 'missing'"):
        provenance.code_digest("missing", package=pkg)


def test_the_real_steps_hash_the_modules_they_import():
    names = {p.name for p in provenance.module_closure("merge")}
    # the reload check runs the transformers engine; nothing of evaluation's LMDeploy side or of
    # the model builder (tests/test_code_hash.py measures what each step runs)
    assert {"merge.py", "atomic.py", "provenance.py", "transformers_engine.py"} <= names
    assert not names & {"convert.py", "train.py", "lmdeploy_engine.py", "model_builder.py", "evaluate.py"}


def test_render_reads_only_the_train_keys_the_workflow_passes(configs, tmp_path):
    """render_xtuner_config gets only xtuner_config.SETTINGS: render must need no other key."""
    from vlmtune.xtuner_config import SETTINGS, render

    read = set()

    class Recording(dict):
        def __getitem__(self, key):
            read.add(key)
            return super().__getitem__(key)

        def get(self, key, default=None):
            read.add(key)
            return super().get(key, default)

    train_json = tmp_path / "train.json"
    train_json.write_text(
        json.dumps([{"id": i, "image": "images/a.jpg", "conversations": []} for i in range(5000)])
    )
    for config in configs:
        passed = {k: v for k, v in config["train"].items() if k in SETTINGS}
        render(tmp_path, train_json, tmp_path, Recording(passed))
        assert read <= set(SETTINGS), read - set(SETTINGS)
    assert {"lr", "seed", "batch_size"} <= read and "deepspeed" not in SETTINGS and "mem_mb" not in SETTINGS


def test_redact_removes_secret_values(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", PLANTED_TOKEN)
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", "ms-secret-value")
    record = provenance.redact({"a": f"x{PLANTED_TOKEN}y", "b": ["ms-secret-value", 3], PLANTED_TOKEN: None})
    assert json.dumps(record).count("***") == 3 and PLANTED_TOKEN not in json.dumps(record)


def test_git_state_reports_commit_and_dirty_flag(tmp_path):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    assert provenance.git_state(tmp_path)["commit"] is None
    git("init", "-q")
    (tmp_path / "f").write_text("1")
    git("add", "f")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    state = provenance.git_state(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{40}", state["commit"]) and state["dirty"] is False
    (tmp_path / "f").write_text("2")
    assert provenance.git_state(tmp_path)["dirty"] is True


# --- rerun semantics on the demo ------------------------------------------------------------------
def planned(workdir, overlay=None) -> Counter:
    """Jobs a run would execute now (rule -> count), from a dry run's job stats."""
    args = ["-n", *DEMO] + ([str(overlay)] if overlay else [])
    out = run_snakemake(workdir, *args).stdout
    if "Nothing to be done" in out:
        return Counter()
    stats = out.split("Job stats:")[1].split("\ntotal")[0]
    jobs = Counter({m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.M)})
    jobs.pop("all", None)
    return jobs


def evaluation_rules(workdir) -> set:
    """Rules defined in evaluate.smk (evaluation, metrics, report), read from the file."""
    return set(re.findall(r"^rule (\w+):", (workdir / "workflow/rules/evaluate.smk").read_text(), re.M))


def overlay(tmp_path, text):
    path = tmp_path / "overlay.yaml"  # outside the workflow copy
    path.write_text(text)
    return path


def rules_in(workdir, *smk) -> set:
    return {
        r
        for f in smk
        for r in re.findall(r"^rule (\w+):", (workdir / "workflow/rules" / f).read_text(), re.M)
    }


def assert_plan(jobs, workdir, required: dict, from_conversion=False):
    """The required jobs, plus only evaluation-stage rules (metrics, report); or, for a change
    at conversion, any rule downstream of it but none upstream (fetch, demo)."""
    for rule, count in required.items():
        assert jobs.get(rule) == count, (rule, jobs)
    extra = set(jobs) - set(required)
    if from_conversion:
        upstream = rules_in(workdir, "fetch.smk", "demo.smk")
        assert upstream and not extra & upstream, f"upstream jobs {extra & upstream}: {jobs}"
    else:
        assert extra <= evaluation_rules(workdir), f"unexpected jobs {extra}: {jobs}"


@pytest.mark.slow
def test_nothing_changed_runs_nothing(demo_run):
    assert planned(demo_run) == Counter()


@pytest.mark.slow
def test_an_evaluation_setting_reruns_only_evaluation(demo_run, tmp_path):
    jobs = planned(demo_run, overlay(tmp_path, "evaluate:\n  max_new_tokens: 8\n"))
    assert jobs["evaluate"] == 2 and set(jobs) <= evaluation_rules(demo_run), jobs


@pytest.mark.slow
def test_lr_reruns_config_train_merge_and_evaluation_not_fetch_or_convert(demo_run, tmp_path):
    jobs = planned(demo_run, overlay(tmp_path, "train:\n  lr: 5.0e-4\n"))
    # Only the fine-tuned model's evaluation: the base model's does not depend on training.
    assert_plan(jobs, demo_run, {"render_xtuner_config": 1, "train": 1, "merge_lora": 1, "evaluate": 1})


@pytest.mark.slow
def test_resources_rerun_nothing(demo_run, tmp_path):
    text = (
        "train:\n  runtime: 31\n  mem_mb: 5000\n  cpus_per_task: 1\n"
        "evaluate:\n  mem_mb: 5000\n  runtime: 16\n"
    )
    assert planned(demo_run, overlay(tmp_path, text)) == Counter()


@pytest.mark.slow
def test_a_conversion_setting_reruns_from_conversion_on(demo_run, tmp_path):
    jobs = planned(
        demo_run, overlay(tmp_path, "conversion:\n  default_question: Tell a joke about this picture.\n")
    )
    assert_plan(
        jobs,
        demo_run,
        {
            "convert_dataset": 1,
            "validate_dataset": 1,
            "render_xtuner_config": 1,
            "train": 1,
            "merge_lora": 1,
            "evaluate": 2,
        },
        from_conversion=True,
    )


@pytest.mark.slow
def test_touched_downloads_do_not_retrain(demo_run):
    later = time.time() + 60
    touched = 0
    for folder in FETCHED:
        for path in (demo_run / folder).rglob("*"):
            if path.name != ".snakemake_timestamp":  # Snakemake's own marker, not a download
                os.utime(path, (later, later))
                touched += 1
        os.utime(demo_run / folder, (later, later))
    assert touched > 10
    assert planned(demo_run) == Counter()


@pytest.mark.slow
@pytest.mark.parametrize(
    "module, required",
    [
        ("merge", {"merge_lora": 1, "evaluate": 1}),
        ("xtuner_config", {"render_xtuner_config": 1, "train": 1, "merge_lora": 1, "evaluate": 1}),
        (
            "convert",
            {
                "convert_dataset": 1,
                "validate_dataset": 1,
                "render_xtuner_config": 1,
                "train": 1,
                "merge_lora": 1,
                "evaluate": 2,
            },
        ),
    ],
)
def test_an_edited_step_reruns_that_step_and_its_dependents(demo_run, module, required):
    path = demo_run / "src" / "vlmtune" / f"{module}.py"
    original = path.read_text()
    try:
        path.write_text(original + "\n# an edit\n")
        assert_plan(planned(demo_run), demo_run, required, from_conversion=module == "convert")
    finally:
        path.write_text(original)
    assert planned(demo_run) == Counter()  # the same content again: nothing to do


@pytest.mark.slow
def test_an_edited_env_check_reruns_every_step(demo_run):
    """Every step runs through vlmtune.envcheck (python_<family> -m ...): its code hash covers it."""
    path = demo_run / "src" / "vlmtune" / "envcheck.py"
    original = path.read_text()
    try:
        path.write_text(original + "\n# an edit\n")
        jobs = planned(demo_run)
    finally:
        path.write_text(original)
    every = rules_in(demo_run, *(f.name for f in (demo_run / "workflow" / "rules").glob("*.smk")))
    assert set(jobs) == every, (jobs, every)
    assert planned(demo_run) == Counter()


# --- provenance, secrets, report ---------------------------------------------------------------
@pytest.mark.slow
def test_provenance_beside_the_merged_model_and_each_evaluation(demo_run):
    wf = demo_run
    merged = json.loads((wf / "results/merged/InternVL2-tiny-demo.provenance.json").read_text())
    manifest = json.loads((wf / "data/models/InternVL2-tiny/manifest.json").read_text())
    assert (
        merged["model"]["repo_id"] == manifest["repo_id"]
        and merged["model"]["revision"] == manifest["revision"]
    )
    assert merged["model"]["files"] == manifest["files"] and merged["model"]["files"]
    config = wf / "results/xtuner/demo/xtuner_config.py"
    assert (
        merged["xtuner_config"]["sha256"] == sha256(config)
        and merged["xtuner_config"]["text"] == config.read_text()
    )
    assert merged["seed"] == 0
    converted = wf / "results/converted/CLoT-Oogiri-GO-demo-cn"
    assert merged["converted"]["files"]["train.json"] == sha256(converted / "train.json")
    ds_manifest = json.loads((wf / "data/datasets/CLoT-Oogiri-GO-demo/manifest.json").read_text())
    assert merged["dataset"]["record_files"]["cn.jsonl"] == ds_manifest["files"]["cn.jsonl"]["sha256"]
    assert merged["dataset"]["images_used"] == merged["dataset"]["images_hashed"] > 0
    summary = json.loads((wf / "results/train/demo/train_summary.json").read_text())
    assert merged["final_loss"] == summary["final_loss"] is not None
    assert merged["training"]["gpus"] == 0 and merged["devices"] == {"gpu_count": 0, "gpu_types": []}
    assert merged["environment"]["packages"]["transformers"] == "4.48.0"
    assert merged["project"] == {"commit": None, "dirty": None, "note": "not a git checkout"}  # the copy
    assert merged["started_at"] <= merged["finished_at"]
    assert merged["merged_files"]["model.safetensors"] == sha256(
        wf / "results/merged/InternVL2-tiny-demo/model.safetensors"
    )
    for variant in ["base", "finetuned"]:
        record = json.loads((wf / f"results/eval/demo/{variant}/provenance.json").read_text())
        assert record["variant"] == variant and record["engine"] == "transformers" and record["records"] > 0
        assert record["predictions_sha256"] == sha256(wf / f"results/eval/demo/{variant}/predictions.jsonl")
        assert record["converted"]["sha256"] == sha256(converted / "eval.jsonl")
        assert record["generation"]["max_new_tokens"] == 16 and record["seed"] == 0
        assert record["started_at"] <= record["finished_at"]
    finetuned = json.loads((wf / "results/eval/demo/finetuned/provenance.json").read_text())
    assert finetuned["model_provenance"] == merged and finetuned["final_loss"] == merged["final_loss"]
    base = json.loads((wf / "results/eval/demo/base/provenance.json").read_text())
    assert base["model"]["files"] == manifest["files"] and base["model_provenance"] is None


@pytest.mark.slow
def test_the_planted_token_is_nowhere(demo_run):
    """HF_TOKEN was set for the whole demo run: no output, log, provenance or .snakemake file
    (nor file name) may hold it."""
    needle = PLANTED_TOKEN.encode()
    scanned, hits = 0, []
    for path in demo_run.rglob("*"):
        if PLANTED_TOKEN in path.name:
            hits.append(str(path))
        if path.is_file() and not path.is_symlink():
            scanned += 1
            if needle in path.read_bytes():
                hits.append(str(path.relative_to(demo_run)))
    assert not hits, hits
    assert (demo_run / ".snakemake" / "metadata").is_dir() and any((demo_run / "logs").iterdir())
    assert scanned > 50


@pytest.mark.slow
def test_the_report_holds_loss_curve_evaluation_and_provenance(demo_run, tmp_path):
    """`snakemake --report` builds offline from the demo run."""
    html, archive = tmp_path / "report.html", tmp_path / "report.zip"
    offline = {"HF_HUB_OFFLINE": "1", "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
    run_snakemake(demo_run, *DEMO, "--report", str(html), env=offline)
    text = html.read_text()
    assert PLANTED_TOKEN not in text
    for item in [
        "loss_curve.png",
        "InternVL2-tiny-demo.provenance.json",
        "predictions.jsonl",
        "metrics.json",
        "summary.png",
        "Provenance",
        "Training",
        "Evaluation",
    ]:
        assert item in text, item
    run_snakemake(demo_run, *DEMO, "--report", str(archive), env=offline)
    names = zipfile.ZipFile(archive).namelist()
    assert any(n.endswith("/loss_curve.png") for n in names), names
    assert sum(n.endswith("provenance.json") for n in names) == 3, names  # merge + base + finetuned
    assert sum(n.endswith("predictions.jsonl") for n in names) == 2, names  # the evaluation
    # The evaluation summary: per-model metrics and the overview figure (evaluate.smk).
    assert sum(n.endswith("/metrics.json") for n in names) == 2 and any(
        n.endswith("/summary.png") for n in names
    ), names
