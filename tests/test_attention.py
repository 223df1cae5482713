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


def _eager_llm_layer(tiny_model):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(tiny_model), torch_dtype=torch.float32, trust_remote_code=True)
    return model.eval(), model.language_model.model.layers[0].attention


def test_own_sdpa_forward_where_the_code_has_no_sdpa_class(tiny_model, monkeypatch):
    import sys

    model, attn = _eager_llm_layer(tiny_model)
    llm = model.language_model.model
    modelling = sys.modules[type(attn).__module__]
    torch.manual_seed(0)
    x = torch.randn(2, 21, model.config.llm_config.hidden_size)
    pos = torch.arange(21).unsqueeze(0).repeat(2, 1)
    mask2d = torch.ones(2, 21, dtype=torch.long)
    mask2d[1, 15:] = 0
    with torch.no_grad():
        causal = llm._update_causal_mask(mask2d, x, pos[0], None, False)  # causal + padding, additive
        ref_masked = attn(x, attention_mask=causal, position_ids=pos)[0]
        full = llm._update_causal_mask(torch.ones_like(mask2d), x, pos[0], None, False)
        ref_causal = attn(x, attention_mask=full, position_ids=pos)[0]  # None: SDPA's is_causal
        monkeypatch.delattr(modelling, "InternLM2SdpaAttention")
        done = apply(model, "sdpa")
        assert done["llm"] == done["llm_own_forward"] == len(llm.layers)
        assert type(attn).__name__ == "InternLM2Attention" and "forward" in attn.__dict__
        assert torch.allclose(attn(x, attention_mask=causal, position_ids=pos)[0], ref_masked, atol=1e-5)
        assert torch.allclose(attn(x, attention_mask=None, position_ids=pos)[0], ref_causal, atol=1e-5)
        # asked for attention weights (or given a KV cache), the eager forward runs
        out, weights, _ = attn(x, attention_mask=causal, position_ids=pos, output_attentions=True)
        assert weights is not None and torch.allclose(out, ref_masked, atol=1e-5)


def test_own_sdpa_forward_with_seq_len_rotary(tiny_model):
    """InternLM2 code whose rotary module takes ``seq_len`` and whose ``apply_rotary_pos_emb``
    indexes the cos/sin tables by ``position_ids``: a stand-in built from the xtuner code's own
    functions (so the reference is the xtuner eager layer)."""
    import sys
    import types

    model, attn = _eager_llm_layer(tiny_model)
    real = sys.modules[type(attn).__module__]
    torch.manual_seed(1)
    x = torch.randn(2, 17, model.config.llm_config.hidden_size)
    pos = torch.arange(3, 20).unsqueeze(0).repeat(2, 1)  # an offset, so the indexing matters
    llm = model.language_model.model
    with torch.no_grad():
        full = llm._update_causal_mask(torch.ones(2, 17, dtype=torch.long), x, torch.arange(17), None, False)
        ref = attn(x, attention_mask=full, position_ids=pos)[0]

    class SeqLenRotary(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, seq_len=None):
            cos, sin = self.inner(x, torch.arange(64).unsqueeze(0))
            return cos[0], sin[0]  # tables over positions 0..63

    stand_in = types.ModuleType("seq_len_internlm2")
    stand_in.repeat_kv = real.repeat_kv
    stand_in.apply_rotary_pos_emb = lambda q, k, cos, sin, position_ids: real.apply_rotary_pos_emb(
        q, k, cos[position_ids], sin[position_ids]
    )
    sys.modules[stand_in.__name__] = stand_in
    try:
        attn.__class__ = type("InternLM2Attention", (type(attn),), {"__module__": stand_in.__name__})
        attn.rotary_emb = SeqLenRotary(attn.rotary_emb)
        assert apply(attn, "sdpa")["llm_own_forward"] == 1
        with torch.no_grad():
            assert torch.allclose(attn(x, attention_mask=full, position_ids=pos)[0], ref, atol=1e-5)
            assert torch.allclose(attn(x, attention_mask=None, position_ids=pos)[0], ref, atol=1e-5)
    finally:
        del sys.modules[stand_in.__name__]
