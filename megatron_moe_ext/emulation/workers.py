"""Per-worker emulation: one network namespace (one address) per worker, so that tc can tell
workers apart, and a reconfigurable circuit fabric on top (:mod:`.circuits`).

Layout (``P`` = prefix; worker g = k M + j on node k)::

    P-sw        : bridge br0, ports p0 .. p{N-1}                      (the spine)
    P-node<k>   : bridge br0, port ``uplink`` (veth peer of p<k>), ports w0 .. w{M-1}
    P-node<k>w<j>: eth0 = 10.77.1.(g+1)/24 (veth peer of P-node<k>'s w<j>)

Each worker runs its own torchrun (``--nnodes W --nproc-per-node 1 --node-rank g``, static
rendezvous at worker 0's address, ``GLOO_SOCKET_IFNAME=eth0``), so gloo needs nothing new: a
worker's only interface is its own. What changes for a workload: every rank is node rank g
with LOCAL_RANK 0 and LOCAL_WORLD_SIZE 1 (``MMX_EMULATION_NODE`` still names the emulated
node). The rate limits are htb classes (:func:`.circuits.tc_config`), not the per-node tbfs of
:class:`.netns.EmulatedCluster`; :meth:`WorkerEmulatedCluster.set_circuits` reconfigures them
while the workload runs.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections import defaultdict
from typing import Mapping, Sequence

from ..perf.cluster import ClusterSpec
from .circuits import (
    UPLINK_IF,
    WORKER_IF,
    CircuitFabric,
    DeviceConfig,
    reconfigure_commands,
    setup_commands,
    tc_config,
)
from .netns import BRIDGE, EmulatedCluster, EmulationError, NodeRef


class WorkerEmulatedCluster(EmulatedCluster):
    """:class:`.netns.EmulatedCluster` with one namespace per worker and circuit classes.

    >>> with WorkerEmulatedCluster(spec, fabric, circuits={(0, 1): 1}) as cl:
    ...     cl.set_circuits({(0, 2): 1})          # seconds the tc changes took
    """

    def __init__(self, spec: ClusterSpec, fabric: CircuitFabric,
                 circuits: Mapping[tuple[int, int], int] | None = None, *,
                 master_port: int = 29500, prefix: str | None = None, dry_run: bool = False,
                 cluster_file: str | None = None) -> None:
        """Plan the emulation of ``fabric`` (nodes, M, rates x scale) for workers of ``spec``
        with ``circuits`` installed first (default: none, the plain tree)."""
        super().__init__(spec, fabric.scale, fabric.nodes, fabric.workers_per_node,
                         intra_limit=False, master_port=master_port, prefix=prefix,
                         dry_run=dry_run, cluster_file=cluster_file)
        self.links = []  # the limits are the fabric's htb classes
        self.fabric = fabric
        self.config: tuple[DeviceConfig, ...] = tc_config(fabric, dict(circuits or {}))
        """The htb configuration installed now."""

    @classmethod
    def for_tree(cls, spec: ClusterSpec, scale: float, nodes: int | None = None,
                 workers_per_node: int | None = None, oversub: float = 1.0,
                 nic_gbps: float | None = None, **kw) -> "WorkerEmulatedCluster":
        """The model's tree fabric (:func:`..traffic.fabric.tree_fabric`: a NIC of
        ``nic_gbps``, default the cluster's first NIC, per worker, node uplinks of M x NIC /
        ``oversub``) on ``nodes`` nodes, no circuits. ``workers_per_node`` must be the
        cluster's (the tree keeps the node's own links)."""
        from ..traffic.fabric import tree_fabric
        from .circuits import circuit_fabric

        m = spec.workers_per_node
        if workers_per_node not in (None, m):
            raise EmulationError(f"workers_per_node {workers_per_node}: one namespace per "
                                 f"worker emulates whole nodes of {spec.name} ({m} workers)")
        n = spec.nodes if nodes is None else int(nodes)
        if not spec.nics:
            raise EmulationError(f"{spec.name}: the cluster has no NIC")
        nic = float(nic_gbps or spec.nics[0].gbps)
        tree = tree_fabric(spec, n * m, nic, oversub, rack_nodes=1)
        return cls(spec, circuit_fabric(tree, spec, n, nic, scale), **kw)

    # ---- naming ----------------------------------------------------------------------

    def namespace(self, node: NodeRef) -> str:
        """As :meth:`EmulatedCluster.namespace`, plus ``"w<g>"``: worker g's namespace."""
        if isinstance(node, str) and node[:1] == "w" and node[1:].isdigit():
            g = int(node[1:])
            self.fabric.address(g)  # range check
            m = self.workers_per_node
            return f"{self.prefix}-node{g // m}w{g % m}"
        return super().namespace(node)

    @property
    def namespaces(self) -> list[str]:
        """The switch, the nodes, then the workers."""
        return super().namespaces + [self.namespace(u) for u in self.launch_units()]

    @property
    def master_addr(self) -> str:
        """Rendezvous address: worker 0's."""
        return self.fabric.address(0)

    def describe(self) -> str:
        """Sizes, rates and where they sit."""
        f = self.fabric
        up = "none" if f.uplink_gbps is None else f"{f.uplink_gbps:g}"
        intra = "memory" if f.intra_gbps is None else f"{f.intra_gbps:g}"
        return "\n".join([
            f"emulated cluster {self.spec.name}, one namespace per worker: {self.nodes} node(s) "
            f"x {self.workers_per_node} worker(s), scale {self.scale:.6g}, rendezvous "
            f"{self.master_addr}:{self.master_port}",
            f"  NIC {f.nic_gbps:g}, uplink {up}, circuit port {f.ocs_gbps:g}, intra-node "
            f"{intra} Gbit/s (x scale; htb classes, see emulation/circuits.py)"])

    # ---- setup -----------------------------------------------------------------------

    def _setup(self) -> None:
        sw = self.namespace("sw")
        self._add_bridge_namespace(sw)
        for k in range(self.nodes):
            ns = self.namespace(k)
            self._add_bridge_namespace(ns)
            self._add_port(sw, f"p{k}", ns, UPLINK_IF)
            self._sh(["ip", "-n", ns, "link", "set", UPLINK_IF, "master", BRIDGE])
            self._sh(["ip", "-n", ns, "link", "set", UPLINK_IF, "up"])
            for j in range(self.workers_per_node):
                g = k * self.workers_per_node + j
                wns = self.namespace(f"w{g}")
                self._add_namespace(wns)
                self._add_port(ns, f"w{j}", wns, WORKER_IF)
                self._sh(["ip", "-n", wns, "addr", "add", f"{self.fabric.address(g)}/24", "dev",
                          WORKER_IF])
                self._sh(["ip", "-n", wns, "link", "set", WORKER_IF, "up"])
        for cfg in self.config:
            for cmd in setup_commands(cfg):
                self._sh(["ip", "netns", "exec", self.namespace(cfg.ns), *cmd])

    def set_circuits(self, circuits: Mapping[tuple[int, int], int]) -> float:
        """Reconfigure to ``circuits`` ({(a, b): n}): ``tc class change`` of the circuit
        classes and new filters, one ``tc -batch`` per namespace touched. Returns the
        seconds it took."""
        new = tc_config(self.fabric, dict(circuits))
        per_ns: dict[str, list[str]] = defaultdict(list)
        for label, cmd in reconfigure_commands(self.config, new):
            per_ns[label].append(" ".join(cmd[1:]))  # tc -batch lines have no leading 'tc'
        t0 = time.perf_counter()
        for label, lines in per_ns.items():
            argv = ["ip", "netns", "exec", self.namespace(label), "tc", "-batch", "-"]
            self.commands.append(argv + ["<<", "; ".join(lines)])
            if self.dry_run:
                continue
            proc = subprocess.run(argv, input="\n".join(lines) + "\n", capture_output=True,
                                  text=True)
            if proc.returncode != 0:
                raise EmulationError(f"reconfiguring {label} failed: {proc.stderr.strip()}")
        self.config = new
        return time.perf_counter() - t0

    # ---- launching -------------------------------------------------------------------

    def launch_units(self) -> list[NodeRef]:
        """One torchrun per worker."""
        return [f"w{g}" for g in range(self.fabric.num_workers)]

    @staticmethod
    def _worker(unit: NodeRef) -> int:
        if not (isinstance(unit, str) and unit[:1] == "w" and unit[1:].isdigit()):
            raise EmulationError(f"launch unit {unit!r} is not a worker 'w<g>'")
        return int(unit[1:])

    def env_for(self, node: NodeRef, env: Mapping[str, str] | None = None) -> dict[str, str]:
        """The node's environment (:meth:`EmulatedCluster.env_for`) for worker ``"w<g>"``."""
        return super().env_for(self._worker(node) // self.workers_per_node, env)

    def torchrun_argv(self, node: NodeRef, cmd: Sequence[str]) -> list[str]:
        """torchrun of worker ``"w<g>"``: node rank g of W one-process nodes."""
        return [
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes", str(self.fabric.num_workers), "--nproc-per-node", "1",
            "--node-rank", str(self._worker(node)), "--master-addr", self.master_addr,
            "--master-port", str(self.master_port), *map(str, cmd),
        ]
