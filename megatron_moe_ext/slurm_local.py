"""A real two-node Slurm cluster on this one machine, for testing the sbatch scripts.

Debian's Slurm 22.05 runs two "nodes" (n1, n2) on one host: one slurmctld, two slurmd on ports
17001 / 17002, both NodeAddr 127.0.0.1 (see /work/shared/reference/local-slurm.md). Everything
lives in one scratch folder: the munge key and socket (a private munged, so the system's munge,
if any, is not touched), slurm.conf, state, spool, pid and log files. Client commands find the
cluster through ``SLURM_CONF=<folder>/slurm.conf`` (:attr:`LocalSlurm.env`).

As a library (tests)::

    with LocalSlurm("/tmp/my-slurm") as cluster:      # up() ... down(), always torn down
        job = cluster.sbatch(["-N2", "scripts/slurm/pretrain.sbatch", "cfg.yaml"], cwd=repo)
        info = cluster.wait_job(job, timeout=120)       # scontrol show job fields
        assert info["JobState"] == "COMPLETED"

As a CLI (scripts/slurm/local_cluster.py, a front end of this module)::

    python scripts/slurm/local_cluster.py --up      # prints: export SLURM_CONF=...
    SLURM_CONF=/tmp/moe-local-slurm/slurm.conf sbatch -N2 scripts/slurm/pretrain.sbatch ...
    python scripts/slurm/local_cluster.py --down    # cancels jobs, stops every daemon

Needs root (slurmd runs jobs as any user) and the Debian packages slurmctld, slurmd,
slurm-client and munge (``scripts/install_slurm.sh`` installs them).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

from megatron_moe_ext.runtime.launch import pid_alive  # (no torch import)

DEFAULT_DIR = "/tmp/moe-local-slurm"
CTLD_PORT = 16817
NODE_PORTS = (17001, 17002)
_SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")

# binary -> Debian package that provides it
BINARIES = {
    "slurmctld": "slurmctld",
    "slurmd": "slurmd",
    "sbatch": "slurm-client",
    "srun": "slurm-client",
    "scontrol": "slurm-client",
    "sinfo": "slurm-client",
    "squeue": "slurm-client",
    "scancel": "slurm-client",
    "munged": "munge",
    "munge": "munge",
}


class SlurmUnavailable(RuntimeError):
    """Slurm or munge is not installed (the message names the apt packages)."""


class ClusterError(RuntimeError):
    """The local cluster could not be started or used (the message quotes the daemon logs)."""


def which(name: str) -> Optional[str]:
    """Path of a binary, also looking in the sbin folders a non-root PATH may lack."""
    path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(_SBIN)
    return shutil.which(name, path=path)


def missing_packages() -> list[str]:
    """Debian packages whose binaries are missing (empty: everything is installed)."""
    return sorted({pkg for binary, pkg in BINARIES.items() if which(binary) is None})


def require_slurm() -> None:
    """Raise SlurmUnavailable naming the packages to install when a binary is missing."""
    missing = missing_packages()
    if missing:
        raise SlurmUnavailable(
            f"Slurm is not installed (missing packages: {' '.join(missing)}). Install with "
            f"`apt-get update && apt-get install -y slurmctld slurmd slurm-client munge` "
            f"(as root), or run scripts/install_slurm.sh"
        )


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _read_pid(path: Path, marker: str) -> Optional[int]:
    """The pid in a pid file, if that process is alive and its command line holds `marker`
    (a stale pid file whose pid now belongs to another program gives None)."""
    try:
        pid = int(path.read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except (OSError, ValueError, IndexError):
        return None
    return pid if marker.encode() in cmdline else None


def _tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path}: not written)"
    return f"--- {path} (last {min(n, len(lines))} lines)\n" + "\n".join(lines[-n:])


class LocalSlurm:
    """One slurmctld + N slurmd (nodes n1..nN, all 127.0.0.1) + a private munged, in `root`."""

    def __init__(
        self,
        root: str | Path = DEFAULT_DIR,
        node_ports: Sequence[int] = NODE_PORTS,
        ctld_port: int = CTLD_PORT,
        cpus_per_node: int = 1,
        partition: str = "debug",
        kill_wait: int = 10,
        cred_expire: int = 5,
    ) -> None:
        self.root = Path(root).resolve()
        self.node_ports = tuple(node_ports)
        self.nodes = tuple(f"n{i + 1}" for i in range(len(self.node_ports)))
        self.ctld_port = ctld_port
        self.cpus_per_node = cpus_per_node
        self.partition = partition
        self.kill_wait = kill_wait
        self.cred_expire = cred_expire
        self.conf = self.root / "slurm.conf"
        self.munge_dir = self.root / "munge"
        self.munge_socket = self.munge_dir / "munge.socket"
        self.hostname = socket.gethostname().split(".")[0]

    # ------------------------------------------------------------------ environment
    @property
    def env(self) -> dict[str, str]:
        """os.environ plus SLURM_CONF (and the sbin folders on PATH) for client commands."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = env.get("PATH", "") + os.pathsep + os.pathsep.join(_SBIN)
        return env

    def cmd(
        self, args: Sequence[str], check: bool = True, timeout: float = 30, **kw
    ) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster; output captured as text."""
        kw.setdefault("env", self.env)
        proc = subprocess.run(
            list(args), capture_output=True, text=True, timeout=timeout, **kw
        )
        if check and proc.returncode != 0:
            out = proc.stderr.strip() or proc.stdout.strip()
            raise ClusterError(f"`{shlex.join(args)}` failed ({proc.returncode}): {out}")
        return proc

    # ------------------------------------------------------------------ configuration
    def _write_munge_key(self) -> None:
        self.munge_dir.mkdir(parents=True, exist_ok=True)
        # munged insists: socket folder world-executable, key folder not writable by others
        os.chmod(self.root, 0o755)
        os.chmod(self.munge_dir, 0o755)
        key = self.munge_dir / "munge.key"
        if not key.is_file():
            key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)

    def slurm_conf(self) -> str:
        """The slurm.conf text of this cluster."""
        r = self.root
        lines = [
            "# written by scripts/slurm/local_cluster.py: a two-node test cluster on one host",
            "ClusterName=moeext-local",
            f"SlurmctldHost={self.hostname}(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire also sets the delay before a requeued job may start (default 120 s)
            f"AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            # schedule often, so a requeued job starts seconds after its begin time
            "SchedulerParameters=sched_interval=1,bf_interval=1",
            "MpiDefault=none",
            "ReturnToService=2",
            "JobRequeue=1",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={r}/jobcomp.log",
            "MinJobAge=3600",  # keep finished jobs visible to `scontrol show job`
            f"KillWait={self.kill_wait}",
            "InactiveLimit=0",
            "Waittime=0",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/slurmctld.log",
            f"SlurmdLogFile={r}/d-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
        ]
        for name, port in zip(self.nodes, self.node_ports, strict=True):
            lines.append(
                f"NodeName={name} NodeHostname={self.hostname} NodeAddr=127.0.0.1 Port={port} "
                f"CPUs={self.cpus_per_node} State=UNKNOWN"
            )
        lines.append(
            f"PartitionName={self.partition} Nodes={','.join(self.nodes)} Default=YES "
            "MaxTime=INFINITE State=UP"
        )
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------ start / stop
    def is_up(self) -> bool:
        """Whether slurmctld answers (`scontrol ping`)."""
        if not self.conf.is_file():
            return False
        try:
            p = self.cmd(["scontrol", "ping"], check=False, timeout=10)
        except subprocess.TimeoutExpired:
            return False
        return p.returncode == 0 and "UP" in p.stdout

    def node_states(self) -> dict[str, str]:
        """{node: sinfo state} (idle, alloc, down*, unk*, ...)."""
        p = self.cmd(["sinfo", "-h", "-N", "-o", "%N %t"], check=False, timeout=10)
        states = {}
        for line in p.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2:
                states[parts[0]] = parts[1]
        return states

    def up(self, timeout: float = 60) -> "LocalSlurm":
        """Write the config, start munged, slurmctld and the slurmds; wait until all nodes
        are idle. On failure everything started is stopped and ClusterError quotes the logs."""
        require_slurm()
        if os.geteuid() != 0:
            raise ClusterError("the local Slurm cluster must be started as root (SlurmUser=root)")
        busy = [p for p in (self.ctld_port, *self.node_ports) if _port_in_use(p)]
        if busy:
            raise ClusterError(
                f"ports {busy} are in use: another local Slurm cluster is running? "
                f"stop it with `python scripts/slurm/local_cluster.py --down --dir <its folder>`"
            )
        try:
            self._start(timeout)
        except BaseException:
            self.down()
            raise
        return self

    def _start(self, timeout: float) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(exist_ok=True)
        for n in self.nodes:
            (self.root / "spool" / n).mkdir(exist_ok=True)
        self._write_munge_key()
        self.conf.write_text(self.slurm_conf())
        env = self.env
        m = self.munge_dir
        self._daemon(
            [which("munged"), f"--key-file={m}/munge.key", f"--socket={self.munge_socket}",
             f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log",
             f"--seed-file={m}/munged.seed", "--force"],
            env, m / "munged.log",
        )
        probe = subprocess.run(
            f"{shlex.quote(which('munge'))} -n -S {shlex.quote(str(self.munge_socket))} | "
            f"{shlex.quote(which('unmunge'))} -S {shlex.quote(str(self.munge_socket))}",
            shell=True, capture_output=True, text=True, env=env, timeout=20,
        )
        if "Success" not in probe.stdout:
            raise ClusterError(f"munge does not work: {probe.stdout}{probe.stderr}\n"
                               + _tail(m / "munged.log"))
        # -c: start clean (no jobs or node states from an earlier cluster in this folder)
        self._daemon([which("slurmctld"), "-c", "-f", str(self.conf)], env,
                     self.root / "slurmctld.log")
        for n in self.nodes:
            self._daemon([which("slurmd"), "-N", n, "-f", str(self.conf)], env,
                         self.root / f"d-{n}.log")
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            states = self.node_states()
            if len(states) == len(self.nodes) and all(s == "idle" for s in states.values()):
                return
            time.sleep(0.5)
        logs = "\n".join(_tail(self.root / f) for f in
                         ("slurmctld.log", *(f"d-{n}.log" for n in self.nodes)))
        raise ClusterError(f"nodes not idle after {timeout:.0f} s: {states}\n{logs}")

    def _daemon(self, argv: list, env: dict, log: Path) -> None:
        """Start a self-daemonizing program; fail with its output and log if it exits non-zero."""
        p = subprocess.run(
            [str(a) for a in argv], env=env, capture_output=True, text=True, timeout=30,
            stdin=subprocess.DEVNULL,
        )
        if p.returncode != 0:
            raise ClusterError(
                f"`{shlex.join(str(a) for a in argv)}` failed ({p.returncode}):\n"
                f"{p.stdout}{p.stderr}\n{_tail(log)}"
            )

    def _pid_files(self) -> list[Path]:
        return [self.root / "slurmctld.pid",
                *(self.root / f"slurmd-{n}.pid" for n in self.nodes)]

    def _processes_of_cluster(self) -> list[int]:
        """Processes left by this cluster: slurm daemons and slurmstepd started with this
        slurm.conf, and job processes (SLURM_JOB_ID set) submitted to it. Found through
        /proc/<pid>/environ, never by name alone; this process and its ancestors are spared."""
        want = f"SLURM_CONF={self.conf}".encode()
        spare = set()
        pid = os.getpid()
        while pid > 1 and pid not in spare:
            spare.add(pid)
            try:
                pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                break
        pids = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) in spare:
                continue
            try:
                env = (d / "environ").read_bytes().split(b"\0")
                comm = (d / "comm").read_text().strip()
            except OSError:
                continue
            if want not in env:
                continue
            is_job = any(e.startswith(b"SLURM_JOB_ID=") for e in env)
            if is_job or comm.startswith(("slurmstepd", "slurmd", "slurmctld")):
                pids.append(int(d.name))
        return pids

    def down(self, timeout: float = 30) -> None:
        """Cancel every job, stop slurmctld, the slurmds and munged; kill what survives.
        Safe to call repeatedly and on a cluster that is only partly started."""
        deadline = time.monotonic() + timeout
        up = self.conf.is_file() and self.is_up()
        if not up:
            deadline = time.monotonic() + timeout / 3  # nobody to ask: terminate right away
        if up:
            try:
                self.cmd(["scancel", "--full", "--partition", self.partition], check=False,
                         timeout=10)
                while time.monotonic() < deadline - timeout / 2:
                    q = self.cmd(["squeue", "-h", "-o", "%i"], check=False, timeout=10)
                    if q.returncode != 0 or not q.stdout.strip():
                        break
                    time.sleep(0.5)
                self.cmd(["scontrol", "shutdown"], check=False, timeout=10)
            except (subprocess.TimeoutExpired, ClusterError):
                pass
        pids = [p for p in (_read_pid(f, str(self.conf)) for f in self._pid_files()) if p]
        while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
            if time.monotonic() > deadline - timeout / 3:  # shutdown did not reach them
                for pid in pids:
                    if pid_alive(pid):
                        os.kill(pid, signal.SIGTERM)
            time.sleep(0.2)
        # daemons that ignored shutdown, and job processes left behind (slurmstepd, tasks)
        leftovers = [p for p in pids if pid_alive(p)] + self._processes_of_cluster()
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        munged = _read_pid(self.munge_dir / "munged.pid", str(self.munge_socket))
        if munged and pid_alive(munged):
            os.kill(munged, signal.SIGTERM)
            for _ in range(50):
                if not pid_alive(munged):
                    break
                time.sleep(0.1)
            else:
                os.kill(munged, signal.SIGKILL)
        for f in (*self._pid_files(), self.munge_dir / "munged.pid"):
            f.unlink(missing_ok=True)

    def __enter__(self) -> "LocalSlurm":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    # ------------------------------------------------------------------ jobs
    def sbatch(self, args: Sequence[str], cwd: str | Path | None = None,
               env: Optional[dict] = None) -> int:
        """Submit (`sbatch --parsable ARGS`); returns the job id."""
        full_env = self.env if env is None else {**self.env, **env, "SLURM_CONF": str(self.conf)}
        p = self.cmd(["sbatch", "--parsable", *args], cwd=cwd, env=full_env)
        return int(p.stdout.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        """`scontrol show job -o` fields of a job ({} once Slurm forgot it)."""
        p = self.cmd(["scontrol", "show", "job", "-o", str(job_id)], check=False, timeout=10)
        info: dict[str, str] = {}
        for tok in p.stdout.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                info.setdefault(k, v)
        return info

    def wait_job(self, job_id: int, timeout: float,
                 until: Iterable[str] = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                         "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                                         "BOOT_FAIL", "DEADLINE")) -> dict[str, str]:
        """Poll until the job's state is in `until`; returns its fields. On timeout the job is
        cancelled and ClusterError carries its last fields."""
        until = set(until)
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info.get("JobState") in until:
                return info
            time.sleep(0.5)
        self.cmd(["scancel", str(job_id)], check=False)
        raise ClusterError(f"job {job_id} not done after {timeout:.0f} s: {info}")

    def daemon_logs(self) -> str:
        """Tails of the slurmctld and slurmd logs (for failure messages)."""
        return "\n".join(_tail(self.root / f, 30) for f in
                         ("slurmctld.log", *(f"d-{n}.log" for n in self.nodes)))
