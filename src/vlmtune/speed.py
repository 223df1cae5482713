"""Speed levers for XTuner's ``InternVL_V1_5`` applied by the launcher (``vlmtune.xtuner_main``) to
the built model, never by editing XTuner's or the model's files.

- ``label_only_head`` (``train.label_only_head``): XTuner's ``_llm_forward`` runs the causal LM
  (``InternLM2ForCausalLM``), which projects EVERY position onto the 92,553-token vocabulary and
  casts the logits to fp32; XTuner then copies ``logits[:, :-1]`` and takes a cross-entropy in
  which every position without a label (``-100``: prompt, image tokens, padding) is ignored. A
  sample carries ~1,600 tokens of which ~40 have labels. The lever computes the same loss from
  the decoder's hidden states at the labelled positions only: position ``t`` predicts label
  ``t + 1`` (XTuner's shift), so the head (with its LoRA adapter) and the cross-entropy see exactly
  the rows whose terms the stock loss averages, and the mean is over the same count. Same loss,
  same gradients (tests/test_speed.py), a fraction of the head's GEMM and no full fp32 logits.
  The causal LM's ``forward`` is wrapped on the instance; it takes the short path only while
  ``InternVL_V1_5._llm_forward`` hands it the positions, so generation and any other caller see the
  original forward.
- ``qlora_compute_dtype`` (``train.qlora_compute_dtype``): XTuner hard-codes
  ``bnb_4bit_compute_dtype=torch.float16`` (docs/xtuner.md) while the model trains in bf16
  (DeepSpeed casts the module to bf16), so every 4-bit layer casts its bf16 input and its
  dequantised bf16 weight to fp16 and the fp16 output back to bf16. ``bfloat16`` sets the compute
  dtype of every bitsandbytes ``Linear4bit`` to bf16: no casts (the dequantised weight is bf16
  either way).
- ``quantize_head`` (``train.quantize_head``): XTuner's QLoRA quantises every linear layer of the
  LLM to 4-bit nf4, the 92,553-wide output head included (its ``BitsAndBytesConfig`` names only
  ``mlp1`` and ``vision_model`` to skip, which also switches off transformers' own habit of
  keeping the output head in full precision). ``false`` adds the head (``language_model.output``
  for InternLM2, ``language_model.lm_head`` for Phi-3) to the skip list, so it stays bf16 with its
  LoRA adapter: 0.38 GB instead of 0.1 GB of weights, no dequantisation of the largest matrix at
  every step, and the label-only head runs over it (over a 4-bit head it failed on the GPU).
  The merge is unchanged: ``convert_to_official`` merges the adapters into the bf16 base either way.
- ``fused_elementwise`` (``train.fused_elementwise``): InternLM2's RMSNorm runs six element-wise
  kernels (fp32 cast, square, mean, rsqrt, multiply, cast back, weight multiply), its MLP two more
  for SiLU and the gate product, and its rotary embedding four broadcast multiply/adds per query
  and key; the lever routes all three through ``torch.compile``d functions of the same arithmetic
  (``dynamic=True`` so varying sequence lengths do not recompile). The functions run uncompiled
  when ``compile=False`` (CPU tests).
- ``fused_lora`` (``train.fused_lora``): PEFT's LoRA layers add the adapter's output in three
  element-wise passes over a tokens x out_features tensor (copy, scale, add); the lever adds it
  inside the up-projection's GEMM (``addmm_``) and scales the rank-wide tensor instead.
- ``compile_layers`` (``train.compile_layers``): ``torch.compile`` of every decoder layer (CUDA
  only; not with recompute or ZeRO-3, see :func:`compile_blocker`).
- ``shared_rope`` (``train.shared_rope``): the rotary embedding's cos/sin computed by the first
  layer and reused by the others (one GPU-to-CPU sync per forward instead of one per layer in the
  dynamic-NTK code). Alone no faster; it is what lets ``compile_layers`` compile a layer as one
  graph (the sync was a graph break in every layer).

``bench_hook_class()`` is the benchmark's iteration hook: the project's ``IterationLogHook`` plus
the labelled-position count of each iteration (``labels.jsonl``, for the FLOP model) and an
optional ``torch.profiler`` window whose kernels are summed by category (``profile.json``).
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import time
import types
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
COMPUTE_DTYPES = ("float16", "bfloat16")


# ---------------------------------------------------------------- label-only head
def label_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices (into ``B * N``) of the positions whose next token carries a label, and those
    labels, in XTuner's order (row-major: the order of the stock loss's terms)."""
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    flat = shifted.reshape(-1)
    index = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    return index, flat.index_select(0, index)


def causal_lm(language_model: torch.nn.Module) -> torch.nn.Module:
    """The ``...ForCausalLM`` module inside a (possibly PEFT-wrapped) language model."""
    lm = language_model.get_base_model() if hasattr(language_model, "get_base_model") else language_model
    if not hasattr(lm, "get_output_embeddings") or not hasattr(lm, "model"):
        raise RuntimeError(f"{type(lm).__name__}: no decoder (.model) and output head to split")
    if getattr(lm.config, "pretraining_tp", 1) > 1:
        raise RuntimeError("label_only_head: pretraining_tp > 1 is not supported")
    return lm


def _selective_forward(lm: torch.nn.Module, original):
    """``lm.forward`` that, while ``lm._vlmtune_positions`` is set, returns fp32 logits only at
    those flat positions (shape ``[n, vocab]``); otherwise the original forward."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    def forward(*args, **kwargs):
        positions = lm.__dict__.get("_vlmtune_positions")
        if positions is None:
            return original(*args, **kwargs)
        if kwargs.pop("labels", None) is not None:
            raise RuntimeError("label_only_head: labels reached the causal LM")
        kwargs["return_dict"] = True
        outputs = lm.model(*args, **kwargs)
        hidden = outputs[0]
        selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
        logits = lm.get_output_embeddings()(selected).float()
        return CausalLMOutputWithPast(
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    return forward


def install_label_only_head(model_cls=None) -> None:
    """Wrap ``InternVL_V1_5._llm_forward`` (once): for an instance with
    ``vlmtune_label_only_head = True`` and labels given, the loss comes from the labelled positions
    only. Idempotent."""
    if model_cls is None:
        from xtuner.model import InternVL_V1_5 as model_cls
    if getattr(model_cls, "_vlmtune_label_only_installed", False):
        return
    original = model_cls._llm_forward

    def _llm_forward(self, *args, labels=None, **kwargs):
        if labels is None or not getattr(self, "vlmtune_label_only_head", False):
            return original(self, *args, labels=labels, **kwargs)
        lm = causal_lm(self.model.language_model)
        if "_vlmtune_wrapped" not in lm.__dict__:
            lm.forward = _selective_forward(lm, lm.forward)
            lm._vlmtune_wrapped = True
        positions, targets = label_positions(labels)
        lm._vlmtune_positions = positions
        try:
            out = original(self, *args, labels=None, **kwargs)
        finally:
            lm._vlmtune_positions = None
        logits = out.logits if hasattr(out, "logits") else out[0]
        # the stock CrossEntropyLoss: mean over the non-ignored terms (NaN when there are none)
        loss = F.cross_entropy(logits, targets.to(logits.device))
        if hasattr(out, "logits"):
            out["loss"] = loss  # item assignment: a ModelOutput's attribute and key both
            return out
        return (loss, *out)

    model_cls._llm_forward = _llm_forward
    model_cls._vlmtune_label_only_installed = True


# ---------------------------------------------------------------- output head outside 4-bit
HEAD_MODULES = ("language_model.output", "language_model.lm_head")


def keep_output_head_unquantized(internvl_module=None) -> None:
    """Make XTuner's ``InternVL_V1_5`` build its ``BitsAndBytesConfig`` with the LLM's output head
    among the modules left unquantised (``llm_int8_skip_modules``). Idempotent."""
    if internvl_module is None:
        import xtuner.model.internvl as internvl_module
    original = internvl_module.BitsAndBytesConfig
    if getattr(original, "_vlmtune_keeps_head", False):
        return

    class HeadKeepingBitsAndBytesConfig(original):
        _vlmtune_keeps_head = True

        def __init__(self, *args, llm_int8_skip_modules=None, **kwargs):
            skip = list(llm_int8_skip_modules or [])
            skip += [m for m in HEAD_MODULES if m not in skip]
            super().__init__(*args, llm_int8_skip_modules=skip, **kwargs)

    internvl_module.BitsAndBytesConfig = HeadKeepingBitsAndBytesConfig


# ---------------------------------------------------------------- 4-bit compute dtype
def set_4bit_compute_dtype(model: torch.nn.Module, dtype: str) -> int:
    """Set the compute dtype of every bitsandbytes 4-bit linear layer; returns how many."""
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"qlora_compute_dtype {dtype!r}: choose one of {COMPUTE_DTYPES}")
    target = getattr(torch, dtype)
    n = 0
    for module in model.modules():
        # bnb.nn.Linear4bit (PEFT's LoRA wrapper of it has no compute_dtype of its own)
        if type(module).__name__ == "Linear4bit" and hasattr(module, "compute_dtype"):
            module.compute_dtype = target
            module.compute_type_is_set = True  # keep bnb from re-deriving it from the first input
            n += 1
    return n


# ---------------------------------------------------------------- fused LoRA output
_WARNED: set = set()  # fallback reasons already warned about (once per process)


def _fallback(module: torch.nn.Module, why: str | None = None) -> None:
    """Count a call that took PEFT's own forward (the benchmark reads the count); warn once per
    process when a setting, not the call, keeps the lever from working (autocast, mixed dtypes)."""
    module.__dict__["_vlmtune_fallbacks"] = module.__dict__.get("_vlmtune_fallbacks", 0) + 1
    if why and why not in _WARNED:
        _WARNED.add(why)
        warnings.warn(
            f"train.fused_lora has no effect here ({why}): PEFT's own LoRA forward runs", stacklevel=3
        )


def fused_lora_forward(self, x, *args, **kwargs):
    """``forward`` of a PEFT LoRA linear layer (``lora.Linear``, or ``lora.bnb.Linear4bit``) that adds
    the adapter's output inside the up-projection's GEMM: ``y = base(x)`` flattened to 2-D, then
    ``y.addmm_(scaling * A(dropout(x)), B^T)`` in place. PEFT computes ``B(A(dropout(x))) * scaling``
    as a full-width tensor, scales it and adds it to ``base(x)`` (its 4-bit wrapper copies
    ``base(x)`` first), and the backward scales the full-width gradient again: element-wise passes
    over a tokens x out_features tensor that this does not make (the scaling moves to the rank-wide
    tensor; ``addmm_``'s backward hands the output gradient to the base unchanged). Same arithmetic
    up to the order of the scaling; the class's own forward runs whenever the case is not the
    plain one (several or disabled adapters, merged weights, DoRA, a LoRA bias, autocast, mixed
    dtypes, per-call adapter names, DeepSpeed ZeRO-3's partitioned weights). Bound to the instance
    (``types.MethodType``), so a deep copy of the model binds to the copy."""
    original = type(self).forward
    active = self.active_adapters
    name = active[0] if len(active) == 1 else None
    if (
        args
        or kwargs
        or name not in self.lora_A
        or self.disable_adapters
        or self.merged
        or self.use_dora.get(name, False)
        or self.lora_B[name].bias is not None
    ):
        _fallback(self)
        return original(self, x, *args, **kwargs)
    lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
    if torch.is_autocast_enabled():
        _fallback(self, "autocast is on, e.g. train.deepspeed: none on a GPU")
        return original(self, x, *args, **kwargs)
    if not (x.dtype == lora_a.dtype == lora_b.dtype):
        _fallback(self, f"input {x.dtype} but LoRA weights {lora_a.dtype}/{lora_b.dtype}")
        return original(self, x, *args, **kwargs)
    if hasattr(lora_b, "ds_id"):  # ZeRO-3 gathers a weight only when its own module is called
        _fallback(self, "DeepSpeed ZeRO-3 partitions the LoRA weights")
        return original(self, x, *args, **kwargs)
    flat = x.reshape(-1, x.shape[-1])
    result = self.base_layer(flat)
    if result.dtype != x.dtype:
        _fallback(self, f"the base layer returns {result.dtype} for {x.dtype} input")
        return original(self, x, *args, **kwargs)
    if result._base is not None:  # in place only on a tensor of its own (PEFT clones for this)
        result = result.clone()
    down = F.linear(self.lora_dropout[name](flat), lora_a) * self.scaling[name]
    result.addmm_(down, lora_b.t())
    return result.view(*x.shape[:-1], result.shape[-1])


def apply_fused_lora(model: torch.nn.Module) -> int:
    """Give every PEFT LoRA linear layer of ``model`` the fused forward (per instance); returns
    how many. Idempotent."""
    n = 0
    for module in model.modules():
        if not (hasattr(module, "lora_A") and hasattr(module, "base_layer") and hasattr(module, "scaling")):
            continue
        if not isinstance(module.get_base_layer(), torch.nn.Linear):  # bnb Linear4bit is one too
            continue
        module.forward = types.MethodType(fused_lora_forward, module)
        n += 1
    return n


# ---------------------------------------------------------------- fused RMSNorm / SwiGLU
def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """InternLM2RMSNorm.forward's arithmetic, op for op."""
    dtype = hidden.dtype
    h = hidden.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


_FUSED: dict = {}


def _fused(fn, compile: bool):
    if not compile:
        return fn
    if fn not in _FUSED:
        _FUSED[fn] = torch.compile(fn, dynamic=True)
    return _FUSED[fn]


def apply_fused_elementwise(model: torch.nn.Module, compile: bool = True) -> dict:
    """Route InternLM2's RMSNorm and SwiGLU MLP modules through the fused functions (per
    instance), and its attention's rotary embedding through a compiled copy of the model's own
    ``apply_rotary_pos_emb`` (looked up in the modelling module at every call, so replacing the
    module's attribute is enough; each InternLM2 release's own arithmetic is what gets compiled).
    The rotary function is replaced in the modelling module itself, so every model of this process
    that uses the same remote code gets the compiled copy too (same arithmetic). Returns counts."""
    norm, mlp = _fused(rms_norm, compile), _fused(silu_mul, compile)
    done = dict(rms_norm=0, swiglu=0, rope_modules=0)
    for module in model.modules():
        name = type(module).__name__
        if name == "InternLM2RMSNorm":
            module.forward = types.MethodType(
                lambda self, x: norm(x, self.weight, self.variance_epsilon), module
            )
            done["rms_norm"] += 1
        elif name == "InternLM2MLP" and isinstance(module.act_fn, torch.nn.SiLU):
            module.forward = types.MethodType(lambda self, x: self.w2(mlp(self.w1(x), self.w3(x))), module)
            done["swiglu"] += 1
        elif name.startswith("InternLM2") and name.endswith("Attention"):
            modelling = sys.modules[type(module).__module__]
            rope = getattr(modelling, "apply_rotary_pos_emb", None)
            if compile and rope is not None and not getattr(rope, "_vlmtune_fused", False):
                fused = _fused(rope, compile)
                fused._vlmtune_fused = True
                modelling.apply_rotary_pos_emb = fused
                done["rope_modules"] += 1
    return done


# ---------------------------------------------------------------- shared rotary embedding
def shared_rope_forward(self, x, position_ids):
    """The rotary module's forward through the cache its configuration shares with the other
    layers' modules (``self._vlmtune_rope_cache``): the first call for a ``position_ids`` tensor
    computes, the calls that follow with the same tensor (same identity and version), dtype and
    device reuse the result. Bound to the instance, so a deep copy shares a copied cache."""
    cache = self._vlmtune_rope_cache
    key = (position_ids._version, x.dtype, x.device)
    hit = cache.get("last")
    if hit is not None and hit[0] is position_ids and hit[1] == key:
        return hit[2]
    out = type(self).forward(self, x, position_ids)
    # a strong reference to position_ids: its id cannot be reused while the entry lives
    cache["last"] = (position_ids, key, out)
    return out


def share_rotary_embedding(model: torch.nn.Module) -> int:
    """Compute the rotary embedding's cos/sin once per forward and hand the same tensors to every
    layer. Newer InternLM2 code (the one xtuner 0.2.0 ships, ``forward(x, position_ids)``) gives each
    attention layer its own rotary module that recomputes cos/sin from ``position_ids``; its
    dynamic-NTK variant also compares ``max(position_ids)`` (a GPU tensor) with an int, which makes
    the CPU wait for the GPU in every layer. The modules of one configuration share a cache keyed
    by the identity (and version) of ``position_ids``, the input's dtype and device: the first
    layer computes, the others reuse the same values (no grad flows through cos/sin). Code whose
    rotary module takes a Python ``seq_len`` instead (the hub's InternVL2-2B code, as published)
    is left alone. Limit: the dynamic-NTK module that computes past ``max_position_embeddings``
    (32,768 for InternVL2-2B) stores a new ``inv_freq`` in itself only, so a later recompute by
    another layer's module could differ; training here stops at ``max_length`` (8,192 by default).
    Returns how many modules."""
    caches: dict = {}
    n = 0
    for module in model.modules():
        rope = getattr(module, "rotary_emb", None)
        if not isinstance(rope, torch.nn.Module):
            continue
        if "position_ids" not in inspect.signature(type(rope).forward).parameters:
            continue
        config = tuple(
            getattr(rope, k, None) for k in ("dim", "base", "max_position_embeddings", "scaling_factor")
        )
        rope._vlmtune_rope_cache = caches.setdefault((type(rope), config), {})
        rope.forward = types.MethodType(shared_rope_forward, rope)
        n += 1
    return n


# ---------------------------------------------------------------- compiled decoder layers
def compile_decoder_layers(model: torch.nn.Module, dynamic: bool = True) -> int:
    """``torch.compile`` every decoder layer of the LLM in place (``nn.Module.compile``): at a
    micro-batch of a few thousand tokens the GPU idles while Python launches many small kernels
    (HF's layer code, PEFT's LoRA wrapper, bitsandbytes' 4-bit autograd function); a compiled
    layer runs fewer, fused kernels. On an H200 (benchmarks/RESULTS.md, round 2d): no faster
    alone, where the per-layer rotary sync of xtuner's InternLM2 code breaks each layer's graph;
    with ``shared_rope`` 12.6 against 10.5 samples/s and 7.5 GiB less. ``dynamic=True``: one graph
    for every sequence length. Returns how many layers."""
    import torch._dynamo

    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    # one code object for all layers: keep dynamo from falling back to eager after 8 variants
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * len(layers))
    for layer in layers:
        layer.compile(dynamic=dynamic)
    return len(layers)


def compile_blocker(language_model: torch.nn.Module, settings: dict) -> str | None:
    """Why the decoder layers should not be compiled in this run, or None. Only the setting the
    benchmark measured is compiled: no recompute (gradient checkpointing wraps each layer's call in
    a checkpoint the compiled graph was not measured under) and no DeepSpeed ZeRO-3 (its
    partitioned weights are gathered by hooks around each module call)."""
    if settings.get("gradient_checkpointing"):
        return "gradient checkpointing is on (not measured together; set compile_layers: false)"
    if any(hasattr(p, "ds_id") for p in language_model.parameters()):
        return "DeepSpeed ZeRO-3 partitions the weights (set compile_layers: false)"
    return None


# ---------------------------------------------------------------- apply all
def apply(xtuner_model, settings: dict) -> dict:
    """Apply the levers of ``settings`` (the launcher dict) to a built ``InternVL_V1_5``."""
    done = {}
    if settings.get("label_only_head"):
        install_label_only_head(type(xtuner_model))
        xtuner_model.vlmtune_label_only_head = True
        causal_lm(xtuner_model.model.language_model)  # fail at start, not at the first batch
        done["label_only_head"] = True
    dtype = settings.get("qlora_compute_dtype", "float16")
    if dtype != "float16":
        done["4bit_layers_" + dtype] = set_4bit_compute_dtype(xtuner_model, dtype)
    if settings.get("fused_elementwise"):
        done.update(apply_fused_elementwise(xtuner_model, compile=torch.cuda.is_available()))
    if settings.get("fused_lora"):
        done["fused_lora_layers"] = apply_fused_lora(xtuner_model)
    if settings.get("shared_rope"):
        done["shared_rope_modules"] = share_rotary_embedding(xtuner_model.model.language_model)
    if settings.get("compile_layers") and torch.cuda.is_available():
        why_not = compile_blocker(xtuner_model.model.language_model, settings)
        if why_not:
            warnings.warn(f"compile_layers: decoder layers left uncompiled: {why_not}", stacklevel=2)
            done["compiled_layers"] = 0
        else:
            done["compiled_layers"] = compile_decoder_layers(xtuner_model.model.language_model)
    return done


# ---------------------------------------------------------------- benchmark hook
CATEGORIES = (
    "GEMM",
    "attention",
    "4-bit dequantize",
    "element-wise",
    "casts/copies",
    "optimizer",
    "communication",
)


def kernel_category(name: str) -> str:
    """The category of a CUDA kernel (or memcpy) name from ``torch.profiler``."""
    # Template arguments name lambdas ("{lambda(int)#1}") and ``gpu_kernel_impl_nocast``, which
    # would otherwise read as the optimizer's "lamb" and as a cast: drop those words first.
    n = name.lower().replace("lambda", "").replace("nocast", "")
    if any(k in n for k in ("flash", "fmha", "attention", "attn", "sdpa")):
        return "attention"
    if any(k in n for k in ("nccl", "allreduce", "all_reduce", "allgather", "reducescatter")):
        return "communication"
    if "dequant" in n:
        return "4-bit dequantize"
    if any(
        k in n
        for k in (
            "gemm",
            "gemv",
            "cutlass",
            "xmma",
            "nvjet",
            "cublas",
            "matmul",
            "splitk",
            "sm90_",
            "sm80_",
            "ampere_",
            "hopper_",
            "s16816",
            "s1688",
            "wgmma",
        )
    ):
        return "GEMM"
    if any(k in n for k in ("multi_tensor", "adam", "foreach", "optimizer", "lamb")):
        return "optimizer"
    if any(k in n for k in ("copy", "memcpy", "memset", "cast", "convert", "catarray", "fill")):
        return "casts/copies"
    return "element-wise"


def summarise_profile(prof, wall_s: float, iterations: int) -> dict:
    """Device time by kernel category over a profiled window; idle = wall time - busy union."""
    spans, by_cat, top = [], {c: 0.0 for c in CATEGORIES}, {}
    for evt in prof.events():
        if getattr(evt, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        start, end = evt.time_range.start, evt.time_range.end
        if end <= start:
            continue
        cat = kernel_category(evt.name)
        by_cat[cat] += (end - start) / 1e6
        top[evt.name] = top.get(evt.name, 0.0) + (end - start) / 1e6
        spans.append((start, end))
    spans.sort()
    busy, cur_s, cur_e = 0.0, None, None
    for s, e in spans:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        busy += cur_e - cur_s
    busy /= 1e6
    shares = {c: t / wall_s for c, t in by_cat.items()}
    shares["idle"] = max(0.0, wall_s - busy) / wall_s
    return dict(
        wall_s=wall_s,
        iterations=iterations,
        busy_s=busy,
        seconds=by_cat,
        share=shares,
        top_kernels=sorted(([k, v] for k, v in top.items()), key=lambda kv: -kv[1])[:25],
    )


def bench_hook_class():
    """IterationLogHook + labelled-position counts + an optional profiler window, set by
    ``VLMTUNE_PROFILE=START:COUNT`` (iterations, 1-based start)."""
    from mmengine.dist import get_rank

    from .iteration_log import hook_class

    base = hook_class()
    spec = os.environ.get("VLMTUNE_PROFILE", "")
    start, count = (int(x) for x in spec.split(":")) if spec else (0, 0)

    class BenchIterationLogHook(base):
        def __init__(self):
            super().__init__()
            self._prof = None
            self._prof_t0 = None

        def before_train_iter(self, runner, batch_idx, data_batch=None):
            if count and runner.iter + 1 == start and get_rank() == 0 and torch.cuda.is_available():
                torch.cuda.synchronize()
                self._prof = torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                )
                self._prof.__enter__()
                self._prof_t0 = time.perf_counter()
            super().before_train_iter(runner, batch_idx, data_batch)

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            super().after_train_iter(runner, batch_idx, data_batch, outputs)
            if get_rank() != 0:
                return
            labels = data_batch["data"]["labels"]
            with Path(runner.work_dir, "labels.jsonl").open("a") as fh:
                fh.write(
                    json.dumps(
                        dict(iteration=runner.iter + 1, labelled=int((labels[:, 1:] != IGNORE_INDEX).sum()))
                    )
                    + "\n"
                )
            if self._prof is not None and runner.iter + 1 == start + count - 1:
                torch.cuda.synchronize()
                wall = time.perf_counter() - self._prof_t0
                self._prof.__exit__(None, None, None)
                summary = summarise_profile(self._prof, wall, count)
                summary["first_iteration"] = start
                Path(runner.work_dir, "profile.json").write_text(json.dumps(summary, indent=1))
                self._prof = None

    return BenchIterationLogHook
