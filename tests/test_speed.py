"""The launcher's speed levers (vlmtune.speed) on CPU: the label-only head gives XTuner's loss and
gradients on the tiny demo model through XTuner's own model and dataset; the fused RMSNorm/SwiGLU
arithmetic equals the modules'; the 4-bit compute dtype switch; the new config keys render."""

import json
import os
import socket

import pytest
import torch

from vlmtune import speed


@pytest.fixture(scope="module")
def process_group():
    # InternVL_V1_5's forward calls torch.distributed.get_rank() (docs/xtuner.md, "Launching")
    if not torch.distributed.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(port)
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    yield


@pytest.fixture(scope="module")
def xtuner_batch(tiny_model, demo_dataset, tmp_path_factory, process_group):
    """XTuner's InternVL_V1_5 (LoRA on every LLM linear incl. the head, dropout 0) and one collated,
    right-padded batch of 3 samples from XTuner's dataset over demo images."""
    from peft import LoraConfig
    from xtuner.dataset.collate_fns import default_collate_fn
    from xtuner.dataset.internvl_dataset import InternVL_V1_5_Dataset
    from xtuner.model import InternVL_V1_5
    from xtuner.utils import PROMPT_TEMPLATE

    images = sorted(p.name for p in (demo_dataset / "images").glob("*.jpg"))[:3]
    answers = ["今天的天气真不错啊", "猫说它不想上班", "这张图告诉我们要多喝水,少熬夜,早点睡觉"]
    records = [
        dict(
            id=i,
            image=f"images/{name}",
            conversations=[
                {"from": "human", "value": "<image>\n请你根据这张图片,讲一个脑洞大开的梗。"},
                {"from": "gpt", "value": a},
            ],
        )
        for i, (name, a) in enumerate(zip(images, answers))
    ]
    tmp = tmp_path_factory.mktemp("speed")
    (tmp / "train.json").write_text(json.dumps(records, ensure_ascii=False))
    dataset = InternVL_V1_5_Dataset(
        str(tiny_model),
        PROMPT_TEMPLATE.internlm2_chat,
        [str(tmp / "train.json")],
        [str(demo_dataset)],
        max_length=100000,
    )
    batch = default_collate_fn([dataset[i] for i in range(len(records))])["data"]
    torch.manual_seed(0)
    lora = dict(
        type=LoraConfig, r=8, lora_alpha=16, lora_dropout=0.0, target_modules=None, task_type="CAUSAL_LM"
    )
    model = InternVL_V1_5(str(tiny_model), freeze_llm=True, freeze_visual_encoder=True, llm_lora=lora).float()
    model.gradient_checkpointing_disable()
    # non-zero LoRA B so the adapters (and their gradients) take part in the comparison
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model, batch


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(batch)["loss"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), grads


def test_label_positions_follow_xtuners_shift():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, -100, -100, -100]])
    index, targets = speed.label_positions(labels)
    # position t predicts label t+1; flat index into B * N
    assert index.tolist() == [1, 2, 5] and targets.tolist() == [5, 6, 7]


def test_label_only_head_same_loss_and_gradients(xtuner_batch):
    model, batch = xtuner_batch
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    assert 0 < labelled < batch["labels"].numel() // 4  # most positions carry no label
    assert bool((batch["attention_mask"] == 0).any())  # the batch is padded
    model.vlmtune_label_only_head = False
    ref_loss, ref_grads = loss_and_grads(model, batch)
    done = speed.apply(model, dict(label_only_head=True))
    assert done == {"label_only_head": True}
    assert model.vlmtune_label_only_head
    lm = speed.causal_lm(model.model.language_model)
    seen = []
    head = lm.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    try:
        loss, grads = loss_and_grads(model, batch)
    finally:
        handle.remove()
        model.vlmtune_label_only_head = False
    assert seen == [(labelled, lm.config.vocab_size)]  # the head ran on the labelled rows only
    assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=0), (float(loss), float(ref_loss))
    assert (
        set(grads) == set(ref_grads) and any("lora" in n for n in grads) and any("mlp1" in n for n in grads)
    )
    for name, g in grads.items():
        assert torch.allclose(g, ref_grads[name], rtol=1e-4, atol=1e-7), name
    # switched off again: the original path (full logits) and the same loss
    assert torch.allclose(model(batch)["loss"].detach(), ref_loss, rtol=1e-6, atol=0)


def test_label_only_head_leaves_other_callers_alone(xtuner_batch):
    model, batch = xtuner_batch
    speed.install_label_only_head(type(model))
    model.vlmtune_label_only_head = True
    try:
        lm = speed.causal_lm(model.model.language_model)
        ids = batch["input_ids"][:1, :12]
        out = model.model.language_model(input_ids=ids)  # e.g. generation: full logits
        assert out.logits.shape == (1, 12, lm.config.vocab_size)
        # without labels XTuner's _llm_forward runs the original path too
        assert lm.__dict__.get("_vlmtune_positions") is None
    finally:
        model.vlmtune_label_only_head = False


def test_fused_elementwise_arithmetic_equals_modules(tiny_model):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(
        str(tiny_model), torch_dtype=torch.float32, trust_remote_code=True
    ).eval()
    layer = model.language_model.model.layers[0]
    torch.manual_seed(0)
    x = torch.randn(2, 7, model.config.llm_config.hidden_size)
    with torch.no_grad():
        layer.attention_norm.weight.normal_(1, 0.1)
        ref_norm, ref_mlp = layer.attention_norm(x), layer.feed_forward(x)
        ref_bf16 = layer.attention_norm(x.bfloat16().float().bfloat16())
        done = speed.apply_fused_elementwise(model, compile=False)
        assert done["rms_norm"] == 2 * len(model.language_model.model.layers) + 1 and done["swiglu"] == len(
            model.language_model.model.layers
        )
        assert torch.equal(layer.attention_norm(x), ref_norm)
        assert torch.equal(layer.feed_forward(x), ref_mlp)
        assert torch.equal(layer.attention_norm(x.bfloat16().float().bfloat16()), ref_bf16)


def _lora_pair(dropout: float, dtype):
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.SiLU(), torch.nn.Linear(40, 16, bias=False))
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["0", "2"])
    stock = get_peft_model(base, cfg).to(dtype)
    for name, p in stock.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero: give the adapter an output to check
            torch.nn.init.normal_(p, std=0.5)
    fused = copy.deepcopy(stock)
    assert speed.apply_fused_lora(fused) == 2 and speed.apply_fused_lora(fused) == 2  # idempotent
    return stock, fused


def _out_and_grads(model, x, seed):
    torch.manual_seed(seed)
    x = x.clone().requires_grad_(True)
    y = model(x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads


@pytest.mark.parametrize(
    "dtype, dropout, tol",
    [(torch.float32, 0.0, 1e-6), (torch.float32, 0.3, 1e-6), (torch.bfloat16, 0.3, 2e-2)],
)
def test_fused_lora_same_output_and_gradients(dtype, dropout, tol):
    stock, fused = _lora_pair(dropout, dtype)
    stock.train(), fused.train()
    x = torch.randn(3, 5, 24, dtype=dtype)
    y0, gx0, g0 = _out_and_grads(stock, x, seed=7)
    y1, gx1, g1 = _out_and_grads(fused, x, seed=7)  # same seed: the same dropout masks

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    assert y1.shape == y0.shape and rel(y1, y0) < tol and rel(gx1, gx0) < tol
    assert set(g1) == set(g0) and any("lora_A" in n for n in g0)
    assert all(rel(g1[n], g0[n]) < tol for n in g0)
    if dropout:  # the masks matter: another seed gives another output
        assert rel(_out_and_grads(fused, x, seed=8)[0], y0) > 10 * tol


def test_fused_lora_survives_a_deep_copy():
    import copy

    _, fused = _lora_pair(0.0, torch.float32)
    twin = copy.deepcopy(fused)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if "lora_B" in name:
                p.zero_()  # the copy's adapters off: its output must be its base model's
        x = torch.randn(2, 24)
        with twin.disable_adapter():
            base = twin(x)
        assert torch.equal(twin(x), base) and not torch.allclose(fused(x), base, atol=1e-3)


def test_fused_lora_leaves_the_other_cases_to_peft():
    stock, fused = _lora_pair(0.0, torch.float32)
    x = torch.randn(2, 24)
    with torch.no_grad():
        with fused.disable_adapter(), stock.disable_adapter():  # adapters off: the base model
            base = fused(x)
            assert torch.equal(base, stock(x))
        assert not torch.allclose(fused(x), base, atol=1e-3)  # adapters on again
        layer = fused.base_model.model[0]
        before = layer._vlmtune_fallbacks  # the disabled adapters above took PEFT's path too
        layer.lora_B.default.weight.ds_id = 7  # as DeepSpeed ZeRO-3 marks a partitioned weight
        with pytest.warns(UserWarning, match="ZeRO-3"):
            assert torch.equal(fused(x), stock(x)) and layer._vlmtune_fallbacks == before + 1
        del layer.lora_B.default.weight.ds_id
        fused.merge_adapter()  # merged weights: PEFT's own path
        assert torch.allclose(fused(x), stock(x), atol=1e-5)


def test_shared_rope_same_logits_one_computation_per_forward(tiny_model):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(tiny_model), torch_dtype=torch.float32, trust_remote_code=True)
    lm = model.eval().language_model
    ids = torch.randint(0, lm.config.vocab_size, (2, 19))
    with torch.no_grad():
        ref = lm(input_ids=ids).logits
    ropes = [layer.attention.rotary_emb for layer in lm.model.layers]
    assert len(ropes) > 1
    computed = []
    cls = type(ropes[0])
    counted = type(
        "Counted",
        (cls,),
        {"forward": lambda self, x, position_ids: computed.append(1) or cls.forward(self, x, position_ids)},
    )
    for rope in ropes:  # count what reaches the modules' own code
        rope.__class__ = counted
    assert speed.share_rotary_embedding(lm) == len(ropes) and speed.share_rotary_embedding(lm) == len(ropes)
    with torch.no_grad():
        assert torch.equal(lm(input_ids=ids).logits, ref)
        assert len(computed) == 1  # once per forward, not once per layer
        lm(input_ids=ids[:, :11])  # new position ids: computed again
        assert len(computed) == 2


def test_shared_rope_leaves_seq_len_style_modules_alone():
    class SeqLenRope(torch.nn.Module):
        def forward(self, x, seq_len=None):
            return x, x

    holder = torch.nn.Module()
    holder.rotary_emb = SeqLenRope()
    assert speed.share_rotary_embedding(holder) == 0 and "forward" not in holder.rotary_emb.__dict__


def test_4bit_compute_dtype():
    bnb = pytest.importorskip("bitsandbytes")
    model = torch.nn.Sequential(
        bnb.nn.Linear4bit(16, 16, compute_dtype=torch.float16),
        torch.nn.Linear(16, 16),
        bnb.nn.Linear4bit(16, 8, compute_dtype=torch.float16),
    )
    assert speed.set_4bit_compute_dtype(model, "bfloat16") == 2
    assert model[0].compute_dtype == torch.bfloat16 and model[2].compute_dtype == torch.bfloat16
    assert model[0].compute_type_is_set
    with pytest.raises(ValueError, match="float32"):
        speed.set_4bit_compute_dtype(model, "float32")


def test_kernel_categories():
    c = speed.kernel_category
    assert c("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "GEMM"
    assert c("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT") == "GEMM"
    assert c("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128>>") == "attention"
    assert c("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>") == "4-bit dequantize"
    assert (
        c("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda>")
        == "casts/copies"
    )
    assert (
        c("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>")
        == "optimizer"
    )
    assert c("void at::native::vectorized_elementwise_kernel<4, at::native::silu_kernel>") == "element-wise"
    # names as the H200 profile printed them: lambdas in template arguments are no optimizer
    binary_mul = (
        "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::"
        "BinaryFunctor<c10::BFloat16, c10::BFloat16, c10::BFloat16, at::native::binary_internal::MulFunctor"
        "<float> > >(at::TensorIteratorBase&, ...)::{lambda(int)#1}>(int, ...)"
    )
    assert c(binary_mul) == "element-wise"
    gelu = (
        "void at::native::vectorized_elementwise_kernel<8, at::native::GeluCUDAKernelImpl(at::"
        "TensorIteratorBase&, at::native::GeluType)::{lambda()#2}::operator()() const>(int, ...)"
    )
    assert c(gelu) == "element-wise"
    copy_in_lambda = (
        "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::"
        "direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}::operator()() const>(int, ...)"
    )
    assert c(copy_in_lambda) == "casts/copies"
    assert c("Memcpy HtoD (Pageable -> Device)") == "casts/copies"
    assert c("void at::native::(anonymous namespace)::CatArrayBatchedCopy<float, 4, 64>") == "casts/copies"
    assert c("void at::native::scatter_gather_elementwise_kernel<128, 4>") == "element-wise"


def test_new_keys_render(tiny_model, tmp_path):
    from vlmtune.xtuner_config import render
    from vlmtune.xtuner_main import launcher_settings

    (tmp_path / "train.json").write_text(json.dumps([dict(id=i) for i in range(40)]))
    train = dict(
        device="cpu",
        gpus=0,
        method="lora",
        max_length=512,
        batch_size=2,
        accumulative_counts=1,
        max_epochs=1,
        lr=1e-4,
        warmup_ratio=0.2,
        seed=0,
    )
    text, _ = render(tiny_model, tmp_path / "train.json", tmp_path, train)
    (tmp_path / "stock.py").write_text(text)
    stock = launcher_settings(str(tmp_path / "stock.py"))
    assert (
        stock["label_only_head"] is False
        and stock["qlora_compute_dtype"] == "float16"
        and stock["quantize_head"] is True
        and stock["fused_elementwise"] is False
        and stock["fused_lora"] is False
    )
    text, _ = render(
        tiny_model,
        tmp_path / "train.json",
        tmp_path,
        dict(
            train,
            label_only_head=True,
            qlora_compute_dtype="bfloat16",
            quantize_head=False,
            fused_elementwise=True,
            fused_lora=True,
        ),
    )
    (tmp_path / "fast.py").write_text(text)
    fast = launcher_settings(str(tmp_path / "fast.py"))
    assert (
        fast["label_only_head"] is True
        and fast["qlora_compute_dtype"] == "bfloat16"
        and fast["quantize_head"] is False
        and fast["fused_elementwise"] is True
        and fast["fused_lora"] is True
    )


def test_schema_and_overlay_accept_the_keys():
    from pathlib import Path

    from vlmtune.config import load, validate_config

    root = Path(__file__).resolve().parents[1]
    cfg = validate_config(load(root / "config" / "config.yaml", root / "config" / "gpu-24g.yaml"))
    t = cfg["train"]
    assert t["method"] == "qlora" and t["gradient_checkpointing"] is True
    assert t["label_only_head"] is True and t["qlora_compute_dtype"] == "bfloat16"
    assert t["quantize_head"] is False
    assert t["compile_layers"] is False and t["shared_rope"] is True  # recompute: not compiled
    default = validate_config(load(root / "config" / "config.yaml"))["train"]
    assert default["compile_layers"] is True and default["shared_rope"] is True
    assert default["gradient_checkpointing"] is False  # the setting compile_layers was measured in
    bad = load(root / "config" / "config.yaml")
    bad["train"]["qlora_compute_dtype"] = "float32"
    with pytest.raises(Exception, match="qlora_compute_dtype"):
        validate_config(bad)


def test_compile_blocker_names_the_settings_it_was_not_measured_in():
    lm = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert speed.compile_blocker(lm, dict(gradient_checkpointing=False)) is None
    assert "gradient checkpointing" in speed.compile_blocker(lm, dict(gradient_checkpointing=True))
    lm[0].weight.ds_id = 7  # how DeepSpeed ZeRO-3 marks a partitioned parameter
    assert "ZeRO-3" in speed.compile_blocker(lm, dict(gradient_checkpointing=False))


def test_profile_summary_shape():
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.randn(64, 64) @ torch.randn(64, 64)
    p = speed.summarise_profile(prof, wall_s=0.5, iterations=2)
    assert set(p["share"]) == {*speed.CATEGORIES, "idle"} and p["iterations"] == 2
    assert p["share"]["idle"] == 1.0  # no device kernels on CPU


def test_output_head_stays_out_of_4bit():
    """``quantize_head: false``: XTuner's own BitsAndBytesConfig (skip list mlp1 + vision_model)
    gains the LLM's output head, and transformers' 4-bit replacement then leaves exactly the head
    (and what XTuner skips) as plain linear layers while the decoder's layers become 4-bit."""
    import types

    from torch import nn
    from transformers import BitsAndBytesConfig
    from transformers.integrations import replace_with_bnb_linear

    fake_internvl = types.SimpleNamespace(BitsAndBytesConfig=BitsAndBytesConfig)
    speed.keep_output_head_unquantized(fake_internvl)
    speed.keep_output_head_unquantized(fake_internvl)  # idempotent: one subclass, no repeats
    cls = fake_internvl.BitsAndBytesConfig
    assert cls is not BitsAndBytesConfig and cls.__bases__ == (BitsAndBytesConfig,)
    config = cls(load_in_4bit=True, llm_int8_skip_modules=["mlp1", "vision_model"])
    assert config.llm_int8_skip_modules == ["mlp1", "vision_model", *speed.HEAD_MODULES]

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.ModuleDict(dict(wqkv=nn.Linear(64, 64), w2=nn.Linear(64, 64)))
            self.output = nn.Linear(64, 96)

    model = nn.Module()
    model.language_model, model.mlp1 = LM(), nn.Linear(64, 64)
    model.vision_model = nn.ModuleDict(dict(fc1=nn.Linear(64, 64)))
    model = replace_with_bnb_linear(
        model, modules_to_not_convert=config.llm_int8_skip_modules, quantization_config=config
    )
    kinds = {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert kinds == {
        "language_model.model.wqkv": "Linear4bit",
        "language_model.model.w2": "Linear4bit",
        "language_model.output": "Linear",
        "mlp1": "Linear",
        "vision_model.fc1": "Linear",
    }
