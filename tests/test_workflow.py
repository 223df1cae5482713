"""The whole demo through Snakemake, in a copy of the workflow (so the checkout's own data/
and results/ are untouched), plus dry runs of the default config."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT


def snakemake(workdir, *args, check=True):
    proc = subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=workdir, capture_output=True, text=True)
    if check and proc.returncode != 0:
        logs = "\n".join(f"== {p}\n{p.read_text()[-3000:]}" for p in sorted((workdir / "logs").glob("*.log"))) if (workdir / "logs").exists() else ""
        raise AssertionError(proc.stdout[-5000:] + proc.stderr[-5000:] + logs)
    return proc


@pytest.fixture(scope="module")
def workflow_copy(tmp_path_factory):
    dest = tmp_path_factory.mktemp("wf")
    for item in ["Snakefile", "workflow", "config", "envs", "src"]:
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dest / item)
    return dest


def test_default_config_dry_run_lists_the_tutorial_chain(workflow_copy):
    out = snakemake(workflow_copy, "-n", "results/merged/InternVL2-2B-my").stdout
    for rule in ["fetch_model", "fetch_dataset", "convert_dataset", "render_xtuner_config", "train", "merge_lora"]:
        assert f"rule {rule}:" in out or f"localrule {rule}:" in out, rule
    train_block = out.split("rule train:")[1].split("\n\n")[0]
    assert "gpu=4" in train_block


@pytest.mark.slow
def test_demo_end_to_end(workflow_copy):
    snakemake(workflow_copy, "-j2", "--configfile", "config/demo.yaml")
    merged = workflow_copy / "results" / "merged" / "InternVL2-tiny-demo"
    report = json.loads((workflow_copy / "results" / "merged" / "InternVL2-tiny-demo.merge_report.json").read_text())
    assert report["ok"] and report["lora_merged"] == 11 and report["changed"] > 0

    from safetensors.torch import load_file
    from transformers import AutoModel

    model = AutoModel.from_pretrained(merged, trust_remote_code=True, torch_dtype=torch.bfloat16)
    assert type(model).__name__ == "InternVLChatModel"
    base = load_file(str(workflow_copy / "data" / "models" / "InternVL2-tiny" / "model.safetensors"))
    state = model.state_dict()
    for name in ["language_model.model.layers.0.attention.wqkv.weight", "language_model.output.weight", "mlp1.1.weight"]:
        assert not torch.equal(base[name], state[name]), name
    assert torch.equal(base["vision_model.embeddings.patch_embedding.weight"], state["vision_model.embeddings.patch_embedding.weight"])

    evals = [json.loads(l) for l in (workflow_copy / "results/converted/CLoT-Oogiri-GO-demo-cn/eval.jsonl").open()]
    for variant in ["base", "finetuned"]:
        rows = [json.loads(l) for l in (workflow_copy / f"results/eval/demo/{variant}/predictions.jsonl").open()]
        assert [r["id"] for r in rows] == [e["id"] for e in evals] and rows
        assert all(r["engine"] == "transformers" and r["completion_tokens"] >= 0 for r in rows)
        assert rows[0]["prompt"].startswith("<|im_start|>system\nYou are an AI assistant whose name is InternLM")

    again = snakemake(workflow_copy, "-j2", "--configfile", "config/demo.yaml")
    assert "Nothing to be done" in again.stdout + again.stderr


@pytest.mark.slow
def test_merge_check_catches_a_mismatched_checkpoint(workflow_copy, tmp_path):
    """A checkpoint whose names drifted loads as a silent no-op under strict=False: caught."""
    from vlmtune.merge import MergeCheckError, load_checkpoint, check

    train_result = workflow_copy / "results/train/demo/train_result.json"
    if not train_result.exists():
        pytest.skip("needs test_demo_end_to_end")
    trained = load_checkpoint(json.loads(train_result.read_text())["checkpoint"])
    base = workflow_copy / "data/models/InternVL2-tiny"
    merged = workflow_copy / "results/merged/InternVL2-tiny-demo"
    check(base, merged, trained)  # the real pair passes
    with pytest.raises(MergeCheckError, match="do not carry the checkpoint's update"):
        check(base, base, trained)  # the base saved as if merged
    drifted = {k.replace("mlp1.", "projector."): v for k, v in trained.items()}
    with pytest.raises(MergeCheckError, match="no counterpart|no trained projector"):
        check(base, merged, drifted)
