# Configuration check and the paths every stage shares. Step logic lives in the vlmtune
# package (src/vlmtune); rules only name files, params and resources and call one command.
import json
import sys
from pathlib import Path

SRC = str(Path(workflow.basedir) / "src")
sys.path.insert(0, SRC)

import shlex

from snakemake.settings.types import DeploymentMethod

from vlmtune.config import ConfigError, validate_config
from vlmtune.presets import describe as describe_preset
from vlmtune.presets import get as get_preset
from vlmtune.provenance import code_digest
from vlmtune.xtuner_config import SETTINGS as XTUNER_SETTINGS

try:
    validate_config(config)
except ConfigError as exc:
    raise WorkflowError(str(exc))

RUN = config["run"]
# validate_config() filled every key left out with the schema's default and every null the preset
# decides with model.preset's (vlmtune.presets): the rules read `config` with no fallbacks.
PRESET = get_preset(config["model"]["preset"])
print(describe_preset(config), file=sys.stderr)
MODEL_NAME = config["model"]["name"]
DATASET_NAME = config["dataset"]["name"]
LANGUAGE = config["conversion"]["language"]

MODEL_DIR = f"data/models/{MODEL_NAME}"
DATASET_DIR = f"data/datasets/{DATASET_NAME}"
CONVERTED = f"results/converted/{DATASET_NAME}-{LANGUAGE}"
TRAIN_FORMAT = config["conversion"]["output_format"]
# Conversion writes CONVERTED_TRAIN; validation (images decode, lengths fit) writes TRAIN_DATA,
# the file training reads.
CONVERTED_TRAIN = f"{CONVERTED}/converted_train.{TRAIN_FORMAT}"
TRAIN_DATA = f"{CONVERTED}/train.{TRAIN_FORMAT}"
# The held-out records (by image): validation checks them, both evaluation steps read them.
HELD_OUT = f"{CONVERTED}/eval.jsonl"
VALIDATION = config["validation"]
XTUNER_DIR = f"results/xtuner/{RUN}"
XTUNER_CONFIG = f"{XTUNER_DIR}/xtuner_config.py"
XTUNER_PLAN = f"{XTUNER_DIR}/plan.json"
TRAIN_DIR = f"results/train/{RUN}"
TRAIN_RESULT = f"{TRAIN_DIR}/train_result.json"
MERGED_MODEL = f"results/merged/{MODEL_NAME}-{RUN}"
PREDICTIONS = f"results/eval/{RUN}/{{variant}}/predictions.jsonl"
REFERENCE_NLL = f"results/eval/{RUN}/{{variant}}/reference_nll.jsonl"
METRICS = f"results/eval/{RUN}/{{variant}}/metrics.json"
EVAL_REPORT_HTML = f"results/eval/{RUN}/report.html"
EVAL_SUMMARY_PNG = f"results/eval/{RUN}/summary.png"

TRAIN = config["train"]
# GPUs a training job holds: torchrun starts one process per GPU.
TRAIN_GPUS = TRAIN["gpus"] if TRAIN["device"] == "cuda" else 0
TRAIN_NODES = TRAIN["nodes"]
EVAL = config["evaluate"]
EVAL_GPUS = EVAL["gpus"]
# Only the train keys the renderer reads: a change to any other (resources, deepspeed) must not
# re-render the config and so retrain. cpu_processes counts only on CPU (processes per node).
TRAIN_SETTINGS = {
    k: TRAIN[k]
    for k in XTUNER_SETTINGS
    if not (k == "cpu_processes" and TRAIN["device"] == "cuda")
}
# evaluate and reference_nll: the same records, on the same machine.
EVAL_MAX_RECORDS = f"--max-records {EVAL['max_records']}" if EVAL["max_records"] else ""
EVAL_RESOURCES = dict(
    gpu=EVAL_GPUS,
    gpu_model=EVAL["gpu_model"] or "",
    cpus_per_task=EVAL["cpus_per_task"],
    mem_mb=EVAL["mem_mb"],
    runtime=EVAL["runtime"],
)
# LMDeploy prepares the images on the job's cores (Snakemake caps threads at --cores); the
# transformers engine prepares them in its own process and keeps one, so that the CPU demo's
# two evaluations can still run side by side.
EVAL_THREADS = EVAL["cpus_per_task"] if EVAL["engine"] == "lmdeploy" else 1
# --batch-size of vlmtune.evaluate: LMDeploy's max_batch_size, or the transformers engine's batch.
EVAL_BATCH_SIZE = (
    EVAL["lmdeploy_max_batch_size"]
    if EVAL["engine"] == "lmdeploy"
    else EVAL["batch_size"]
)
GENERATION = {
    k: EVAL[k] for k in ("max_new_tokens", "do_sample", "temperature", "top_p", "seed")
}


# {variant}: the base or the fine-tuned model (evaluate, reference_nll, metrics).
wildcard_constraints:
    variant="base|finetuned",


def local_source(kind):
    """A local model/dataset folder is an input, so a rule can build it (the demo)."""
    section = config[kind]
    return [section["path"]] if section["source"] == "local" else []


def evaluated_model(wildcards):
    return MODEL_DIR if wildcards.variant == "base" else MERGED_MODEL


def code_hash(*modules):
    """Content hash of step modules and the vlmtune modules they import, for `params: code=`.

    Snakemake's own code trigger sees only the rule's shell text, not the Python it calls.
    Every step runs through vlmtune.envcheck (python_<family>), so it is always covered.
    """
    return code_digest("envcheck", *modules)


def step_python(family):
    """A shell function `python_<family>` that runs a step in its env family (data, xtuner,
    lmdeploy): `python_xtuner -m vlmtune.train ...`.

    vlmtune.envcheck checks the family's pinned key packages, then runs the step module. With
    --sdm conda the rule's conda env provides `python`; without it, the interpreter named in
    config python.<family> (a venv from `make venvs`), by default the one running Snakemake.
    A shell function, not a param: the interpreter's path is no reason to rerun a step.
    """
    if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method:
        interpreter = "python"
    else:
        interpreter = config["python"][family] or sys.executable
    command = f'{shlex.quote(interpreter)} -m vlmtune.envcheck {family} "$@"'
    return f"python_{family}() {{{{ {command}; }}}}; "


ENV_FAMILIES = ("data", "xtuner", "lmdeploy")
EVAL_FAMILY = "lmdeploy" if EVAL["engine"] == "lmdeploy" else "xtuner"
# Make the package importable in every env (also the per-step conda envs of --sdm conda, which
# do not install the project) and define python_<family> (python_evaluate: the engine's).
shell.prefix(
    "set -euo pipefail; export PYTHONPATH=%s${{PYTHONPATH:+:$PYTHONPATH}}; " % SRC
    + "".join(step_python(family) for family in ENV_FAMILIES)
    + 'python_evaluate() {{ python_%s "$@"; }}; ' % EVAL_FAMILY
)


# Compute nodes of many clusters have no internet: downloads run where Snakemake runs.
if config["cluster"]["fetch_on_submit_host"]:

    localrules:
        fetch_model,
        fetch_dataset,
