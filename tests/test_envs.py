"""Per-step environments: conda env pins agree with the pip requirement files, every rule's
conda env matches the interpreter family it runs with, and a step refuses a wrong interpreter."""

import os
import re
import shutil
import subprocess
import sys
import venv

import pytest
import yaml

from conftest import ROOT
from vlmtune import envcheck
from vlmtune.envcheck import FAMILIES, canonical, env_pins, family_pins, requirement_pins


def rule_blocks():
    """(file, rule name, text) of every rule in the workflow."""
    for smk in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        text = smk.read_text()
        parts = re.split(r"^rule (\w+):\n", text, flags=re.M)
        for name, body in zip(parts[1::2], parts[2::2]):
            yield smk.name, name, body


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_conda_env_pins_agree_with_the_pip_requirements(family):
    spec = FAMILIES[family]
    conda = env_pins(ROOT / spec["env"])
    pip = {}
    for req in spec["requirements"]:
        pip.update(requirement_pins(ROOT / req))
    assert conda, f"{spec['env']} pins nothing"
    disagree = {name: (version, pip.get(name)) for name, version in conda.items() if pip.get(name) != version}
    assert not disagree, f"{spec['env']} vs {spec['requirements']} (conda, pip): {disagree}"
    unpinned = [d for d in spec["key"] if canonical(d) not in conda and canonical(d) not in pip]
    assert not unpinned, f"key packages of {family} pinned nowhere: {unpinned}"
    deps = yaml.safe_load((ROOT / spec["env"]).read_text())["dependencies"]
    for dep in deps:
        if isinstance(dep, dict):
            unpinned = [p for p in dep["pip"] if "==" not in p]
            assert not unpinned, f"{spec['env']}: unpinned pip dependencies {unpinned}"
        else:
            assert dep == "pip" or re.search(r"=\d", dep), f"{spec['env']}: unpinned dependency {dep!r}"


def test_the_single_default_venv_agrees_with_every_family_it_serves():
    """CI and the demo run every step in one .venv from requirements/cpu.txt: its pins must be
    the families' pins, except what requirements/gpu.txt re-pins for CUDA (bitsandbytes)."""
    cpu = requirement_pins(ROOT / "requirements" / "cpu.txt")
    gpu_overrides = {
        n
        for n, v in requirement_pins(ROOT / "requirements" / "gpu.txt").items()
        if cpu.get(n) not in (None, v)
    }
    assert gpu_overrides == {"bitsandbytes"}, gpu_overrides
    for family in ("data", "xtuner"):
        pins = family_pins(family)
        differ = {
            n: (cpu[n], v) for n, v in pins.items() if n in cpu and cpu[n] != v and n not in gpu_overrides
        }
        assert not differ, f"requirements/cpu.txt vs the {family} env (cpu, env): {differ}"


def test_every_rule_runs_in_the_family_of_its_conda_env():
    seen = set()
    for smk, rule, body in rule_blocks():
        conda = (
            re.findall(r"envs/(\w+)\.yaml", body.split("conda:")[1].split("resources:")[0])
            if "conda:" in body
            else []
        )
        assert conda, f"{smk}: rule {rule} has no conda: env"
        for name in conda:
            assert (ROOT / "envs" / f"{name}.yaml").exists(), name
        runners = re.findall(r"\bpython_(\w+) -m vlmtune\.", body)
        assert len(runners) == 1 and "python -m" not in body, (
            f"{smk}: rule {rule} must run one python_<family> step"
        )
        if runners[0] == "evaluate":  # the engine picks the env: lmdeploy or xtuner (common.smk)
            assert sorted(conda) == ["lmdeploy", "xtuner"], conda
        else:
            assert conda == [runners[0]], (
                f"{smk}: rule {rule} runs python_{runners[0]} but its conda env is {conda}"
            )
        seen.add(rule)
    assert {"fetch_model", "convert_dataset", "train", "merge_lora", "evaluate"} <= seen


def test_envcheck_accepts_this_venv_for_the_families_it_holds():
    assert set(envcheck.check("data", do_import=False)) == set(FAMILIES["data"]["key"])
    assert envcheck.check("xtuner", do_import=False)["transformers"] == "4.48.0"


def test_envcheck_names_a_version_mismatch_and_the_way_out(tmp_path):
    for item in ["envs", "requirements"]:
        shutil.copytree(ROOT / item, tmp_path / item)
    env = tmp_path / "envs" / "data.yaml"
    env.write_text(env.read_text().replace("PyYAML==6.0.2", "PyYAML==5.1"))
    with pytest.raises(envcheck.EnvError) as err:
        envcheck.check("data", root=tmp_path, do_import=False)
    msg = str(err.value)
    assert "'data' env (envs/data.yaml)" in msg and "PyYAML 6.0.2 is installed, 5.1 is pinned" in msg
    assert "make venvs" in msg and "--sdm conda" in msg and "python.data" in msg
    with pytest.raises(envcheck.EnvError, match="unknown env family 'gpu'"):
        envcheck.check("gpu")


def test_a_step_refuses_an_interpreter_without_its_packages(tmp_path):
    """A bare venv (no packages) stands in for a wrong interpreter: the step must not start."""
    venv.EnvBuilder(with_pip=False).create(tmp_path / "bare")
    bare = tmp_path / "bare" / "bin" / "python"
    marker = tmp_path / "ran"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run(
        [str(bare), "-m", "vlmtune.envcheck", "data", "-m", "vlmtune.config", str(marker)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode != 0
    assert f"interpreter {bare} is not the 'data' env" in proc.stderr, proc.stderr
    assert "PyYAML is not installed (pinned 6.0.2)" in proc.stderr and "make venvs" in proc.stderr
    assert "configuration" not in proc.stdout  # vlmtune.config never ran


def test_the_launcher_runs_the_step_in_a_good_env():
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vlmtune.envcheck",
            "data",
            "-m",
            "vlmtune.config",
            str(ROOT / "config" / "config.yaml"),
            str(ROOT / "config" / "demo.yaml"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "configuration is valid"


def test_the_workflow_runs_a_step_with_its_family_interpreter_and_refuses_a_wrong_one(tmp_path):
    """config python.data names the data family's interpreter: a bare one stops the step with
    the envcheck message in the rule's log; the xtuner steps keep the default interpreter."""
    from conftest import copy_workflow, run_snakemake

    venv.EnvBuilder(with_pip=False).create(tmp_path / "bare")
    (tmp_path / "wf").mkdir()
    workdir = copy_workflow(tmp_path / "wf")
    overlay = tmp_path / "venvs.yaml"
    overlay.write_text(f"python:\n  data: {tmp_path / 'bare' / 'bin' / 'python'}\n")
    proc = run_snakemake(
        workdir,
        "-j1",
        "data/demo/CLoT-Oogiri-GO",
        "--configfile",
        "config/demo.yaml",
        str(overlay),
        check=False,
    )
    assert proc.returncode != 0
    log = (workdir / "logs" / "demo" / "demo_dataset.log").read_text()
    assert f"interpreter {tmp_path / 'bare' / 'bin' / 'python'} is not the 'data' env" in log, log
    assert not (workdir / "data" / "demo" / "CLoT-Oogiri-GO").exists()
    dry = run_snakemake(workdir, "-n", "-p", "--configfile", "config/demo.yaml", str(overlay)).stdout
    assert "python_xtuner -m vlmtune.train" in dry and "python_data -m vlmtune.fetch" in dry
