import pytest
import torch

from vlmtune.attention import apply, compare, right_padded


def test_sdpa_equals_eager_on_random_inputs(tiny_model):
    # fp32 on CPU: the SDPA path must reproduce the eager one up to rounding.
    result = compare(tiny_model, device="cpu", dtype=torch.float32, batch=3, seq=48)
    assert (
        result["switched"]["vit"] >= 1
        and result["switched"]["llm"] >= 2
        and result["switched"]["llm_models"] == 1
    )
    assert result["vit_attention"] < 1e-5
    assert result["llm_attention"] < 1e-5
    assert result["llm_model_right_padded"] < 1e-5


def test_right_padding_detection():
    assert right_padded(torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]]))
    assert not right_padded(torch.tensor([[1, 1, 1], [0, 1, 1]]))  # left padding keeps its mask
    assert not right_padded(torch.tensor([[1, 0, 1]]))


def test_mask_dropped_only_for_right_padding(tiny_model):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(tiny_model), torch_dtype=torch.float32, trust_remote_code=True)
    apply(model, "sdpa")
    llm = model.language_model.model
    x = torch.zeros(2, 5, model.config.llm_config.hidden_size)
    pos = torch.arange(5)
    assert (
        llm._update_causal_mask(torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]), x, pos, None, False) is None
    )
    kept = llm._update_causal_mask(torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]), x, pos, None, False)
    assert kept is not None and kept.shape == (2, 1, 5, 5)
    assert type(llm.layers[0].attention).__name__ == "InternLM2SdpaAttention"
    # applying twice is harmless (the launcher may see a model twice)
    assert apply(model, "sdpa")["llm"] == 0


def test_unknown_mode_is_refused(tiny_model):
    with pytest.raises(ValueError, match="flash"):
        apply(torch.nn.Linear(1, 1), "flash")
