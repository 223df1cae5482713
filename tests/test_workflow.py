"""The whole demo through Snakemake, in a copy of the workflow (so the checkout's own data/
and results/ are untouched), plus dry runs of the default config. The demo runs once per
session (the `demo_run` fixture of conftest.py), shared with tests/test_reproducibility.py."""

import json

import pytest

from conftest import DEMO_4B, assert_merged_weights, copy_workflow
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

    assert_merged_weights(
        workflow_copy / "data" / "models" / "InternVL2-tiny",
        merged,
        changed=[
            "language_model.model.layers.0.attention.wqkv.weight",
            "language_model.output.weight",
            "mlp1.1.weight",
        ],
        unchanged=["vision_model.embeddings.patch_embedding.weight"],
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
    from vlmtune.merge import MergeCheckError, check_merged, load_checkpoint

    workflow_copy = demo_run
    train_result = workflow_copy / "results/train/demo/train_result.json"
    trained = load_checkpoint(json.loads(train_result.read_text())["checkpoint"])
    base = workflow_copy / "data/models/InternVL2-tiny"
    merged = workflow_copy / "results/merged/InternVL2-tiny-demo"
    check_merged(base, merged, trained)  # the real pair passes
    with pytest.raises(MergeCheckError, match="do not carry the checkpoint's update"):
        check_merged(base, base, trained)  # the base saved as if merged
    drifted = {k.replace("mlp1.", "projector."): v for k, v in trained.items()}
    with pytest.raises(MergeCheckError, match="no counterpart|no trained projector"):
        check_merged(base, merged, drifted)


@pytest.mark.slow
def test_tiny_4b_demo_end_to_end(demo_4b_run):
    """config/demo-4b.yaml: the demo with a tiny InternVL2-4B (Phi-3) trains, merges (checked in
    tests/test_merge.py), evaluates base and fine-tuned with the Phi-3 template and reports."""
    wf = demo_4b_run
    config = (wf / "results/xtuner/demo4b/xtuner_config.py").read_text()
    assert "PROMPT_TEMPLATE.phi3_chat" in config and "PROMPT_TEMPLATE.internlm2_chat" not in config
    summary = json.loads((wf / "results/train/demo4b/train_result.json").read_text())
    assert summary["checkpoint"].endswith("iter_4.pth")
    phi3 = "<|system|>\nYou are an AI assistant whose name is Phi-3.<|end|>\n<|user|>\n"
    for variant in ["base", "finetuned"]:
        rows = [json.loads(l) for l in (wf / f"results/eval/demo4b/{variant}/predictions.jsonl").open()]
        assert len(rows) == 3 and all(r["engine"] == "transformers" for r in rows)
        assert all(
            r["prompt"].startswith(phi3) and r["prompt"].endswith("<|end|><|assistant|>\n") for r in rows
        ), rows[0]["prompt"]
        assert json.loads((wf / f"results/eval/demo4b/{variant}/metrics.json").read_text())
    assert (wf / "results/eval/demo4b/report.html").stat().st_size > 0
    assert (wf / "results/eval/demo4b/summary.png").stat().st_size > 0
    again = snakemake(wf, "-j2", *DEMO_4B)
    assert "Nothing to be done" in again.stdout + again.stderr
