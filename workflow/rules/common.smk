# Configuration check and the paths every stage shares. Step logic lives in the vlmtune
# package (src/vlmtune); rules only name files, params and resources and call one command.
import json
import sys
from pathlib import Path

SRC = str(Path(workflow.basedir) / "src")
sys.path.insert(0, SRC)
# Rules run `python -m vlmtune.<step>`; make the package importable in every env (also the
# per-step conda envs of --sdm conda, which do not install the project).
shell.prefix(
    "set -euo pipefail; export PYTHONPATH=%s${{PYTHONPATH:+:$PYTHONPATH}}; " % SRC
)

from vlmtune.config import ConfigError, validate

try:
    validate(config)
except ConfigError as exc:
    raise WorkflowError(str(exc))

RUN = config["run"]
MODEL_NAME = config["model"]["name"]
DATASET_NAME = config["dataset"]["name"]
LANGUAGE = config["conversion"]["language"]

MODEL_DIR = f"data/models/{MODEL_NAME}"
DATASET_DIR = f"data/datasets/{DATASET_NAME}"
CONVERTED = f"results/converted/{DATASET_NAME}-{LANGUAGE}"
XTUNER_DIR = f"results/xtuner/{RUN}"
TRAIN_DIR = f"results/train/{RUN}"
MERGED_MODEL = f"results/merged/{MODEL_NAME}-{RUN}"
PREDICTIONS = f"results/eval/{RUN}/{{variant}}/predictions.jsonl"

TRAIN = config["train"]
# GPUs a training job holds: torchrun starts one process per GPU.
TRAIN_GPUS = TRAIN["gpus"] if TRAIN["device"] == "cuda" else 0
TRAIN_NODES = TRAIN.get("nodes", 1)
EVAL = config["evaluate"]
EVAL_GPUS = EVAL.get("gpus", 1) if EVAL["engine"] == "lmdeploy" else EVAL.get("gpus", 0)
# Keys of the train section that change the rendered XTuner config (not the job's resources).
TRAIN_SETTINGS = {
    k: v
    for k, v in TRAIN.items()
    if k not in ("mem_mb", "runtime", "cpus_per_task", "gpu_model")
}
GENERATION = {
    k: EVAL.get(k, d)
    for k, d in [
        ("max_new_tokens", 128),
        ("do_sample", False),
        ("temperature", 1.0),
        ("top_p", 1.0),
        ("seed", 0),
    ]
}


def local_source(kind):
    """A local model/dataset folder is an input, so a rule can build it (the demo)."""
    section = config[kind]
    return [section["path"]] if section["source"] == "local" else []


def evaluated_model(wildcards):
    return MODEL_DIR if wildcards.variant == "base" else MERGED_MODEL


# Compute nodes of many clusters have no internet: downloads run where Snakemake runs.
if config.get("cluster", {}).get("fetch_on_submit_host", True):

    localrules:
        fetch_model,
        fetch_dataset,
