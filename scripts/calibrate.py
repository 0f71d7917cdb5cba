#!/usr/bin/env python
"""Measure this machine's GEMM throughput and worker-to-worker links; write a cluster YAML.

Run it under the same launcher as training, so that it sees the same processes, threads and
network: torchrun (one or more nodes), scripts/emulate_cluster.py, or alone (it then spawns
--nproc local processes, gloo on the loopback).

    torchrun --nproc-per-node 2 scripts/calibrate.py --out configs/clusters/local-cpu.yaml
    scripts/emulate_cluster.py --cluster johnny --scale 0.005 --nodes 2 --workers-per-node 1 \\
        -- scripts/calibrate.py --quick --compare johnny --out /tmp/johnny-emulated.yaml

What is measured
----------------
GEMM: the six GEMMs of one expert MLP forward + backward (fc1 [T, H] x [H, F], fc2 [T, F] x
[F, H]; backward: data and weight gradients of both, 12 T H F FLOPs), run on every worker at
the same time (as in training, where all workers compute together; on a shared-core machine
they compete for the cores), with the torch thread count of training (setup_runtime: cores /
local processes unless --threads). For each token count T of the curve, every rank takes the
median over repetitions; the value written is the mean over ranks. ``gemm_tflops[dtype]`` is
the value at the largest T, ``gemm_curve[dtype]`` all (T, TFLOP/s) points (small GEMMs are
slower on a CPU). The performance model interpolates the curve at the tokens of a worker.

Links: for every pair of workers (--pairs all) or rank 0 and every other rank (--pairs star),
one pair at a time, for several message sizes: a ping-pong (blocking send / recv; one-way time
= median round trip / 2, the other direction idle) and a simultaneous exchange (both sides
isend then irecv at once, as in an all-to-all, timed until both directions arrived). Latency =
time of the smallest size; bandwidth = largest size / (time(largest) - latency), one
direction, Gbit/s. --bandwidth picks which rate becomes the link bandwidth (default: pingpong,
the link's rate; under the emulator it recovers the tbf rate within a few percent). With gloo
the exchange rate is about half the ping-pong rate: when the sends are posted before the
receives (as our exchange and gloo's all-to-all do), gloo moves the two directions of a worker
pair one after the other (raw TCP between the same namespaces overlaps them, and so does gloo
with the receives posted first; docs/emulation.md). The written file says ``duplex: half``
when exchange / ping-pong is below 0.7, and the performance model then charges a pair's
exchange with both directions' bytes. Both rates are recorded in the header. Pairs on the same
node are intra-node, the others inter-node. The node of a rank is GROUP_RANK (torchrun's node
rank), else rank // --workers-per-node, else rank // LOCAL_WORLD_SIZE.

What is written (rank 0): the schema of configs/clusters/*.yaml. Workers of a node hang off one
vertex ``host`` (a star; kind ``loopback`` unless --intra-kind) whose links carry the median
intra-node bandwidth over pairs; with more than one node, one NIC on ``host`` carries the
median inter-node bandwidth (on ``w0`` with one worker per node). A comment header records
the date, the command and every measured value.
--out defaults to configs/clusters/local-cpu.yaml, except under the emulator or with --compare,
where nothing is written unless --out is given. --json writes the raw measurements.

--compare CLUSTER prints measured vs described rates. The described rates are multiplied by
the emulation scale (MMX_EMULATION_SCALE, set by scripts/emulate_cluster.py, or --scale):
inter-node = the NIC bandwidth an emulated node gets, intra-node = the slowest worker-to-worker
path of a node (not rate-limited by the emulator when its links are memory-like), GEMM =
gemm_tflops x scale (equal to the local throughput by construction of --scale auto).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shlex
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

logger = logging.getLogger("calibrate")

DEFAULT_OUT = REPO / "configs" / "clusters" / "local-cpu.yaml"
DEFAULT_TOKENS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
QUICK_TOKENS = (64, 512, 2048)
DEFAULT_SIZES = (8, 64 << 10, 1 << 20, 8 << 20)
QUICK_SIZES = (8, 1 << 20)
EMULATION_ENV = ("MMX_EMULATION_CLUSTER", "MMX_EMULATION_SCALE")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, metavar="YAML",
                   help="cluster YAML to write (default: configs/clusters/local-cpu.yaml; "
                        "under the emulator or with --compare: none unless given)")
    p.add_argument("--name", default=None,
                   help="cluster name in the YAML (default: the --out file stem; under the "
                        "emulator <cluster>-emulated)")
    p.add_argument("--json", metavar="PATH", help="also write the raw measurements as JSON")
    p.add_argument("--compare", metavar="CLUSTER",
                   help="print measured vs described rates of this cluster YAML (or name)")
    p.add_argument("--scale", type=float, default=None,
                   help="factor applied to the described rates for --compare (default: "
                        "MMX_EMULATION_SCALE under the emulator, else 1)")
    p.add_argument("--tolerance", type=float, default=0.15,
                   help="relative difference accepted by --compare (default: %(default)s)")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when a --compare rate is outside --tolerance")
    p.add_argument("--quick", action="store_true",
                   help="few sizes, short measurements (tests): tokens %s, messages %s, "
                        "H=256, F=512 unless given" % (QUICK_TOKENS, QUICK_SIZES))
    p.add_argument("--hidden", type=int, default=None,
                   help="expert MLP hidden size H of the GEMM shapes (default: 512; quick 256)")
    p.add_argument("--ffn", type=int, default=None,
                   help="expert FFN hidden size F of the GEMM shapes (default: 2H)")
    p.add_argument("--tokens", type=int, nargs="+", default=None,
                   help="token counts of the gemm_curve (default: %s)" % (DEFAULT_TOKENS,))
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                   help="dtypes to measure (default: fp32 bf16; the YAML needs both, a missing "
                        "one copies the measured one)")
    p.add_argument("--gemm-seconds", type=float, default=None,
                   help="time budget per kind and dtype for the rounds over all token counts "
                        "(default: 4; quick 0.3); at least 3 rounds (quick 2)")
    p.add_argument("--curve", choices=["mlp", "gemm"], default="mlp",
                   help="what becomes gemm_tflops / gemm_curve: the expert MLP as training runs "
                        "it (GEMMs + activation + autograd, counted as GEMM FLOPs) or the bare "
                        "GEMMs; both are measured and recorded (default: %(default)s)")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                   help="clock of the written throughput: CPU time of the computing thread "
                        "(what a worker does when it has its core; insensitive to other jobs "
                        "on a shared machine) or wall time (includes time-sharing with other "
                        "jobs); both are measured and recorded; cpu needs 1 torch thread per "
                        "process, else wall is used (default: %(default)s)")
    p.add_argument("--activation", default="gelu", choices=["gelu", "silu", "swiglu", "relu"],
                   help="expert activation of the mlp kernel (default: %(default)s, the "
                        "model default)")
    p.add_argument("--sizes", type=int, nargs="+", default=None,
                   help="ping-pong message sizes in bytes (default: %s)" % (DEFAULT_SIZES,))
    p.add_argument("--p2p-seconds", type=float, default=None,
                   help="time budget per pair and message size (default: 0.3; quick 0.05)")
    p.add_argument("--pairs", choices=["all", "star"], default="all",
                   help="ping-pong between every pair, or rank 0 <-> k (default: %(default)s)")
    p.add_argument("--workers-per-node", type=int, default=None,
                   help="node = rank // this (default: GROUP_RANK, else LOCAL_WORLD_SIZE)")
    p.add_argument("--bandwidth", choices=["pingpong", "exchange"], default="pingpong",
                   help="which measured rate becomes the link bandwidth: the ping-pong rate "
                        "(one direction of the link) or the simultaneous 2-way exchange (what "
                        "one direction gets while the other is busy) (default: %(default)s)")
    p.add_argument("--intra-kind", default="loopback",
                   help="kind label of the written intra-node links (default: %(default)s; "
                        "memory-like kinds are not rate-limited by the emulator)")
    p.add_argument("--nproc", type=int, default=2,
                   help="processes to spawn when not started by torchrun (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per process (default: as training, OMP_NUM_THREADS if "
                        "set, else cores / local processes)")
    p.add_argument("--log-level", default="INFO", help="rank-0 log level (default: %(default)s)")
    args = p.parse_args(argv)
    args.hidden = args.hidden or (256 if args.quick else 512)
    args.ffn = args.ffn or 2 * args.hidden
    args.tokens = sorted(set(args.tokens or (QUICK_TOKENS if args.quick else DEFAULT_TOKENS)))
    args.sizes = sorted(set(args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)))
    args.gemm_seconds = args.gemm_seconds or (0.3 if args.quick else 4.0)
    args.p2p_seconds = args.p2p_seconds or (0.05 if args.quick else 0.3)
    if min(args.tokens) < 1 or min(args.sizes) < 4 or args.hidden < 1 or args.ffn < 1:
        p.error("--tokens, --hidden, --ffn must be >= 1 and --sizes >= 4 bytes")
    if len(args.sizes) < 2:
        p.error("--sizes needs at least two sizes (latency and bandwidth)")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


# ----------------------------------------------------------------------------------- measuring


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


def measure_gemm(hidden: int, ffn: int, tokens: Sequence[int], dtype: str, seconds: float,
                 kind: str = "mlp", activation: str = "gelu",
                 min_rounds: int = 3) -> dict[str, Any]:
    """Throughput curve on this rank: rounds over all token counts (one fwd+bwd of each per
    round, so that load bursts on a shared machine hit every size alike) until ``seconds``
    have passed and at least ``min_rounds`` rounds ran; median per size, by the wall clock and
    by the CPU time of this thread (``cpu``: None with more than one torch thread, where the
    thread's CPU time does not cover the work). Every rank must call it together (barrier
    first: the workers compute at the same time, as in training).

    Returns {"tokens": [T], "wall": [TFLOP/s], "cpu": [TFLOP/s] | None, "reps": [n]}."""
    import torch

    kernels = {t: make_kernel(kind, hidden, ffn, t, dtype, activation) for t in tokens}
    for k in kernels.values():
        k()  # warm-up
    single = torch.get_num_threads() == 1
    _sync_all()
    wall: dict[int, list[float]] = {t: [] for t in tokens}
    cpu: dict[int, list[float]] = {t: [] for t in tokens}
    t_start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or (time.perf_counter() - t_start < seconds and rounds < 1000):
        for t in tokens:
            c0, t0 = time.thread_time(), time.perf_counter()
            kernels[t]()
            wall[t].append(time.perf_counter() - t0)
            cpu[t].append(time.thread_time() - c0)
        rounds += 1
    _sync_all()
    return throughput_rows(hidden, ffn, activation, wall, cpu if single else None)


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


def node_layout(args: argparse.Namespace, rank: int, world: int) -> tuple[list[int], list[str]]:
    """(node id per rank, hostname per rank), all-gathered."""
    import torch.distributed as dist

    if args.workers_per_node:
        node = rank // args.workers_per_node
    elif os.environ.get("GROUP_RANK", "") != "":
        node = int(os.environ["GROUP_RANK"])
    else:
        lws = int(os.environ.get("LOCAL_WORLD_SIZE") or world)
        node = rank // max(1, lws)
    info: list[Any] = [None] * world
    dist.all_gather_object(info, (node, socket.gethostname()))
    return [int(i[0]) for i in info], [str(i[1]) for i in info]


# ----------------------------------------------------------------------------------- summary


def summarize(gemm_by_rank: list[dict[str, dict[str, list]]], links: dict, nodes: list[int],
              hosts: list[str], mode: str = "pingpong", curve: str = "mlp",
              clock: str = "cpu") -> dict[str, Any]:
    """Combine the per-rank measurements into the values written to the YAML; ``mode``
    (exchange | pingpong) picks the link bandwidth, ``curve`` (mlp | gemm) the throughput
    kernel, ``clock`` (cpu | wall) its clock (wall where no CPU time was measured)."""
    node_ids = sorted(set(nodes))
    per_node = [nodes.count(n) for n in node_ids]
    if len(set(per_node)) != 1:
        raise SystemExit(f"calibrate: nodes have different worker counts {per_node}; the "
                         "cluster schema needs the same number of workers on every node")
    def curves(kind: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for dtype in sorted(gemm_by_rank[0][kind]):
            per_rank = [g[kind][dtype] for g in gemm_by_rank]
            use = clock if all(r["cpu"] for r in per_rank) else "wall"
            curve = []
            for i, t in enumerate(per_rank[0]["tokens"]):
                vals = [r[use][i] for r in per_rank]
                point = {"tokens": t, "tflops": statistics.fmean(vals),
                         "tflops_min_rank": min(vals), "tflops_max_rank": max(vals),
                         "reps": per_rank[0]["reps"][i],
                         "wall_tflops": statistics.fmean(r["wall"][i] for r in per_rank)}
                if use == "cpu":
                    point["cpu_tflops"] = point["tflops"]
                curve.append(point)
            out[dtype] = {"curve": curve, "tflops": curve[-1]["tflops"], "clock": use}
        return out

    gemm_all = {kind: curves(kind) for kind in sorted(gemm_by_rank[0])}
    pairs = []
    for (a, b), v in sorted(links.items()):
        pairs.append(dict(v, a=a, b=b, intra=nodes[a] == nodes[b]))

    def agg(sel: list[dict]) -> Optional[dict[str, Any]]:
        if not sel:
            return None
        bw = [p[f"{mode}_gbps"] for p in sel]
        med = statistics.median
        return {"pairs": len(sel), "mode": mode, "gbps": med(bw), "gbps_min": min(bw),
                "gbps_max": max(bw),
                "latency_us": med(p["latency_s"] for p in sel) * 1e6,
                "pingpong_gbps": med(p["pingpong_gbps"] for p in sel),
                "pingpong_effective_gbps": med(p["pingpong_effective_gbps"] for p in sel),
                "exchange_gbps": med(p["exchange_gbps"] for p in sel),
                "exchange_effective_gbps": med(p["exchange_effective_gbps"] for p in sel),
                "exchange_latency_us": med(p["exchange_latency_s"] for p in sel) * 1e6}

    return {"world_size": len(nodes), "nodes": len(node_ids), "workers_per_node": per_node[0],
            "node_of_rank": nodes, "hosts": hosts, "curve_kind": curve,
            "gemm": gemm_all[curve], "gemm_all": gemm_all, "pairs": pairs,
            "intra": agg([p for p in pairs if p["intra"]]),
            "inter": agg([p for p in pairs if not p["intra"]])}


def _fmt_rows(rows: dict[str, Any]) -> str:
    """``T: wall/cpu`` TFLOP/s pairs of one :func:`measure_gemm` result."""
    cpu = rows["cpu"] or [None] * len(rows["tokens"])
    return ", ".join(f"{t}: {w:.4f}/{'-' if c is None else f'{c:.4f}'}"
                     for t, w, c in zip(rows["tokens"], rows["wall"], cpu))


def _fmt(x: float) -> str:
    """Compact number for the YAML (4 significant digits)."""
    return f"{x:.4g}"


HALF_DUPLEX_RATIO = 0.7
"""Exchange / ping-pong rate below which the written cluster says ``duplex: half``: the two
directions of a pair took turns (gloo's TCP pairs: ~0.5) instead of overlapping (~0.9-1)."""


def duplex_of(m: dict[str, Any]) -> tuple[str, Optional[float]]:
    """(``full`` | ``half``, exchange / ping-pong rate) of the links that bound an all-to-all:
    inter-node pairs when there are any, else intra-node pairs."""
    a = m.get("inter") or m.get("intra")
    if not a or not a.get("pingpong_gbps"):
        return "full", None
    ratio = a["exchange_gbps"] / a["pingpong_gbps"]
    return ("half" if ratio < HALF_DUPLEX_RATIO else "full"), ratio


def cluster_yaml(m: dict[str, Any], name: str, args: argparse.Namespace, command: str,
                 extra: dict[str, Any]) -> str:
    """The cluster YAML text (comment header + data) for the measurements ``m``."""
    gemm = dict(m["gemm"])
    for need in ("fp32", "bf16"):  # the schema needs both
        if need not in gemm:
            other = next(iter(gemm))
            gemm[need] = dict(gemm[other], copied_from=other)
    mw, nn = m["workers_per_node"], m["nodes"]
    intra, inter = m["intra"], m["inter"]
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    hdr = [
        f"# {name}: measured by scripts/calibrate.py on {now} (host {m['hosts'][0]}).",
        f"# command: {command}",
        f"# {nn} node(s) x {mw} worker process(es); torch threads per worker "
        f"{extra['threads']}; torch {extra['torch']}; load average at start "
        f"{extra['loadavg']}.",
    ]
    if extra.get("emulation"):
        hdr.append(f"# under scripts/emulate_cluster.py: {extra['emulation']}")
    hdr.append(f"# Expert MLP fwd+bwd, H={args.hidden}, F={args.ffn}, {args.activation}, on all "
               "workers at once; TFLOP/s = GEMM FLOPs (12 T H F) / median time, mean over "
               "ranks, by tokens T, 'wall clock / CPU time of the computing thread':")
    kinds = {"gemm": "bare GEMMs (6 torch.mm)",
             "mlp": "MLP as trained (fc1, activation, fc2, autograd backward)"}
    for kind in sorted(m["gemm_all"]):
        for dtype, g in sorted(m["gemm_all"][kind].items()):
            pts = ", ".join(f"{c['tokens']}: {c['wall_tflops']:.4f}"
                            + (f"/{c['cpu_tflops']:.4f}" if "cpu_tflops" in c else "")
                            for c in g["curve"])
            hdr.append(f"#   {kind} {dtype}: {{{pts}}}")
        hdr.append(f"#     ({kind}: {kinds[kind]})")
    clocks = sorted({g["clock"] for g in m["gemm"].values()})
    hdr.append(f"#   written as gemm_tflops / gemm_curve: {m['curve_kind']}, "
               f"{' / '.join(clocks)} clock" + "".join(
                   f"; {d} copied from {g['copied_from']} (not measured)"
                   for d, g in sorted(gemm.items()) if g.get("copied_from")))
    hdr.append("# Links, one pair at a time; bandwidth = largest message / (time - time of the "
               "smallest), one direction:")
    hdr.append("#   ping-pong = blocking send/recv round trip / 2 (other direction idle); "
               "exchange = both sides isend then irecv at once, until both arrived (as in an "
               "all-to-all)")
    for label, a in (("intra-node", intra), ("inter-node", inter)):
        if a:
            hdr.append(
                f"#   {label} ({a['pairs']} pairs): exchange {a['exchange_gbps']:.3f} Gbit/s "
                f"each way (latency {a['exchange_latency_us']:.1f} us), ping-pong "
                f"{a['pingpong_gbps']:.3f} Gbit/s (latency {a['latency_us']:.1f} us); "
                f"written: {a['mode']} {a['gbps']:.3f} (pairs min {a['gbps_min']:.3f}, "
                f"max {a['gbps_max']:.3f})")
    hdr.append(f"#   message sizes (bytes): {', '.join(str(s) for s in args.sizes)}")
    duplex, dratio = duplex_of(m)
    if dratio is not None:
        hdr.append(f"#   exchange / ping-pong = {dratio:.2f} -> duplex: {duplex} (half below "
                   f"{HALF_DUPLEX_RATIO}: the two directions of a pair took turns)")
    topo = ("every worker hangs off one vertex 'host' at the intra-node bandwidth"
            if mw > 1 else "one worker per node")
    if nn > 1:
        topo += f"; one NIC on '{'host' if mw > 1 else 'w0'}' at the inter-node bandwidth"
    hdr.append(f"# Topology written: {topo}.")
    hdr.append("# Wall-clock numbers are noisy on a shared machine: re-run calibrate.py before "
               "relying on them.")
    desc = (f"{nn} node(s) x {mw} process(es), measured by scripts/calibrate.py on "
            f"{now.split()[0]}"
            + (" under the network emulator" if extra.get("emulation") else ""))
    lines = hdr + [
        f"name: {name}",
        f"description: {json.dumps(desc)}",
        f"nodes: {nn}",
        f"workers_per_node: {mw}",
        f"duplex: {duplex}",
        "gemm_tflops:",
    ]
    for dtype in ("fp32", "bf16"):
        lines.append(f"  {dtype}: {_fmt(gemm[dtype]['tflops'])}")
    lines.append("gemm_curve:            # [tokens per GEMM, TFLOP/s]")
    for dtype in ("fp32", "bf16"):
        pts = ", ".join(f"[{c['tokens']}, {_fmt(c['tflops'])}]" for c in gemm[dtype]["curve"])
        lines.append(f"  {dtype}: [{pts}]")
    if mw > 1:
        if intra is None:
            raise SystemExit("calibrate: no intra-node pair was measured (use --pairs all)")
        lat = intra["latency_us"] / 2  # two hops w_i -> host -> w_j
        lines.append("links:")
        for i in range(mw):
            lines.append(f"  - {{a: w{i}, b: host, gbps: {_fmt(intra['gbps'])}, "
                         f"latency_us: {lat:.1f}, kind: {args.intra_kind}}}")
    if nn > 1:
        if inter is None:
            raise SystemExit("calibrate: no inter-node pair was measured")
        attach = "host" if mw > 1 else "w0"
        nic_lat = max(0.0, inter["latency_us"] - (intra["latency_us"] if intra else 0.0))
        lines += ["nics:",
                  f"  - {{attach: {attach}, gbps: {_fmt(inter['gbps'])}, "
                  f"latency_us: {nic_lat:.1f}}}",
                  "inter_node: {switch: net}"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------- compare


def compare_rows(m: dict[str, Any], cluster: str, scale: float) -> list[dict[str, Any]]:
    """Measured vs described (x scale) rates: GEMM per dtype, intra-node, inter-node."""
    from megatron_moe_ext.emulation.netns import intra_node_link, node_nic_gbps
    from megatron_moe_ext.perf.topology import load_cluster

    spec = load_cluster(cluster)
    rows = []
    for dtype, g in sorted(m["gemm"].items()):
        if dtype in spec.gemm_tflops:
            rows.append({"what": f"GEMM {dtype} (TFLOP/s)", "measured": g["tflops"],
                         "described": spec.gemm_tflops[dtype] * scale,
                         "note": "equal to the local rate only with --scale auto"
                         if scale != 1 else ""})
    if m["intra"]:
        link = intra_node_link(spec) if spec.workers_per_node > 1 else None
        if link is None:
            rows.append({"what": "intra-node (Gbit/s)", "measured": m["intra"]["gbps"],
                         "described": None, "note": "cluster has 1 worker per node"})
        else:
            for mode in ("pingpong", "exchange"):
                checked = mode == m["intra"]["mode"]
                note = ("memory-like: not rate-limited by the emulator"
                        if link.memory and scale != 1 else "")
                if not checked:
                    note = "; ".join(x for x in (note, "informational") if x)
                rows.append({"what": f"intra-node {link.kind} {mode} (Gbit/s)",
                             "measured": m["intra"][f"{mode}_gbps"],
                             "described": link.gbps * scale, "checked": checked,
                             "note": note})
    if m["inter"]:
        try:
            nic = node_nic_gbps(spec, m["workers_per_node"])
        except Exception as exc:  # no NIC in the described cluster
            rows.append({"what": "inter-node NIC (Gbit/s)", "measured": m["inter"]["gbps"],
                         "described": None, "note": str(exc)})
        else:
            for mode in ("pingpong", "exchange"):
                rows.append({"what": f"inter-node NIC {mode} (Gbit/s)",
                             "measured": m["inter"][f"{mode}_gbps"],
                             "described": nic * scale, "checked": mode == m["inter"]["mode"],
                             "note": "" if mode == m["inter"]["mode"] else "informational"})
    for r in rows:
        d = r["described"]
        r["ratio"] = r["measured"] / d if d else None
    return rows


def format_compare(rows: list[dict[str, Any]], cluster: str, scale: float,
                   tolerance: float) -> tuple[str, bool]:
    """(table, all link rows within tolerance)."""
    out = [f"measured vs described ({cluster} x scale {scale:.4g}):",
           f"{'rate':<36} {'measured':>12} {'described':>12} {'ratio':>7}  verdict"]
    ok = True
    for r in rows:
        d, ratio = r["described"], r["ratio"]
        if ratio is None:
            verdict = "-"
        elif abs(ratio - 1) <= tolerance:
            verdict = f"OK (within {tolerance:.0%})"
        else:
            verdict = f"OFF by {ratio - 1:+.0%}"
            if ("GEMM" not in r["what"] and "memory-like" not in r["note"]
                    and r.get("checked", True)):
                ok = False
        out.append(f"{r['what']:<36} {r['measured']:12.4g} "
                   f"{('-' if d is None else f'{d:.4g}'):>12} "
                   f"{('-' if ratio is None else f'{ratio:.3f}'):>7}  {verdict}"
                   + (f"  [{r['note']}]" if r["note"] else ""))
    return "\n".join(out), ok


# ----------------------------------------------------------------------------------- worker


def _command(args: argparse.Namespace) -> str:
    """The command line that ran this calibration (launcher reconstructed from the env)."""
    own = f"scripts/calibrate.py {shlex.join(args.argv)}".strip()
    env = os.environ
    if env.get("MMX_EMULATION_CLUSTER"):
        return (f"scripts/emulate_cluster.py --cluster {env['MMX_EMULATION_CLUSTER']} --scale "
                f"{env.get('MMX_EMULATION_SCALE', '?')} ... -- {own}")
    if "TORCHELASTIC_RUN_ID" in env or "GROUP_RANK" in env:
        lws = int(env.get("LOCAL_WORLD_SIZE") or 1)
        nnodes = int(env.get("WORLD_SIZE") or lws) // max(1, lws)
        return (f"torchrun{f' --nnodes {nnodes}' if nnodes > 1 else ''} --nproc-per-node "
                f"{lws} {own}")
    return f"python {own}" + ("" if "--nproc" in args.argv else f"  (spawned {args.nproc})")


def worker(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from megatron_moe_ext.config import RuntimeConfig
    from megatron_moe_ext.runtime import device as rdev

    rcfg = RuntimeConfig(device="cpu", num_threads=args.threads)
    rt = rdev.setup_runtime(rcfg, "cpu")
    rank, world = rt.rank, rt.world_size
    logging.basicConfig(level=args.log_level.upper() if rank == 0 else "WARNING",
                        format=f"[calibrate rank {rank}] %(message)s", force=True)
    load = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    nodes, hosts = node_layout(args, rank, world)
    logger.info("%d workers, node of each rank %s, %d torch threads each, load average %s",
                world, nodes, torch.get_num_threads(), load)

    gemm: dict[str, dict[str, list]] = {}
    for kind in ("gemm", "mlp"):
        for dtype in args.dtypes:
            t0 = time.perf_counter()
            rows = measure_gemm(args.hidden, args.ffn, args.tokens, dtype, args.gemm_seconds,
                                kind, args.activation, 2 if args.quick else 3)
            gemm.setdefault(kind, {})[dtype] = rows
            logger.info("%s %s (rank %d, TFLOP/s by tokens, wall / cpu): %s  [%d rounds, "
                        "%.1f s]", kind, dtype, rank, _fmt_rows(rows), rows["reps"][0],
                        time.perf_counter() - t0)
    if args.pairs == "all":
        pairs = [(a, b) for a in range(world) for b in range(a + 1, world)]
    else:
        pairs = [(0, k) for k in range(1, world)]
    t0 = time.perf_counter()
    links = measure_links(pairs, args.sizes, args.p2p_seconds)
    logger.info("ping-pong of %d pair(s) x %d sizes: %.1f s", len(pairs), len(args.sizes),
                time.perf_counter() - t0)

    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, {"gemm": gemm, "links": links})
    rc = 0
    if rank == 0:
        all_links: dict = {}
        for g in gathered:
            all_links.update(g["links"])
        m = summarize([g["gemm"] for g in gathered], all_links, nodes, hosts, args.bandwidth,
                      args.curve, args.clock)
        rc = report(m, args, {"threads": torch.get_num_threads(), "torch": torch.__version__,
                              "loadavg": load, "emulation": _emulation()})
    rc_t = torch.tensor([rc])
    dist.broadcast(rc_t, 0)
    dist.barrier()
    dist.destroy_process_group()
    return int(rc_t)


def _emulation() -> Optional[str]:
    if not os.environ.get("MMX_EMULATION_CLUSTER"):
        return None
    return (f"cluster {os.environ['MMX_EMULATION_CLUSTER']}, scale "
            f"{os.environ.get('MMX_EMULATION_SCALE', '?')}")


def report(m: dict[str, Any], args: argparse.Namespace, extra: dict[str, Any]) -> int:
    """Rank 0: print the summary, write YAML / JSON, run --compare. Returns the exit code."""
    for dtype, g in m["gemm"].items():
        logger.info("written %s %s: %.4f TFLOP/s at %d tokens (curve %s)", m["curve_kind"],
                    dtype, g["tflops"],
                    g["curve"][-1]["tokens"],
                    ", ".join(f"{c['tokens']}: {c['tflops']:.4f}" for c in g["curve"]))
    for label in ("intra", "inter"):
        a = m[label]
        if a:
            logger.info("%s-node (%d pairs): 2-way exchange %.3f Gbit/s each way, ping-pong "
                        "%.3f Gbit/s, latency %.1f us; written (%s) %.3f Gbit/s", label,
                        a["pairs"], a["exchange_gbps"], a["pingpong_gbps"], a["latency_us"],
                        a["mode"], a["gbps"])
    emulated = any(os.environ.get(k) for k in EMULATION_ENV)
    out = args.out
    if out is None and not emulated and not args.compare:
        out = str(DEFAULT_OUT)
    name = args.name
    if name is None:
        if emulated:
            name = f"{os.environ.get('MMX_EMULATION_CLUSTER', 'cluster')}-emulated"
        else:
            name = Path(out).stem if out else "local-cpu"
    text = cluster_yaml(m, name, args, _command(args), extra)
    if out:
        from megatron_moe_ext.perf.topology import cluster_spec_from_dict

        import yaml

        cluster_spec_from_dict(yaml.safe_load(text), source=Path(out).name)  # schema check
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text, encoding="utf-8")
        logger.info("wrote %s", out)
    else:
        print(text, end="", flush=True)
    rc = 0
    result: dict[str, Any] = {"measured": m, "cluster_name": name, "yaml": out,
                              "config": {k: v for k, v in vars(args).items()}, "extra": extra}
    if args.compare:
        scale = args.scale
        if scale is None:
            scale = float(os.environ.get("MMX_EMULATION_SCALE") or 1.0)
        rows = compare_rows(m, args.compare, scale)
        table, ok = format_compare(rows, args.compare, scale, args.tolerance)
        print(table, flush=True)
        result["compare"] = {"cluster": args.compare, "scale": scale, "rows": rows,
                             "tolerance": args.tolerance, "links_within_tolerance": ok}
        if args.strict and not ok:
            rc = 1
    result["machine"] = {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                         "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
                             timespec="seconds")}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
        logger.info("wrote %s", args.json)
    return rc


# ----------------------------------------------------------------------------------- launch


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from megatron_moe_ext.runtime.launch import run_workers

    return run_workers(worker, args.nproc, args)


if __name__ == "__main__":
    sys.exit(main())
