import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory):
    from vlmtune.demo import build_dataset

    return build_dataset(tmp_path_factory.mktemp("ds") / "CLoT-Oogiri-GO", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from vlmtune.demo_model import build_model

    return build_model(tmp_path_factory.mktemp("model") / "InternVL2-tiny", seed=0)


@pytest.fixture(scope="session")
def configs():
    from vlmtune.config import load
    from vlmtune.presets import apply

    default, demo = (
        load(ROOT / "config" / "config.yaml"),
        load(ROOT / "config" / "config.yaml", ROOT / "config" / "demo.yaml"),
    )
    for config in (default, demo):
        apply(config)  # model.preset's values where the YAML leaves null, as validate() fills them
    return default, demo


# A hub token planted in the demo run's environment: it must land in no file (test_reproducibility).
PLANTED_TOKEN = "hf_PLANTEDvlmtune0123456789abcdefghijklmnop"
WORKFLOW_ITEMS = ["Snakefile", "workflow", "config", "envs", "src"]
# The fields of every predictions.jsonl row, whichever engine wrote it (test_evaluate, test_report).
PREDICTION_FIELDS = {
    "id",
    "image",
    "type",
    "question",
    "prompt",
    "references",
    "prediction",
    "prompt_tokens",
    "prompt_ids_digest",
    "image_tokens",
    "completion_tokens",
    "completion_ids",
    "first_token_margin",
    "finish_reason",
    "engine",
    "engine_backend",
    "engine_version",
    "generation",
    "model",
}


def copy_workflow(dest: Path) -> Path:
    """The workflow in a scratch folder, so the checkout's own data/ and results/ stay untouched."""
    import shutil

    for item in WORKFLOW_ITEMS:
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dest / item)
    return dest


def run_snakemake(workdir: Path, *args, check=True, env=None):
    """`python -m snakemake ARGS` in workdir; on failure the error names the step logs."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        logs = (
            "\n".join(f"== {p}\n{p.read_text()[-3000:]}" for p in sorted((workdir / "logs").rglob("*.log")))
            if (workdir / "logs").exists()
            else ""
        )
        raise AssertionError(proc.stdout[-5000:] + proc.stderr[-5000:] + logs)
    return proc


# Where the demo run's processes wrote the vlmtune modules they ran (tests/trace_site).
DEMO_MODULE_TRACE: dict = {}


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The whole demo, run ONCE per session (CPU time is scarce) in a copy of the workflow, with
    PLANTED_TOKEN in HF_TOKEN. Tests that change the copy must restore it. Every Python process
    of the run records the vlmtune modules it runs (DEMO_MODULE_TRACE["dir"]; test_code_hash)."""
    workdir = copy_workflow(tmp_path_factory.mktemp("demo_wf"))
    trace = tmp_path_factory.mktemp("demo_module_trace")
    site = str(Path(__file__).resolve().parent / "trace_site")
    path = os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")]))
    env = {"HF_TOKEN": PLANTED_TOKEN, "PYTHONPATH": path, "VLMTUNE_TRACE_MODULES": str(trace)}
    run_snakemake(workdir, "-j2", "--configfile", "config/demo.yaml", env=env)
    DEMO_MODULE_TRACE.update(dir=trace, workdir=workdir)
    return workdir


DEMO_4B = ["--configfile", "config/demo.yaml", "config/demo-4b.yaml"]


@pytest.fixture(scope="session")
def demo_4b_run(tmp_path_factory):
    """The tiny-4B (Phi-3) demo (config/demo-4b.yaml over config/demo.yaml), run ONCE per
    session in its own copy of the workflow: train, merge, evaluate and report on CPU."""
    workdir = copy_workflow(tmp_path_factory.mktemp("demo_4b_wf"))
    run_snakemake(workdir, "-j2", *DEMO_4B)
    return workdir


def assert_merged_weights(base_dir: Path, merged_dir: Path, changed: list[str], unchanged: list[str]):
    """Reload a merged model through its remote code: the ``changed`` tensors differ from the
    base model's, the ``unchanged`` ones are bit-identical. Returns the model."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModel

    model = AutoModel.from_pretrained(merged_dir, trust_remote_code=True, torch_dtype=torch.bfloat16)
    assert type(model).__name__ == "InternVLChatModel"
    base, state = load_file(str(base_dir / "model.safetensors")), model.state_dict()
    for name in changed:
        assert not torch.equal(base[name], state[name]), name
    for name in unchanged:
        assert torch.equal(base[name], state[name]), name
    return model
