"""Reconfigurable circuits in the cluster emulator: a circuit plan -> htb classes and filters.

Pure functions (nothing here runs ``tc``; :class:`.workers.WorkerEmulatedCluster` does). The
emulated fabric is the model's ``reconfigurable`` one (:mod:`megatron_moe_ext.traffic.fabric`)
with one node per rack: the oversubscribed tree (a NIC of B per worker to its node's switch,
a node uplink of U = M B / oversub to a spine) plus circuits of C per port between worker
pairs on different nodes, re-assigned between windows by the model's own plan
(:func:`..traffic.fabric.plan_circuits`: the emulator consumes it, it does not recompute it).

Where each limit sits (worker g on node k, address :meth:`CircuitFabric.address`; ``w<g>`` is
the worker's namespace, ``node<k>`` the node's bridge namespace, ``sw`` the spine)::

    w<g>     eth0   egress of g     class NIC (B) for off-node peers without a circuit,
                                    class 100+b (n C) for peer b holding n circuits with g,
                                    class INTRA (intra-node rate) for same-node peers
    node<k>  w<j>   egress to g     class NIC (B) for traffic from off-node peers without a
                                    circuit (the NIC's receive side)
    node<k>  uplink node -> spine   class UPLINK (U) by default, circuit pairs bypass
    sw       p<k>   spine -> node   class UPLINK (U) by default, circuit pairs bypass

Unclassified traffic (and bypassing circuit traffic) goes to class FREE
(:data:`UNLIMITED_GBPS`, faster than the box moves data). Every class hangs off the htb root,
so classes never borrow from each other: each one is an independent link. A reconfiguration
changes the circuit classes' rates (``tc class change``) and replaces the filters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from ..perf.cluster import ClusterSpec
from ..perf.topology import GBIT
from .links import burst_bytes, intra_node_link, rate_kbit
from .namespaces import EmulationError

WORKER_SUBNET = "10.77.1"
"""/24 of the per-worker addresses: worker g has ``WORKER_SUBNET.(g+1)``."""

WORKER_IF = "eth0"
"""A worker namespace's interface (GLOO_SOCKET_IFNAME)."""

UPLINK_IF = "uplink"
"""A node namespace's port to the spine."""

UNLIMITED_GBPS = 10.0
"""Emulated rate of class FREE (Gbit/s, not scaled)."""

FREE, NIC, UPLINK, INTRA = 1, 2, 3, 4
"""htb class minors; a circuit to worker b is class ``CIRCUIT0 + b``."""
CIRCUIT0 = 100

_PRIO = "1"
"""Filter priority of every filter (deleting it removes them all)."""


@dataclass(frozen=True)
class CircuitFabric:
    """Rates (cluster Gbit/s) and size of an emulated reconfigurable fabric."""

    nodes: int
    workers_per_node: int
    nic_gbps: float
    """B: each worker's NIC, each direction."""
    uplink_gbps: Optional[float]
    """U: each node's uplink to the spine, each direction (None: one node, no spine)."""
    ocs_gbps: float
    """C: one circuit port."""
    intra_gbps: Optional[float]
    """Same-node worker pairs, per sender (None: memory speed, not limited)."""
    scale: float
    """Emulated rate = cluster rate x scale."""

    @property
    def num_workers(self) -> int:
        """W = nodes x M."""
        return self.nodes * self.workers_per_node

    def node_of(self, g: int) -> int:
        """Node of worker ``g``."""
        return g // self.workers_per_node

    def address(self, g: int) -> str:
        """IPv4 address of worker ``g``."""
        if not 0 <= g < self.num_workers:
            raise IndexError(f"worker {g} out of range [0, {self.num_workers})")
        return f"{WORKER_SUBNET}.{g + 1}"

    def emulated(self, gbps: float) -> float:
        """Emulated bytes/s of a cluster rate."""
        return gbps * self.scale * GBIT


def circuit_fabric(tree: ClusterSpec, cluster: ClusterSpec, nodes: int, ocs_gbps: float,
                   scale: float) -> CircuitFabric:
    """The emulated fabric of the model's tree ``tree`` (:func:`..traffic.fabric.tree_fabric`
    with one node per rack) on ``nodes`` nodes of ``cluster``: its ``nic`` and ``uplink`` link
    rates are taken from the tree itself, the intra-node rate from the cluster's slowest
    worker-to-worker path (:func:`.links.intra_node_link`, None when memory)."""
    m = cluster.workers_per_node
    if tree.workers_per_node != nodes * m:
        raise EmulationError(f"tree {tree.name} has {tree.workers_per_node} workers, not "
                             f"{nodes} nodes x {m}")
    nic = {ln.gbps for ln in tree.links if ln.kind == "nic"}
    up = {ln.gbps for ln in tree.links if ln.kind == "uplink"}
    if len(nic) != 1 or len(up) > 1:
        raise EmulationError(f"tree {tree.name}: expected one NIC rate and at most one uplink "
                             f"rate, got {sorted(nic)} / {sorted(up)}")
    racks = {ln.b for ln in tree.links if ln.kind == "nic"}
    if nodes > 1 and len(racks) != nodes:
        raise EmulationError(f"tree {tree.name}: the emulator needs one node per rack "
                             f"(rack_nodes 1), got {len(racks)} racks for {nodes} nodes")
    intra = intra_node_link(cluster) if m > 1 else None
    return CircuitFabric(
        nodes=nodes, workers_per_node=m, nic_gbps=nic.pop(),
        uplink_gbps=up.pop() if up else None, ocs_gbps=float(ocs_gbps),
        intra_gbps=None if intra is None or intra.memory else intra.gbps, scale=float(scale))


@dataclass(frozen=True)
class DeviceConfig:
    """The htb of one device: root classes, default class, filters."""

    ns: str
    """Namespace label: ``w<g>``, ``node<k>`` or ``sw``."""
    dev: str
    classes: tuple[tuple[int, float], ...]
    """(minor, emulated rate in bytes/s), sorted by minor."""
    default: int
    """Class of unclassified traffic."""
    filters: tuple[tuple[Optional[str], Optional[str], int], ...]
    """(src address or None, dst address or None, minor), in order."""

    def rate(self, minor: int) -> float:
        """Rate of class ``minor`` in bytes/s."""
        return dict(self.classes)[minor]


def _check(fab: CircuitFabric, circuits: Mapping[tuple[int, int], int]) -> None:
    for (a, b), n in circuits.items():
        if not (0 <= a < b < fab.num_workers) or fab.node_of(a) == fab.node_of(b) or n < 1:
            raise EmulationError(
                f"circuit {(a, b)}: {n} needs workers a < b in [0, {fab.num_workers}) on "
                f"different nodes (M = {fab.workers_per_node}) and n >= 1")


def tc_config(fab: CircuitFabric, circuits: Mapping[tuple[int, int], int]
              ) -> tuple[DeviceConfig, ...]:
    """Every limited device's htb for ``circuits`` ({(a, b): n}, a < b; {} = the plain tree),
    in the layout of the module docstring."""
    _check(fab, circuits)
    W, m = fab.num_workers, fab.workers_per_node
    n_of = {}
    for (a, b), n in circuits.items():
        n_of[(a, b)] = n_of[(b, a)] = n
    free = UNLIMITED_GBPS * GBIT
    nic = fab.emulated(fab.nic_gbps)
    out: list[DeviceConfig] = []
    for g in range(W):
        remote = [b for b in range(W) if fab.node_of(b) != fab.node_of(g)]
        local = [b for b in range(W) if b != g and fab.node_of(b) == fab.node_of(g)]
        classes = [(FREE, free), (NIC, nic)]
        classes += [(CIRCUIT0 + b, fab.emulated(fab.ocs_gbps * n_of.get((g, b), 1)))
                    for b in remote]
        filters = [(None, fab.address(b), CIRCUIT0 + b if (g, b) in n_of else NIC)
                   for b in remote]
        if fab.intra_gbps is not None and local:
            classes.append((INTRA, fab.emulated(fab.intra_gbps)))
            filters += [(None, fab.address(b), INTRA) for b in local]
        out.append(DeviceConfig(f"w{g}", WORKER_IF, tuple(sorted(classes)), FREE,
                                tuple(filters)))
        out.append(DeviceConfig(
            f"node{fab.node_of(g)}", f"w{g % m}", ((FREE, free), (NIC, nic)), FREE,
            tuple((fab.address(b), None, NIC) for b in remote if (g, b) not in n_of)))
    if fab.uplink_gbps is not None and fab.nodes > 1:
        up = fab.emulated(fab.uplink_gbps)
        for k in range(fab.nodes):
            mine = range(k * m, (k + 1) * m)
            pairs = sorted(p for p in n_of if p[0] in mine)
            out.append(DeviceConfig(f"node{k}", UPLINK_IF, ((FREE, free), (UPLINK, up)), UPLINK,
                                    tuple((fab.address(a), fab.address(b), FREE)
                                          for a, b in pairs)))
            pairs = sorted(p for p in n_of if p[1] in mine)
            out.append(DeviceConfig("sw", f"p{k}", ((FREE, free), (UPLINK, up)), UPLINK,
                                    tuple((fab.address(a), fab.address(b), FREE)
                                          for a, b in pairs)))
    return tuple(out)


def _class_args(cfg: DeviceConfig, minor: int, verb: str) -> list[str]:
    rate = cfg.rate(minor)
    burst = str(burst_bytes(rate, cfg.dev))
    return ["tc", "class", verb, "dev", cfg.dev, "parent", "1:", "classid", f"1:{minor}",
            "htb", "rate", f"{rate_kbit(rate)}kbit", "ceil", f"{rate_kbit(rate)}kbit",
            "burst", burst, "cburst", burst, "quantum", "65536"]


def _filter_args(cfg: DeviceConfig, src: Optional[str], dst: Optional[str],
                 minor: int) -> list[str]:
    match: list[str] = []
    if src is not None:
        match += ["match", "ip", "src", f"{src}/32"]
    if dst is not None:
        match += ["match", "ip", "dst", f"{dst}/32"]
    return ["tc", "filter", "add", "dev", cfg.dev, "parent", "1:", "protocol", "ip", "prio",
            _PRIO, "u32", *match, "flowid", f"1:{minor}"]


def setup_commands(cfg: DeviceConfig) -> list[list[str]]:
    """``tc`` commands (to run inside namespace ``cfg.ns``) that install ``cfg``."""
    cmds = [["tc", "qdisc", "add", "dev", cfg.dev, "root", "handle", "1:", "htb", "default",
             str(cfg.default)]]
    cmds += [_class_args(cfg, minor, "add") for minor, _ in cfg.classes]
    cmds += [_filter_args(cfg, *f) for f in cfg.filters]
    return cmds


def change_commands(old: DeviceConfig, new: DeviceConfig) -> list[list[str]]:
    """``tc`` commands that turn ``old`` into ``new`` on the same device: ``class change`` of
    every class whose rate differs, and the filters replaced when they differ."""
    if (old.ns, old.dev, old.default) != (new.ns, new.dev, new.default) or \
            [m for m, _ in old.classes] != [m for m, _ in new.classes]:
        raise EmulationError(f"{new.ns}:{new.dev}: a reconfiguration changes rates and "
                             "filters only, not the device's classes")
    cmds = [_class_args(new, minor, "change") for (minor, rate), (_, was)
            in zip(new.classes, old.classes) if rate_kbit(rate) != rate_kbit(was)]
    if old.filters != new.filters:
        if old.filters:
            cmds.append(["tc", "filter", "del", "dev", new.dev, "parent", "1:", "prio", _PRIO])
        cmds += [_filter_args(new, *f) for f in new.filters]
    return cmds


def reconfigure_commands(old: Sequence[DeviceConfig], new: Sequence[DeviceConfig]
                         ) -> list[tuple[str, list[str]]]:
    """(namespace label, command) of every change from one :func:`tc_config` to the next."""
    before = {(c.ns, c.dev): c for c in old}
    if set(before) != {(c.ns, c.dev) for c in new}:
        raise EmulationError("the two configurations are for different fabrics")
    return [(c.ns, cmd) for c in new for cmd in change_commands(before[(c.ns, c.dev)], c)]
