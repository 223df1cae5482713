"""A real single-node Slurm (Debian's slurmctld/slurmd + munge) for tests/test_slurm.py.

Installs nothing: CI installs the packages of .ci/apt-packages.txt first. Needs root, because
the executor plugin drops SLURM_CONF before its in-job `srun`, so the configuration has to sit
at /etc/slurm/slurm.conf (FIELD-NOTES §7); a file already there is put back on teardown.
The daemons run in the foreground as children of the test, so teardown kills exactly them.
Fake GPUs are gres backed by links to /dev/null: Slurm allocates and accounts them, nothing
uses them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
SLURM_CONF = Path("/etc/slurm/slurm.conf")
GRES_CONF = Path("/etc/slurm/gres.conf")
MUNGE_KEY = Path("/etc/munge/munge.key")
NEEDED = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "srun")


class SlurmUnavailable(RuntimeError):
    """The machine cannot host the test cluster; the message says what is missing."""


def missing_requirements() -> list[str]:
    problems = [f"`{tool}` not on PATH" for tool in NEEDED if not shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")]
    if os.geteuid() != 0:
        problems.append("not root (the plugin needs the config at /etc/slurm/slurm.conf)")
    return problems


def node_memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise SlurmUnavailable("no MemTotal in /proc/meminfo")


def running(name: str) -> list[int]:
    out = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


class SingleNodeSlurm:
    """slurmctld + slurmd on this host, with `cpus` CPUs, all but 1 GiB of its memory, and
    `gpus` fake GPUs of type `gpu_model` in one default partition `partition`."""

    def __init__(self, root: Path, partition: str = "vlmtune", gpus: int = 2, gpu_model: str = "fakegpu"):
        self.root, self.partition, self.gpus, self.gpu_model = Path(root), partition, gpus, gpu_model
        self.host = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count() or 1
        self.memory_mb = max(1024, node_memory_mb() - 1024)
        self.procs: dict[str, subprocess.Popen] = {}
        self.saved: dict[Path, bytes | None] = {}
        self.log_dir = self.root / "log"

    # -- configuration ------------------------------------------------------------------
    def slurm_conf(self) -> str:
        state = self.root / "state"
        return "\n".join([
            "# written by tests/slurm_cluster.py; removed when the test ends",
            "ClusterName=vlmtune-test",
            f"SlurmctldHost={self.host}",
            "AuthType=auth/munge",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={state}/ctld",
            f"SlurmdSpoolDir={state}/d",
            f"SlurmctldPidFile={state}/slurmctld.pid",
            f"SlurmdPidFile={state}/slurmd.pid",
            f"SlurmctldLogFile={self.log_dir}/slurmctld.log",
            f"SlurmdLogFile={self.log_dir}/slurmd.log",
            "SlurmctldDebug=verbose",
            "SlurmdDebug=info",
            # no cgroup in containers: track processes by parent pid, no task binding
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "DefMemPerCPU=1000",
            "GresTypes=gpu",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            # finished jobs stay visible to squeue/scontrol: the plugin's squeue status
            # command needs MinJobAge >= 3x its first polling interval
            "MinJobAge=600",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            f"NodeName={self.host} CPUs={self.cpus} RealMemory={self.memory_mb}"
            f" Gres=gpu:{self.gpu_model}:{self.gpus} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
            "",
        ])  # fmt: skip

    def gres_conf(self) -> str:
        devices = self.root / "dev"
        devices.mkdir(parents=True, exist_ok=True)
        for i in range(self.gpus):
            link = devices / f"fakegpu{i}"
            if not link.is_symlink():
                link.symlink_to("/dev/null")
        return f"NodeName={self.host} Name=gpu Type={self.gpu_model} File={devices}/fakegpu[0-{self.gpus - 1}]\n"

    def _install(self, path: Path, text: str) -> None:
        if path not in self.saved:
            self.saved[path] = path.read_bytes() if path.exists() else None
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> "SingleNodeSlurm":
        problems = missing_requirements()
        if problems:
            raise SlurmUnavailable("cannot start the test Slurm: " + "; ".join(problems) + " (run .ci/install-system-packages as root)")
        ours = [name for name in DAEMONS if running(name)]
        if ours:
            raise SlurmUnavailable(f"{ours} already running: the test cluster would collide with them")
        for d in ("state/ctld", "state/d", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self._install(SLURM_CONF, self.slurm_conf())
        self._install(GRES_CONF, self.gres_conf())
        self._start_munge()
        self._spawn("slurmctld", ["slurmctld", "-D", "-i"])
        self._spawn("slurmd", ["slurmd", "-D"])
        self._wait_idle(timeout)
        return self

    def _start_munge(self) -> None:
        if not MUNGE_KEY.exists():  # Debian's postinst makes one; a bare image may not have it
            self._install(MUNGE_KEY, "")
            MUNGE_KEY.write_bytes(os.urandom(128))
            shutil.chown(MUNGE_KEY, "munge", "munge")
            MUNGE_KEY.chmod(0o600)
        for d in ("/run/munge", "/var/lib/munge", "/var/log/munge"):  # what munged expects
            Path(d).mkdir(parents=True, exist_ok=True)
            shutil.chown(d, "munge", "munge")
        # as the munge user, but as our direct child (no runuser in between), so stop() ends it
        self._spawn("munged", ["munged", "-F"], user="munge", group="munge", extra_groups=[])
        deadline = time.time() + 20
        while time.time() < deadline:
            if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
                return
            time.sleep(0.2)
        raise SlurmUnavailable("munged did not answer within 20 s: " + self.logs())

    def _spawn(self, name: str, cmd: list[str], **popen) -> None:
        log = open(self.log_dir / f"{name}.stderr", "wb")
        env = dict(os.environ, PATH=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
        cmd = [shutil.which(cmd[0], path=env["PATH"]) or cmd[0], *cmd[1:]]
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, **popen)

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.time() + timeout
        state = ""
        while time.time() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise SlurmUnavailable(f"{name} exited with {proc.returncode}: " + self.logs())
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True)
            state = out.stdout.strip()
            if state in ("idle", "idle~"):
                return
            time.sleep(0.5)
        raise SlurmUnavailable(f"node not idle after {timeout} s (state {state!r}): " + self.logs())

    def stop(self) -> None:
        """Kill our daemons (slurmd first), wait for them, put the system files back."""
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for path, content in self.saved.items():
            if content is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(content)
        self.saved.clear()

    def logs(self, tail: int = 3000) -> str:
        parts = []
        for path in sorted(self.log_dir.glob("*")):
            parts.append(f"== {path.name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
