"""Build an InternVL2 model in the exact remote-code format, with random weights.

``tiny`` is the demo/test model (seconds on a CPU); ``full`` has exactly the shapes of
OpenGVLab/InternVL2-2B (2,205,754,368 parameters) for GPU speed and memory measurements.
The InternViT and InternLM2 code is copied from the installed xtuner wheel; the chat
wrapper is the project's own (``vlmtune/remote_code``). The tokenizer is trained locally
and holds InternVL2's special tokens at the same positions relative to the vocabulary end.

    python -m vlmtune.model_builder --preset tiny --out data/demo/InternVL2-tiny
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from .atomic import atomic_dir
from .envcheck import xtuner_root

REMOTE_CODE = Path(__file__).parent / "remote_code"
# (sub-package of xtuner, file) pairs shipped by xtuner 0.2.0 (docs/xtuner.md, "Model code in the
# wheel").
XTUNER_MODEL_CODE = [
    ("_lite/modelings/internvl2", "configuration_intern_vit.py"),
    ("_lite/modelings/internvl2", "modeling_intern_vit.py"),
    ("_lite/modelings/internlm2", "configuration_internlm2.py"),
    ("_lite/modelings/internlm2", "modeling_internlm2.py"),
]
OWN_MODEL_CODE = ["configuration_internvl_chat.py", "modeling_internvl_chat.py"]

# InternLM2 / InternVL2-2B special tokens, in id order at the end of the vocabulary.
SPECIAL_TAIL = [
    "<|plugin|>",
    "<|interpreter|>",
    "<|action_end|>",
    "<|action_start|>",
    "<|im_end|>",
    "<|im_start|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
]
SPECIAL_HEAD = ["<unk>", "<s>", "</s>"]
# InternVL2-4B (Phi-3-mini): Phi-3's added tokens (32000-32010), then InternVL's (32011-32019).
PHI3_SPECIAL_TAIL = [
    "<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
    "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>",
    "<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>",
]  # fmt: skip
# The LLM families of the InternVL2 models XTuner 0.2.0 trains: the special-token tail of the
# tokenizer, the stop token generation ends on, and config.json's ``template``.
LLM_FAMILIES = {
    "internlm2": dict(tail=SPECIAL_TAIL, stop="<|im_end|>", template="internlm2-chat"),
    "phi3": dict(tail=PHI3_SPECIAL_TAIL, stop="<|end|>", template="phi3-chat"),
}

PRESETS = {
    "full": dict(
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
        llm=dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=24,
            num_attention_heads=16,
            num_key_value_heads=8,
        ),
        vocab_size=92553,
        bpe_vocab=8000,
        max_dynamic_patch=12,
    ),
    "tiny": dict(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        llm=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        vocab_size=1200,
        bpe_vocab=1185,
        max_dynamic_patch=4,
    ),
    # InternVL2-4B: InternViT-300M + Phi-3-mini-128k (multi-head attention, LongRoPE).
    "tiny-4b": dict(
        llm_family="phi3",
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        llm=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4),
        vocab_size=1200, bpe_vocab=1180, max_dynamic_patch=4,
    ),
    "full-4b": dict(
        llm_family="phi3",
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
        llm=dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32),
        vocab_size=32020, bpe_vocab=8000, max_dynamic_patch=12,
    ),
    # InternVL2-8B: InternViT-300M + InternLM2.5-7B-chat (32 heads over 8 KV heads).
    "tiny-8b": dict(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        llm=dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2),
        vocab_size=1200, bpe_vocab=1185, max_dynamic_patch=4,
    ),
    "full-8b": dict(
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
        llm=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8),
        vocab_size=92553, bpe_vocab=8000, max_dynamic_patch=12,
    ),
    # InternVL2-26B: InternViT-6B (RMSNorm, QK-norm, no qkv bias) + InternLM2-chat-20B.
    "full-26b": dict(
        vision=dict(hidden_size=3200, intermediate_size=12800, num_hidden_layers=45, num_attention_heads=25,
                    qkv_bias=False, qk_normalization=True, norm_type="rms_norm"),
        llm=dict(hidden_size=6144, intermediate_size=16384, num_hidden_layers=48, num_attention_heads=48,
                 num_key_value_heads=8),
        vocab_size=92553, bpe_vocab=8000, max_dynamic_patch=12,
    ),
}  # fmt: skip

SYSTEM_PROMPT = "You are an AI assistant whose name is InternLM (书生·浦语)."
DEFAULT_QUESTION = "请你根据这张图片,讲一个脑洞大开的梗。"
_CORPUS = [
    SYSTEM_PROMPT,
    DEFAULT_QUESTION,
    "住手!现在的你还不是那家伙的对手!先撤吧!!",
    "小猫咪,你的猫爪好臭啊",
    "这张图片中的猫咪看起来非常可爱,甚至有点滑稽。",
    "老板说今天加班,我说我的电脑先下班了。",
    "The quick brown fox jumps over the lazy dog. Tell me a joke about this picture.",
    "月亮不睡你不睡,你是秃头小宝贝。",
    "我不是胖,我只是对地球的爱比较沉重。",
]


def copy_model_code(out: Path) -> list[str]:
    root = xtuner_root()
    names = []
    for sub, name in XTUNER_MODEL_CODE:
        shutil.copyfile(root / sub / name, out / name)
        names.append(name)
    for name in OWN_MODEL_CODE:
        shutil.copyfile(REMOTE_CODE / name, out / name)
        names.append(name)
    return names


def model_config(preset: str, vocab_size: int) -> dict:
    p = PRESETS[preset]
    vision = dict(
        architectures=["InternVisionModel"],
        model_type="intern_vit_6b",
        image_size=448,
        patch_size=14,
        num_channels=3,
        qkv_bias=True,
        qk_normalization=False,
        norm_type="layer_norm",
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        dropout=0.0,
        drop_path_rate=0.0,
        attention_dropout=0.0,
        initializer_range=0.02,
        initializer_factor=1.0,
        use_flash_attn=True,
    )
    vision.update(p["vision"])  # the 26B's InternViT-6B overrides norm, qkv bias and QK-norm
    family = p.get("llm_family", "internlm2")
    if family == "phi3":
        llm = phi3_llm_config(p["llm"], vocab_size)
    else:
        llm = dict(
            architectures=["InternLM2ForCausalLM"],
            model_type="internlm2",
            vocab_size=vocab_size,
            hidden_act="silu",
            max_position_embeddings=32768,
            rms_norm_eps=1e-5,
            bias=False,
            rope_theta=1000000,
            rope_scaling={"type": "dynamic", "factor": 2.0},
            tie_word_embeddings=False,
            use_cache=True,
            initializer_range=0.02,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
            attn_implementation="eager",
            **p["llm"],
        )
    return dict(
        architectures=["InternVLChatModel"],
        auto_map={
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
            "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
        },
        model_type="internvl_chat",
        template=LLM_FAMILIES[family]["template"],
        torch_dtype="bfloat16",
        force_image_size=448,
        downsample_ratio=0.5,
        dynamic_image_size=True,
        use_thumbnail=True,
        ps_version="v2",
        select_layer=-1,
        min_dynamic_patch=1,
        max_dynamic_patch=p["max_dynamic_patch"],
        use_backbone_lora=0,
        use_llm_lora=0,
        vision_config=vision,
        llm_config=llm,
    )


def phi3_llm_config(dims: dict, vocab_size: int) -> dict:
    """Phi-3-mini-128k-instruct's LLM config (InternVL2-4B's ``llm_config``), as transformers'
    own ``Phi3Config`` reads it: LongRoPE over a 4k original context (factors 1.0 here: the
    weights are random anyway), SiLU MLP with fused gate/up, fused QKV."""
    half_head = dims["hidden_size"] // dims["num_attention_heads"] // 2
    return dict(
        architectures=["Phi3ForCausalLM"], model_type="phi3", vocab_size=vocab_size,
        hidden_act="silu", max_position_embeddings=131072, original_max_position_embeddings=4096,
        rms_norm_eps=1e-5, rope_theta=10000.0,
        rope_scaling={"type": "longrope", "long_factor": [1.0] * half_head,
                      "short_factor": [1.0] * half_head},
        sliding_window=262144, tie_word_embeddings=False, use_cache=True, initializer_range=0.02,
        attention_dropout=0.0, embd_pdrop=0.0, resid_pdrop=0.0, bos_token_id=1, eos_token_id=2,
        pad_token_id=2, attn_implementation="eager", **dims,
    )  # fmt: skip


def build_tokenizer(vocab_size: int, bpe_vocab: int, corpus: list[str], tail: list[str] = SPECIAL_TAIL):
    """A byte-level BPE tokenizer of exactly ``vocab_size`` ids: <unk>/<s>/</s> first,
    trained merges, ``<unused_N>`` filler, then InternVL2's special tokens last."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    base = vocab_size - len(tail)
    if bpe_vocab > base:
        raise ValueError(f"bpe_vocab {bpe_vocab} does not fit in {base} regular ids")
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab,
        special_tokens=SPECIAL_HEAD,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trained.train_from_iterator(corpus * 4, trainer)
    state = json.loads(trained.to_str())["model"]
    vocab = dict(state["vocab"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    for i in range(len(vocab), base):
        vocab[f"<unused_{i}>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_HEAD + tail])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    if tok.get_vocab_size() != vocab_size:
        raise AssertionError(f"tokenizer has {tok.get_vocab_size()} ids, wanted {vocab_size}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        additional_special_tokens=tail,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )


def build(
    out: Path, preset: str = "tiny", seed: int = 0, corpus: list[str] | None = None, device: str = "cpu"
) -> Path:
    """Write a randomly initialised InternVL2 of ``preset``'s architecture (the real remote-code
    classes), with a tokenizer trained on the corpus, to ``out`` (atomically). ``device``: where
    the weights are initialised (``cuda`` makes the exact-size 8B and 26B quick to build); the
    files are the same format either way."""
    import torch
    from transformers import AutoConfig, AutoModel

    if preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    with atomic_dir(Path(out)) as tmp:
        copy_model_code(tmp)
        (tmp / "config.json").write_text(json.dumps(model_config(preset, p["vocab_size"]), indent=2))
        family = LLM_FAMILIES[p.get("llm_family", "internlm2")]
        corpus = _CORPUS + list(corpus or [])
        tokenizer = build_tokenizer(p["vocab_size"], p["bpe_vocab"], corpus, family["tail"])
        tokenizer.save_pretrained(tmp)
        config = AutoConfig.from_pretrained(tmp, trust_remote_code=True)
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModel.from_config(config, trust_remote_code=True, torch_dtype=torch.bfloat16)
        model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        # save_pretrained rewrites config.json with the temporary folder's name: make the
        # build reproducible byte for byte. The remote code must stay beside it.
        saved = json.loads((tmp / "config.json").read_text())
        saved["_name_or_path"] = Path(out).name
        (tmp / "config.json").write_text(json.dumps(saved, indent=2) + "\n")
        copy_model_code(tmp)
        stop = tokenizer.convert_tokens_to_ids(family["stop"])
        (tmp / "generation_config.json").write_text(
            json.dumps({"bos_token_id": 1, "eos_token_id": [2, stop]}, indent=2)
        )
    return Path(out)


def preset_parameter_count(preset: str) -> int:
    """Parameters of a preset's model, instantiated on the meta device (no memory, no weights)."""
    import tempfile

    import torch
    from transformers import AutoConfig, AutoModel

    with tempfile.TemporaryDirectory() as tmp:
        copy_model_code(Path(tmp))
        (Path(tmp) / "config.json").write_text(
            json.dumps(model_config(preset, PRESETS[preset]["vocab_size"]))
        )
        config = AutoConfig.from_pretrained(tmp, trust_remote_code=True)
        with torch.device("meta"):
            model = AutoModel.from_config(config, trust_remote_code=True)
    return sum(p.numel() for p in model.parameters())


def count_parameters(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                total += _prod(st.get_slice(k).get_shape())
    return total


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="where to initialise the weights (cpu | cuda)")
    args = ap.parse_args(argv)
    path = build(args.out, args.preset, args.seed, device=args.device)
    print(f"built {args.preset} InternVL2 at {path}: {count_parameters(path):,} parameters")


if __name__ == "__main__":
    main()
