"""The prompt InternVL2 is trained on by XTuner 0.2.0 (FIELD-NOTES §2), so evaluation can send
exactly the same one: XTuner's InternVL dataset forces the InternLM2 system prompt and joins
the turns without separators:

    <s><|im_start|>system\\n{system}<|im_end|><|im_start|>user\\n<img>{<IMG_CONTEXT> x N}</img>\\n
    {question}<|im_end|><|im_start|>assistant\\n
"""

SYSTEM_PROMPT = "You are an AI assistant whose name is InternLM (书生·浦语)."
IMG_START, IMG_CONTEXT, IMG_END = "<img>", "<IMG_CONTEXT>", "</img>"
STOP_WORDS = ["<|im_end|>"]


def image_tokens(num_tiles: int, tokens_per_tile: int) -> str:
    return IMG_START + IMG_CONTEXT * (num_tiles * tokens_per_tile) + IMG_END


def training_prompt(question: str, image: str | None, system: str = SYSTEM_PROMPT) -> str:
    """The text XTuner tokenises for one human turn (``image`` from :func:`image_tokens`)."""
    user = question.replace("<image>", "").strip()
    if image is not None:
        user = (image + "\n" + user).strip()
    return f"<|im_start|>system\n{system}<|im_end|><|im_start|>user\n{user}<|im_end|><|im_start|>assistant\n"
