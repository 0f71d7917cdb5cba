"""Executor of the FasterMoE smart schedule: pipelined expert exchange, forward and backward.

Notation
--------
T      routed token copies on this rank (rows of ``tokens``), sorted by global expert
E      experts in total; expert e lives on worker e // E_l
E_l    local experts per worker (E_l = E // W)
H      hidden size of the input, H_out hidden size of the expert output
W      workers in the expert-parallel group ``group``
g      group size, n = W / g groups, steps j = 0..n-1 (see :mod:`.plan`)

Forward on one rank (comm and compute overlap; waits happen only when data is needed)::

    issue S_0                          # local group (self traffic is a plain slice)
    for j in 0..n-1:
        issue S_{j+1}                  # next ring step in flight ...
        wait S_j; C_j                  # ... while computing the tokens received at step j
        issue R_j                      # return outputs of C_j, receive own outputs of S_j
    wait R_*

Backward replays the same steps (local group first) with the data direction reversed:
``bwd_S_j`` sends grad-of-output slices to the workers that computed them, ``bwd_C_j``
runs ``torch.autograd.grad`` on the small graphs kept from ``C_j``, and ``bwd_R_j``
returns grad-of-input / grad-of-prob to the token owners. Parameter gradients are summed
over all steps and returned once, by the single autograd node of this exchange.

Message matching: every point-to-point message carries a tag ``step * 8 + kind``; on
backends that ignore tags (NCCL) both sides post each batch in the same order anyway.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from .comm_priority import exchange_in_flight
from .plan import ExchangePlan, build_plan
from .trace import Tracer

logger = logging.getLogger(__name__)

__all__ = ["smart_exchange", "ExpertFn"]

ExpertFn = Callable[[torch.Tensor, torch.Tensor, list], torch.Tensor]

# message kinds (part of the p2p tag)
_X, _P, _Y, _GY, _GX, _GP = range(6)
_KINDS_PER_STEP = 8


def _tag(step: int, kind: int) -> int:
    return step * _KINDS_PER_STEP + kind


# --------------------------------------------------------------------------- communication


@dataclass
class _CommOp:
    """A batch of async p2p ops issued together (one S_j / R_j), with its trace span."""

    name: str
    category: str
    works: list
    start: float
    tensors: list = field(default_factory=list)  # keep buffers alive until completion
    done: bool = False

    def _finish(self, tracer: Tracer | None) -> None:
        self.done = True
        self.tensors = []
        if tracer is not None:
            tracer.record(self.name, self.category, self.start, tracer.now())

    def poll(self, tracer: Tracer | None) -> None:
        """Close the span if all ops already completed (non-blocking)."""
        if not self.done and all(w.is_completed() for w in self.works):
            for w in self.works:
                w.wait()
            self._finish(tracer)

    def wait(self, tracer: Tracer | None) -> None:
        """Block (host on gloo; current stream on NCCL) until all ops completed."""
        if self.done:
            return
        for w in self.works:
            w.wait()
        self._finish(tracer)


_COMM_STREAMS: dict[torch.device, "torch.cuda.Stream"] = {}


def _comm_stream(device: torch.device) -> "torch.cuda.Stream":
    """One side stream per CUDA device for all smart-exchange communication."""
    device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    if device not in _COMM_STREAMS:
        _COMM_STREAMS[device] = torch.cuda.Stream(device)
    return _COMM_STREAMS[device]


class _Comm:
    """Issues batched isend/irecv on ``group`` (on a side stream when on CUDA)."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device, tracer: Tracer | None):
        self.group = group
        self.tracer = tracer
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._global = [dist.get_global_rank(group, r) for r in range(self.world_size)]
        self.stream = _comm_stream(device) if device.type == "cuda" else None
        self.pending: list[_CommOp] = []

    def issue(
        self,
        name: str,
        category: str,
        step: int,
        sends: list[tuple[int, torch.Tensor, int]],
        recvs: list[tuple[int, torch.Tensor, int]],
    ) -> _CommOp:
        """Post sends/recvs given as (group peer, contiguous tensor, kind)."""
        start = Tracer.now()
        ops = [
            dist.P2POp(dist.isend, t, self._global[p], self.group, _tag(step, k))
            for p, t, k in sends
        ] + [
            dist.P2POp(dist.irecv, t, self._global[p], self.group, _tag(step, k))
            for p, t, k in recvs
        ]
        tensors = [op.tensor for op in ops]
        works: list = []
        if ops:
            if self.stream is not None:
                works = self._issue_cuda(ops)
            else:
                works = dist.batch_isend_irecv(ops)
        op = _CommOp(name, category, list(works), start, tensors)
        self.pending.append(op)
        return op

    def _issue_cuda(self, ops: list) -> list:
        """Run the batch on the comm stream, ordered after the compute stream's work."""
        ready = torch.cuda.Event()
        ready.record()  # on the current (compute) stream
        self.stream.wait_event(ready)
        for op in ops:
            op.tensor.record_stream(self.stream)
        with torch.cuda.stream(self.stream):
            return dist.batch_isend_irecv(ops)

    def poll(self) -> None:
        for op in self.pending:
            op.poll(self.tracer)

    def wait_all(self) -> None:
        for op in self.pending:
            op.wait(self.tracer)
        self.pending = []


# --------------------------------------------------------------------------- helpers


@dataclass
class _ChunkGraph:
    """Graph of one expert_fn call on the chunk received from ``peer`` at some step."""

    peer: int
    x: torch.Tensor  # detached leaf, requires grad
    p: torch.Tensor  # detached leaf, requires grad
    y: torch.Tensor  # expert_fn output


@dataclass
class _Config:
    plan: ExchangePlan
    expert_fn: ExpertFn
    group: dist.ProcessGroup
    tracer: Tracer | None
    build_graph: bool


def _self_slice(plan: ExchangePlan, step: int) -> tuple[int, int] | None:
    """(offset, length) of this rank's tokens for its own experts, if at this step."""
    for s in plan.steps[step].sends:
        if s.peer == plan.rank:
            return s.offset, s.length
    return None


def _span(tracer: Tracer | None, name: str):
    if tracer is None:
        from contextlib import nullcontext

        return nullcontext()
    return tracer.span(name, "compute")


def _probe_output(expert_fn: ExpertFn, tokens: torch.Tensor, probs: torch.Tensor, e_l: int):
    """H_out and dtype of expert outputs, from an empty call (when this rank computes nothing)."""
    with torch.no_grad():
        y = expert_fn(tokens[:0], probs[:0], [0] * e_l)
    return y.shape[-1], y.dtype


def _add(acc: torch.Tensor | None, g: torch.Tensor | None) -> torch.Tensor | None:
    if g is None:
        return acc
    return g if acc is None else acc + g


# --------------------------------------------------------------------------- forward


def _forward(cfg: _Config, tokens: torch.Tensor, probs: torch.Tensor):
    """Run the pipelined forward; return (output [T, H_out], graphs per step)."""
    plan, tracer, rank = cfg.plan, cfg.tracer, cfg.plan.rank
    comm = _Comm(cfg.group, tokens.device, tracer)
    num_tokens, hidden = tokens.shape
    graphs: list[list[_ChunkGraph]] = [[] for _ in plan.steps]
    out: torch.Tensor | None = None

    def issue_s(j: int):
        step = plan.steps[j]
        sends, recvs, chunks = [], [], []
        for s in step.remote_sends:
            sl = slice(s.offset, s.offset + s.length)
            sends += [(s.peer, tokens[sl], _X), (s.peer, probs[sl], _P)]
        self_sl = _self_slice(plan, j)
        for r in step.recvs:
            if r.peer == rank:
                off, length = self_sl
                chunks.append((r, tokens[off:off + length], probs[off:off + length]))
                continue
            x = tokens.new_empty((r.length, hidden))
            p = probs.new_empty((r.length,))
            recvs += [(r.peer, x, _X), (r.peer, p, _P)]
            chunks.append((r, x, p))
        return comm.issue(f"S{j}", "send", j, sends, recvs), chunks

    def compute(j: int, chunks) -> list[tuple[int, torch.Tensor]]:
        outputs = []
        with _span(tracer, f"C{j}"):
            for r, x, p in chunks:
                counts = list(r.expert_counts)
                if cfg.build_graph:
                    with torch.enable_grad():
                        xl = x.detach().requires_grad_(True)
                        pl = p.detach().requires_grad_(True)
                        y = cfg.expert_fn(xl, pl, counts)
                    graphs[j].append(_ChunkGraph(r.peer, xl, pl, y))
                else:
                    y = cfg.expert_fn(x, p, counts)
                if y.dim() != 2 or y.shape[0] != r.length:
                    raise RuntimeError(
                        f"expert_fn returned shape {tuple(y.shape)} for {r.length} tokens; "
                        "expected [t, H_out]"
                    )
                outputs.append((r.peer, y.detach()))
        return outputs

    def issue_r(j: int, outputs: list[tuple[int, torch.Tensor]]) -> None:
        nonlocal out
        if out is None:
            h_out, dtype = (
                (outputs[0][1].shape[1], outputs[0][1].dtype)
                if outputs else _probe_output(cfg.expert_fn, tokens, probs, plan.num_local_experts)
            )
            out = tokens.new_empty((num_tokens, h_out), dtype=dtype)
        sends = []
        for peer, y in outputs:
            if peer == rank:
                off, length = _self_slice(plan, j)
                out[off:off + length].copy_(y)
            else:
                sends.append((peer, y.contiguous(), _Y))
        recvs = [(s.peer, out[s.offset:s.offset + s.length], _Y) for s in plan.steps[j].remote_sends]
        comm.issue(f"R{j}", "return", j, sends, recvs)

    n = len(plan.steps)
    pending_s = issue_s(0)
    for j in range(n):
        nxt = issue_s(j + 1) if j + 1 < n else None
        op, chunks = pending_s
        op.wait(tracer)
        outputs = compute(j, chunks)
        issue_r(j, outputs)
        comm.poll()
        pending_s = nxt
    comm.wait_all()
    if out is None:  # n == 0 cannot happen; keeps type checkers quiet
        raise RuntimeError("smart_exchange produced no output buffer")
    return out, graphs


# --------------------------------------------------------------------------- backward


def _backward(cfg: _Config, graphs: list[list[_ChunkGraph]], grad_out: torch.Tensor,
              tokens_like: torch.Tensor, probs_like: torch.Tensor,
              params: Sequence[torch.Tensor]):
    """Pipelined backward; return (grad_tokens, grad_probs, param grads)."""
    plan, tracer, rank = cfg.plan, cfg.tracer, cfg.plan.rank
    comm = _Comm(cfg.group, grad_out.device, tracer)
    grad_out = grad_out.contiguous()
    grad_x = torch.zeros_like(tokens_like)
    grad_p = torch.zeros_like(probs_like)
    diff_idx = [i for i, t in enumerate(params) if t.requires_grad]
    diff_params = [params[i] for i in diff_idx]
    param_grads: list[torch.Tensor | None] = [None] * len(diff_params)
    h_out = grad_out.shape[1]

    def issue_s(j: int):
        sends = [(s.peer, grad_out[s.offset:s.offset + s.length], _GY)
                 for s in plan.steps[j].remote_sends]
        recvs, gys = [], []
        for gr in graphs[j]:
            if gr.peer == rank:
                off, length = _self_slice(plan, j)
                gys.append(grad_out[off:off + length])
                continue
            buf = grad_out.new_empty((gr.x.shape[0], h_out))
            recvs.append((gr.peer, buf, _GY))
            gys.append(buf)
        return comm.issue(f"bwd_S{j}", "send", j, sends, recvs), gys

    def compute(j: int, gys: list[torch.Tensor]):
        results = []
        with _span(tracer, f"bwd_C{j}"):
            for gr, gy in zip(graphs[j], gys):
                grads = torch.autograd.grad(
                    gr.y, [gr.x, gr.p, *diff_params], gy, allow_unused=True
                )
                gx = grads[0] if grads[0] is not None else torch.zeros_like(gr.x)
                gp = grads[1] if grads[1] is not None else torch.zeros_like(gr.p)
                for i, g in enumerate(grads[2:]):
                    param_grads[i] = _add(param_grads[i], g)
                results.append((gr.peer, gx, gp))
        graphs[j] = []  # free this step's graph
        return results

    def issue_r(j: int, results) -> None:
        sends = []
        for peer, gx, gp in results:
            if peer == rank:
                off, length = _self_slice(plan, j)
                grad_x[off:off + length].copy_(gx)
                grad_p[off:off + length].copy_(gp)
            else:
                sends += [(peer, gx.contiguous(), _GX), (peer, gp.contiguous(), _GP)]
        recvs = []
        for s in plan.steps[j].remote_sends:
            sl = slice(s.offset, s.offset + s.length)
            recvs += [(s.peer, grad_x[sl], _GX), (s.peer, grad_p[sl], _GP)]
        comm.issue(f"bwd_R{j}", "return", j, sends, recvs)

    n = len(plan.steps)
    pending_s = issue_s(0)
    for j in range(n):
        nxt = issue_s(j + 1) if j + 1 < n else None
        op, gys = pending_s
        op.wait(tracer)
        issue_r(j, compute(j, gys))
        comm.poll()
        pending_s = nxt
    comm.wait_all()

    full: list[torch.Tensor | None] = [None] * len(params)
    for i, g in zip(diff_idx, param_grads):
        # Always hand back a tensor so that every parameter's grad hook fires exactly once.
        full[i] = g if g is not None else torch.zeros_like(params[i])
    return grad_x, grad_p, full


# --------------------------------------------------------------------------- autograd glue


class _SmartExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg: _Config, tokens: torch.Tensor, probs: torch.Tensor, *params):
        with exchange_in_flight():  # gradient reductions wait (train.comm_priority)
            out, graphs = _forward(cfg, tokens, probs)
        ctx.cfg = cfg
        ctx.graphs = graphs
        ctx.params = params
        ctx.tokens_meta = (tokens.shape, tokens.dtype, tokens.device)
        ctx.probs_meta = (probs.shape, probs.dtype, probs.device)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        cfg = ctx.cfg
        shape, dtype, device = ctx.tokens_meta
        tokens_like = torch.empty(shape, dtype=dtype, device=device)
        shape, dtype, device = ctx.probs_meta
        probs_like = torch.empty(shape, dtype=dtype, device=device)
        with exchange_in_flight():
            gx, gp, gparams = _backward(cfg, ctx.graphs, grad_out, tokens_like, probs_like, ctx.params)
        ctx.graphs = None
        ctx.params = None
        needs = ctx.needs_input_grad
        return (None, gx if needs[1] else None, gp if needs[2] else None, *gparams)


def _validate(tokens: torch.Tensor, probs: torch.Tensor, counts: torch.Tensor,
              rank: int, world_size: int) -> list[list[int]]:
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [T, H], got shape {tuple(tokens.shape)}")
    if probs.dim() != 1 or probs.shape[0] != tokens.shape[0]:
        raise ValueError(f"probs must be [T={tokens.shape[0]}], got shape {tuple(probs.shape)}")
    if counts.dim() != 2 or counts.shape[0] != world_size or counts.shape[1] % world_size:
        raise ValueError(
            f"counts must be [W={world_size}, E] with E a multiple of W, got {tuple(counts.shape)}"
        )
    rows = counts.detach().to("cpu", torch.int64).tolist()
    if sum(rows[rank]) != tokens.shape[0]:
        raise ValueError(
            f"counts[{rank}] sums to {sum(rows[rank])} but this rank holds {tokens.shape[0]} tokens"
        )
    return rows


def smart_exchange(
    tokens: torch.Tensor,
    probs: torch.Tensor,
    counts: torch.Tensor,
    expert_fn: ExpertFn,
    params: Sequence[torch.Tensor],
    group: dist.ProcessGroup,
    group_size: int,
    group_order: Sequence[int] | None = None,
    tracer: Tracer | None = None,
) -> torch.Tensor:
    """Dispatch tokens to their experts, compute, and combine, with the smart schedule.

    Args:
        tokens: [T, H] routed token copies of this rank, sorted by global expert.
        probs: [T] routing probability of each copy (may differ in dtype from tokens).
        counts: [W, E] int tensor, counts[s, e] = tokens worker s sends to expert e
            (all-gathered, identical on every rank).
        expert_fn: ``expert_fn(x [t, H], p [t], tokens_per_local_expert) -> y [t, H_out]``;
            x is sorted by local expert; must only use the tensors in ``params``
            (plus constants) and must accept empty inputs.
        params: the expert parameters used by ``expert_fn``; their gradients are returned
            once per backward, summed over all steps (zeros when unused).
        group: expert-parallel process group (required, never defaults to the world).
        group_size: g (``moe.fastermoe.group_size``), must divide W.
        group_order: optional permutation of group ranks; group members are consecutive.
        tracer: optional :class:`Tracer` recording S/C/R spans of forward and backward.

    Returns:
        [T, H_out]: row i is the expert output for input row i.
    """
    if group is None:
        raise ValueError("smart_exchange needs an explicit expert-parallel process group")
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    rows = _validate(tokens, probs, counts, rank, world_size)
    plan = build_plan(rows, rank, world_size, group_size, group_order)
    params = tuple(params)
    build_graph = torch.is_grad_enabled() and any(
        t.requires_grad for t in (tokens, probs, *params)
    )
    logger.debug(
        "rank %d smart_exchange: T=%d, n=%d steps, sent/step=%s, recv/step=%s",
        rank, tokens.shape[0], len(plan.steps),
        plan.tokens_sent_per_step(), plan.tokens_received_per_step(),
    )
    cfg = _Config(plan, expert_fn, group, tracer, build_graph)
    return _SmartExchange.apply(cfg, tokens.contiguous(), probs.contiguous(), *params)
