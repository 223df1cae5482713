"""Configuration: validation against ``workflow/schemas/config.schema.yaml`` with messages
that name the key and what is allowed, plus the cross-key rules a schema cannot say.

    python -m vlmtune.config config/config.yaml [config/demo.yaml ...]
"""

from __future__ import annotations

import argparse
import copy
import re
from pathlib import Path

import yaml

SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """An invalid configuration; the message names every offending key."""


def deep_merge(base: dict, overlay: dict) -> dict:
    """Snakemake's --configfile semantics: nested mappings merge, other values replace."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load(*paths: str | Path) -> dict:
    config: dict = {}
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            config = deep_merge(config, yaml.safe_load(fh) or {})
    return config


def _key(path) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


# keys an earlier release had, with their new names (named in the unknown-key error)
RENAMED = {"train.fused_norm": "train.fused_elementwise"}


def _describe(error) -> str:
    """One line per schema violation: the dotted key, the value and what is allowed."""
    key = _key(error.absolute_path)
    v, schema = error.validator, error.schema
    if v == "enum":
        # null (where allowed: "the preset's") is not a choice to offer
        choices = [e for e in schema["enum"] if e is not None]
        return f"{key}: {error.instance!r} is not allowed; choose one of {choices}"
    if v == "additionalProperties":
        allowed = sorted(schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        renamed = [f"{k} is now {RENAMED[f'{key}.{k}']}" for k in extra if f"{key}.{k}" in RENAMED]
        hint = f" ({'; '.join(renamed)})" if renamed else ""
        return f"{key}: unknown key(s) {extra}{hint}; allowed keys are {allowed}"
    if v == "required":
        return f"{key}: {error.message}"
    if v == "type":
        return f"{key}: {error.instance!r} has the wrong type; expected {schema['type']}"
    if v in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        return f"{key}: {error.instance!r} is out of range ({v} {schema[v]})"
    if v == "pattern":
        return f"{key}: {error.instance!r} does not match the pattern {schema['pattern']!r}"
    return f"{key}: {error.message}"


# A float as YAML 1.2 (and JSON) writes it; PyYAML follows YAML 1.1, which needs a dot and a
# signed exponent, so `lr: 1e-4` arrives as the string "1e-4".
_FLOAT = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")


def _number_type(schema: dict) -> bool:
    types = schema.get("type")
    return "number" in (types if isinstance(types, list) else [types])


def coerce_numbers(config, schema: dict):
    """Where the schema wants a number and the YAML gave a string that is one (``1e-4``), put
    the number in its place (in place: Snakemake's config object is the one validated)."""
    if isinstance(config, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key not in config:
                continue
            value = config[key]
            if isinstance(value, str) and _number_type(sub) and _FLOAT.fullmatch(value.strip()):
                config[key] = float(value)
            else:
                coerce_numbers(value, sub)
    elif isinstance(config, list) and isinstance(schema.get("items"), dict):
        items = schema["items"]
        for i, value in enumerate(config):
            if isinstance(value, str) and _number_type(items) and _FLOAT.fullmatch(value.strip()):
                config[i] = float(value)
            else:
                coerce_numbers(value, items)
    return config


def _resolve(sub: dict, schema: dict) -> dict:
    """A ``$ref`` to ``#/definitions/<name>`` replaced by the definition it names."""
    ref = sub.get("$ref")
    if ref:
        node = schema
        for part in ref.lstrip("#/").split("/"):
            node = node[part]
        return node
    return sub


def fill_defaults(config: dict, schema: dict, root: dict | None = None) -> dict:
    """Put the schema's ``default:`` of every key the config leaves out in its place, in place.

    A left-out section (an object with properties) is filled as ``{}`` and then key by key, so
    ``extraction.max_bytes`` is there even where the config has no ``extraction``. A value the
    config gives, ``null`` included (= the preset's), is kept. The schema is the one source of
    the defaults: the rules read the filled config and hold none of their own.
    """
    root = schema if root is None else root
    for key, sub in (schema.get("properties") or {}).items():
        sub = _resolve(sub, root)
        if key not in config:
            if "default" in sub:
                config[key] = copy.deepcopy(sub["default"])
            elif sub.get("properties"):
                config[key] = {}
            else:
                continue
        if isinstance(config[key], dict) and sub.get("properties"):
            fill_defaults(config[key], sub, root)
    return config


def validate_config(config: dict, schema_path: Path = SCHEMA) -> dict:
    """Check a config against the schema and the cross-key rules, completing it in place.

    Inputs: the merged config (Snakemake's ``config`` object, or ``load(...)``'s). In place:
    numbers YAML 1.1 read as strings (``lr: 1e-4``) become numbers; every key left out gets the
    schema's default (``fill_defaults``); keys left null get ``model.preset``'s value. Returns
    the same dict. Raises ConfigError naming each invalid key.
    """
    import jsonschema

    with open(schema_path, encoding="utf-8") as fh:
        schema = yaml.safe_load(fh)
    coerce_numbers(config, schema)
    validator = jsonschema.Draft7Validator(schema)
    problems = []
    for error in sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path)):
        # if/then/else failures are reported through their sub-errors.
        leaves = [e for e in error.context] if error.validator in ("allOf", "anyOf", "oneOf") else []
        problems.extend(_describe(e) for e in (leaves or [error]))
    if not problems:
        from .presets import apply as apply_preset

        # schema defaults first: the preset and cross-key rules see every key
        fill_defaults(config, schema)

        # model.preset fills the keys left null (repo_id, name, train resources), in place
        problems.extend(apply_preset(config))
        problems.extend(cross_key_problems(config))
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(dict.fromkeys(problems)))
    return config


def cross_key_problems(config: dict) -> list[str]:
    train, problems = config["train"], []
    if train["device"] == "cuda" and train["gpus"] < 1:
        problems.append("train.gpus: must be >= 1 when train.device is cuda")
    if train["device"] == "cpu":
        if train["method"] == "qlora":
            problems.append(
                "train.method: qlora needs CUDA (bitsandbytes 4-bit); use lora with train.device: cpu"
            )
        if train["deepspeed"] != "none":
            problems.append("train.deepspeed: must be none with train.device: cpu")
        if train["gpus"] != 0:
            problems.append("train.gpus: must be 0 with train.device: cpu")
    if train["method"] == "qlora" and train["deepspeed"].startswith("zero3"):
        problems.append(
            f"train.deepspeed: {train['deepspeed']} shards parameters and cannot hold 4-bit (qlora) "
            "weights; use zero1/zero2 or method: lora"
        )
    if train["method"] == "qlora" and train["label_only_head"] and train["quantize_head"]:
        # Seen on an H200 (bitsandbytes 0.50.2): a 4-bit output head on the labelled rows
        # fails with CUBLAS_STATUS_EXECUTION_FAILED (benchmarks/RESULTS.md, round 2).
        problems.append(
            "train.label_only_head: does not work over a 4-bit output head (train.quantize_head: "
            "true fails on the GPU); set quantize_head: false (the default) or label_only_head: false"
        )
    if config["evaluate"]["engine"] == "lmdeploy" and config["evaluate"]["gpus"] < 1:
        problems.append("evaluate.gpus: the lmdeploy engine needs a GPU; use engine: transformers on CPU")
    return problems


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Validate one or more layered config files.")
    ap.add_argument("configs", nargs="+")
    args = ap.parse_args(argv)
    try:
        validate_config(load(*args.configs))
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None
    print("configuration is valid")


if __name__ == "__main__":
    main()
