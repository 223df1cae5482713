"""Token-exact prompt parity: the ids XTuner 0.2.0 trains on (its own InternVL dataset code),
the ids LMDeploy would send (its own chat-template, InternVL preprocessing and tokenisation code,
as its PyTorch/TurboMind paths run them) and the ids of the transformers engine are the same,
for the demo tiny model's tokenizer; a changed system prompt or separator breaks the equality."""

import copy
import json

import pytest

from vlmtune.prompt import SYSTEM_PROMPT, TEMPLATE, image_tokens, lmdeploy_chat_template, training_prompt

# A portrait image (300x900: several tiles plus the thumbnail) and a small landscape one (1 tile).
SAMPLES = [("demo003", "这张图片里的人在想什么?"), ("demo000", "请你根据这张图片,讲一个脑洞大开的梗。")]


def xtuner_prompt_ids(model_dir, image_folder, image, question, tmp_path):
    """Input ids of one training sample through XTuner's InternVL dataset, up to the response."""
    from mmengine.config import ConfigDict
    from xtuner.dataset.internvl_dataset import InternVL_V1_5_Dataset
    from xtuner.utils import IGNORE_INDEX, PROMPT_TEMPLATE

    sample = dict(
        id=0,
        image=f"images/{image}.jpg",
        conversations=[
            dict(**{"from": "human", "value": f"<image>\n{question}"}),
            dict(**{"from": "gpt", "value": "月亮不睡你不睡。"}),
        ],
    )
    data = tmp_path / "train.json"
    data.write_text(json.dumps([sample], ensure_ascii=False), encoding="utf-8")
    ds = InternVL_V1_5_Dataset(
        str(model_dir),
        ConfigDict(copy.deepcopy(PROMPT_TEMPLATE.internlm2_chat)),
        str(data),
        image_folders=str(image_folder),
        max_length=8192,
    )
    item = ds.prepare_data(0)
    first_label = next(i for i, lab in enumerate(item["labels"]) if lab != IGNORE_INDEX)
    return item["input_ids"][:first_label], len(item["pixel_values"])


def lmdeploy_prompt_ids(model_dir, image_path, question, template_config):
    """Input ids LMDeploy builds for the request the LMDeploy engine sends (its own message
    parsing, InternVL preprocessing, template and tokenizer; no GPU needed), and the tile count."""
    from lmdeploy.vl import load_image

    from vlmtune.lmdeploy_engine import prompt_ids, tiling

    ids, _ = prompt_ids(model_dir, load_image(str(image_path)), question, template_config)
    img_ctx = (
        ids.count(TOKENIZER_IMG_CONTEXT[str(model_dir)]) if str(model_dir) in TOKENIZER_IMG_CONTEXT else None
    )
    if img_ctx is None:
        from transformers import AutoTokenizer

        TOKENIZER_IMG_CONTEXT[str(model_dir)] = AutoTokenizer.from_pretrained(
            model_dir, trust_remote_code=True
        ).convert_tokens_to_ids("<IMG_CONTEXT>")
        img_ctx = ids.count(TOKENIZER_IMG_CONTEXT[str(model_dir)])
    return ids, img_ctx // tiling(model_dir)["tokens_per_tile"]


TOKENIZER_IMG_CONTEXT: dict = {}


@pytest.fixture(scope="module")
def engine(tiny_model):
    from vlmtune.evaluate import TransformersEngine

    return TransformersEngine(tiny_model, device="cpu")


@pytest.mark.parametrize("image,question", SAMPLES)
def test_training_lmdeploy_and_transformers_prompts_are_token_identical(
    tiny_model, demo_dataset, engine, tmp_path, image, question
):
    train_ids, train_tiles = xtuner_prompt_ids(tiny_model, demo_dataset, image, question, tmp_path)
    lmd_ids, lmd_tiles = lmdeploy_prompt_ids(
        tiny_model, demo_dataset / "images" / f"{image}.jpg", question, lmdeploy_chat_template()
    )
    rec = dict(id="x", image=f"images/{image}.jpg", question=question, references=[])
    _, _, enc = engine.prepare([rec], demo_dataset)
    eval_ids = enc.input_ids[0].tolist()

    assert train_tiles == lmd_tiles
    if image == "demo003":
        assert train_tiles > 1  # the multi-tile path (and its thumbnail) is covered
    img_ctx = engine.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert train_ids.count(img_ctx) == train_tiles * engine.tokens_per_tile
    assert train_ids[0] == engine.tokenizer.bos_token_id
    assert lmd_ids == train_ids
    assert eval_ids == train_ids
    # The transformers engine's text is what XTuner renders (system prompt and pieces included).
    text = engine.tokenizer.decode(train_ids[1:])
    assert text == training_prompt(question, image_tokens(train_tiles, engine.tokens_per_tile))


CHANGES = {
    "system prompt": dict(system="你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型。"),
    "newline after <|im_end|> (internlm2_chat separators)": dict(
        template={**TEMPLATE, "eosys": "<|im_end|>\n", "eoh": "<|im_end|>\n"}
    ),
    "no newline after the user tag": dict(template={**TEMPLATE, "user": "<|im_start|>user"}),
}


@pytest.mark.parametrize("change", CHANGES, ids=list(CHANGES))
def test_changed_system_prompt_or_separator_breaks_parity(tiny_model, demo_dataset, engine, tmp_path, change):
    image, question = SAMPLES[1]
    train_ids, tiles = xtuner_prompt_ids(tiny_model, demo_dataset, image, question, tmp_path)
    kwargs = CHANGES[change]
    lmd_ids, _ = lmdeploy_prompt_ids(
        tiny_model, demo_dataset / "images" / f"{image}.jpg", question, lmdeploy_chat_template(**kwargs)
    )
    text = training_prompt(
        question, image_tokens(tiles, engine.tokens_per_tile), **{"system": SYSTEM_PROMPT, **kwargs}
    )
    eval_ids = engine.tokenizer(text, add_special_tokens=True).input_ids
    assert lmd_ids != train_ids
    assert eval_ids != train_ids
    assert lmd_ids == eval_ids  # both renderers apply the same change the same way


def test_a_model_folder_without_internvl2_in_its_name_gets_the_training_template(
    tiny_model, demo_dataset, tmp_path
):
    """The engine hands LMDeploy the template, so the tutorial's rename trick is not needed: a
    merged model in `my-finetune/` is prompted exactly as in training. Without the explicit
    template LMDeploy would pick another one for such a folder (what the trick worked around)."""
    import shutil

    from lmdeploy.model import get_chat_template
    from lmdeploy.vl import load_image

    from vlmtune.lmdeploy_engine import prompt_ids

    renamed = tmp_path / "my-finetune"
    shutil.copytree(tiny_model, renamed)
    image, question = SAMPLES[0]
    image_path = demo_dataset / "images" / f"{image}.jpg"
    assert (
        prompt_ids(renamed, load_image(str(image_path)), question)[0]
        == prompt_ids(tiny_model, load_image(str(image_path)), question)[0]
    )
    messages = [dict(role="user", content="<img><IMG_CONTEXT></img>\n" + question)]
    explicit = get_chat_template(str(renamed), lmdeploy_chat_template()).messages2prompt(messages)
    assert explicit == training_prompt(question, "<img><IMG_CONTEXT></img>")
    assert get_chat_template(str(renamed), None).messages2prompt(messages) != explicit
