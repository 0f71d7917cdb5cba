"""A small replica of a cluster on one machine: one network namespace per node, a bridge as the
switch, token-bucket (tbf) rate limits scaled from the cluster YAML, and one torchrun per node.

Layout (``P`` = prefix, ``mmx-<pid>`` by default)::

    P-sw     : bridge br0 with ports p0 .. p{N-1}            (the inter-node "switch")
    P-node0  : eth0 = 10.77.0.1/24 (veth peer of p0), lo    (rendezvous address)
    P-node1  : eth0 = 10.77.0.2/24 (veth peer of p1), lo
    ...

Rates, with ``scale`` = local GEMM throughput / cluster GEMM throughput:

- NIC of node k: tbf at ``sum(nic.gbps * nic.count) * scale`` (NICs attached to workers count
  only for the emulated workers, see :func:`node_nic_gbps`) on ``eth0`` of P-nodek (egress,
  node -> switch) and on ``p<k>`` in P-sw (egress of the switch port = ingress of the node), so
  both directions of the full-duplex NIC are limited. ``delay_ms`` adds a netem delay under the
  tbf of ``eth0`` (one way, per node; node -> node round trip = 2 x delay_ms).
- Lossless: each namespace caps TCP receive buffers (``net.ipv4.tcp_rmem``) so that the
  windows of all flows through a queue fit in it (:func:`.links.tcp_rcvbuf_bytes`).
- Intra-node: workers of one node talk over the namespace's ``lo`` (gloo connects to the node's
  own eth0 address, which Linux routes through ``lo``). When the cluster's slowest worker-to-worker
  path inside a node is not memory (e.g. PCIe), ``lo`` gets a tbf at that path's bottleneck
  ``gbps * scale``. One tbf on ``lo`` is a shared bus: it limits the node's aggregate intra-node
  traffic (both directions together) to one link's rate.

Addresses live only inside the namespaces created here; the root namespace is never touched
(veth pairs are created directly inside the switch namespace and moved into the node namespace).
Everything created is removed by :meth:`EmulatedCluster.teardown` (also on errors and signals);
:func:`cleanup` removes leftovers of dead processes by name.

Modules: :mod:`.links` plans the rate limits (pure), :mod:`.namespaces` checks the host and
lists / removes / cleans up namespaces, this module sets up the namespaces, bridge, veths and
qdiscs and launches one torchrun per node (:class:`EmulatedCluster`). Every name of those
modules stays importable from here.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

from ..perf.topology import ClusterSpec
from .links import (  # noqa: F401 -- used here and re-exported
    INTRA_BUS_MODES,
    MEMORY_KINDS,
    NAMESPACE_SYSCTLS,
    NODE_IF,
    TBF_BURST_S,
    TBF_LATENCY_MS,
    EmulatedLink,
    IntraNodeLink,
    auto_scale,
    intra_node_aggregate_gbps,
    intra_node_link,
    measure_local_gemm_tflops,
    namespace_sysctls,
    node_nic_gbps,
    plan_links,
    tbf_args,
    tcp_rcvbuf_bytes,
)
from .namespaces import (  # noqa: F401 -- used here and re-exported
    NS_RE,
    PREFIX,
    EmulationError,
    EmulationUnavailable,
    _remove_namespace,
    _signals_deferred,
    check_prerequisites,
    cleanup,
    list_namespaces,
    netem_available,
)

__all__ = [
    "BRIDGE", "INTRA_BUS_MODES", "MAX_NODES", "MEMORY_KINDS", "NAMESPACE_SYSCTLS", "NODE_IF",
    "NS_RE", "PREFIX", "REPO", "SUBNET", "TBF_BURST_S", "TBF_LATENCY_MS", "EmulatedCluster",
    "EmulatedLink", "EmulationError", "EmulationUnavailable", "IntraNodeLink", "NodeRef",
    "auto_scale", "check_prerequisites", "cleanup", "intra_node_aggregate_gbps",
    "intra_node_link", "list_namespaces", "measure_local_gemm_tflops", "netem_available",
    "node_nic_gbps", "plan_links", "tbf_args",
]

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
"""Repository root (put on PYTHONPATH of the launched processes)."""

SUBNET = "10.77.0"
"""Private /24 used inside the namespaces: node k has ``SUBNET.(k+1)``."""

BRIDGE = "br0"
"""Bridge device inside the switch namespace."""

MAX_NODES = 250
"""Nodes get host addresses 1..MAX_NODES of the /24."""

_SEQ = itertools.count()


def _normalize_rc(rc: int) -> int:
    """Exit status as a shell reports it (killed by signal s -> 128 + s)."""
    return 128 - rc if rc < 0 else rc


NodeRef = Union[int, str]


class EmulatedCluster:
    """Context manager: namespaces, bridge and rate limits for a scaled replica of ``spec``.

    >>> with EmulatedCluster(load_cluster("johnny"), scale=0.005, nodes=2,
    ...                      workers_per_node=1) as cl:
    ...     rc = cl.run(["scripts/emulation_probe.py", "--mb", "8"])
    """

    def __init__(
        self, spec: ClusterSpec, scale: float, nodes: int | None = None,
        workers_per_node: int | None = None, delay_ms: float = 0.0, *, intra_limit: bool = True,
        master_port: int = 29500, prefix: str | None = None, dry_run: bool = False,
        intra_bus: str = "link", cluster_file: str | os.PathLike | None = None,
    ) -> None:
        """Plan the emulation (nothing is created before ``__enter__``).

        ``nodes`` / ``workers_per_node`` default to the cluster's; ``scale`` multiplies every
        link bandwidth; ``delay_ms`` is a one-way netem delay per node NIC; ``dry_run`` only
        records the commands (see :attr:`commands`) and needs no root. ``intra_bus`` sizes the
        shared intra-node limit (:func:`.links.plan_links`); ``cluster_file``, the YAML ``spec``
        came from, is told to the launched processes (``MMX_EMULATION_CLUSTER_FILE``) so that
        they can load the same cluster (the scale lab does).
        """
        self.spec = spec
        self.scale = float(scale)
        self.nodes = int(nodes if nodes is not None else spec.nodes)
        self.workers_per_node = int(workers_per_node if workers_per_node is not None
                                    else spec.workers_per_node)
        self.delay_ms = float(delay_ms)
        if not self.scale > 0:
            raise EmulationError(f"scale must be > 0, got {scale!r}")
        if not 1 <= self.nodes <= MAX_NODES:
            raise EmulationError(f"nodes must be in [1, {MAX_NODES}], got {self.nodes}")
        if self.workers_per_node < 1:
            raise EmulationError(f"workers_per_node must be >= 1, got {self.workers_per_node}")
        if self.delay_ms < 0:
            raise EmulationError(f"delay_ms must be >= 0, got {delay_ms!r}")
        self.master_port = int(master_port)
        self.dry_run = dry_run
        seq = next(_SEQ)
        self.prefix = prefix or (f"mmx-{os.getpid()}" if seq == 0 else f"mmx-{os.getpid()}.{seq}")
        self.intra_bus = intra_bus
        self.cluster_file = None if cluster_file is None else str(Path(cluster_file).resolve())
        self.links: list[EmulatedLink] = plan_links(
            spec, self.scale, self.nodes, self.workers_per_node, self.delay_ms, intra_limit,
            intra_bus)
        self.commands: list[list[str]] = []
        """Every command run (or, with ``dry_run``, that would run) to set up and tear down."""
        self.returncodes: list[int | None] = []
        """Exit codes of the last :meth:`run`, per node (None: killed by us)."""
        self._created: list[str] = []
        self._procs: list[subprocess.Popen] = []
        self._active = False

    # ---- naming ----------------------------------------------------------------------

    def namespace(self, node: NodeRef) -> str:
        """Namespace name of node ``k`` (int), or of the switch (``"sw"``/``"switch"``)."""
        if isinstance(node, str):
            if node in ("sw", "switch"):
                return f"{self.prefix}-sw"
            if node.startswith("node") and node[4:].isdigit():
                node = int(node[4:])
            else:
                raise ValueError(f"unknown node {node!r}")
        if not 0 <= node < self.nodes:
            raise IndexError(f"node {node} out of range [0, {self.nodes})")
        return f"{self.prefix}-node{node}"

    @property
    def namespaces(self) -> list[str]:
        """All namespaces of this emulation: the switch, then the nodes."""
        return [self.namespace("sw")] + [self.namespace(k) for k in range(self.nodes)]

    def node_address(self, k: int) -> str:
        """IPv4 address of node ``k`` (on its ``eth0``); node 0's is the rendezvous address."""
        self.namespace(k)
        return f"{SUBNET}.{k + 1}"

    @property
    def master_addr(self) -> str:
        """Rendezvous address: node 0's address on the bridge side."""
        return self.node_address(0)

    def describe(self) -> str:
        """Human-readable summary: sizes, scale, rates and rendezvous."""
        lines = [
            f"emulated cluster {self.spec.name}: {self.nodes} node(s) x {self.workers_per_node} "
            f"worker(s), scale {self.scale:.6g}, rendezvous {self.master_addr}:{self.master_port}"
            f", namespaces {self.prefix}-{{sw,node0..{self.nodes - 1}}}",
        ]
        lines += ["  " + ln.describe() for ln in self.links]
        if any(ln.kind != "nic" for ln in self.links):
            lines.append(f"  intra-node: one shared bus per node on lo, sized '{self.intra_bus}'")
        if not any(ln.kind != "nic" for ln in self.links):
            lines.append("  intra-node traffic: not limited (memory / loopback speed)")
        if self.nodes == 1:
            lines.append("  one node: no inter-node traffic")
        rcvbuf = tcp_rcvbuf_bytes(self.links)
        if rcvbuf is not None:
            lines.append(f"  TCP receive buffer {rcvbuf} bytes per connection: every queue "
                         "holds all windows of its flows (lossless, like IB credits)")
        return "\n".join(lines)

    # ---- commands --------------------------------------------------------------------

    def _sh(self, argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
        """Run (or record, in dry-run) one setup command; raise EmulationError on failure."""
        argv = [str(a) for a in argv]
        self.commands.append(argv)
        if self.dry_run:
            return subprocess.CompletedProcess(argv, 0, "", "")
        proc = subprocess.run(argv, capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise EmulationError(f"command failed ({proc.returncode}): {' '.join(argv)}\n"
                                 f"{proc.stderr.strip()}")
        return proc

    def _add_namespace(self, ns: str) -> None:
        if not self.dry_run and ns in list_namespaces():
            raise EmulationError(f"namespace {ns} already exists (leftover? run "
                                 "scripts/emulate_cluster.py --cleanup)")
        self._sh(["ip", "netns", "add", ns])
        self._created.append(ns)
        self._sh(["ip", "-n", ns, "link", "set", "lo", "up"])
        for key, value in namespace_sysctls(self.links).items():
            self._sh(["ip", "netns", "exec", ns, "sysctl", "-qw", f"{key}={value}"])

    def _add_bridge_namespace(self, ns: str) -> None:
        """A new namespace holding bridge ``BRIDGE``, up."""
        self._add_namespace(ns)
        self._sh(["ip", "-n", ns, "link", "add", BRIDGE, "type", "bridge"])
        self._sh(["ip", "-n", ns, "link", "set", BRIDGE, "up"])

    def _add_port(self, ns: str, port: str, peer_ns: str, peer_dev: str) -> None:
        """A veth pair created inside ``ns``: ``port`` joins ``ns``'s bridge (up); its peer
        ``peer_dev`` is moved straight into ``peer_ns`` (left down for the caller)."""
        self._sh(["ip", "-n", ns, "link", "add", port, "type", "veth", "peer", "name",
                  peer_dev, "netns", peer_ns])
        self._sh(["ip", "-n", ns, "link", "set", port, "master", BRIDGE])
        self._sh(["ip", "-n", ns, "link", "set", port, "up"])

    def _setup(self) -> None:
        sw = self.namespace("sw")
        self._add_bridge_namespace(sw)
        for k in range(self.nodes):
            ns = self.namespace(k)
            self._add_namespace(ns)
            self._add_port(sw, f"p{k}", ns, NODE_IF)
            self._sh(["ip", "-n", ns, "addr", "add", f"{self.node_address(k)}/24", "dev", NODE_IF])
            self._sh(["ip", "-n", ns, "link", "set", NODE_IF, "up"])
        for link in self.links:
            for i, (label, dev) in enumerate(link.devices):
                ns = self.namespace(label)
                tc = ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev]
                tbf = tbf_args(link.rate_bytes, dev, link.connections)
                if i == 0 and link.delay_ms > 0:
                    self._sh(tc + ["root", "handle", "1:"] + tbf)
                    proc = self._sh(tc + ["parent", "1:1", "handle", "10:", "netem", "delay",
                                          f"{link.delay_ms:g}ms", "limit", "100000"], check=False)
                    if proc.returncode != 0:
                        raise EmulationUnavailable(
                            f"--delay-ms needs the netem qdisc, which this kernel lacks "
                            f"(CONFIG_NET_SCH_NETEM): {proc.stderr.strip()}")
                else:
                    self._sh(tc + ["root"] + tbf)

    def __enter__(self) -> "EmulatedCluster":
        """Create namespaces, bridge, veths and qdiscs; on any failure remove them again."""
        if not self.dry_run:
            check_prerequisites()
        self._active = True
        try:
            self._setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        """Tear everything down."""
        self.teardown()

    def teardown(self) -> list[str]:
        """Stop launched processes and delete every namespace created (with its veths, bridge
        and qdiscs). Idempotent; returns the names that could not be removed."""
        failed: list[str] = []
        with _signals_deferred():
            self._stop(self._procs)
            for ns in reversed(self._created):
                self.commands.append(["ip", "netns", "del", ns])
                if self.dry_run:
                    continue
                if not _remove_namespace(ns):
                    failed.append(ns)
            self._created = []
            self._procs = []
            self._active = False
        if failed:
            logger.error("could not remove namespaces %s; run scripts/emulate_cluster.py "
                         "--cleanup --all", failed)
        return failed

    # ---- running ---------------------------------------------------------------------

    def _ns_argv(self, node: NodeRef, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(node), *map(str, argv)]

    def exec_in(self, node: NodeRef, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        """Run ``argv`` inside the namespace of ``node`` (int or ``"sw"``) and wait; output is
        captured as text unless overridden by ``kwargs`` (passed to :func:`subprocess.run`)."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self._ns_argv(node, argv), **kwargs)

    def popen_in(self, node: NodeRef, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start ``argv`` inside the namespace of ``node`` in its own session (process group),
        tracked so that :meth:`teardown` stops it."""
        if not self._active:
            raise EmulationError("the emulated cluster is not set up (use it as a context manager)")
        kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(self._ns_argv(node, argv), **kwargs)
        self._procs.append(proc)
        return proc

    def env_for(self, node: int, env: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment of node ``node``'s torchrun: GLOO_SOCKET_IFNAME, PYTHONPATH, threads."""
        out = dict(os.environ if env is None else env)
        out["GLOO_SOCKET_IFNAME"] = NODE_IF
        out["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), out.get("PYTHONPATH")) if p)
        out.setdefault("OMP_NUM_THREADS", "1")
        out["MMX_EMULATION_CLUSTER"] = self.spec.name
        out["MMX_EMULATION_SCALE"] = repr(self.scale)
        out["MMX_EMULATION_NODE"] = str(node)
        if self.cluster_file is not None:
            out["MMX_EMULATION_CLUSTER_FILE"] = self.cluster_file
        return out

    def launch_units(self) -> list[NodeRef]:
        """Where :meth:`run` starts one torchrun each: every node."""
        return list(range(self.nodes))

    def torchrun_argv(self, node: int, cmd: Sequence[str]) -> list[str]:
        """torchrun command line for node ``node`` (static rendezvous at node 0)."""
        return [
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes", str(self.nodes), "--nproc-per-node", str(self.workers_per_node),
            "--node-rank", str(node), "--master-addr", self.master_addr,
            "--master-port", str(self.master_port), *map(str, cmd),
        ]

    def run(
        self, cmd: Sequence[str], *, env: Mapping[str, str] | None = None,
        timeout: float | None = None, grace_s: float = 30.0,
        poll: Optional[Callable[[], None]] = None, **popen_kwargs,
    ) -> int:
        """Launch one torchrun per node running ``cmd`` (``SCRIPT [ARGS...]``, or ``-m MODULE``
        ...) and wait. Returns the worst exit code of the nodes that exited by themselves
        (a signal s counts as 128 + s); 124 when ``timeout`` expired. After the first failure,
        the other nodes get ``grace_s`` seconds to exit before they are stopped.
        ``poll``, when given, is called every 0.1 s while the nodes run (e.g. to serve the
        workload's reconfiguration requests). ``popen_kwargs`` (e.g. ``stdout``) go to
        :class:`subprocess.Popen`."""
        if not cmd:
            raise EmulationError("no command to run")
        if self.dry_run:
            keys = ("GLOO_SOCKET_IFNAME", "PYTHONPATH", "OMP_NUM_THREADS", "MMX_EMULATION_SCALE")
            for k in self.launch_units():
                full = self.env_for(k, env)
                self.commands.append(self._ns_argv(
                    k, ["env", *(f"{key}={full[key]}" for key in keys),
                        *self.torchrun_argv(k, cmd)]))
            return 0
        procs = [self.popen_in(k, self.torchrun_argv(k, cmd), env=self.env_for(k, env),
                               **popen_kwargs) for k in self.launch_units()]
        killed: set[int] = set()
        timed_out = False
        deadline = None if timeout is None else time.monotonic() + timeout
        fail_at: float | None = None
        while any(p.poll() is None for p in procs):
            time.sleep(0.1)
            if poll is not None:
                poll()
            now = time.monotonic()
            if fail_at is None and any(p.poll() not in (None, 0) for p in procs):
                fail_at = now + grace_s
            expired = deadline is not None and now > deadline
            if expired or (fail_at is not None and now > fail_at):
                timed_out = timed_out or expired
                alive = [p for p in procs if p.poll() is None]
                killed.update(id(p) for p in alive)
                self._stop(alive)
        self.returncodes = [None if id(p) in killed else _normalize_rc(p.returncode)
                            for p in procs]
        worst = max((rc for rc in self.returncodes if rc is not None), default=0)
        return max(worst, 124) if timed_out else worst

    @staticmethod
    def _stop(procs: Sequence[subprocess.Popen], wait_s: float = 5.0) -> None:
        """SIGTERM the process groups of ``procs``, then SIGKILL what is left after ``wait_s``."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            alive = [p for p in procs if p.poll() is None]
            if not alive:
                return
            for p in alive:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, sig)
            end = time.monotonic() + wait_s
            while time.monotonic() < end and any(p.poll() is None for p in alive):
                time.sleep(0.05)
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=1)
