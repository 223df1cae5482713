import json

import torch


def test_tiny_model_round_trip(tiny_model):
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(tiny_model, trust_remote_code=True, torch_dtype=torch.bfloat16)
    assert type(model).__name__ == "InternVLChatModel"
    saved = load_file(str(tiny_model / "model.safetensors"))
    state = model.state_dict()
    assert set(saved) == set(state)
    assert all(torch.equal(saved[k], state[k]) for k in saved)
    # InternVL2's parameter names, which xtuner and LMDeploy look up.
    for name in [
        "vision_model.embeddings.patch_embedding.weight",
        "vision_model.encoder.layers.0.attn.qkv.weight",
        "mlp1.0.weight",
        "mlp1.1.weight",
        "mlp1.3.weight",
        "language_model.model.tok_embeddings.weight",
        "language_model.model.layers.0.attention.wqkv.weight",
        "language_model.model.layers.0.feed_forward.w1.weight",
        "language_model.output.weight",
    ]:
        assert name in saved, name
    cfg = json.loads((tiny_model / "config.json").read_text())
    assert cfg["force_image_size"] == 448 and cfg["vision_config"]["patch_size"] == 14
    assert model.num_image_token == 256  # (448/14)^2 x 0.5^2
    tok = AutoTokenizer.from_pretrained(tiny_model, trust_remote_code=True)
    vocab = cfg["llm_config"]["vocab_size"]
    assert len(tok) == vocab
    # Same layout as InternVL2-2B relative to the vocabulary end (92553: <|im_end|> 92542, <img> 92544).
    assert tok.convert_tokens_to_ids("<|im_end|>") == vocab - 11
    assert tok.convert_tokens_to_ids("<IMG_CONTEXT>") == vocab - 7
    ids = tok("<|im_start|>user\n请你讲个笑话<|im_end|>").input_ids
    assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=False).endswith("<|im_end|>")
    assert tok.decode(tok("脑洞大开的梗", add_special_tokens=False).input_ids) == "脑洞大开的梗"


def test_builder_is_deterministic(tiny_model, tmp_path):
    from vlmtune.demo_model import build_model

    again = build_model(tmp_path / "InternVL2-tiny", seed=0)
    for name in ["model.safetensors", "tokenizer.json", "config.json"]:
        assert (again / name).read_bytes() == (tiny_model / name).read_bytes(), name


def test_full_preset_has_internvl2_2b_size():
    from vlmtune.model_builder import preset_parameter_count

    assert preset_parameter_count("full") == 2_205_754_368
