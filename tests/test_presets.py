"""model.preset (issue 19): per-template prompt parity on tiny builds of the 4B (Phi-3) and the
8B (InternLM2.5) architectures, LoRA targets, the preset/model check, and what `snakemake -n`
shows for a preset."""

import copy
import json
import subprocess
import sys

import pytest

from vlmtune.presets import PRESETS, get

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
TINY = {name: p.tiny_builder for name, p in PRESETS.items() if p.tiny_builder and name != "InternVL2-2B"}


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request, tmp_path_factory):
    from vlmtune import model_builder
    from vlmtune.demo import JOKES, QUESTIONS

    out = tmp_path_factory.mktemp("preset") / request.param
    return request.param, model_builder.build(out, TINY[request.param], 0, corpus=JOKES + QUESTIONS)


def xtuner_ids(model_dir, template, image_folder, image, question, tmp_path):
    from mmengine.config import ConfigDict
    from xtuner.dataset.internvl_dataset import InternVL_V1_5_Dataset
    from xtuner.utils import IGNORE_INDEX, PROMPT_TEMPLATE

    sample = dict(
        id=0,
        image=f"images/{image}.jpg",
        conversations=[
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": "月亮不睡你不睡。"},
        ],
    )
    data = tmp_path / "train.json"
    data.write_text(json.dumps([sample], ensure_ascii=False), encoding="utf-8")
    ds = InternVL_V1_5_Dataset(
        str(model_dir),
        ConfigDict(copy.deepcopy(PROMPT_TEMPLATE[template])),
        str(data),
        image_folders=str(image_folder),
        max_length=8192,
    )
    item = ds.prepare_data(0)
    first = next(i for i, lab in enumerate(item["labels"]) if lab != IGNORE_INDEX)
    return item["input_ids"][:first], item["input_ids"][first:], ds.tokenizer


@pytest.mark.parametrize("image,question", [("demo003", "这张图片里的人在想什么?"), ("demo000", "讲个笑话")])
def test_training_lmdeploy_and_transformers_ids_are_identical_per_template(
    tiny, demo_dataset, tmp_path, image, question
):
    from lmdeploy.vl import load_image

    from vlmtune.evaluate import TransformersEngine
    from vlmtune.lmdeploy_engine import prompt_ids
    from vlmtune.prompt import chat_format, image_tokens

    name, model_dir = tiny
    preset = get(name)
    assert chat_format(model_dir) == preset.chat
    train_ids, response_ids, tok = xtuner_ids(
        model_dir, preset.xtuner_template, demo_dataset, image, question, tmp_path
    )
    lmd_ids, _ = prompt_ids(model_dir, load_image(str(demo_dataset / "images" / f"{image}.jpg")), question)
    engine = TransformersEngine(model_dir, device="cpu")
    _, prompts, enc = engine.prepare(
        [dict(id="x", image=f"images/{image}.jpg", question=question, references=[])], demo_dataset
    )
    assert lmd_ids == train_ids
    assert enc.input_ids[0].tolist() == train_ids
    tiles = train_ids.count(tok.convert_tokens_to_ids("<IMG_CONTEXT>")) // engine.tokens_per_tile
    assert tok.decode(train_ids[1:]) == preset.chat.prompt(
        question, image_tokens(tiles, engine.tokens_per_tile)
    )
    # training labels the response and the preset's stop word, which generation stops on
    assert tok.decode(response_ids).endswith(preset.chat.suffix)
    assert tok.convert_tokens_to_ids(preset.chat.suffix) in engine.stop_ids
    if name == "InternVL2-4B":
        assert prompts[0].startswith(
            "<|system|>\nYou are an AI assistant whose name is Phi-3.<|end|>\n<|user|>\n"
        )


def test_lora_targets_are_what_xtuner_resolves(tiny):
    import torch
    from transformers import AutoModel
    from xtuner.model.utils import find_all_linear_names

    name, model_dir = tiny
    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True, torch_dtype=torch.float32)
    assert set(find_all_linear_names(model.language_model)) == set(get(name).lora_targets)


def test_render_refuses_a_model_of_another_llm(tiny, tmp_path):
    from vlmtune.xtuner_config import prompt_template

    name, model_dir = tiny
    assert prompt_template(model_dir, name) == get(name).xtuner_template
    if name == "InternVL2-4B":
        with pytest.raises(ValueError, match="expects a InternLM2ForCausalLM LLM"):
            prompt_template(model_dir, "InternVL2-2B")


def test_26b_method_and_zero_stage():
    from vlmtune.config import ConfigError, load, validate_config

    base = load(ROOT / "config" / "config.yaml")
    qlora = validate_config({**copy.deepcopy(base), "model": {**base["model"], "preset": "InternVL2-26B"}})
    assert (qlora["train"]["gpus"], qlora["train"]["deepspeed"]) == (8, "zero2")
    lora = copy.deepcopy(base)
    lora["model"]["preset"], lora["train"]["method"] = "InternVL2-26B", "lora"
    assert validate_config(lora)["train"]["deepspeed"] == "zero3"
    bad = copy.deepcopy(base)
    bad["model"]["preset"], bad["train"]["method"], bad["train"]["deepspeed"] = (
        "InternVL2-26B",
        "lora",
        "zero2",
    )
    with pytest.raises(ConfigError, match="52 GB"):
        validate_config(bad)


@pytest.mark.parametrize(
    "preset, shown",
    [
        (
            "InternVL2-8B",
            [
                "model InternVL2-8B (OpenGVLab/InternVL2-8B",
                "--preset InternVL2-8B",
                "# XTuner template internlm2_chat",
                "--deepspeed zero2",
                "mem_mb=256000",
                "runtime=720",
                "gpu=4",
                "data/models/InternVL2-8B",
            ],
        ),
        (
            "InternVL2-4B",
            ["XTuner template phi3_chat", "name is Phi-3.", "stop <|end|>", "--preset InternVL2-4B"],
        ),
    ],
)
def test_dry_run_shows_the_presets_resources_and_template(tmp_path, preset, shown):
    overlay = tmp_path / "preset.yaml"
    overlay.write_text(f"model: {{preset: {preset}}}\n")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-n",
            "-p",
            "--snakefile",
            str(ROOT / "Snakefile"),
            "--directory",
            str(tmp_path),
            "--configfile",
            str(ROOT / "config" / "config.yaml"),
            str(overlay),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    for s in shown:
        assert s in text, s


def test_validation_counts_the_tokens_xtuner_feeds_per_template(tiny, demo_dataset, tmp_path):
    """vlmtune.validate's length check builds each sample with the model's template (the tiny-4B
    demo's Phi-3 was refused before): its count equals the ids of XTuner's dataset."""
    from vlmtune.validate import TokenLength, model_tiling

    name, model_dir = tiny
    question = "这张图片里的人在想什么?"
    train_ids, response_ids, tok = xtuner_ids(
        model_dir, get(name).xtuner_template, demo_dataset, "demo003", question, tmp_path
    )
    tiling = model_tiling(model_dir)
    tiles = train_ids.count(tok.convert_tokens_to_ids("<IMG_CONTEXT>")) // tiling["tokens_per_tile"]
    conversations = [
        {"from": "human", "value": f"<image>\n{question}"},
        {"from": "gpt", "value": "月亮不睡你不睡。"},
    ]
    count = TokenLength(model_dir, tiling)
    assert count(conversations, tiles) == count(conversations, tiles, expand=True)
    assert count(conversations, tiles) == len(train_ids) + len(response_ids)
