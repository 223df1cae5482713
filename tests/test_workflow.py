"""The whole demo through Snakemake, in a copy of the workflow (so the checkout's own data/
and results/ are untouched), plus dry runs of the default config. The demo runs once per
session (the `demo_run` fixture of conftest.py), shared with tests/test_reproducibility.py."""

import json

import pytest
import torch

from conftest import copy_workflow
from conftest import run_snakemake as snakemake


@pytest.fixture(scope="module")
def workflow_copy(tmp_path_factory):
    return copy_workflow(tmp_path_factory.mktemp("wf"))


def test_default_config_dry_run_lists_the_tutorial_chain(workflow_copy):
    out = snakemake(workflow_copy, "-n", "results/merged/InternVL2-2B-my").stdout
    for rule in [
        "fetch_model",
        "fetch_dataset",
        "convert_dataset",
        "render_xtuner_config",
        "train",
        "merge_lora",
    ]:
        assert f"rule {rule}:" in out or f"localrule {rule}:" in out, rule
    train_block = out.split("rule train:")[1].split("\n\n")[0]
    assert "gpu=4" in train_block


@pytest.mark.slow
def test_demo_end_to_end(demo_run):
    workflow_copy = demo_run
    merged = workflow_copy / "results" / "merged" / "InternVL2-tiny-demo"
    report = json.loads(
        (workflow_copy / "results" / "merged" / "InternVL2-tiny-demo.merge_report.json").read_text()
    )
    assert report["ok"] and report["lora_merged"] == 11 and report["changed"] > 0

    from safetensors.torch import load_file
    from transformers import AutoModel

    model = AutoModel.from_pretrained(merged, trust_remote_code=True, torch_dtype=torch.bfloat16)
    assert type(model).__name__ == "InternVLChatModel"
    base = load_file(str(workflow_copy / "data" / "models" / "InternVL2-tiny" / "model.safetensors"))
    state = model.state_dict()
    for name in [
        "language_model.model.layers.0.attention.wqkv.weight",
        "language_model.output.weight",
        "mlp1.1.weight",
    ]:
        assert not torch.equal(base[name], state[name]), name
    assert torch.equal(
        base["vision_model.embeddings.patch_embedding.weight"],
        state["vision_model.embeddings.patch_embedding.weight"],
    )

    evals = [
        json.loads(l) for l in (workflow_copy / "results/converted/CLoT-Oogiri-GO-demo-cn/eval.jsonl").open()
    ]
    for variant in ["base", "finetuned"]:
        rows = [
            json.loads(l) for l in (workflow_copy / f"results/eval/demo/{variant}/predictions.jsonl").open()
        ]
        assert [r["id"] for r in rows] == [e["id"] for e in evals] and rows
        assert all(r["engine"] == "transformers" and r["completion_tokens"] >= 0 for r in rows)
        assert rows[0]["prompt"].startswith(
            "<|im_start|>system\nYou are an AI assistant whose name is InternLM"
        )

    again = snakemake(workflow_copy, "-j2", "--configfile", "config/demo.yaml")
    assert "Nothing to be done" in again.stdout + again.stderr


@pytest.mark.slow
def test_merge_check_catches_a_mismatched_checkpoint(demo_run):
    """A checkpoint whose names drifted loads as a silent no-op under strict=False: caught."""
    from vlmtune.merge import MergeCheckError, check, load_checkpoint

    workflow_copy = demo_run
    train_result = workflow_copy / "results/train/demo/train_result.json"
    trained = load_checkpoint(json.loads(train_result.read_text())["checkpoint"])
    base = workflow_copy / "data/models/InternVL2-tiny"
    merged = workflow_copy / "results/merged/InternVL2-tiny-demo"
    check(base, merged, trained)  # the real pair passes
    with pytest.raises(MergeCheckError, match="do not carry the checkpoint's update"):
        check(base, base, trained)  # the base saved as if merged
    drifted = {k.replace("mlp1.", "projector."): v for k, v in trained.items()}
    with pytest.raises(MergeCheckError, match="no counterpart|no trained projector"):
        check(base, merged, drifted)
