"""The InternVL2 models the workflow trains (``model.preset``): one table, read by the config
(defaults), the XTuner config renderer (prompt template), evaluation (chat template) and the docs.

XTuner 0.2.0 ships configs for exactly these four (``xtuner/configs/internvl/v2``) and its
InternVL dataset accepts their two LLM families: InternLM2 (2B, 8B = InternLM2.5, 26B) and
Phi-3 (4B). InternVL2-1B (Qwen2) is refused there (``NotImplementedError``): not a preset.

Resources are defaults, used where the config leaves a key null: ``train.gpus``,
``train.deepspeed`` (per method), ``train.mem_mb``, ``train.runtime``. ``gpu_mem_gib`` is the
GPU memory a training GPU should have (documentation and the dry-run line; not a Slurm request).
Only the 2B's figures are measured (benchmarks/RESULTS.md); the others are estimates from the
parameter counts, marked ``measured: False``.

The 26B: XTuner's guidance is ZeRO-3 for 26B, and 4-bit weights cannot be sharded by ZeRO-3.
So ``method: lora`` (bf16 LoRA) runs under ZeRO-3 and ``method: qlora`` under ZeRO-2 (the 4-bit
20B LLM, about 11 GiB, replicated on each of 8 GPUs, optimizer states sharded); the config
refuses qlora with zero3 and, for the 26B, lora without zero3 (52 GB of bf16 weights per GPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .prompt import INTERNLM2, PHI3, ChatFormat

DEFAULT = "InternVL2-2B"


@dataclass(frozen=True)
class Preset:
    name: str
    repo_id: str
    llm: str  # the LLM, as its model card names it
    chat: ChatFormat  # training prompt = LMDeploy chat template (handed over explicitly)
    xtuner_config: str  # XTuner 0.2.0's stock QLoRA config for this model
    lmdeploy_by_path: str  # the template LMDeploy would pick by path (never used: ours is explicit)
    lora_targets: tuple  # what XTuner's target_modules=None resolves to (every LLM linear but lm_head)
    builder: str  # vlmtune.model_builder preset of the exact-size stand-in ("" = none)
    tiny_builder: str  # vlmtune.model_builder preset of the CPU test model
    parameters: int  # of the official model (its model card)
    max_dynamic_patch: int = 12  # tiles of 448 px (+ thumbnail), 256 tokens each; from config.json
    gpus: int = 4
    deepspeed: dict = field(default_factory=lambda: {"qlora": "zero1", "lora": "zero1"}, hash=False)
    mem_mb: int = 160000
    runtime: int = 360
    gpu_mem_gib: int = 40
    measured: bool = False

    @property
    def xtuner_template(self) -> str:
        return self.chat.xtuner_template

    def train_defaults(self, method: str) -> dict:
        return dict(gpus=self.gpus, deepspeed=self.deepspeed[method], mem_mb=self.mem_mb,
                    runtime=self.runtime)  # fmt: skip


INTERNLM2_LORA = ("wqkv", "wo", "w1", "w2", "w3", "output")
PHI3_LORA = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")

PRESETS = {
    p.name: p
    for p in [
        # The tutorial's run: 4 GPUs, ZeRO-1, 37.9 GB per GPU in its log (stock XTuner).
        Preset("InternVL2-2B", "OpenGVLab/InternVL2-2B", "internlm2-chat-1_8b", INTERNLM2,
               "internvl_v2_internlm2_2b_qlora_finetune.py", "internvl2-internlm2", INTERNLM2_LORA,
               "full", "tiny", 2_205_754_368, measured=True),
        Preset("InternVL2-4B", "OpenGVLab/InternVL2-4B", "Phi-3-mini-128k-instruct", PHI3,
               "internvl_v2_phi3_4b_qlora_finetune.py", "internvl2-phi3", PHI3_LORA,
               "full-4b", "tiny-4b", 4_146_855_936, mem_mb=192000, runtime=480, gpu_mem_gib=48),
        Preset("InternVL2-8B", "OpenGVLab/InternVL2-8B", "internlm2_5-7b-chat", INTERNLM2,
               "internvl_v2_internlm2_5_8b_qlora_finetune.py", "internvl2-internlm2", INTERNLM2_LORA,
               "full-8b", "tiny-8b", 8_075_365_376, deepspeed={"qlora": "zero2", "lora": "zero2"},
               mem_mb=256000, runtime=720, gpu_mem_gib=80),
        Preset("InternVL2-26B", "OpenGVLab/InternVL2-26B", "internlm2-chat-20b", INTERNLM2,
               "internvl_v2_internlm2_26b_qlora_finetune.py", "internvl2-internlm2", INTERNLM2_LORA,
               "full-26b", "", 25_514_186_112, gpus=8, deepspeed={"qlora": "zero2", "lora": "zero3"},
               mem_mb=512000, runtime=1440, gpu_mem_gib=80),
    ]
}  # fmt: skip
NAMES = list(PRESETS)


def get(name: str | None) -> Preset:
    return PRESETS[name or DEFAULT]


def apply(config: dict) -> list[str]:
    """Fill the keys the config leaves null (or out) from ``model.preset``, in place, and return
    the problems of a combination the preset does not run."""
    model, train = config["model"], config["train"]
    preset = get(model.get("preset"))
    model["preset"] = preset.name
    # Also for source: local, as before presets: provenance names the repo a local copy stands for.
    if model.get("repo_id") is None:
        model["repo_id"] = preset.repo_id
    if model.get("name") is None:
        model["name"] = preset.name
    for key, value in preset.train_defaults(train["method"]).items():
        if train.get(key) is None:
            train[key] = value
    problems = []
    if preset.name == "InternVL2-26B" and train["method"] == "lora" and train["device"] == "cuda" \
            and not str(train["deepspeed"]).startswith("zero3"):  # fmt: skip
        problems.append(
            f"train.deepspeed: {train['deepspeed']} with model.preset InternVL2-26B and method: lora "
            "would hold 52 GB of bf16 weights on every GPU; use zero3 (the preset's), or method: qlora "
            "with zero2"
        )
    return problems


def describe(config: dict) -> str:
    """One line for the console: the preset, its templates and the training resources."""
    preset, train = get(config["model"].get("preset")), config["train"]
    return (
        f"[vlmtune] model {preset.name} ({config['model'].get('repo_id') or config['model'].get('path')}, "
        f"LLM {preset.llm}): XTuner template {preset.xtuner_template}, LMDeploy chat template explicit "
        f"(system {preset.chat.system!r}, stop {preset.chat.suffix}); train {train['method']} on "
        f"{train['gpus']} GPU(s) x {train.get('nodes', 1)} node(s), deepspeed {train['deepspeed']}, "
        f"mem_mb {train['mem_mb']}, >= {preset.gpu_mem_gib} GiB per GPU"
        f"{'' if preset.measured else ' (estimated, not measured)'}"
    )
