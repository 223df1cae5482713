"""Each step's command-line choices are the schema's enum for the config key the rule passes to
it (the schema is the one source: a value the config accepts, the step accepts, and no other)."""

import contextlib
import importlib
import io
import re

import pytest
import yaml

from conftest import ROOT
from vlmtune.config import _resolve

SCHEMA = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())

CASES = [
    ("evaluate", ["generate"], "--engine", "evaluate.engine"),
    ("evaluate", ["generate"], "--lmdeploy-backend", "evaluate.lmdeploy_backend"),
    ("convert", [], "--on-bad-record", "conversion.on_bad_record"),
    ("convert", [], "--output-format", "conversion.output_format"),
    ("fetch", ["model"], "--source", "model.source"),
    ("fetch", ["dataset"], "--source", "dataset.source"),
    ("train", [], "--deepspeed", "train.deepspeed"),
    ("validate", [], "--on-too-long", "validation.on_too_long"),
]


def schema_enum(dotted: str) -> set:
    node = SCHEMA
    for key in dotted.split("."):
        node = _resolve(node["properties"][key], SCHEMA)  # dataset: "#/definitions/source"
    return {v for v in node["enum"] if v is not None}


def cli_choices(module: str, args: list[str], option: str) -> set:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        importlib.import_module(f"vlmtune.{module}").main([*args, "--help"])
    match = re.search(re.escape(option) + r"\s+\{([^}]*)\}", out.getvalue())
    assert match, f"vlmtune.{module} {option}: no choices in --help"
    return set(match.group(1).split(","))


@pytest.mark.parametrize("module, args, option, key", CASES, ids=[f"{c[0]}{c[2]}" for c in CASES])
def test_cli_choices_are_the_schema_enum(module, args, option, key):
    assert cli_choices(module, args, option) == schema_enum(key)
