import pytest

from vlmtune.config import ConfigError, deep_merge, validate_config


def dry_run(*args) -> str:
    """Commands a Snakemake dry run (`-n -p`) of the repository's workflow prints; fails on error."""
    import subprocess
    import sys

    from conftest import ROOT

    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-p", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_shipped_configs_are_valid(configs):
    default, demo = configs
    validate_config(default)
    validate_config(demo)
    assert default["model"]["repo_id"] == "OpenGVLab/InternVL2-2B"
    assert default["train"]["gpus"] == 4 and default["train"]["deepspeed"] == "zero1"
    assert demo["model"]["source"] == "local"


@pytest.mark.parametrize(
    "overlay, message",
    [
        (
            {"train": {"deepspeed": "zero5"}},
            "train.deepspeed: 'zero5' is not allowed; choose one of ['none', 'zero1', 'zero2', "
            "'zero2_offload', 'zero3', 'zero3_offload']",
        ),
        ({"train": {"lr": -1}}, "train.lr: -1 is out of range"),
        ({"model": {"source": "s3"}}, "model.source: 's3' is not allowed"),
        ({"typo_key": 1}, "unknown key(s) ['typo_key']"),
        (
            {"train": {"fused_norm": True}},
            "unknown key(s) ['fused_norm'] (fused_norm is now train.fused_elementwise)",
        ),
        (
            {"conversion": {"on_bad_record": "ignore"}},
            "conversion.on_bad_record: 'ignore' is not allowed; choose one of ['skip', 'error']",
        ),
        ({"model": {"source": "local", "path": None}}, "model.path"),
        (
            {"train": {"device": "cpu", "gpus": 0, "deepspeed": "none", "method": "qlora"}},
            "train.method: qlora needs CUDA",
        ),
        ({"train": {"method": "qlora", "deepspeed": "zero3"}}, "train.deepspeed: zero3"),
        ({"run": "bad name/with slash"}, "run:"),
    ],
)
def test_invalid_values_name_the_key(configs, overlay, message):
    with pytest.raises(ConfigError) as err:
        validate_config(deep_merge(configs[0], overlay))
    assert message in str(err.value)


def test_snakemake_stops_on_invalid_config(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  deepspeed: zero5\n")
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--configfile", str(bad)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "train.deepspeed: 'zero5' is not allowed" in proc.stdout + proc.stderr


def test_a_yaml_1_1_exponent_is_the_number_it_reads_as(configs, tmp_path):
    """PyYAML (YAML 1.1) reads `lr: 1e-4` as the string '1e-4': validation makes it the number,
    in the config object itself, so Snakemake's rules see 0.0001; a non-number string still fails."""
    import re

    import yaml

    overlay = yaml.safe_load("train:\n  lr: 1e-4\n  betas: [0.9, 1e-1]\n  warmup_ratio: 3e-2\n")
    assert overlay["train"]["lr"] == "1e-4"
    config = deep_merge(configs[0], overlay)
    assert validate_config(config) is config
    assert (
        config["train"]["lr"] == 1e-4
        and config["train"]["betas"] == [0.9, 0.1]
        and config["train"]["warmup_ratio"] == 0.03
    )
    assert isinstance(config["train"]["lr"], float)
    with pytest.raises(ConfigError, match="train.lr: 'fast' has the wrong type"):
        validate_config(deep_merge(configs[0], {"train": {"lr": "fast"}}))
    with pytest.raises(
        ConfigError, match="train.lr: '-1e-4' is out of range|train.lr: -0.0001 is out of range"
    ):
        validate_config(deep_merge(configs[0], {"train": {"lr": "-1e-4"}}))
    # Snakemake reads the same file: the dry run plans the run with the number (same params as 1.0e-4).
    plans = []
    for text in ("1e-4", "1.0e-4"):
        (tmp_path / "lr.yaml").write_text(f"train:\n  lr: {text}\n")
        stdout = dry_run(
            "results/xtuner/demo/plan.json", "--configfile", "config/demo.yaml", tmp_path / "lr.yaml"
        )
        plans.append(re.search(r"--train-settings (.*?) --out", stdout).group(1))
    assert '"lr": 0.0001' in plans[0] and plans[0] == plans[1]


def test_label_only_head_is_refused_over_a_4bit_head(configs):
    """Seen on an H200: the label-only head over a 4-bit output layer fails (CUBLAS); the config
    says so before any GPU time is spent. With the head kept bf16 (the default), or with bf16
    LoRA, the pair is accepted."""
    import copy

    from vlmtune.config import ConfigError, validate_config

    cfg = copy.deepcopy(configs[0])
    cfg["train"].update(method="qlora", label_only_head=True, quantize_head=True)
    with pytest.raises(ConfigError, match="train.label_only_head: does not work over a 4-bit output head"):
        validate_config(cfg)
    cfg["train"]["quantize_head"] = False
    validate_config(cfg)
    cfg["train"].update(method="lora", quantize_head=True)
    validate_config(cfg)


def test_extraction_limits_reach_the_fetch_step(tmp_path):
    """extraction.max_bytes / max_ratio are handed to `vlmtune.fetch dataset` (dry run)."""

    (tmp_path / "x.yaml").write_text("extraction: {max_bytes: 12345, max_ratio: 7.5}\n")
    stdout = dry_run(
        "-F", "data/datasets/CLoT-Oogiri-GO-demo", "--configfile", "config/demo.yaml", tmp_path / "x.yaml"
    )
    assert "--max-extract-bytes 12345 --max-extract-ratio 7.5" in stdout


# --- schema defaults: the one source of every default (issue 17) ---------------------------------
def _schema():
    import yaml

    from vlmtune.config import SCHEMA

    with open(SCHEMA, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def test_every_schema_key_has_a_default():
    schema = _schema()

    def missing(node, path):
        out = []
        for key, sub in (node.get("properties") or {}).items():
            if "$ref" in sub:
                sub = schema["definitions"][sub["$ref"].rsplit("/", 1)[1]]
            if sub.get("properties"):
                out += missing(sub, [*path, key])
            elif "default" not in sub:
                out.append(".".join([*path, key]))
        return out

    assert missing(schema, []) == []


def test_a_key_left_out_gets_the_schema_default(configs):
    cfg = configs[0]
    del cfg["evaluate"]["cpus_per_task"], cfg["conversion"]["types"], cfg["validation"]
    cfg.pop("extraction", None)
    validate_config(cfg)
    assert cfg["evaluate"]["cpus_per_task"] == 8  # config/config.yaml's, not a rule's fallback
    assert cfg["conversion"]["types"] == ["I2T", "T2T", "IT2T"]
    assert cfg["validation"] == {"on_too_long": "drop", "workers": 2}
    assert cfg["extraction"] == {"max_bytes": 17179869184, "max_ratio": 100}
    assert cfg["train"]["cpu_processes"] == 1
    assert cfg["python"] == {"data": None, "xtuner": None, "lmdeploy": None}


def test_a_given_value_wins_over_the_default(configs):
    cfg = deep_merge(
        configs[0],
        {"evaluate": {"cpus_per_task": 3}, "extraction": {"max_ratio": 7}, "train": {"lora": {"r": 4}}},
    )
    validate_config(cfg)
    assert cfg["evaluate"]["cpus_per_task"] == 3
    assert cfg["extraction"] == {"max_bytes": 17179869184, "max_ratio": 7}  # the rest filled
    assert cfg["train"]["lora"]["r"] == 4


def test_defaults_fill_before_the_preset_and_keep_its_nulls(configs):
    cfg = configs[0]
    for key in ("mem_mb", "runtime"):
        del cfg["train"][key]  # left out: the schema's null, then the preset's value
    validate_config(cfg)
    assert (cfg["train"]["mem_mb"], cfg["train"]["runtime"]) == (160000, 360)


def test_shipped_config_equals_the_schema_defaults():
    """config/config.yaml ships the schema's defaults: filled from nothing, every key it sets has
    the value it sets (the keys it leaves out: cpu_processes, extraction, python, demo)."""
    from pathlib import Path

    from vlmtune.config import fill_defaults, load

    shipped = load(Path(__file__).resolve().parents[1] / "config" / "config.yaml")
    filled = fill_defaults({}, _schema())

    def same(a, b, path=""):
        for key, value in b.items():
            if isinstance(value, dict) and key != "lora":
                same(a[key], value, f"{path}{key}.")
            else:
                assert a[key] == value, f"{path}{key}"

    same(filled, {k: v for k, v in shipped.items() if k not in ("model", "dataset")})
    same(filled["model"], shipped["model"], "model.")
    assert filled["train"]["lora"] == shipped["train"]["lora"]


def test_evaluate_hands_each_engine_its_batch_and_threads(tmp_path):
    """LMDeploy gets evaluate.lmdeploy_max_batch_size and the job's cpus_per_task as image
    threads; the transformers engine gets evaluate.batch_size and one thread (dry runs)."""

    commands = {}
    for engine in ("lmdeploy", "transformers"):
        overlay = tmp_path / f"{engine}.yaml"
        overlay.write_text(
            f"evaluate: {{engine: {engine}, gpus: 1, batch_size: 5, lmdeploy_max_batch_size: 48, "
            "cpus_per_task: 6}\n"
        )
        stdout = dry_run(
            "--cores",
            8,
            "results/eval/demo/base/predictions.jsonl",
            "--configfile",
            "config/demo.yaml",
            overlay,
        )
        commands[engine] = next(l for l in stdout.splitlines() if "vlmtune.evaluate generate" in l)
    assert "--batch-size 48 " in commands["lmdeploy"] and "--threads 6 " in commands["lmdeploy"]
    assert "--batch-size 5 " in commands["transformers"] and "--threads 1 " in commands["transformers"]
