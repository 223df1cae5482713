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
