"""The merge step's reload check: the merged folder must load through transformers' remote code
and answer one image, or the merge fails."""

import shutil

import pytest

from vlmtune.merge import MergeCheckError, answer_one_image


def test_a_loadable_model_answers_one_image(tiny_model):
    answer = answer_one_image(tiny_model, max_new_tokens=4)
    assert answer["ok"] and answer["completion_tokens"] >= 1 and answer["prompt_tokens"] > 256


def test_a_merged_folder_with_broken_weights_fails_the_check(tiny_model, tmp_path):
    broken = tmp_path / "InternVL2-broken"
    shutil.copytree(tiny_model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a half-written save
    with pytest.raises(MergeCheckError, match="does not reload and answer an image"):
        answer_one_image(broken)


@pytest.mark.slow
def test_the_tiny_4b_merge_reloads_and_answers_one_image(demo_4b_run):
    """InternVL2-4B (Phi-3 LLM): the tiny-4B demo's merge step (XTuner's convert_to_official,
    then vlmtune.merge's checks) merged the LoRA of every Phi-3 linear and the projector, and the
    merged folder reloads through the remote code and answers one image on CPU."""
    import json

    from conftest import assert_merged_weights
    from vlmtune.prompt import PHI3, chat_format

    merged = demo_4b_run / "results/merged/InternVL2-tiny-4b-demo4b"
    report = json.loads((merged.parent / f"{merged.name}.merge_report.json").read_text())
    # 2 layers x (qkv_proj, o_proj, gate_up_proj, down_proj); lm_head is not a LoRA target
    assert report["ok"] and report["lora_merged"] == 8 and report["projector"] > 0, report
    assert report["answer"]["ok"] and report["answer"]["completion_tokens"] >= 1
    assert chat_format(merged) is PHI3

    answer = answer_one_image(merged, max_new_tokens=4)  # again, outside the workflow
    assert answer["ok"] and answer["completion_tokens"] >= 1 and answer["prompt_tokens"] > 256

    model = assert_merged_weights(
        demo_4b_run / "data/models/InternVL2-tiny-4b",
        merged,
        changed=[
            "language_model.model.layers.0.self_attn.qkv_proj.weight",
            "language_model.model.layers.1.mlp.down_proj.weight",
            "mlp1.1.weight",
        ],
        unchanged=["language_model.lm_head.weight", "vision_model.embeddings.patch_embedding.weight"],
    )
    assert type(model.language_model).__name__ == "Phi3ForCausalLM"
