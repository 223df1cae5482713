"""Attention through PyTorch's ``scaled_dot_product_attention`` (SDPA) for InternVL2, applied to
a built model without touching the model's files.

Without flash-attn, InternVL2's remote code falls back to eager attention in both towers: a full
``L x L`` score matrix per head (fp32 softmax in the LLM), which dominates the step time and the
memory at 8k tokens. SDPA with bf16 inputs runs fused flash / memory-efficient kernels instead.

- InternLM2 (LLM): where the model code ships ``InternLM2SdpaAttention`` (a subclass of the eager
  ``InternLM2Attention`` with the same weights: the InternLM2 code of the xtuner wheel), eager
  layers are switched to it. Where it does not (InternLM2 code with eager and flash-attn classes
  only, whose rotary module takes a Python ``seq_len``), each eager layer gets
  ``internlm2_sdpa_forward``: the eager layer's own projections, rotary embedding and key/value
  repetition, then SDPA (with the additive mask that code builds, or causal without one); calls
  with a KV cache or asking for attention weights keep the eager forward. The causal mask
  the eager path builds would push SDPA onto its slower masked kernel, and XTuner's collate pads
  on the right only: for such a batch, plain causal attention gives every real token exactly the
  same inputs (padding comes after it), so the mask is dropped and SDPA's causal flash kernel runs.
  Any other mask (left padding, holes) is kept as is. Outputs at padding positions differ; they
  carry no label, so the loss is unchanged.
- InternViT: ``InternAttention`` computes ``softmax(q k^T * d^-0.5) v`` without a mask; the same
  through SDPA (same scale, same dropout) replaces ``_naive_attn``.

``apply(model)`` returns what it switched; ``compare()`` measures patched against original on
random inputs (used by the GPU benchmark in bf16 and by the CPU tests in fp32).
"""

from __future__ import annotations

import inspect
import sys
import types

import torch
import torch.nn.functional as F

MODES = ("eager", "sdpa")


def _vit_sdpa_attn(self, x: torch.Tensor) -> torch.Tensor:
    """InternAttention._naive_attn through SDPA (same projections, scale and dropout)."""
    B, N, C = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    if self.qk_normalization:
        B_, H_, N_, D_ = q.shape
        q = self.q_norm(q.transpose(1, 2).flatten(-2, -1)).view(B_, N_, H_, D_).transpose(1, 2)
        k = self.k_norm(k.transpose(1, 2).flatten(-2, -1)).view(B_, N_, H_, D_).transpose(1, 2)
    dropout = self.attn_drop.p if self.training else 0.0
    x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=self.scale)
    x = x.transpose(1, 2).reshape(B, N, C)
    return self.proj_drop(self.proj(x))


def internlm2_sdpa_forward(
    self,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    past_key_value=None,
    output_attentions: bool = False,
    use_cache: bool = False,
    **kwargs,
):
    """An eager ``InternLM2Attention``'s forward with SDPA in place of the score matrix (training
    calls: no KV cache, no attention weights; other calls run the class's eager forward). The
    packed ``wqkv`` output is split as the model code splits it: per KV head, its
    ``num_key_value_groups`` queries, then the key, then the value. The rotary embedding and
    ``repeat_kv`` are the modelling module's own, called the way its release expects (cos/sin
    tables indexed by ``position_ids`` when the rotary module takes ``seq_len``: decided once by
    ``apply``, in ``self._vlmtune_rope_seq_len``)."""
    if past_key_value is not None or output_attentions or use_cache:
        return type(self).forward(
            self,
            hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_value=past_key_value,
            output_attentions=output_attentions,
            use_cache=use_cache,
            **kwargs,
        )
    modelling = sys.modules[type(self).__module__]
    bsz, q_len, _ = hidden_states.shape
    groups = self.num_key_value_groups
    qkv = self.wqkv(hidden_states).view(bsz, q_len, -1, groups + 2, self.head_dim)
    query = qkv[..., :groups, :].reshape(bsz, q_len, -1, self.head_dim).transpose(1, 2)
    key = qkv[..., -2, :].transpose(1, 2)
    value = qkv[..., -1, :].transpose(1, 2)
    if self._vlmtune_rope_seq_len:
        cos, sin = self.rotary_emb(value, seq_len=q_len)
        query, key = modelling.apply_rotary_pos_emb(query, key, cos, sin, position_ids)
    else:
        cos, sin = self.rotary_emb(value, position_ids)
        query, key = modelling.apply_rotary_pos_emb(query, key, cos, sin)
    key = modelling.repeat_kv(key, groups)
    value = modelling.repeat_kv(value, groups)
    if attention_mask is None:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=q_len > 1)
    else:
        mask = attention_mask[:, :, :, : key.shape[-2]]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask.to(query.dtype))
    out = out.transpose(1, 2).reshape(bsz, q_len, -1)
    return self.wo(out), None, None


def right_padded(mask: torch.Tensor) -> bool:
    """True when every row of a 2D 0/1 mask is ones followed by zeros (XTuner's collate)."""
    m = mask.to(torch.int8)
    return bool((m[:, 1:] <= m[:, :-1]).all())


def _causal_mask_for_sdpa(original):
    def update(attention_mask, input_tensor, cache_position, past_key_values, output_attentions):
        if (
            attention_mask is not None
            and attention_mask.dim() == 2
            and past_key_values is None
            and not output_attentions
            and input_tensor.shape[1] > 1
            and right_padded(attention_mask)
        ):
            return None  # SDPA then runs with is_causal=True (flash kernel)
        return original(attention_mask, input_tensor, cache_position, past_key_values, output_attentions)

    return update


def apply(model: torch.nn.Module, mode: str = "sdpa") -> dict:
    """Switch every eager attention of an InternVL2 model (InternViT and InternLM2) to SDPA.
    Returns counts of what was switched; ``eager`` changes nothing."""
    if mode not in MODES:
        raise ValueError(f"attention {mode!r}: choose one of {MODES}")
    done = dict(vit=0, llm=0, llm_own_forward=0, llm_models=0)
    if mode == "eager":
        return done
    for module in model.modules():
        cls = type(module)
        if cls.__name__ == "InternAttention" and not getattr(module, "use_flash_attn", False):
            module._naive_attn = types.MethodType(_vit_sdpa_attn, module)
            done["vit"] += 1
        elif cls.__name__ == "InternLM2Attention":
            if getattr(module.config, "pretraining_tp", 1) > 1:
                raise RuntimeError(f"{cls.__module__}: SDPA with pretraining_tp > 1 is not supported")
            sdpa_cls = getattr(sys.modules[cls.__module__], "InternLM2SdpaAttention", None)
            if sdpa_cls is not None:
                module.__class__ = sdpa_cls
            else:
                forward = type(module.rotary_emb).forward
                module._vlmtune_rope_seq_len = "seq_len" in inspect.signature(forward).parameters
                module.forward = types.MethodType(internlm2_sdpa_forward, module)
                done["llm_own_forward"] += 1
            done["llm"] += 1
        elif (
            cls.__name__ == "InternLM2Model"
            and hasattr(module, "_update_causal_mask")
            and not getattr(module, "_vlmtune_sdpa_mask", False)
        ):
            module._update_causal_mask = _causal_mask_for_sdpa(module._update_causal_mask)
            module._vlmtune_sdpa_mask = True
            done["llm_models"] += 1
    return done


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def compare(
    model_path,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    batch: int = 2,
    seq: int = 64,
    tiles: int = 2,
    seed: int = 0,
) -> dict:
    """Relative errors of SDPA against the original eager attention on random inputs, for one
    InternViT attention layer, one InternLM2 attention layer and the whole InternLM2 model with
    a right-padded batch (compared at the real positions only)."""
    from transformers import AutoModel

    torch.manual_seed(seed)
    model = (
        AutoModel.from_pretrained(str(model_path), torch_dtype=dtype, trust_remote_code=True)
        .to(device)
        .eval()
    )
    vit_attn = model.vision_model.encoder.layers[0].attn
    llm = model.language_model.model
    llm_attn = llm.layers[0].attention
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    x_vit = torch.randn(
        tiles, side * side + 1, model.config.vision_config.hidden_size, device=device, dtype=dtype
    )
    hidden = model.config.llm_config.hidden_size
    x_llm = torch.randn(batch, seq, hidden, device=device, dtype=dtype)
    pos = torch.arange(seq, device=device).unsqueeze(0).repeat(batch, 1)
    mask = torch.ones(batch, seq, dtype=torch.bool, device=device)
    for row in range(1, batch):  # right padding, as XTuner's collate makes it
        mask[row, seq - seq // (row + 2) :] = False
    embeds = torch.randn(batch, seq, hidden, device=device, dtype=dtype)
    with torch.no_grad():
        ref_vit = vit_attn(x_vit)
        causal = llm._update_causal_mask(mask, x_llm, pos[0], None, False)
        ref_llm = llm_attn(x_llm, attention_mask=causal, position_ids=pos)[0]
        ref_model = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).last_hidden_state
        switched = apply(model, "sdpa")
        new_vit = vit_attn(x_vit)
        new_llm = llm_attn(x_llm, attention_mask=causal, position_ids=pos)[0]
        new_model = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).last_hidden_state
    return dict(
        switched=switched,
        dtype=str(dtype).replace("torch.", ""),
        device=device,
        vit_attention=_rel_err(new_vit, ref_vit),
        llm_attention=_rel_err(new_llm, ref_llm),
        llm_model_right_padded=_rel_err(new_model[mask], ref_model[mask]),
    )
