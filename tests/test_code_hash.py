"""Code hashes cover exactly what a step runs: for every module of the package, the rules whose
``code`` param changes when the module changes are the rules that execute it.

"Executes" is measured, not read from the code: every Python process of the demo run (the step,
and the processes it starts: torchrun, XTuner's launcher ``vlmtune.xtuner_main``, workers) records
the vlmtune modules it ran (tests/trace_site/sitecustomize.py), and each process is assigned to
the rule whose log its stderr writes to (or, failing that, to its parent's rule). The code param
is ``code_hash(...)`` of the rule, i.e. ``vlmtune.provenance.module_closure`` of the modules named
there plus ``envcheck``."""

import json
import re
from pathlib import Path

import pytest

from conftest import DEMO_MODULE_TRACE, ROOT
from vlmtune.provenance import PACKAGE, module_closure

# Modules in a rule's code hash that the CPU demo does not run, with the setting that runs them.
NOT_RUN_BY_THE_DEMO = {
    ("evaluate", "lmdeploy_engine"): "evaluate.engine: lmdeploy (GPU)",
    ("train", "iteration_log"): "train.iteration_log: true",
}


def rules_code_modules() -> dict[str, tuple[str, ...]]:
    """rule name -> the module names its ``code=code_hash(...)`` param names."""
    found = {}
    for smk in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        rule = None
        for line in smk.read_text().splitlines():
            m = re.match(r"^(?:local)?rule (\w+):", line)
            if m:
                rule = m.group(1)
            m = re.search(r"\bcode=code_hash\(([^)]*)\)", line)
            if m and rule:
                found[rule] = tuple(re.findall(r'"(\w+)"', m.group(1)))
    return found


def closure(modules) -> set[str]:
    """The package's .py modules in a rule's code hash (folders such as remote_code are data)."""
    return {
        p.stem
        for p in module_closure("envcheck", *modules)
        if p.parent == PACKAGE and p.suffix == ".py" and p.stem != "__init__"
    }


def log_rules(workdir: Path) -> dict[str, str]:
    """log file (absolute) -> rule, from the Snakemake log of the run."""
    logs = {}
    for path in (workdir / ".snakemake" / "log").glob("*.snakemake.log"):
        rule = None
        for line in path.read_text().splitlines():
            m = re.match(r"^(?:local)?rule (\w+):", line)
            if m:
                rule = m.group(1)
            elif rule and line.strip().startswith("log: "):
                for log in line.strip()[len("log: ") :].split(", "):
                    logs[str((workdir / log).resolve())] = rule
    return logs


def executed_by_rule(trace: Path, workdir: Path) -> dict[str, set[str]]:
    logs = log_rules(workdir)
    procs = {r["pid"]: r for r in (json.loads(p.read_text()) for p in trace.glob("*.json"))}

    def rule_of(rec, depth=0):
        if rec["stderr"] in logs:
            return logs[rec["stderr"]]
        parent = procs.get(rec["ppid"])
        return rule_of(parent, depth + 1) if parent and depth < 10 else None

    executed: dict[str, set[str]] = {}
    for rec in procs.values():
        rule = rule_of(rec)
        if rule:
            mods = {m for m in rec["modules"] if (PACKAGE / f"{m}.py").exists() and m != "__init__"}
            executed.setdefault(rule, set()).update(mods)
    return executed


@pytest.mark.slow
def test_each_rules_code_hash_covers_exactly_what_it_executes(demo_run):
    """Rule by rule, closure == executed; that is the same as: for every module, the rules whose
    code param changes with it are the rules that run it."""
    executed = executed_by_rule(DEMO_MODULE_TRACE["dir"], DEMO_MODULE_TRACE["workdir"])
    code = rules_code_modules()
    ran = sorted(set(code) & set(executed))
    # every rule of the demo that has a code param was seen running, the training's subprocesses too
    assert {"convert_dataset", "validate_dataset", "train", "merge_lora", "evaluate", "reference_nll",
            "metrics", "report", "render_xtuner_config", "fetch_model"} <= set(ran), ran  # fmt: skip
    assert "xtuner_main" in executed["train"], "torchrun's worker was not traced"
    problems = []
    for rule in ran:
        expected = executed[rule] | {m for (r, m) in NOT_RUN_BY_THE_DEMO if r == rule}
        hashed = closure(code[rule])
        if hashed != expected:
            problems.append(
                f"{rule}: hashed but not run {sorted(hashed - expected)}, run but not hashed "
                f"{sorted(expected - hashed)}"
            )
    assert not problems, "\n".join(problems)
    for (rule, module), why in NOT_RUN_BY_THE_DEMO.items():
        assert module in closure(code[rule]), f"stale exception: {rule} no longer hashes {module} ({why})"
