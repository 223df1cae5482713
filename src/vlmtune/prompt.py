"""The prompt InternVL2 is trained on by XTuner 0.2.0 (docs/xtuner.md, "The training prompt"),
so evaluation sends exactly the same one. XTuner's InternVL dataset forces the InternLM2 system
prompt and joins the turns without the newline separators of the ``internlm2_chat`` template:

    <s><|im_start|>system\\n{system}<|im_end|><|im_start|>user\\n<img>{<IMG_CONTEXT> x N}</img>\\n
    {question}<|im_end|><|im_start|>assistant\\n

The same pieces are handed to LMDeploy as an explicit chat template (:func:`lmdeploy_chat_template`),
so neither the model folder's name nor LMDeploy's version picks the template: LMDeploy <= 0.9
matches it by path, >= 0.10 maps ``internvl2-internlm2`` to the tokenizer's own chat template,
which puts newlines after ``<|im_end|>`` and ignores ``meta_instruction``.

InternVL2-4B's LLM is Phi-3: there the dataset forces ``You are an AI assistant whose name is
Phi-3.`` and ``phi3_chat``'s pieces (:data:`PHI3`)::

    <s><|system|>\n{system}<|end|>\n<|user|>\n<img>...</img>\n{question}<|end|><|assistant|>\n

:func:`chat_format` picks the pieces from a model folder's LLM architecture, as XTuner does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

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


# Phi-3 (InternVL2-4B): XTuner's dataset keeps ``phi3_chat``'s SYSTEM (newline after ``<|end|>``)
# and replaces its INSTRUCTION by ``<|user|>\n{input}<|end|><|assistant|>\n`` (no newline).
PHI3_SYSTEM_PROMPT = "You are an AI assistant whose name is Phi-3."
PHI3_STOP_WORDS = ["<|end|>"]
PHI3_TEMPLATE = dict(
    system="<|system|>\n",
    eosys="<|end|>\n",
    user="<|user|>\n",
    eoh="<|end|>",
    assistant="<|assistant|>\n",
    eoa="<|end|>",
    separator="",
)


@dataclass(frozen=True)
class ChatFormat:
    """The training prompt of one LLM family as XTuner 0.2.0's InternVL dataset builds it:
    the system prompt it forces, the turn pieces, the stop word (the response's SUFFIX, which
    training labels) and the XTuner prompt template the rendered config names."""

    llm_architecture: str
    xtuner_template: str
    system: str
    template: dict = field(hash=False)
    stop_words: tuple = ()

    @property
    def suffix(self) -> str:
        return self.stop_words[0]

    def prompt(self, question: str, image: str | None) -> str:
        return training_prompt(question, image, system=self.system, template=self.template)

    def lmdeploy(self):
        return lmdeploy_chat_template(system=self.system, template=self.template, stop_words=self.stop_words)


INTERNLM2 = ChatFormat("InternLM2ForCausalLM", "internlm2_chat", SYSTEM_PROMPT, TEMPLATE, tuple(STOP_WORDS))
PHI3 = ChatFormat("Phi3ForCausalLM", "phi3_chat", PHI3_SYSTEM_PROMPT, PHI3_TEMPLATE, tuple(PHI3_STOP_WORDS))
# The LLMs XTuner 0.2.0's InternVL dataset accepts (any other raises NotImplementedError there).
FORMATS = {f.llm_architecture: f for f in (INTERNLM2, PHI3)}


class UnsupportedLLM(ValueError):
    pass


def llm_architecture(model_dir) -> str:
    cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    return ((cfg.get("llm_config") or {}).get("architectures") or ["?"])[0]


def chat_format(model_dir) -> ChatFormat:
    """The training prompt of a model folder, chosen as XTuner's dataset chooses it: by the
    LLM architecture in its ``config.json``."""
    arch = llm_architecture(model_dir)
    if arch not in FORMATS:
        raise UnsupportedLLM(
            f"{model_dir}: LLM {arch} is not trained by XTuner 0.2.0's InternVL dataset "
            f"(it accepts {', '.join(FORMATS)})"
        )
    return FORMATS[arch]


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


def lmdeploy_chat_template(system: str = SYSTEM_PROMPT, template: dict = TEMPLATE, stop_words=STOP_WORDS):
    """LMDeploy's ``ChatTemplateConfig`` for the training prompt, every piece named.

    ``base`` is LMDeploy's plain ``BaseChatTemplate`` in every version since 0.5: it uses
    exactly the pieces given here, whatever the model path or the tokenizer's template.
    """
    from lmdeploy import ChatTemplateConfig

    return ChatTemplateConfig(
        model_name="base", meta_instruction=system, stop_words=list(stop_words), **template
    )
