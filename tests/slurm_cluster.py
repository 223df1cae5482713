"""A real Slurm (Debian's slurmctld/slurmd + munge) for the tests: SingleNodeSlurm for
tests/test_slurm.py, TwoNodeSlurm (two slurmd in two network namespaces) for
tests/test_slurm_two_nodes.py.

Installs nothing: CI installs the packages of .ci/apt-packages.txt first. Needs root, because
the executor plugin drops SLURM_CONF before its in-job `srun`, so the configuration has to sit
at /etc/slurm/slurm.conf (docs/snakemake-slurm.md); a file already there is put back on teardown.
The daemons run in the foreground as children of the test, so teardown kills exactly them.
Fake GPUs are gres backed by links to /dev/null: Slurm allocates and accounts them, nothing
uses them.
"""

from __future__ import annotations

import fcntl
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
# One test cluster per machine at a time (slurm.conf and munged are machine-wide): test runs of
# other checkouts or sessions wait for it instead of colliding.
LOCK = Path("/tmp/vlmtune-test-slurm.lock")
NEEDED = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "srun")


class SlurmUnavailable(RuntimeError):
    """The machine cannot host the test cluster; the message says what is missing."""


def missing_requirements() -> list[str]:
    problems = [
        f"`{tool}` not on PATH"
        for tool in NEEDED
        if not shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    ]
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
        self.nodes = [self.host]
        self.per_node = ""  # suffix of slurmd's spool/pid/log files: "-%n" for several nodes

    # -- configuration ------------------------------------------------------------------
    def slurm_conf(self) -> str:
        state = self.root / "state"
        return "\n".join(
            [
                "# written by tests/slurm_cluster.py; removed when the test ends",
                "ClusterName=vlmtune-test",
                f"SlurmctldHost={self.controller()}",
                "AuthType=auth/munge",
                "SlurmUser=root",
                "SlurmdUser=root",
                f"StateSaveLocation={state}/ctld",
                f"SlurmdSpoolDir={state}/d{self.per_node}",
                f"SlurmctldPidFile={state}/slurmctld.pid",
                f"SlurmdPidFile={state}/slurmd{self.per_node}.pid",
                f"SlurmctldLogFile={self.log_dir}/slurmctld.log",
                f"SlurmdLogFile={self.log_dir}/slurmd{self.per_node}.log",
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
                *self.node_lines(),
                f"PartitionName={self.partition} Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE "
                "State=UP",
                "",
            ]
        )

    def gres_conf(self) -> str:
        devices = self.root / "dev"
        devices.mkdir(parents=True, exist_ok=True)
        for i in range(self.gpus):
            link = devices / f"fakegpu{i}"
            if not link.is_symlink():
                link.symlink_to("/dev/null")
        return "".join(
            f"NodeName={node} Name=gpu Type={self.gpu_model} File={devices}/fakegpu[0-{self.gpus - 1}]\n"
            for node in self.nodes
        )

    def controller(self) -> str:
        return self.host

    def node_lines(self) -> list[str]:
        return [
            f"NodeName={self.host} CPUs={self.cpus} RealMemory={self.memory_mb}"
            f" Gres=gpu:{self.gpu_model}:{self.gpus} State=UNKNOWN"
        ]

    def _install(self, path: Path, text: str) -> None:
        if path not in self.saved:
            self.saved[path] = path.read_bytes() if path.exists() else None
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    # -- lifecycle ------------------------------------------------------------------------
    def _lock(self, timeout: float) -> None:
        self._lock_file = open(LOCK, "a")
        deadline = time.time() + timeout
        while True:
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.time() > deadline:
                    self._unlock()
                    raise SlurmUnavailable(
                        f"another test Slurm on this machine held {LOCK} for {timeout} s"
                    ) from None
                time.sleep(1)

    def _unlock(self) -> None:
        lock, self._lock_file = getattr(self, "_lock_file", None), None
        if lock is not None:
            lock.close()  # closing releases the flock

    def start(self, timeout: float = 60, lock_timeout: float = 1800) -> SingleNodeSlurm:
        problems = missing_requirements()
        if problems:
            raise SlurmUnavailable(
                "cannot start the test Slurm: "
                + "; ".join(problems)
                + " (run .ci/install-system-packages as root)"
            )
        self._lock(lock_timeout)
        try:
            self._start(timeout)
        except BaseException:
            self.stop()  # what did start, and the lock
            raise
        return self

    def _start(self, timeout: float) -> None:
        ours = [name for name in DAEMONS if running(name)]
        if ours:
            raise SlurmUnavailable(f"{ours} already running: the test cluster would collide with them")
        for d in ("state/ctld", "state/d", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self._install(SLURM_CONF, self.slurm_conf())
        self._install(GRES_CONF, self.gres_conf())
        self._start_munge()
        self._start_daemons()
        self._wait_idle(timeout)

    def _start_daemons(self) -> None:
        self._spawn("slurmctld", ["slurmctld", "-D", "-i"])
        self._spawn("slurmd", ["slurmd", "-D"])

    def client(self, cmd: list[str]) -> list[str]:
        """`cmd` as run from where the controller is reachable (here: this host as it is)."""
        return list(cmd)

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
            out = subprocess.run(
                self.client(["sinfo", "-h", "-N", "-o", "%T"]), capture_output=True, text=True
            )
            state = out.stdout.strip()
            if len(state.split()) == len(self.nodes) and set(state.split()) <= {"idle", "idle~"}:
                return
            time.sleep(0.5)
        raise SlurmUnavailable(f"nodes not idle after {timeout} s (state {state!r}): " + self.logs())

    def stop(self) -> None:
        """Kill our daemons (slurmd first), wait for them, put the system files back."""
        try:
            self._stop_daemons()
        finally:
            self._unlock()

    def _stop_daemons(self) -> None:
        for name in [*(n for n in self.procs if n.startswith("slurmd")), "slurmctld", "munged"]:
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


class TwoNodeSlurm(SingleNodeSlurm):
    """Two Slurm nodes on this host, each with its own network stack, address and hostname.

    Each node is a network namespace (`ip netns`) of its own, joined to the other by a veth
    pair that is created directly inside the two namespaces (no interface or address is added
    to the host's namespace, no traffic leaves them). In node `vn1`'s namespace run slurmctld
    and slurmd, in `vn2`'s a second slurmd; each daemon also gets a UTS namespace whose
    hostname is its node name, and the cluster's hosts file (bind-mounted over /etc/hosts by
    bind-mounted over /etc/hosts) resolves both names, so hostname-based code (torchrun's rendezvous, gloo's
    choice of interface) sees two real hosts. vn1 is also the submit host: clients
    (sbatch, squeue, the test's Snakemake) run through `client()` in its namespace. munged
    stays on the host: its socket is a file, reachable from every namespace. Per-node spool,
    pid and log files come from `%n` in slurm.conf. Processes left in the namespaces (job
    steps of a failed test) are killed and the namespaces and files removed in stop().

    Both nodes share this host's CPUs (each declares all of them) and split its memory.
    """

    SUBNET = "10.213.77"  # only ever assigned inside the two namespaces

    def __init__(self, root: Path, partition: str = "vlmtune2", gpus: int = 1, gpu_model: str = "fakegpu"):
        super().__init__(root, partition, gpus, gpu_model)
        self.nodes = ["vn1", "vn2"]
        self.addrs = [f"{self.SUBNET}.{i + 1}" for i in range(len(self.nodes))]
        tag = f"vlmt{os.getpid()}"  # distinct per test process: never someone else's namespace
        self.netns = [f"{tag}-{node}" for node in self.nodes]
        self.veth = [f"veth-{node}" for node in self.nodes]
        self.memory_mb = max(1024, (node_memory_mb() - 1024) // len(self.nodes))
        self.per_node = "-%n"
        self.made_netns: list[str] = []

    def controller(self) -> str:
        return f"{self.nodes[0]}({self.addrs[0]})"

    def node_lines(self) -> list[str]:
        return [
            f"NodeName={node} NodeAddr={addr} NodeHostname={node} CPUs={self.cpus} "
            f"RealMemory={self.memory_mb}"
            f" Gres=gpu:{self.gpu_model}:{self.gpus} State=UNKNOWN"
            for node, addr in zip(self.nodes, self.addrs)
        ]

    def on(self, node: int, cmd: list[str], as_host: bool = False) -> list[str]:
        """`cmd` run in node `node`'s network namespace; `as_host`: also with the node's name
        as hostname and the cluster's hosts file as /etc/hosts (private UTS and mount
        namespaces). Not `ip netns exec`: it remounts /sys, hiding the cgroup mounts slurmd
        wants to see."""
        prefix = ["nsenter", f"--net=/run/netns/{self.netns[node]}"]
        if not as_host:
            return prefix + list(cmd)
        # nsenter, unshare and sh all exec: the Popen's pid is the daemon's
        setup = f'mount --bind {self.root / "hosts"} /etc/hosts && hostname {self.nodes[node]} && exec "$@"'
        return prefix + ["unshare", "--mount", "--uts", "sh", "-c", setup, "node", *cmd]

    def client(self, cmd: list[str]) -> list[str]:
        return self.on(0, cmd)

    def _ip(self, *args: str) -> None:
        proc = subprocess.run(["ip", *args], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SlurmUnavailable(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")

    def _network(self) -> None:
        hosts = "127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for a, n in zip(self.addrs, self.nodes))
        (self.root / "hosts").write_text(hosts)
        for ns in self.netns:
            self._ip("netns", "add", ns)
            self.made_netns.append(ns)
            self._ip("-n", ns, "link", "set", "lo", "up")
        self._ip(
            "link",
            "add",
            self.veth[0],
            "netns",
            self.netns[0],
            "type",
            "veth",
            "peer",
            "name",
            self.veth[1],
            "netns",
            self.netns[1],
        )
        for ns, dev, addr in zip(self.netns, self.veth, self.addrs):
            self._ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            self._ip("-n", ns, "link", "set", dev, "up")

    def _start_daemons(self) -> None:
        problems = [
            f"`{t}` not on PATH"
            for t in ("ip", "nsenter", "unshare")
            if not shutil.which(t, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
        ]
        if problems:
            raise SlurmUnavailable("cannot build the two-node cluster: " + "; ".join(problems))
        self._network()
        self._spawn("slurmctld", self.on(0, ["slurmctld", "-D", "-i"], as_host=True))
        for i, node in enumerate(self.nodes):
            (self.root / f"state/d-{node}").mkdir(parents=True, exist_ok=True)
            self._spawn(f"slurmd-{node}", self.on(i, ["slurmd", "-D", "-N", node], as_host=True))

    def _spawn(self, name: str, cmd: list[str], **popen) -> None:
        # the daemon's path resolved here (inside `sh -c` PATH lookups would also work)
        env_path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
        daemon = next((i for i, c in enumerate(cmd) if c in ("slurmctld", "slurmd", "munged")), None)
        if daemon is not None:
            cmd = [*cmd[:daemon], shutil.which(cmd[daemon], path=env_path) or cmd[daemon], *cmd[daemon + 1 :]]
        super()._spawn(name, cmd, **popen)

    def namespace_pids(self) -> dict[str, list[int]]:
        out = {}
        for ns in self.made_netns:
            proc = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            out[ns] = [int(p) for p in proc.stdout.split()]
        return out

    def stop(self) -> None:
        """Daemons first (as SingleNodeSlurm), then whatever still runs in the namespaces
        (all started by them or by the test), then the namespaces."""
        try:
            self._stop_daemons()
        finally:
            for sig in (15, 9):
                pids = [p for ps in self.namespace_pids().values() for p in ps]
                for pid in pids:
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                deadline = time.time() + 10
                while pids and time.time() < deadline and any(self.namespace_pids().values()):
                    time.sleep(0.2)
            for ns in list(self.made_netns):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
                self.made_netns.remove(ns)
            self._unlock()
