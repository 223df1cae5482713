"""Check that the running interpreter is the environment a step family needs, then run the step.

Each rule runs its step through this module (the shell function
``python_<family>`` that ``step_python`` defines in workflow/rules/common.smk):

    python -m vlmtune.envcheck xtuner -m vlmtune.train --config ... --work-dir ...

Before the step starts, every key package of the family must import and be installed at the
version pinned in the family's conda env (``envs/<family>.yaml``, else its pip requirement
file). Otherwise the step stops with a message naming the env, what is wrong and how to get the
right one (``--sdm conda``, ``make venvs``, or the ``python`` config key), so a step never runs
silently with a wrong interpreter. Without ``-m`` it only checks and prints the versions.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def xtuner_root() -> Path:
    """The installed ``xtuner`` package folder, whose files the steps use as they are: the
    InternVL model code the model builder copies, ``convert_to_official.py`` the merge runs."""
    spec = importlib.util.find_spec("xtuner")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("xtuner is not installed: run `make venv` (or use envs/xtuner.yaml)")
    return Path(list(spec.submodule_search_locations)[0])


# family -> conda env, pip requirement files (used without conda, later files win), and the key
# packages (distribution name -> import name) a step of that family cannot run without.
FAMILIES = {
    "data": dict(
        env="envs/data.yaml",
        requirements=["requirements/data.txt"],
        key={
            "PyYAML": "yaml",
            "jsonschema": "jsonschema",
            "huggingface_hub": "huggingface_hub",
            "Pillow": "PIL",
            "tqdm": "tqdm",
        },
    ),
    "xtuner": dict(
        env="envs/xtuner.yaml",
        requirements=["requirements/gpu.txt", "requirements/xtuner-nodeps.txt"],
        key={
            "torch": "torch",
            "transformers": "transformers",
            "mmengine": "mmengine",
            "peft": "peft",
            "timm": "timm",
            "xtuner": "xtuner",
            "PyYAML": "yaml",
        },
    ),
    "lmdeploy": dict(
        env="envs/lmdeploy.yaml",
        requirements=["requirements/lmdeploy.txt", "requirements/lmdeploy-nodeps.txt"],
        key={"lmdeploy": "lmdeploy", "Pillow": "PIL", "PyYAML": "yaml"},
    ),
}
# Set to 1 on a machine whose preinstalled stack cannot be replaced (a GPU image with its own
# CUDA torch): version differences from the pins are then printed as warnings, not errors. A
# package that is missing or does not import still stops the step.
ALLOW_DRIFT_VAR = "VLMTUNE_ALLOW_VERSION_DRIFT"
PIN = re.compile(r"^\s*(?:-\s+)?([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*==\s*([^\s;#]+)")


class EnvError(RuntimeError):
    pass


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins_from_text(text: str) -> dict[str, str]:
    """``name==version`` lines of a requirement file or a conda env's pip list."""
    pins = {}
    for line in text.splitlines():
        m = PIN.match(line)
        if m:
            pins[canonical(m.group(1))] = m.group(2)
    return pins


def requirement_pins(path: Path) -> dict[str, str]:
    """Pins of a pip requirement file, following ``-r`` includes (later lines win)."""
    path = Path(path)
    pins: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip().startswith("-r "):
            pins.update(requirement_pins(path.parent / line.split(None, 1)[1].strip()))
        else:
            pins.update(pins_from_text(line))
    return pins


def env_pins(path: Path) -> dict[str, str]:
    return pins_from_text(Path(path).read_text(encoding="utf-8"))


def family_pins(family: str, root: Path = ROOT) -> dict[str, str]:
    """The versions a family's env must hold: the conda env's pins, else its requirement files'."""
    spec = FAMILIES[family]
    pins: dict[str, str] = {}
    for req in spec["requirements"]:
        if (root / req).exists():
            pins.update(requirement_pins(root / req))
    pins.update(env_pins(root / spec["env"]))
    return pins


def installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def same_version(installed: str, pinned: str) -> bool:
    # A local build tag (torch 2.14.1+cu130) is the pinned release.
    return installed.split("+")[0] == pinned.split("+")[0]


def drift_allowed() -> bool:
    return os.environ.get(ALLOW_DRIFT_VAR, "") not in ("", "0")


def check(family: str, root: Path = ROOT, do_import: bool = True) -> dict[str, str]:
    """Versions of the family's key packages; EnvError naming every problem otherwise.

    With ``VLMTUNE_ALLOW_VERSION_DRIFT=1`` a version other than the pinned one is a warning on
    stderr; a missing package or one that fails to import is still an error.
    """
    if family not in FAMILIES:
        raise EnvError(f"unknown env family {family!r}; choose one of {sorted(FAMILIES)}")
    pins, problems, found = family_pins(family, root), [], {}
    for dist, module in FAMILIES[family]["key"].items():
        pinned, have = pins.get(canonical(dist)), installed_version(dist)
        if have is None:
            problems.append(f"{dist} is not installed (pinned {pinned})")
            continue
        if pinned and not same_version(have, pinned):
            if drift_allowed():
                print(
                    f"envcheck: warning: {dist} {have} is installed, {pinned} is pinned "
                    f"({ALLOW_DRIFT_VAR} is set)",
                    file=sys.stderr,
                )
            else:
                problems.append(f"{dist} {have} is installed, {pinned} is pinned")
        if do_import:
            try:
                importlib.import_module(module)
            except Exception as exc:  # a broken install fails here, not hours into the step
                problems.append(f"{dist} {have} does not import: {type(exc).__name__}: {exc}")
        found[dist] = have
    if problems:
        raise EnvError(
            f"interpreter {sys.executable} is not the '{family}' env ({FAMILIES[family]['env']}):\n  "
            + "\n  ".join(problems)
            + f"\nRun with --sdm conda, or create the env with `make venvs` (.venvs/{family}) and "
            f"name its interpreter in the config key python.{family} (README, 'Environments')."
        )
    return found


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if argv else 2)
    family, rest = argv[0], argv[1:]
    try:
        found = check(family)
    except EnvError as exc:
        raise SystemExit(f"envcheck: {exc}") from None
    if not rest:
        print(f"'{family}' env OK ({sys.executable}): " + ", ".join(f"{k} {v}" for k, v in found.items()))
        return
    if rest[0] != "-m" or len(rest) < 2:
        raise SystemExit(f"envcheck: expected `-m MODULE [ARGS...]` after the family, got {rest[:2]}")
    sys.argv = [rest[1], *rest[2:]]
    runpy.run_module(rest[1], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
