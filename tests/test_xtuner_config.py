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


def test_four_gpu_qlora_config(configs, train_json, tmp_path):
    text, plan = render(tmp_path / "InternVL2-2B", train_json, tmp_path / "ds", configs[0]["train"])
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
