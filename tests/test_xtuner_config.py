import json

import pytest

from vlmtune.config import deep_merge
from vlmtune.xtuner_config import iteration_plan, render


@pytest.fixture
def train_json(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([{"id": i} for i in range(10000)]))
    return path


def load(text, tmp_path):
    from mmengine.config import Config

    path = tmp_path / "cfg.py"
    path.write_text(text)
    return Config.fromfile(str(path))


# The tutorial's settings over the shipped GPU config (which defaults to bf16 LoRA, micro-batch 4).
TUTORIAL = {"method": "qlora", "batch_size": 8, "accumulative_counts": 2, "global_batch_size": None}


def test_four_gpu_qlora_config(configs, train_json, tmp_path):
    text, plan = render(
        tmp_path / "InternVL2-2B", train_json, tmp_path / "ds", deep_merge(configs[0]["train"], TUTORIAL)
    )
    cfg = load(text, tmp_path)
    assert cfg.model.quantization_llm is True
    assert cfg.model.llm_lora.r == 128 and cfg.model.llm_lora.lora_alpha == 256
    assert cfg.model.model_path == str((tmp_path / "InternVL2-2B").resolve())
    assert cfg.llava_dataset.model_path == cfg.model.model_path == cfg.tokenizer.pretrained_model_name_or_path
    assert cfg.optim_wrapper.type.__name__ == "AmpOptimWrapper"
    assert cfg.optim_wrapper.optimizer.lr == 2e-5
    assert cfg.env_cfg.dist_cfg.backend == "nccl"
    assert cfg.train_dataloader.batch_size == 8 and cfg.optim_wrapper.accumulative_counts == 2
    assert cfg.max_length == 8192 and cfg.randomness.seed == 42
    assert cfg.default_hooks.checkpoint.save_optimizer is True
    assert "model_wrapper_cfg" not in cfg
    # 10,000 samples / global batch 64 = 157 optimizer steps x 2 accumulation = 314 iterations.
    assert plan["global_batch_size"] == 64 and plan["iterations"] == 314 and plan["world_size"] == 4
    assert plan["warmup_iterations"] == 9


def test_cpu_lora_config(configs, train_json, tmp_path):
    text, plan = render(tmp_path / "m", train_json, tmp_path / "ds", configs[1]["train"])
    cfg = load(text, tmp_path)
    assert cfg.model.quantization_llm is False
    assert cfg.optim_wrapper.type.__name__ == "OptimWrapper"
    assert "dtype" not in cfg.optim_wrapper
    assert cfg.env_cfg.dist_cfg.backend == "gloo"
    assert cfg.model_wrapper_cfg.device_ids is None
    assert plan["world_size"] == 1


def test_tutorial_iteration_count():
    # The tutorial: 39,736 samples on 4 GPUs, batch 8, accumulation 2 -> 1,242 iterations.
    assert iteration_plan(39736, 4, 8, 2, 1, 0.03)["iterations"] == 1242


def test_short_warmup_is_refused(configs, tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([{"id": i} for i in range(20)]))
    train = deep_merge(configs[1]["train"], {"warmup_ratio": 0.03})
    with pytest.raises(ValueError, match="at least 2 are needed"):
        render(tmp_path / "m", path, tmp_path / "ds", train)


LEVERS = {
    "attention": "sdpa",
    "gradient_checkpointing": False,
    "group_by_exact_length": True,
    "cuda_expandable_segments": True,
    "iteration_log": True,
    "label_only_head": True,
    "qlora_compute_dtype": "bfloat16",
    "quantize_head": False,
    "fused_elementwise": True,
    "fused_lora": True,
    "compile_layers": True,
    "shared_rope": True,
    "pin_memory": True,
    "max_iters": 12,
}


def test_stock_settings_render_stock_behaviour(configs, train_json, tmp_path):
    from vlmtune.xtuner_main import launcher_settings

    stock = {k: v for k, v in deep_merge(configs[0]["train"], TUTORIAL).items() if k not in LEVERS}
    text, plan = render(tmp_path / "m", train_json, tmp_path / "ds", stock)
    (tmp_path / "stock.py").write_text(text)
    assert launcher_settings(str(tmp_path / "stock.py")) == dict(
        attention="eager",
        gradient_checkpointing=True,
        group_by_exact_length=False,
        cuda_expandable_segments=False,
        iteration_log=False,
        label_only_head=False,
        qlora_compute_dtype="float16",
        quantize_head=True,
        fused_elementwise=False,
        fused_lora=False,
        compile_layers=False,
        shared_rope=False,
    )
    cfg = load(text, tmp_path)
    assert cfg.train_cfg.max_epochs == 1 and "max_iters" not in cfg.train_cfg
    assert [h.type.__name__ if not isinstance(h.type, str) else h.type for h in cfg.custom_hooks] == [
        "DatasetInfoHook"
    ]


def test_levers_reach_the_launcher(configs, train_json, tmp_path):
    from vlmtune.xtuner_main import launcher_settings

    text, plan = render(tmp_path / "m", train_json, tmp_path / "ds", deep_merge(configs[0]["train"], LEVERS))
    (tmp_path / "fast.py").write_text(text)
    settings = launcher_settings(str(tmp_path / "fast.py"))
    assert settings == {k: v for k, v in LEVERS.items() if k not in ("max_iters", "pin_memory")}
    cfg = load(text, tmp_path)
    assert cfg.train_cfg.max_iters == 12 and "max_epochs" not in cfg.train_cfg
    assert plan["iterations"] == 12
    assert cfg.custom_hooks[-1].type == "IterationLogHook"
    # the config stays a plain XTuner config: the lever block is data, not code
    assert cfg.vlmtune_launcher["attention"] == "sdpa"


def test_unknown_launcher_key_is_refused(tmp_path):
    from vlmtune.xtuner_main import launcher_settings

    (tmp_path / "c.py").write_text("vlmtune_launcher = {'attention': 'sdpa', 'flash': True}\n")
    with pytest.raises(SystemExit, match="flash"):
        launcher_settings(str(tmp_path / "c.py"))


def test_project_gpu_defaults(configs):
    train = configs[0]["train"]
    assert train["attention"] == "sdpa" and train["group_by_exact_length"] is True
    # QLoRA is the product's method (the tutorial's); bf16 LoRA is a documented choice
    assert train["method"] == "qlora" and train["cuda_expandable_segments"] is True
    assert train["label_only_head"] is True and train["qlora_compute_dtype"] == "bfloat16"
    assert train["quantize_head"] is False  # the label-only head needs a bf16 head under QLoRA
    # the global batch of the tutorial (8 x 2 x 4 GPUs) is kept whatever the micro-batch
    assert train["global_batch_size"] == 64


def test_exact_group_lengths_use_the_tile_count():
    from types import SimpleNamespace

    from vlmtune.xtuner_main import exact_group_lengths

    guess = 256 * 13
    data = [
        {"image": "a.jpg", "width": 448, "height": 448},  # one tile, no thumbnail
        {"image": "b.jpg", "width": 1344, "height": 448},  # 3x1 tiles + thumbnail
        {"image": "c.jpg", "image_wh": [10, 10]},  # XTuner already counted it
        {"image": None},  # text only: negative length, untouched
        {"image": "d.jpg"},  # no size: the guess stays
    ]
    ds = SimpleNamespace(
        data=data,
        group_length=[40 + guess, 50 + guess, 999, -30, 60 + guess],
        patch_token=256,
        max_dynamic_patch=12,
        min_dynamic_patch=1,
        use_thumbnail=True,
        image_size=448,
    )
    assert exact_group_lengths(ds) == 2
    assert ds.group_length == [40 + 256, 50 + 4 * 256, 999, -30, 60 + guess]


def test_shipped_gpu_config_keeps_the_global_batch(configs, train_json, tmp_path):
    text, plan = render(tmp_path / "m", train_json, tmp_path / "ds", configs[0]["train"])
    cfg = load(text, tmp_path)
    assert cfg.model.quantization_llm is True  # the shipped default trains QLoRA
    assert cfg.train_dataloader.batch_size == 4 and cfg.optim_wrapper.accumulative_counts == 4
    assert cfg.train_dataloader.pin_memory is True
    assert plan["global_batch_size"] == 64 and plan["iterations"] == 157 * 4


def test_iteration_log_summary_counts_padding_and_wall_time():
    from vlmtune.iteration_log import summarise

    rec = lambda s, real, padded, n: dict(
        seconds=s,
        step_seconds=s * 0.9,
        samples=n,
        tiles=3 * n,
        real_tokens=real,
        padded_tokens=padded,
        lengths=[],
        loss=1.0,
        max_allocated=2**30,
        max_reserved=2**31,
    )
    s = summarise([rec(9.0, 10, 10, 2), rec(1.0, 60, 80, 2), rec(3.0, 40, 40, 4)], warmup=1)
    assert s["iterations"] == 2 and s["samples_per_s"] == 6 / 4.0 and s["real_tokens_per_s"] == 100 / 4.0
    assert s["padding_share"] == 1 - 100 / 120 and s["tiles_per_sample"] == 3.0
    assert abs(s["data_wait_share"] - 0.1) < 1e-9 and s["max_reserved_gib"] == 2.0
    with pytest.raises(ValueError, match="none left"):
        summarise([rec(1.0, 1, 1, 1)], warmup=1)


def test_tutorial_overlay_renders_the_stock_tutorial_run(train_json, tmp_path):
    """config/tutorial.yaml over the shipped config gives back the tutorial's exact settings."""
    from conftest import ROOT
    from vlmtune.config import load as load_config
    from vlmtune.config import validate_config
    from vlmtune.xtuner_main import launcher_settings

    config = validate_config(load_config(ROOT / "config" / "config.yaml", ROOT / "config" / "tutorial.yaml"))
    text, plan = render(tmp_path / "m", train_json, tmp_path / "ds", config["train"])
    (tmp_path / "tutorial.py").write_text(text)
    assert launcher_settings(str(tmp_path / "tutorial.py")) == dict(
        attention="eager",
        gradient_checkpointing=True,
        group_by_exact_length=False,
        cuda_expandable_segments=False,
        iteration_log=False,
        label_only_head=False,
        qlora_compute_dtype="float16",
        quantize_head=True,
        fused_elementwise=False,
        fused_lora=False,
        compile_layers=False,
        shared_rope=False,
    )
    cfg = load(text, tmp_path)
    assert cfg.model.quantization_llm is True and cfg.train_dataloader.batch_size == 8
    assert cfg.train_dataloader.pin_memory is False  # XTuner's config leaves it unset
    assert cfg.optim_wrapper.accumulative_counts == 2 and plan["global_batch_size"] == 64
    assert iteration_plan(39736, 4, 8, 2, 1, 0.03)["iterations"] == 1242
