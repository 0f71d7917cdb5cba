"""The link plan of an emulated cluster: which cluster link becomes which token-bucket (tbf) rate
limit on which device, scaled by local GEMM throughput / cluster GEMM throughput.

Pure functions of the cluster description (:class:`~megatron_moe_ext.perf.topology.ClusterSpec`)
apart from :func:`measure_local_gemm_tflops`; nothing here runs ``ip`` or ``tc`` (that is
:class:`.netns.EmulatedCluster`). See :mod:`.netns` for where each limit sits.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np

from ..perf.topology import GBIT, ClusterSpec, Topology
from .namespaces import EmulationError

NODE_IF = "eth0"
"""Interface of a node namespace facing the switch (GLOO_SOCKET_IFNAME)."""

MEMORY_KINDS = frozenset({"loopback", "memory", "shm", "local"})
"""Intra-node link kinds that already are memory: no rate limit on ``lo``."""

TBF_LATENCY_MS = 100
"""tbf queue length, in ms at the limited rate. InfiniBand and NVLink do not drop (credit-based
flow control), so neither should the emulated links: 10 ms queues (the value until 2026-12-03)
dropped 1-17 % of the packets of 8 workers behind one johnny NIC or bus, and deeper ones than
100 ms slowed the smart schedule's short steps with queueing delay. The measured sweep is in
docs/emulation.md, "tbf parameters"."""

TBF_MIN_QUEUE_BYTES = 1 << 20
"""Floor of the tbf queue in bytes. At the rates of a strongly dilated lab (trevor at scale
1e-4: a 6.2 Mbit/s NIC behind which 4 workers hold 240 connections) 100 ms is 77 KB, and the
drops made gloo's connections time out. 1 MiB leaves johnny at scale 0.002 as it is (its NIC
queue is 1.25 MB)."""

NAMESPACE_SYSCTLS = {"net.ipv4.tcp_slow_start_after_idle": "0"}
"""Set in every emulated namespace. An RDMA queue pair sends at line rate after an idle gap;
Linux TCP by default shrinks a connection's window back to its initial size after one RTO idle,
so each of the smart schedule's steps (a pair talks once per step) restarted in slow start."""

TBF_BURST_S = 1e-3
"""tbf bucket size, in seconds at the limited rate (at least :data:`_MIN_BURST`)."""

_MIN_BURST = {"lo": 128 * 1024}
"""Minimum tbf burst in bytes per device. lo's MTU is 64 KiB, and a packet larger than the
bucket is dropped there."""
_DEFAULT_MIN_BURST = 128 * 1024
"""veth: larger than a 64 KiB GSO packet, so that tbf passes it whole. With a smaller bucket
tbf segments every GSO packet into MTU-sized ones, and the per-packet work on the shared cores
slowed the workers' GEMMs by 50-90 % while a transfer was in flight (8 % with 128 KiB)."""


# --------------------------------------------------------------------------------------
# GEMM throughput and scale
# --------------------------------------------------------------------------------------


def measure_local_gemm_tflops(
    seconds: float = 1.0, shape: tuple[int, int, int] = (2048, 1024, 1024), threads: int = 1,
    dtype: str = "fp32",
) -> float:
    """Achieved GEMM throughput of this machine in TFLOP/s: ``torch.mm`` of an (m x k) by
    (k x n) matrix (default: 2048 tokens, H 1024, F 1024, an expert-MLP-sized GEMM) repeated
    for about ``seconds`` on ``threads`` threads."""
    import torch

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    m, k, n = shape
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(m, k, generator=gen).to(torch_dtype)
        b = torch.randn(k, n, generator=gen).to(torch_dtype)
        out = torch.empty(m, n, dtype=torch_dtype)
        torch.mm(a, b, out=out)  # warm-up
        iters, t0 = 0, time.perf_counter()
        elapsed = 0.0
        while (elapsed < seconds or iters < 2) and iters < 100_000:
            torch.mm(a, b, out=out)
            iters += 1
            elapsed = time.perf_counter() - t0
    finally:
        torch.set_num_threads(prev)
    return 2.0 * m * n * k * iters / elapsed / 1e12


def auto_scale(spec: ClusterSpec, dtype: str = "fp32", local_tflops: float | None = None) -> float:
    """Scale factor for every link: local GEMM TFLOP/s (measured when not given) divided by
    the cluster's ``gemm_tflops[dtype]``. Keeps the cluster's compute-to-communication ratio."""
    if dtype not in spec.gemm_tflops:
        raise EmulationError(f"{spec.name}: no gemm_tflops for {dtype!r} "
                             f"(have {sorted(spec.gemm_tflops)})")
    if local_tflops is None:
        local_tflops = measure_local_gemm_tflops(dtype=dtype)
    return float(local_tflops) / float(spec.gemm_tflops[dtype])


# --------------------------------------------------------------------------------------
# Link plan
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmulatedLink:
    """One rate limit of the emulation: a cluster link scaled and put on one or more devices."""

    name: str
    """``node<k>.nic`` or ``node<k>.intra``."""
    kind: str
    """``nic`` or the cluster's intra-node link kind (e.g. ``pcie``)."""
    cluster_gbps: float
    """One-direction bandwidth in the cluster, Gbit/s."""
    scale: float
    """Factor applied to every link."""
    devices: tuple[tuple[str, str], ...]
    """(namespace label, device) pairs that get a tbf on egress; label ``node<k>`` or ``sw``."""
    delay_ms: float = 0.0
    """netem delay added on the first device (0: none)."""
    connections: int = 0
    """Directed TCP flows whose data enters this link's queue (one gloo connection per worker
    pair of a process group; a NIC carries one direction of each crossing pair, the shared
    ``lo`` bus both). The queue holds an initial window of each (:func:`queue_limit_bytes`) and
    :func:`tcp_rcvbuf_bytes` caps their windows so that the queue cannot overflow."""

    @property
    def rate_mbit(self) -> float:
        """Emulated rate in Mbit/s."""
        return self.cluster_gbps * self.scale * 1000.0

    @property
    def rate_bytes(self) -> float:
        """Emulated rate in bytes/s."""
        return self.cluster_gbps * self.scale * GBIT

    def describe(self) -> str:
        """One line: cluster rate, scale, emulated rate and where the limit sits."""
        where = ", ".join(f"{label}:{dev}" for label, dev in self.devices)
        delay = f", +{self.delay_ms:g} ms one way" if self.delay_ms else ""
        return (f"{self.name:<12} {self.kind:<6} {self.cluster_gbps:8.2f} Gbit/s x {self.scale:.4g}"
                f" = {self.rate_mbit:10.2f} Mbit/s  (tbf on {where}{delay})")


@dataclass(frozen=True)
class IntraNodeLink:
    """The slowest worker-to-worker path inside one node of a cluster."""

    gbps: float
    """Bottleneck bandwidth of that path, Gbit/s."""
    kind: str
    """Kind of the bottleneck link."""
    memory: bool
    """True when every link on the path is memory-like (:data:`MEMORY_KINDS`)."""


def intra_node_link(spec: ClusterSpec) -> IntraNodeLink | None:
    """Bottleneck of the slowest path between two workers of node 0; None with one worker."""
    if spec.workers_per_node < 2:
        return None
    topo = Topology(spec)
    best: tuple[float, str, bool] | None = None
    for s in range(spec.workers_per_node):
        for d in range(spec.workers_per_node):
            if s == d:
                continue
            path = topo.path(s, d)
            slow = min(path, key=lambda ln: ln.bandwidth)
            memory = all(ln.kind in MEMORY_KINDS for ln in path)
            cand = (slow.bandwidth, slow.kind, memory)
            if best is None or cand[0] < best[0]:
                best = cand
    assert best is not None
    return IntraNodeLink(gbps=best[0] / GBIT, kind=best[1] or "intra", memory=best[2])


INTRA_BUS_MODES = ("link", "aggregate")
"""How the one shared intra-node limit on ``lo`` is sized (:func:`plan_links`)."""


def intra_node_aggregate_gbps(spec: ClusterSpec, workers_per_node: int | None = None) -> float:
    """Rate (Gbit/s) of one shared bus that moves a uniform all-to-all among the first
    ``workers_per_node`` workers of a node in the time the model gives it on the node's own
    graph (:meth:`Topology.transfer_time`): total bytes / model time.

    E.g. johnny (8 GPUs, a PCIe tree of 88 Gbit/s links, two switches joined through the
    sockets): 56 pair flows whose busiest link (switch to socket) carries 16 of them, so the
    bus runs at 56 / 16 x 88 = 308 Gbit/s instead of one link's 88.
    """
    m = spec.workers_per_node if workers_per_node is None else int(workers_per_node)
    if m < 2:
        raise EmulationError(f"{spec.name}: an intra-node bus needs >= 2 workers per node")
    topo = Topology(dataclasses.replace(spec, nodes=1))
    traffic = np.zeros((topo.num_workers, topo.num_workers))
    traffic[:m, :m] = 1.0
    np.fill_diagonal(traffic, 0.0)
    return float(traffic.sum() / topo.transfer_time(traffic) / GBIT)


def _worker_index(vertex: str) -> int | None:
    return int(vertex[1:]) if vertex[:1] == "w" and vertex[1:].isdigit() else None


def node_nic_gbps(spec: ClusterSpec, workers_per_node: int) -> float:
    """Aggregate NIC bandwidth (Gbit/s) of one emulated node: every NIC hanging off a switch or
    socket, plus the NICs attached to the workers that are emulated (``w<i>``, i < W). So a
    cluster with one NIC per GPU (dgx-h100) gives an emulated 1-worker node one NIC, not 8."""
    total = 0.0
    for nic in spec.nics:
        idx = _worker_index(nic.attach)
        if idx is None or idx < workers_per_node:
            total += nic.gbps * nic.count
    if total == 0.0:
        raise EmulationError(f"{spec.name}: no NIC serves the first {workers_per_node} "
                             "worker(s) of a node")
    return total


def plan_links(
    spec: ClusterSpec, scale: float, nodes: int, workers_per_node: int, delay_ms: float = 0.0,
    intra_limit: bool = True, intra_bus: str = "link",
) -> list[EmulatedLink]:
    """The rate limits for ``nodes`` x ``workers_per_node`` emulated workers of ``spec``.

    The intra-node limit is one tbf on the node's ``lo`` (a shared bus for all its workers),
    sized by ``intra_bus``: ``link`` = the bottleneck of the slowest worker-to-worker path (one
    link's rate for the whole node: right for 2 workers, pessimistic for more),
    ``aggregate`` = :func:`intra_node_aggregate_gbps` (the node's uniform all-to-all takes the
    model's time; patterns that load fewer links run faster than on the real tree).
    """
    if intra_bus not in INTRA_BUS_MODES:
        raise EmulationError(f"intra_bus {intra_bus!r} is not one of {list(INTRA_BUS_MODES)}")
    links: list[EmulatedLink] = []
    if nodes > 1:
        if not spec.nics:
            raise EmulationError(f"{spec.name}: the cluster has no NIC, cannot emulate {nodes} "
                                 "nodes (use --nodes 1)")
        nic_gbps = node_nic_gbps(spec, workers_per_node)
        for k in range(nodes):
            links.append(EmulatedLink(f"node{k}.nic", "nic", nic_gbps, scale,
                                      ((f"node{k}", NODE_IF), ("sw", f"p{k}")), delay_ms,
                                      workers_per_node ** 2 * (nodes - 1)))
    if workers_per_node > 1 and intra_limit:
        intra = intra_node_link(spec)
        if intra is not None and not intra.memory:
            gbps = (intra.gbps if intra_bus == "link"
                    else intra_node_aggregate_gbps(spec, workers_per_node))
            for k in range(nodes):
                links.append(EmulatedLink(f"node{k}.intra", intra.kind, gbps, scale,
                                          ((f"node{k}", "lo"),), 0.0,
                                          workers_per_node * (workers_per_node - 1)))
    return links


def rate_kbit(rate_bytes: float) -> int:
    """A rate in bytes/s as tc's integer kbit (at least 8)."""
    return max(8, int(round(rate_bytes * 8 / 1000)))


def burst_bytes(rate_bytes: float, dev: str) -> int:
    """Token bucket of a rate limit on ``dev``: :data:`TBF_BURST_S` at the rate, at least the
    device's minimum (:data:`_MIN_BURST`, else :data:`_DEFAULT_MIN_BURST`)."""
    return max(_MIN_BURST.get(dev, _DEFAULT_MIN_BURST), int(rate_bytes * TBF_BURST_S))


_MAX_LIMIT = 1 << 30
"""tc takes a 32-bit ``limit``; a floor run's links (10x the NIC) would ask for more."""


TCP_INITIAL_WINDOW_BYTES = 10 * 1448
"""Linux's initial congestion window (10 segments) at a 1500-byte MTU."""


def queue_limit_bytes(rate_bytes: float, dev: str, connections: int = 0) -> int:
    """tbf ``limit`` of a rate on ``dev``: :data:`TBF_LATENCY_MS` at the rate, at least
    :data:`TBF_MIN_QUEUE_BYTES` and an initial window of each of ``connections``, plus the
    bucket (tc's own ``latency`` rule, floored), at most 1 GiB."""
    queue = max(rate_bytes * TBF_LATENCY_MS / 1e3, TBF_MIN_QUEUE_BYTES,
                connections * TCP_INITIAL_WINDOW_BYTES)
    return min(int(queue) + burst_bytes(rate_bytes, dev), _MAX_LIMIT)


def tbf_args(rate_bytes: float, dev: str, connections: int = 0) -> list[str]:
    """``tbf rate .. burst .. limit ..`` for a rate in bytes/s on ``dev``."""
    return ["tbf", "rate", f"{rate_kbit(rate_bytes)}kbit", "burst",
            str(burst_bytes(rate_bytes, dev)), "limit",
            str(queue_limit_bytes(rate_bytes, dev, connections))]


TCP_MIN_RCVBUF = 4096
"""Smallest receive buffer Linux takes (``tcp_rmem``'s minimum)."""


def tcp_rcvbuf_bytes(links: list[EmulatedLink]) -> int | None:
    """Receive buffer cap per TCP connection that makes every queue lossless: the largest
    buffer b with ``connections x b <= queue`` (queue = tbf limit less its bucket) on every
    link; None when no link has flows (nothing to cap).

    A receiver never advertises more window than its buffer, so no flow has more than b bytes
    in flight and the flows through a queue can never hold more than it takes. That is the
    emulated counterpart of InfiniBand's and NVLink's credit-based flow control: senders wait,
    nothing is dropped. Without it the 240 flows behind each trevor NIC (BBR, the host's
    default congestion control, which does not back off on loss) dropped 1.0-1.3 % of the
    packets at D = 3,000 and each loss cost a retransmission timeout. On an idle box the cap
    did not bind one flow's own rate (19.5 KB: 96.7 of 100 Mbit/s, 587 of 616 Mbit/s, as with
    the host's buffers; docs/emulation.md); on a loaded box a flow's RTT grows and b / RTT
    could, which the lab's floor run would show.
    """
    caps = []
    for ln in links:
        if ln.connections <= 0:
            continue
        for _, dev in ln.devices:
            queue = (queue_limit_bytes(ln.rate_bytes, dev, ln.connections)
                     - burst_bytes(ln.rate_bytes, dev))
            caps.append(queue // ln.connections)
    if not caps:
        return None
    return max(TCP_MIN_RCVBUF, int(min(caps)))


def namespace_sysctls(links: list[EmulatedLink]) -> dict[str, str]:
    """Every sysctl set in each emulated namespace: :data:`NAMESPACE_SYSCTLS`, plus the
    receive buffer cap of :func:`tcp_rcvbuf_bytes` as ``net.ipv4.tcp_rmem`` (min, default and
    max; per namespace, so the host keeps its own)."""
    out = dict(NAMESPACE_SYSCTLS)
    rcvbuf = tcp_rcvbuf_bytes(links)
    if rcvbuf is not None:
        out["net.ipv4.tcp_rmem"] = f"{TCP_MIN_RCVBUF} {rcvbuf} {rcvbuf}"
    return out
