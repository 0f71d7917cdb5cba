"""Calibration measurements on the workers of a job: expert-MLP / GEMM throughput curves and
worker-to-worker links (ping-pong and simultaneous exchange). Every rank must call the
measuring functions together (they use barriers and point-to-point messages).
:mod:`megatron_moe_ext.bench.calibrate` turns them into a cluster file; the validation sweep's
in-run calibration uses them too.

Notation: T tokens, H hidden, F expert FFN hidden size.
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from typing import Any, Optional, Sequence




def _sync_all() -> None:
    import torch.distributed as dist

    dist.barrier()


def make_kernel(kind: str, hidden: int, ffn: int, tokens: int, dtype: str,
                activation: str = "gelu"):
    """A closure running one expert MLP forward + backward over ``tokens`` rows.

    kind ``gemm``: the six bare GEMMs (fc1 / fc2 forward, data and weight gradients).
    kind ``mlp``: the expert MLP as training runs it, fc1 -> activation -> fc2 with autograd
    (the GEMMs plus the activation, its backward and autograd's per-op overhead).
    Both do 12 T H F GEMM FLOPs (swiglu: fc1 is 2F wide, 18 T H F; counted as such).
    """
    import torch
    import torch.nn.functional as F

    tdt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    gen = torch.Generator().manual_seed(tokens)
    f1 = 2 * ffn if activation == "swiglu" else ffn
    x = torch.randn(tokens, hidden, generator=gen).to(tdt)
    gy = torch.randn(tokens, hidden, generator=gen).to(tdt)
    if kind == "gemm":
        w1 = torch.randn(hidden, f1, generator=gen).to(tdt)
        w2 = torch.randn(ffn, hidden, generator=gen).to(tdt)
        h, y = torch.empty(tokens, f1, dtype=tdt), torch.empty(tokens, hidden, dtype=tdt)
        gh, gx = torch.empty(tokens, ffn, dtype=tdt), torch.empty(tokens, hidden, dtype=tdt)
        gw1, gw2 = torch.empty(hidden, f1, dtype=tdt), torch.empty(ffn, hidden, dtype=tdt)
        hh = h[:, :ffn]
        gh1 = torch.empty(tokens, f1, dtype=tdt)

        def once() -> None:
            torch.mm(x, w1, out=h)           # fc1 forward
            torch.mm(hh, w2, out=y)          # fc2 forward
            torch.mm(gy, w2.t(), out=gh)     # fc2 data gradient
            torch.mm(hh.t(), gy, out=gw2)    # fc2 weight gradient
            torch.mm(gh1, w1.t(), out=gx)    # fc1 data gradient
            torch.mm(x.t(), gh1, out=gw1)    # fc1 weight gradient
    elif kind == "mlp":
        w1 = torch.randn(f1, hidden, generator=gen).to(tdt).requires_grad_(True)
        w2 = torch.randn(hidden, ffn, generator=gen).to(tdt).requires_grad_(True)
        act = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu}.get(activation, F.silu)

        def once() -> None:
            w1.grad = w2.grad = None
            xi = x.detach().requires_grad_(True)
            h = F.linear(xi, w1)
            if activation == "swiglu":
                a, g = torch.chunk(h, 2, dim=-1)
                h = F.silu(a) * g
            else:
                h = act(h)
            F.linear(h, w2).backward(gy)
    else:
        raise ValueError(f"kind must be gemm or mlp, got {kind!r}")
    return once


def gemm_flops(hidden: int, ffn: int, tokens: int, activation: str = "gelu") -> float:
    """GEMM FLOPs of one expert MLP fwd + bwd: 3 x 2 x T H (F1 + F), F1 = 2F for swiglu."""
    f1 = 2 * ffn if activation == "swiglu" else ffn
    return 6.0 * tokens * hidden * (f1 + ffn)


class CurveSampler:
    """Timed passes over the expert-MLP (or GEMM) kernels of several token counts on this rank:
    each :meth:`round` runs one fwd+bwd of every size (so that load bursts on a shared machine
    hit every size alike), by the wall clock and by the CPU time of this thread; :meth:`rows`
    gives the throughput curve. The kernels are built and warmed up on construction."""

    def __init__(self, hidden: int, ffn: int, tokens: Sequence[int], dtype: str,
                 kind: str = "mlp", activation: str = "gelu") -> None:
        self.hidden, self.ffn, self.activation = hidden, ffn, activation
        self.kernels = {t: make_kernel(kind, hidden, ffn, t, dtype, activation) for t in tokens}
        for k in self.kernels.values():
            k()  # warm-up
        self.wall: dict[int, list[float]] = {t: [] for t in tokens}
        self.cpu: dict[int, list[float]] = {t: [] for t in tokens}

    def round(self) -> None:
        """One fwd+bwd at every token count."""
        for t, kernel in self.kernels.items():
            c0, t0 = time.thread_time(), time.perf_counter()
            kernel()
            self.wall[t].append(time.perf_counter() - t0)
            self.cpu[t].append(time.thread_time() - c0)

    def rows(self) -> dict[str, Any]:
        """:func:`throughput_rows` of the rounds so far (``cpu`` None with more than one torch
        thread, where the thread's CPU time does not cover the work)."""
        import torch

        single = torch.get_num_threads() == 1
        return throughput_rows(self.hidden, self.ffn, self.activation, self.wall,
                               self.cpu if single else None)


def measure_gemm(hidden: int, ffn: int, tokens: Sequence[int], dtype: str, seconds: float,
                 kind: str = "mlp", activation: str = "gelu",
                 min_rounds: int = 3) -> dict[str, Any]:
    """Throughput curve on this rank: :class:`CurveSampler` rounds until ``seconds`` have
    passed and at least ``min_rounds`` rounds ran; median per size. Every rank must call it
    together (barrier first: the workers compute at the same time, as in training).

    Returns {"tokens": [T], "wall": [TFLOP/s], "cpu": [TFLOP/s] | None, "reps": [n]}."""
    sampler = CurveSampler(hidden, ffn, tokens, dtype, kind, activation)
    _sync_all()
    t_start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or (time.perf_counter() - t_start < seconds and rounds < 1000):
        sampler.round()
        rounds += 1
    _sync_all()
    return sampler.rows()


def throughput_rows(hidden: int, ffn: int, activation: str, wall: dict[int, list[float]],
                    cpu: Optional[dict[int, list[float]]]) -> dict[str, Any]:
    """TFLOP/s from the median times per token count (see :func:`measure_gemm`)."""
    def rate(t: int, ts: list[float]) -> float:
        return gemm_flops(hidden, ffn, t, activation) / max(statistics.median(ts), 1e-9) / 1e12

    tokens = sorted(wall)
    return {"tokens": tokens, "wall": [rate(t, wall[t]) for t in tokens],
            "cpu": [rate(t, cpu[t]) for t in tokens] if cpu else None,
            "reps": [len(wall[t]) for t in tokens]}


def _round_trip(buf: Any, peer: int, initiator: bool) -> None:
    """``buf`` there and back with blocking send / recv (the initiator sends first)."""
    import torch.distributed as dist

    if initiator:
        dist.send(buf, peer)
        dist.recv(buf, peer)
    else:
        dist.recv(buf, peer)
        dist.send(buf, peer)


def _pingpong(peer: int, initiator: bool, nbytes: int, seconds: float) -> tuple[float, int]:
    """(median one-way seconds, reps) of a blocking ping-pong of ``nbytes`` with ``peer``."""
    import torch
    import torch.distributed as dist

    buf = torch.zeros(max(1, nbytes // 4), dtype=torch.float32)
    ctl = torch.zeros(1, dtype=torch.int64)
    # warm-up round trip, whose time sets the repetitions (the initiator decides, tells peer)
    t0 = time.perf_counter()
    if initiator:
        dist.send(buf, peer)
        dist.recv(buf, peer)
        rtt = time.perf_counter() - t0
        ctl[0] = int(min(200, max(3, seconds / max(rtt, 1e-6))))
        dist.send(ctl, peer)
    else:
        dist.recv(buf, peer)
        dist.send(buf, peer)
        dist.recv(ctl, peer)
    reps = int(ctl[0])
    rtts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        _round_trip(buf, peer, initiator)
        rtts.append(time.perf_counter() - t0)
    return statistics.median(rtts) / 2.0, reps


def _exchange(peer: int, nbytes: int, seconds: float) -> tuple[float, int]:
    """(median seconds, reps) of a simultaneous exchange of ``nbytes`` each way, until both
    directions have arrived on both sides.

    Sends are posted before receives, as FasterMoE's exchange and gloo's all-to-all do. With
    gloo that order makes the two directions of a pair take turns, while receive-first
    overlaps them (docs/emulation.md); the exchange should see what the workloads see. A
    1-element handshake after the exchange makes every repetition last until the slower
    direction is done on both ranks (otherwise the rank whose data came first would report
    the fast direction alone).
    """
    import torch
    import torch.distributed as dist

    send = torch.zeros(max(1, nbytes // 4), dtype=torch.float32)
    recv = torch.empty_like(send)
    ctl = torch.zeros(1, dtype=torch.int64)
    tok = torch.zeros(1, dtype=torch.int64)
    low = dist.get_rank() < peer

    def once() -> float:
        t0 = time.perf_counter()
        ops = [dist.isend(send, peer), dist.irecv(recv, peer)]  # send first, as the workloads
        for op in ops:
            op.wait()
        _round_trip(tok, peer, low)
        return time.perf_counter() - t0

    first = once()  # warm-up; the lower rank decides the repetitions and tells the peer
    if low:
        ctl[0] = int(min(200, max(3, seconds / max(first, 1e-6))))
        dist.send(ctl, peer)
    else:
        dist.recv(ctl, peer)
    times = [once() for _ in range(int(ctl[0]))]
    return statistics.median(times), len(times)


def _rates(sizes: Sequence[int], one_way: dict[int, float]) -> tuple[float, float, float]:
    """(latency s, bandwidth Gbit/s = largest / (t - latency), effective Gbit/s = largest / t)."""
    lat = one_way[sizes[0]]
    dt = one_way[sizes[-1]] - lat
    if dt <= 0:
        dt = one_way[sizes[-1]]
    return lat, sizes[-1] * 8 / dt / 1e9, sizes[-1] * 8 / one_way[sizes[-1]] / 1e9


def measure_links(pairs: Sequence[tuple[int, int]], sizes: Sequence[int],
                  seconds: float) -> dict[tuple[int, int], dict[str, Any]]:
    """Ping-pong and 2-way exchange for every pair (one pair at a time, the others wait at a
    barrier). Returned on the lower rank of each pair."""
    import torch.distributed as dist

    rank = dist.get_rank()
    res: dict[tuple[int, int], dict[str, Any]] = {}
    for a, b in pairs:
        _sync_all()
        if rank not in (a, b):
            continue
        peer, init = (b, True) if rank == a else (a, False)
        one_way, exch, reps = {}, {}, {}
        for s in sizes:
            one_way[s], r1 = _pingpong(peer, init, s, seconds)
            exch[s], r2 = _exchange(peer, s, seconds)
            reps[s] = [r1, r2]
        if init:
            lat, bw, eff = _rates(sizes, one_way)
            xlat, xbw, xeff = _rates(sizes, exch)
            res[(a, b)] = {
                "pingpong_one_way_s": {str(s): one_way[s] for s in sizes},
                "exchange_s": {str(s): exch[s] for s in sizes},
                "reps_pingpong_exchange": {str(s): reps[s] for s in sizes},
                "latency_s": lat, "pingpong_gbps": bw, "pingpong_effective_gbps": eff,
                "exchange_latency_s": xlat, "exchange_gbps": xbw,
                "exchange_effective_gbps": xeff,
            }
    _sync_all()
    return res


def node_layout(workers_per_node: Optional[int], rank: int,
                world: int) -> tuple[list[int], list[str]]:
    """(node id per rank, hostname per rank), all-gathered. The node of a rank is
    rank // ``workers_per_node`` when given, else GROUP_RANK (torchrun's node rank), else
    rank // LOCAL_WORLD_SIZE."""
    import torch.distributed as dist

    if workers_per_node:
        node = rank // workers_per_node
    elif os.environ.get("GROUP_RANK", "") != "":
        node = int(os.environ["GROUP_RANK"])
    else:
        lws = int(os.environ.get("LOCAL_WORLD_SIZE") or world)
        node = rank // max(1, lws)
    info: list[Any] = [None] * world
    dist.all_gather_object(info, (node, socket.gethostname()))
    return [int(i[0]) for i in info], [str(i[1]) for i in info]


def format_rows(rows: dict[str, Any]) -> str:
    """``T: wall/cpu`` TFLOP/s pairs of one :func:`measure_gemm` result."""
    cpu = rows["cpu"] or [None] * len(rows["tokens"])
    return ", ".join(f"{t}: {w:.4f}/{'-' if c is None else f'{c:.4f}'}"
                     for t, w, c in zip(rows["tokens"], rows["wall"], cpu))
