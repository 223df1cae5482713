"""The README's two commands on a fresh machine: `make test` installs the Debian packages the
tests need (the same list CI uses) or stops before any test naming the command to run; a failed
step shows its cause on the console; every run keeps its own logs."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import yaml

from conftest import PLANTED_TOKEN, ROOT, copy_workflow, run_snakemake

PYTEST_MARK = "RAN-PYTEST"
# This suite itself runs under `make test`: a nested make must not print "Entering directory".
MAKE_ENV = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}


def apt_list() -> list[str]:
    """.ci/apt-packages.txt read independently of the install script: names, # comments."""
    text = (ROOT / ".ci" / "apt-packages.txt").read_text()
    return [w for line in text.splitlines() for w in line.split("#", 1)[0].split()]


def fake_system(tmp_path: Path, uid: int, installed: bool, sudo_ok: bool) -> dict:
    """PATH with fake id/dpkg-query/sudo/apt-get: apt-get records its arguments."""
    bin_ = tmp_path / "fakebin"
    bin_.mkdir()
    record = tmp_path / "apt-calls"
    fakes = {
        "id": f'[ "$1" = "-u" ] && echo {uid} || /usr/bin/id "$@"',
        "dpkg-query": "echo -n 'install ok installed'" if installed else "exit 1",
        "sudo": '[ "$1" = "-n" ] && shift; '
        + ('"$@"' if sudo_ok else "echo 'sudo: a password is required' >&2; exit 1"),
        "apt-get": f'echo "apt-get $*" >> {record}',
    }
    for name, body in fakes.items():
        (bin_ / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_ / name).chmod(0o755)
    return dict(MAKE_ENV, PATH=f"{bin_}:{os.environ['PATH']}")


def make_test(env: dict, target: str = "test") -> subprocess.CompletedProcess:
    """`make test` in the checkout with pytest replaced by an echo (no recursion) and the venv
    taken as built (-o: not remade)."""
    venv = ROOT / ".venv" / ".installed"
    return subprocess.run(
        ["make", "-o", str(venv.relative_to(ROOT)), target, f"PYTEST=echo {PYTEST_MARK}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_make_test_runs_the_install_step_first_and_ci_runs_make_test():
    dry = subprocess.run(
        ["make", "-n", "-o", ".venv/.installed", "test"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=MAKE_ENV,
    ).stdout
    lines = dry.splitlines()
    assert lines[0] == ".ci/install-system-packages", dry
    assert "pytest" in lines[-1] and len(lines) == 2, dry
    fast = subprocess.run(
        ["make", "-n", "-o", ".venv/.installed", "test-fast"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=MAKE_ENV,
    ).stdout
    assert fast.splitlines()[0] == ".ci/install-system-packages", fast
    # CI runs the README's command and nothing else.
    commands = [
        l for l in (ROOT / ".ci" / "run").read_text().splitlines() if l.strip() and not l.startswith("#")
    ]
    assert commands[-1] == "make test" and not any("install" in c for c in commands), commands
    assert "make test" in (ROOT / "README.md").read_text()


def test_install_step_installs_exactly_the_ci_package_list(tmp_path):
    listed = subprocess.run(
        [ROOT / ".ci" / "install-system-packages", "--list"], capture_output=True, text=True, check=True
    )
    assert listed.stdout.split() == apt_list()
    # What the tests use is in the list: Slurm and munge daemons, Chromium, the report's CJK font.
    from vlmtune import report

    assert {"slurmctld", "slurmd", "slurm-client", "munge", "procps", "chromium", "fonts-noto-cjk"} <= set(
        apt_list()
    )
    assert '"Noto Sans CJK SC"' in report.CSS
    # A machine with none of them, as root: make test installs them all, then runs the suite.
    proc = make_test(fake_system(tmp_path, uid=0, installed=False, sudo_ok=False))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = (tmp_path / "apt-calls").read_text().splitlines()
    assert calls[0] == "apt-get update -q"
    assert calls[1].split() == ["apt-get", "install", "-y", "-q", "--no-install-recommends", *apt_list()]
    assert PYTEST_MARK in proc.stdout


def test_install_step_uses_passwordless_sudo_and_skips_when_all_installed(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    proc = make_test(fake_system(tmp_path / "a", uid=1000, installed=False, sudo_ok=True))
    assert proc.returncode == 0 and PYTEST_MARK in proc.stdout, proc.stderr
    assert "--no-install-recommends" in (tmp_path / "a" / "apt-calls").read_text()
    proc = make_test(fake_system(tmp_path / "b", uid=1000, installed=True, sudo_ok=False))
    assert proc.returncode == 0 and PYTEST_MARK in proc.stdout, proc.stderr
    assert not (tmp_path / "b" / "apt-calls").exists() and proc.stderr == ""


def test_without_root_or_sudo_make_test_stops_before_any_test_with_one_line(tmp_path):
    proc = make_test(fake_system(tmp_path, uid=1000, installed=False, sudo_ok=False), target="test-fast")
    assert proc.returncode != 0
    assert PYTEST_MARK not in proc.stdout
    assert not (tmp_path / "apt-calls").exists()
    ours = [l for l in proc.stderr.splitlines() if not l.startswith("make")]
    assert len(ours) == 1, proc.stderr
    assert re.search(r"run: sudo \S*\.ci/install-system-packages", ours[0]), ours[0]
    assert all(p in ours[0] for p in apt_list())


def test_a_failed_step_shows_its_cause_on_the_console(tmp_path):
    """No network (an endpoint that refuses): the fetch's reason and advice are on the console,
    through the workflow profile (profiles/default: show-failed-logs); the token is not."""
    workdir = copy_workflow(tmp_path)
    shutil.copytree(ROOT / "profiles", workdir / "profiles")
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0", "HF_TOKEN": PLANTED_TOKEN}
    proc = run_snakemake(workdir, "-j1", "data/models/InternVL2-2B", check=False, env=env)
    console = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "could not fetch model OpenGVLab/InternVL2-2B" in console, console[-3000:]
    assert "export HF_ENDPOINT=https://hf-mirror.com" in console and "model.source: local" in console
    assert PLANTED_TOKEN not in console
    # Without the workflow profile the console has only Snakemake's summary: the check can fail.
    bare = run_snakemake(
        workdir, "-j1", "data/models/InternVL2-2B", "--workflow-profile", "none", check=False, env=env
    )
    assert bare.returncode != 0 and "hf-mirror.com" not in bare.stdout + bare.stderr


def test_the_default_profile_adds_to_the_local_and_slurm_profiles():
    default = yaml.safe_load((ROOT / "profiles" / "default" / "config.yaml").read_text())
    assert default == {"show-failed-logs": True}
    for name in ("local", "slurm"):
        assert not set(default) & set(yaml.safe_load((ROOT / "profiles" / name / "config.yaml").read_text()))


def dry_run_logs(workdir: Path, overlay: Path) -> dict[str, str]:
    out = run_snakemake(workdir, "-n", "--configfile", "config/demo.yaml", str(overlay)).stdout
    jobs = re.findall(r"^(?:local)?rule (\w+):\n((?:    .*\n)+)", out, flags=re.M)
    assert jobs and all("log: " in body for rule, body in jobs if rule != "all"), out  # every step has a log
    return {
        rule + (re.search(r"wildcards: (.*)", body) or [None, ""])[1]: re.search(r"log: (\S+)", body).group(1)
        for rule, body in jobs
        if rule != "all"
    }


def test_two_runs_keep_separate_logs(tmp_path):
    (tmp_path / "wf").mkdir()
    workdir = copy_workflow(tmp_path / "wf")
    logs = {}
    for run in ("demo", "other"):
        overlay = tmp_path / f"{run}.yaml"
        overlay.write_text(f"run: {run}\n")
        logs[run] = dry_run_logs(workdir, overlay)
    assert set(logs["demo"]) == set(logs["other"]) and len(logs["demo"]) >= 15
    for run, by_job in logs.items():
        assert all(path.startswith(f"logs/{run}/") for path in by_job.values()), by_job
        assert len(set(by_job.values())) == len(by_job)  # one log per job
    assert not set(logs["demo"].values()) & set(logs["other"].values())
    assert logs["demo"]["fetch_model"] == "logs/demo/fetch_model.log"
