import pytest

from vlmtune.config import ConfigError, deep_merge, validate


def test_shipped_configs_are_valid(configs):
    default, demo = configs
    validate(default)
    validate(demo)
    assert default["model"]["repo_id"] == "OpenGVLab/InternVL2-2B"
    assert default["train"]["gpus"] == 4 and default["train"]["deepspeed"] == "zero1"
    assert demo["model"]["source"] == "local"


@pytest.mark.parametrize(
    "overlay, message",
    [
        ({"train": {"deepspeed": "zero5"}}, "train.deepspeed: 'zero5' is not allowed; choose one of ['none', 'zero1', 'zero2', 'zero2_offload', 'zero3', 'zero3_offload']"),
        ({"train": {"lr": -1}}, "train.lr: -1 is out of range"),
        ({"model": {"source": "s3"}}, "model.source: 's3' is not allowed"),
        ({"typo_key": 1}, "unknown key(s) ['typo_key']"),
        ({"conversion": {"on_bad_record": "ignore"}}, "conversion.on_bad_record: 'ignore' is not allowed; choose one of ['skip', 'error']"),
        ({"model": {"source": "local", "path": None}}, "model.path"),
        ({"train": {"device": "cpu", "gpus": 0, "deepspeed": "none", "method": "qlora"}}, "train.method: qlora needs CUDA"),
        ({"train": {"method": "qlora", "deepspeed": "zero3"}}, "train.deepspeed: zero3"),
        ({"run": "bad name/with slash"}, "run:"),
    ],
)
def test_invalid_values_name_the_key(configs, overlay, message):
    with pytest.raises(ConfigError) as err:
        validate(deep_merge(configs[0], overlay))
    assert message in str(err.value)


def test_snakemake_stops_on_invalid_config(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  deepspeed: zero5\n")
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--configfile", str(bad)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "train.deepspeed: 'zero5' is not allowed" in proc.stdout + proc.stderr
