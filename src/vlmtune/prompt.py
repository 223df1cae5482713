"""The prompt InternVL2 is trained on by XTuner 0.2.0 (FIELD-NOTES §2), so evaluation sends
exactly the same one. XTuner's InternVL dataset forces the InternLM2 system prompt and joins
the turns without the newline separators of the ``internlm2_chat`` template:

    <s><|im_start|>system\\n{system}<|im_end|><|im_start|>user\\n<img>{<IMG_CONTEXT> x N}</img>\\n
    {question}<|im_end|><|im_start|>assistant\\n

The same pieces are handed to LMDeploy as an explicit chat template (:func:`lmdeploy_chat_template`),
so neither the model folder's name nor LMDeploy's version picks the template: LMDeploy <= 0.9
matches it by path, >= 0.10 maps ``internvl2-internlm2`` to the tokenizer's own chat template,
which puts newlines after ``<|im_end|>`` and ignores ``meta_instruction``.
"""

from __future__ import annotations

SYSTEM_PROMPT = "You are an AI assistant whose name is InternLM (书生·浦语)."
IMG_START, IMG_CONTEXT, IMG_END = "<img>", "<IMG_CONTEXT>", "</img>"
STOP_WORDS = ["<|im_end|>"]

# The turn pieces of XTuner's InternVL dataset, in LMDeploy's BaseChatTemplate field names.
TEMPLATE = dict(
    system="<|im_start|>system\n",
    eosys="<|im_end|>",
    user="<|im_start|>user\n",
    eoh="<|im_end|>",
    assistant="<|im_start|>assistant\n",
    eoa="<|im_end|>",
    separator="",
)


def image_tokens(num_tiles: int, tokens_per_tile: int) -> str:
    return IMG_START + IMG_CONTEXT * (num_tiles * tokens_per_tile) + IMG_END


def user_text(question: str) -> str:
    """The question as XTuner keeps it: ``<image>`` tags removed, surrounding blanks stripped."""
    return question.replace("<image>", "").strip()


def training_prompt(
    question: str, image: str | None, system: str = SYSTEM_PROMPT, template: dict = TEMPLATE
) -> str:
    """The text XTuner tokenises for one human turn (``image`` from :func:`image_tokens`)."""
    user = user_text(question)
    if image is not None:
        user = (image + "\n" + user).strip()
    t = template
    return f"{t['system']}{system}{t['eosys']}{t['user']}{user}{t['eoh']}{t['assistant']}"


def lmdeploy_chat_template(system: str = SYSTEM_PROMPT, template: dict = TEMPLATE):
    """LMDeploy's ``ChatTemplateConfig`` for the training prompt, every piece named.

    ``base`` is LMDeploy's plain ``BaseChatTemplate`` in every version since 0.5: it uses
    exactly the pieces given here, whatever the model path or the tokenizer's template.
    """
    from lmdeploy import ChatTemplateConfig

    return ChatTemplateConfig(
        model_name="base", meta_instruction=system, stop_words=list(STOP_WORDS), **template
    )
