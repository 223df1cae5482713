"""What produced a merged model or an evaluation: ``provenance.json`` written by the step itself.

- beside a merged model ``results/merged/<model>-<run>``: ``<model>-<run>.provenance.json``
  (written by ``vlmtune.merge``);
- beside predictions ``results/eval/<run>/<variant>/predictions.jsonl``: ``provenance.json``
  (written by ``vlmtune.evaluate``).

A record holds the base model's repo, revision and file hashes (from the fetch
``manifest.json``), the dataset's revision and the hashes of the files used, the hashes of the
converted data, the rendered XTuner config and its hash, the seed, the training's and this
step's GPU count and type, the versions of the step env's pinned packages, the project's git
commit and dirty flag, start and end times and the final training loss. An evaluation of a
merged model embeds the model's record.

No environment variable is recorded, and every string is scrubbed of the values of secret
variables (``HF_TOKEN`` and the like) before it is written: hub tokens never land here.

It also computes the code hash that the rules pass as ``params: code=...`` (``code_digest``):
a step's module and every ``vlmtune`` module it imports, so that editing a step's code reruns
that step and its dependents (Snakemake's own ``code`` trigger sees only the rule's shell text).
"""

from __future__ import annotations

import ast
import datetime as dt
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

from .atomic import write_json
from .hashing import sha256
from .jsonl import read_jsonl, read_records

PACKAGE = Path(__file__).resolve().parent
ROOT = PACKAGE.parents[1]
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|API_KEY|ACCESS_KEY", re.I)
SCHEMA_VERSION = 1


# --- code hash (rules' params) ------------------------------------------------------------------
def _local_imports(path: Path, package: Path = PACKAGE) -> set[str]:
    """Names of the vlmtune modules a module imports (relative or absolute)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                names.add(node.module.split(".")[0])
            elif node.level == 1:
                names.update(a.name for a in node.names)
            elif node.module and node.module.split(".")[0] == "vlmtune" and "." in node.module:
                names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names if a.name.startswith("vlmtune."))
    return {n for n in names if (package / f"{n}.py").exists() or (package / n).is_dir()}


def module_closure(*names: str, package: Path = PACKAGE) -> list[Path]:
    """The files of the named modules (or package folders, e.g. ``remote_code``) and of every
    vlmtune module they import, transitively."""
    seen, todo, files = set(), list(names), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if (package / name).is_dir():
            files.update(
                p for p in (package / name).rglob("*") if p.is_file() and "__pycache__" not in p.parts
            )
            continue
        path = package / f"{name}.py"
        if not path.exists():
            raise FileNotFoundError(f"code_digest: no module {name!r} in {package}")
        files.add(path)
        todo.extend(_local_imports(path, package))
    return sorted(files)


def code_digest(*names: str, package: Path = PACKAGE) -> str:
    """sha256 over the content (not the mtime) of ``module_closure(*names)``."""
    h = hashlib.sha256()
    for path in module_closure(*names, package=package):
        h.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


# --- pieces of a record ---------------------------------------------------------------------------
def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def process_start() -> str | None:
    """When this process started (Linux /proc), i.e. when the step started."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 (starttime), counted after the ')' of the command
        boot = next(
            int(l.split()[1]) for l in Path("/proc/stat").read_text().splitlines() if l.startswith("btime")
        )
        started = boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return dt.datetime.fromtimestamp(started, dt.timezone.utc).isoformat(timespec="seconds")


def git_state(root: Path = ROOT) -> dict:
    """Project commit and whether the work tree differs from it (None outside a checkout)."""

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=60)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return dict(commit=None, dirty=None, note="not a git checkout")
        status = git("status", "--porcelain", "--untracked-files=no")
        return dict(commit=head.stdout.strip(), dirty=bool(status.stdout.strip()))
    except (OSError, subprocess.TimeoutExpired) as exc:
        return dict(commit=None, dirty=None, note=f"git unavailable: {exc}")


def environment(family: str) -> dict:
    """Python and the installed versions of every package pinned for the step's env family."""
    from .envcheck import FAMILIES, family_pins, installed_version

    pins = family_pins(family)
    names = sorted(set(pins) | {k.lower() for k in FAMILIES[family]["key"]})
    return dict(
        family=family,
        conda_env=FAMILIES[family]["env"],
        python=platform.python_version(),
        executable=sys.executable,
        packages={n: installed_version(n) for n in names},
    )


def devices() -> dict:
    try:
        import torch
    except ImportError:
        return dict(gpu_count=None, gpu_types=[], note="torch not installed")
    if not torch.cuda.is_available():
        return dict(gpu_count=0, gpu_types=[])
    n = torch.cuda.device_count()
    return dict(gpu_count=n, gpu_types=[torch.cuda.get_device_name(i) for i in range(n)])


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / "manifest.json"
    if not path.exists():
        return dict(path=str(folder), manifest=None, note="no manifest.json (not fetched by vlmtune.fetch)")
    m = json.loads(path.read_text(encoding="utf-8"))
    return dict(
        path=str(folder),
        manifest_sha256=sha256(path),
        **{k: m.get(k) for k in ("kind", "source", "repo_id", "revision", "commit", "local_path")},
        files=m.get("files", {}),
    )


def images_of(*record_files: Path) -> set[str]:
    """Image paths (relative to the dataset folder) that converted records refer to."""
    used = set()
    for path in record_files:
        if not Path(path).exists():
            continue
        records = read_records(path)
        used.update(r["image"] for r in records if r.get("image"))
    return used


def dataset_used(folder: Path, *record_files: Path) -> dict:
    """The dataset's revision, the hashes of its record files, and of the images the converted
    data refers to (one digest over ``path sha256`` lines: a real run uses tens of thousands)."""
    info = read_manifest(folder)
    files = info.pop("files", {}) or {}
    used = images_of(*record_files)
    known = {p: files[p]["sha256"] for p in sorted(used) if p in files}
    listing = "".join(f"{p} {h}\n" for p, h in known.items())
    info.update(
        record_files={p: f["sha256"] for p, f in files.items() if p.endswith((".jsonl", ".json", ".zip"))},
        images_used=len(used),
        images_hashed=len(known),
        images_not_in_manifest=sorted(used - set(known))[:20],
        images_sha256=hashlib.sha256(listing.encode()).hexdigest(),
    )
    return info


def files_of(folder: Path) -> dict:
    return {
        p.relative_to(folder).as_posix(): sha256(p)
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file() and not p.name.startswith(".snakemake")
    }


def secret_values() -> list[str]:
    return [v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= 6]


def redact(obj, secrets: list[str] | None = None):
    """Replace every secret environment value inside strings of ``obj`` with ``***``."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(obj, str):
        for s in secrets:
            obj = obj.replace(s, "***")
        return obj
    if isinstance(obj, dict):
        return {redact(k, secrets): redact(v, secrets) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v, secrets) for v in obj]
    return obj


def write_record(path: Path, record: dict) -> dict:
    record = redact(dict(schema=SCHEMA_VERSION, **record, finished_at=now()))
    write_json(Path(path), record)
    return record


# --- the two records ----------------------------------------------------------------------------
def xtuner_config_info(config: Path) -> dict:
    text = Path(config).read_text(encoding="utf-8")

    def value(name):
        m = re.search(rf"^{name} = (.+)$", text, re.M)
        return m.group(1).strip().strip("'\"") if m else None

    seed = re.search(r"randomness = dict\(seed=(\w+)", text)
    return dict(
        path=str(config),
        sha256=sha256(config),
        text=text,
        seed=int(seed.group(1)) if seed and seed.group(1).isdigit() else None,
        data_path=value("data_path"),
        image_folder=value("image_folder"),
    )


def beside_model(out: Path) -> Path:
    return Path(out).with_name(Path(out).name + ".provenance.json")


def for_merge(config: Path, train_result: Path, base: Path, out: Path) -> dict:
    """Provenance of a merged model (called at the end of ``vlmtune.merge``)."""
    started = process_start()
    cfg = xtuner_config_info(config)
    result = json.loads(Path(train_result).read_text(encoding="utf-8"))
    summary = result.get("summary") or {}
    data_path = Path(cfg["data_path"]) if cfg["data_path"] else None
    converted = {}
    if data_path is not None:
        for f in sorted(data_path.parent.glob("*")):
            if f.is_file() and f.suffix in (".json", ".jsonl"):
                converted[f.name] = sha256(f)
    records = [data_path, data_path.parent / "eval.jsonl"] if data_path else []
    return dict(
        step="merge",
        output=str(out),
        started_at=started,
        model=read_manifest(base),
        dataset=dataset_used(Path(cfg["image_folder"]), *records) if cfg["image_folder"] else None,
        converted=dict(folder=str(data_path.parent) if data_path else None, files=converted),
        xtuner_config=cfg,
        seed=cfg["seed"],
        training=dict(
            checkpoint=result.get("checkpoint"),
            iteration=result.get("iteration"),
            optimizer_steps=result.get("optimizer_steps"),
            global_batch_size=result.get("global_batch_size"),
            gpus=summary.get("gpus"),
            processes=summary.get("processes", result.get("processes")),
            gpu_types=summary.get("gpu_types") or summary.get("gpu_names"),
            deepspeed=summary.get("deepspeed"),
            final_loss=summary.get("final_loss"),
            train_result_sha256=sha256(train_result),
        ),
        final_loss=summary.get("final_loss"),
        merged_files=files_of(out),
        devices=devices(),
        environment=environment("xtuner"),
        project=git_state(),
    )


def write_for_merge(config: Path, train_result: Path, base: Path, out: Path) -> Path:
    path = beside_model(out)
    write_record(path, for_merge(config, train_result, base, out))
    return path


def write_for_evaluation(
    model: Path, eval_path: Path, image_folder: Path, predictions: Path, engine: str, generation: dict
) -> Path:
    """``provenance.json`` beside ``predictions`` (called at the end of ``vlmtune.evaluate``)."""
    started = process_start()
    model, predictions = Path(model), Path(predictions)
    rows = read_jsonl(predictions)
    model_record = beside_model(model)
    record = dict(
        step="evaluate",
        output=str(predictions),
        started_at=started,
        variant=predictions.parent.name,
        model=read_manifest(model) if (model / "manifest.json").exists() else dict(path=str(model)),
        model_provenance=json.loads(model_record.read_text(encoding="utf-8"))
        if model_record.exists()
        else None,
        dataset=dataset_used(Path(image_folder), eval_path),
        converted=dict(eval=str(eval_path), sha256=sha256(eval_path)),
        engine=engine,
        engine_version=rows[0].get("engine_version") if rows else None,
        generation=generation,
        seed=generation.get("seed"),
        records=len(rows),
        predictions_sha256=sha256(predictions),
        devices=devices(),
        environment=environment("lmdeploy" if engine == "lmdeploy" else "xtuner"),
        project=git_state(),
    )
    merged = record["model_provenance"] or {}
    record.update(
        final_loss=merged.get("final_loss"),
        xtuner_config_sha256=(merged.get("xtuner_config") or {}).get("sha256"),
    )
    path = predictions.parent / "provenance.json"
    write_record(path, record)
    return path


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Print the code hash of step modules (as the rules see it).")
    ap.add_argument("modules", nargs="+")
    a = ap.parse_args(argv)
    for p in module_closure(*a.modules):
        print(p.relative_to(PACKAGE))
    print(code_digest(*a.modules))


if __name__ == "__main__":
    main()
