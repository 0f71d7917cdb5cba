"""Executor of the FasterMoE smart schedule: pipelined expert exchange, forward and backward.

Notation
--------
T      routed token copies on this rank (rows of ``tokens``), sorted by global expert
E      experts in total; expert e lives on worker e // E_l
E_l    local experts per worker (E_l = E // W)
H      hidden size of the input, H_out hidden size of the expert output
W      workers in the expert-parallel group ``group``
g      group size, n = W / g groups, steps j = 0..n-1 (see :mod:`.plan`)

S      shadowed expert ids (computed locally by every rank, see :class:`Shadows`)

Forward on one rank (comm and compute overlap; waits happen only when data is needed)::

    issue S_0                          # local group (self traffic is a plain slice)
    for j in 0..n-1:
        issue S_{j+1}                  # next ring step in flight ...
        if j == 0: C_shadow            # own tokens of the shadowed experts, while S_0/S_1 fly
        wait S_j; C_j                  # ... while computing the tokens received at step j
        issue R_j                      # return outputs of C_j, receive own outputs of S_j
    wait R_*

(the issue order S_0, S_1, R_0, S_2, R_1, ... is :func:`.plan.pipeline_order`, which the
performance model prices too).

One driver (:func:`_run_pipeline`) runs this loop for forward and backward; each direction
supplies its issue_s / compute / issue_r. The shadow chunks are addressed by offset in the
expert-sorted ``tokens`` (:attr:`ExchangePlan.shadow_chunks`) and write their outputs straight
into the output buffer: no split or merge copies of the token tensor.

Backward replays the same steps (local group first) with the data direction reversed:
``bwd_S_j`` sends grad-of-output slices to the workers that computed them, ``bwd_C_j``
runs ``torch.autograd.grad`` on the small graphs kept from ``C_j``, and ``bwd_R_j``
returns grad-of-input / grad-of-prob to the token owners; the shadow chunks' backward runs
at step 0 too. Parameter gradients (and the shadow weights' gradients) are summed over all
steps and returned once, by the single autograd node of this exchange.

Message matching: see :mod:`.comm` (a tag per step, kind and part; more than one part when a
shadowed expert splits a peer's slice).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from .comm import P2PComm as _Comm
from .comm_priority import exchange_in_flight
from .plan import ExchangePlan, RecvChunk, SendSlice, ShadowChunk, build_plan, pipeline_order
from .trace import Tracer

logger = logging.getLogger(__name__)

__all__ = ["smart_exchange", "ExpertFn", "ShadowFn", "Shadows"]

ExpertFn = Callable[[torch.Tensor, torch.Tensor, list], torch.Tensor]
ShadowFn = Callable[[int, torch.Tensor, torch.Tensor, Sequence[torch.Tensor]], torch.Tensor]

# message kinds (part of the p2p tag, see :func:`.comm.tag`)
_X, _P, _Y, _GY, _GX, _GP = range(6)


# --------------------------------------------------------------------------- helpers


@dataclass
class _ChunkGraph:
    """Graph of one expert_fn call on the chunk received from ``peer`` at some step."""

    peer: int
    x: torch.Tensor  # detached leaf, requires grad
    p: torch.Tensor  # detached leaf, requires grad
    y: torch.Tensor  # expert_fn output


@dataclass
class _ShadowGraph:
    """Graph of one shadow_fn call on this rank's own tokens for a shadowed expert."""

    chunk: ShadowChunk
    x: torch.Tensor  # detached leaf
    p: torch.Tensor  # detached leaf
    weights: list[torch.Tensor]  # detached leaves standing for the broadcast weights
    y: torch.Tensor


@dataclass(frozen=True)
class Shadows:
    """Shadowed experts of one exchange: ids, their broadcast weights and the function.

    ``fn(expert, x [t, H], p [t], weights) -> y [t, H_out]`` computes expert ``expert`` on
    this rank's own tokens with ``weights`` (this rank's replicas, e.g. the outputs of
    :func:`megatron_moe_ext.core.shadow.broadcast_from_owners`); it must accept empty inputs.
    The executor computes these chunks at step 0, while the first sends are in flight, and
    returns the weights' gradients from its backward (so a broadcast's backward can reduce
    them to the owner). ``ready()``, if given, is called before the first shadow chunk is
    computed (e.g. to wait for weights whose broadcast is still in flight).
    """

    weights: Mapping[int, Sequence[torch.Tensor]]
    fn: ShadowFn
    ready: Optional[Callable[[], Any]] = None

    @property
    def experts(self) -> tuple[int, ...]:
        return tuple(sorted(self.weights))

    def flat_weights(self) -> list[torch.Tensor]:
        return [w for e in self.experts for w in self.weights[e]]


@dataclass
class _Config:
    plan: ExchangePlan
    expert_fn: ExpertFn
    group: dist.ProcessGroup
    tracer: Tracer | None
    build_graph: bool
    shadow_fn: ShadowFn | None = None
    shadow_ready: Callable[[], Any] | None = None
    num_params: int = 0  # expert params among the autograd inputs; shadow weights follow


def _parts(slices: Sequence[SendSlice]) -> list[tuple[SendSlice, int]]:
    """Each slice with its message index among the slices to the same peer (the tag part)."""
    seen: dict[int, int] = {}
    out = []
    for s in slices:
        out.append((s, seen.get(s.peer, 0)))
        seen[s.peer] = seen.get(s.peer, 0) + 1
    return out


def _row_splits(t: torch.Tensor, lengths: Sequence[int]) -> list[torch.Tensor]:
    """Views of consecutive row blocks of ``t`` with the given lengths."""
    return list(torch.split(t, list(lengths))) if len(lengths) > 1 else [t]


def _self_slices(plan: ExchangePlan, step: int) -> list[SendSlice]:
    """The slices of this rank's tokens for its own experts at this step (in order)."""
    return [s for s in plan.steps[step].sends if s.peer == plan.rank]


def _gather_rows(t: torch.Tensor, slices: Sequence[SendSlice]) -> torch.Tensor:
    """Rows of ``t`` at ``slices``: a view for one slice, a concatenation for several."""
    views = [t[s.offset:s.offset + s.length] for s in slices]
    return views[0] if len(views) == 1 else torch.cat(views)


def _scatter_rows(dst: torch.Tensor, slices: Sequence[SendSlice], src: torch.Tensor) -> None:
    """Inverse of :func:`_gather_rows`: copy ``src`` rows into ``dst`` at ``slices``."""
    for s, part in zip(slices, _row_splits(src, [s.length for s in slices])):
        dst[s.offset:s.offset + s.length].copy_(part)


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


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


def _check_rows(y: torch.Tensor, rows: int, what: str) -> None:
    if y.dim() != 2 or y.shape[0] != rows:
        raise RuntimeError(f"{what} returned shape {tuple(y.shape)} for {rows} tokens; "
                           "expected [t, H_out]")


# --------------------------------------------------------------------------- pipeline driver


def _run_pipeline(comm: _Comm, num_steps: int, issue_s: Callable, compute: Callable,
                  issue_r: Callable, local: Callable[[], None] | None = None) -> None:
    """The one schedule loop of forward and backward: walks :func:`.plan.pipeline_order`.

    ``issue_s(j) -> (op, data)`` posts step j's sends / receives, ``compute(j, data)`` runs
    C_j once S_j arrived, ``issue_r(j, results)`` posts the returns of step j (so an R in
    the order is: wait S_j, C_j, post R_j). S_{j+1} is in flight while C_j runs; ``local()``
    (the shadow chunks) runs before the first compute, after S_0 and S_1 were posted.
    Returns once every posted message completed.
    """
    pending: dict[int, Any] = {}
    for kind, j in pipeline_order(num_steps):
        if kind == "S":
            pending[j] = issue_s(j)
            continue
        if j == 0 and local is not None:
            local()
        op, data = pending.pop(j)
        op.wait(comm.tracer)
        issue_r(j, compute(j, data))
        comm.poll()
    comm.wait_all()


# --------------------------------------------------------------------------- forward


def _forward(cfg: _Config, tokens: torch.Tensor, probs: torch.Tensor,
             shadow_weights: Sequence[torch.Tensor]):
    """Run the pipelined forward; return (output [T, H_out], graphs per step, shadow graphs)."""
    plan, tracer, rank = cfg.plan, cfg.tracer, cfg.plan.rank
    comm = _Comm(cfg.group, tokens.device, tracer)
    num_tokens, hidden = tokens.shape
    graphs: list[list[_ChunkGraph]] = [[] for _ in plan.steps]
    shadow_graphs: list[_ShadowGraph] = []
    out: torch.Tensor | None = None

    def alloc_out(h_out: int, dtype: torch.dtype) -> torch.Tensor:
        nonlocal out
        if out is None:
            out = tokens.new_empty((num_tokens, h_out), dtype=dtype)
        return out

    def issue_s(j: int):
        step = plan.steps[j]
        sends, recvs, chunks = [], [], []
        for s, part in _parts(step.remote_sends):
            sl = slice(s.offset, s.offset + s.length)
            sends += [(s.peer, tokens[sl], _X, part), (s.peer, probs[sl], _P, part)]
        for r in step.recvs:
            if r.peer == rank:
                own = _self_slices(plan, j)
                chunks.append((r, _gather_rows(tokens, own), _gather_rows(probs, own)))
                continue
            x = tokens.new_empty((r.length, hidden))
            p = probs.new_empty((r.length,))
            for part, (xv, pv) in enumerate(zip(_row_splits(x, r.run_lengths),
                                                _row_splits(p, r.run_lengths))):
                recvs += [(r.peer, xv, _X, part), (r.peer, pv, _P, part)]
            chunks.append((r, x, p))
        return comm.issue(f"S{j}", "send", j, sends, recvs), chunks

    weights = {}  # shadowed expert -> its weights (leaves when building a graph)
    n_w = len(shadow_weights) // max(1, len(plan.shadow_chunks))
    for i, c in enumerate(plan.shadow_chunks):
        ws = list(shadow_weights[i * n_w:(i + 1) * n_w])
        weights[c.expert] = [_leaf(w) for w in ws] if cfg.build_graph else ws

    def shadow_chunks() -> None:
        if cfg.shadow_ready is not None:
            with _span(tracer, "C0_shadow_wait"):
                cfg.shadow_ready()
        with _span(tracer, "C0_shadow"):
            for c in plan.shadow_chunks:
                x = tokens[c.offset:c.offset + c.length]
                p = probs[c.offset:c.offset + c.length]
                if cfg.build_graph:
                    with torch.enable_grad():
                        xl, pl = _leaf(x), _leaf(p)
                        y = cfg.shadow_fn(c.expert, xl, pl, weights[c.expert])
                    shadow_graphs.append(_ShadowGraph(c, xl, pl, weights[c.expert], y))
                else:
                    y = cfg.shadow_fn(c.expert, x, p, weights[c.expert])
                _check_rows(y, c.length, "shadow_fn")
                alloc_out(y.shape[1], y.dtype)[c.offset:c.offset + c.length].copy_(y.detach())

    def compute(j: int, chunks) -> list[tuple[int, torch.Tensor]]:
        outputs = []
        with _span(tracer, f"C{j}"):
            for r, x, p in chunks:
                counts = list(r.expert_counts)
                if cfg.build_graph:
                    with torch.enable_grad():
                        xl, pl = _leaf(x), _leaf(p)
                        y = cfg.expert_fn(xl, pl, counts)
                    graphs[j].append(_ChunkGraph(r.peer, xl, pl, y))
                else:
                    y = cfg.expert_fn(x, p, counts)
                _check_rows(y, r.length, "expert_fn")
                outputs.append((r, y.detach()))
        return outputs

    def issue_r(j: int, outputs: list[tuple[RecvChunk, torch.Tensor]]) -> None:
        if out is None:
            h_out, dtype = (
                (outputs[0][1].shape[1], outputs[0][1].dtype)
                if outputs else _probe_output(cfg.expert_fn, tokens, probs, plan.num_local_experts)
            )
            alloc_out(h_out, dtype)
        sends = []
        for r, y in outputs:
            if r.peer == rank:
                _scatter_rows(out, _self_slices(plan, j), y)
                continue
            y = y.contiguous()
            sends += [(r.peer, v, _Y, part)
                      for part, v in enumerate(_row_splits(y, r.run_lengths))]
        recvs = [(s.peer, out[s.offset:s.offset + s.length], _Y, part)
                 for s, part in _parts(plan.steps[j].remote_sends)]
        comm.issue(f"R{j}", "return", j, sends, recvs)

    local = shadow_chunks if plan.shadow_chunks else None
    _run_pipeline(comm, len(plan.steps), issue_s, compute, issue_r, local)
    if out is None:  # n == 0 cannot happen; keeps type checkers quiet
        raise RuntimeError("smart_exchange produced no output buffer")
    return out, graphs, shadow_graphs


# --------------------------------------------------------------------------- backward


def _backward(cfg: _Config, graphs: list[list[_ChunkGraph]], shadow_graphs: list[_ShadowGraph],
              grad_out: torch.Tensor, tokens_like: torch.Tensor, probs_like: torch.Tensor,
              params: Sequence[torch.Tensor], shadow_weights: Sequence[torch.Tensor]):
    """Pipelined backward; return (grad_tokens, grad_probs, param grads, shadow weight grads)."""
    plan, tracer, rank = cfg.plan, cfg.tracer, cfg.plan.rank
    comm = _Comm(cfg.group, grad_out.device, tracer)
    grad_out = grad_out.contiguous()
    grad_x = torch.zeros_like(tokens_like)
    grad_p = torch.zeros_like(probs_like)
    diff_idx = [i for i, t in enumerate(params) if t.requires_grad]
    diff_params = [params[i] for i in diff_idx]
    param_grads: list[torch.Tensor | None] = [None] * len(diff_params)
    shadow_grads: list[torch.Tensor | None] = []
    h_out = grad_out.shape[1]

    def issue_s(j: int):
        sends = [(s.peer, grad_out[s.offset:s.offset + s.length], _GY, part)
                 for s, part in _parts(plan.steps[j].remote_sends)]
        recvs, gys = [], []
        for gr, r in zip(graphs[j], plan.steps[j].recvs):
            if gr.peer == rank:
                gys.append(_gather_rows(grad_out, _self_slices(plan, j)))
                continue
            buf = grad_out.new_empty((gr.x.shape[0], h_out))
            recvs += [(gr.peer, v, _GY, part)
                      for part, v in enumerate(_row_splits(buf, r.run_lengths))]
            gys.append(buf)
        return comm.issue(f"bwd_S{j}", "send", j, sends, recvs), gys

    def shadow_chunks() -> None:
        with _span(tracer, "bwd_C0_shadow"):
            for gr in shadow_graphs:
                c = gr.chunk
                sl = slice(c.offset, c.offset + c.length)
                grads = torch.autograd.grad(gr.y, [gr.x, gr.p, *gr.weights], grad_out[sl],
                                            allow_unused=True)
                if grads[0] is not None:
                    grad_x[sl].copy_(grads[0])
                if grads[1] is not None:
                    grad_p[sl].copy_(grads[1])
                shadow_grads.extend(grads[2:])
        shadow_graphs.clear()

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
        remote = iter(plan.steps[j].remote_recvs)
        for peer, gx, gp in results:
            if peer == rank:
                own = _self_slices(plan, j)
                _scatter_rows(grad_x, own, gx)
                _scatter_rows(grad_p, own, gp)
                continue
            lengths = next(remote).run_lengths
            for part, (xv, pv) in enumerate(zip(_row_splits(gx.contiguous(), lengths),
                                                _row_splits(gp.contiguous(), lengths))):
                sends += [(peer, xv, _GX, part), (peer, pv, _GP, part)]
        recvs = []
        for s, part in _parts(plan.steps[j].remote_sends):
            sl = slice(s.offset, s.offset + s.length)
            recvs += [(s.peer, grad_x[sl], _GX, part), (s.peer, grad_p[sl], _GP, part)]
        comm.issue(f"bwd_R{j}", "return", j, sends, recvs)

    local = shadow_chunks if shadow_graphs else None
    _run_pipeline(comm, len(plan.steps), issue_s, compute, issue_r, local)

    full: list[torch.Tensor | None] = [None] * len(params)
    for i, g in zip(diff_idx, param_grads):
        # Always hand back a tensor so that every parameter's grad hook fires exactly once.
        full[i] = g if g is not None else torch.zeros_like(params[i])
    if not shadow_grads:
        shadow_grads = [None] * len(shadow_weights)
    shadow_full = [g if g is not None else torch.zeros_like(w)
                   for g, w in zip(shadow_grads, shadow_weights)]
    return grad_x, grad_p, full, shadow_full


# --------------------------------------------------------------------------- autograd glue


class _SmartExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg: _Config, tokens: torch.Tensor, probs: torch.Tensor, *tensors):
        params, shadow_weights = tensors[:cfg.num_params], tensors[cfg.num_params:]
        with exchange_in_flight():  # gradient reductions wait (train.comm_priority)
            out, graphs, shadow_graphs = _forward(cfg, tokens, probs, shadow_weights)
        ctx.cfg = cfg
        ctx.graphs = graphs
        ctx.shadow_graphs = shadow_graphs
        ctx.params = params
        ctx.shadow_weights = shadow_weights
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
            gx, gp, gparams, gshadow = _backward(cfg, ctx.graphs, ctx.shadow_graphs, grad_out,
                                                 tokens_like, probs_like, ctx.params,
                                                 ctx.shadow_weights)
        ctx.graphs = ctx.shadow_graphs = ctx.params = ctx.shadow_weights = None
        needs = ctx.needs_input_grad
        return (None, gx if needs[1] else None, gp if needs[2] else None, *gparams, *gshadow)


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
    shadows: Shadows | None = None,
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
        shadows: optional shadowed experts (the same ids on every rank): this rank's tokens
            for them are computed locally at step 0 with ``shadows.fn`` and the given
            weights, and are not exchanged. ``params`` should then leave out the owners'
            parameters of those experts (they get no gradient here).

    Returns:
        [T, H_out]: row i is the expert output for input row i.
    """
    if group is None:
        raise ValueError("smart_exchange needs an explicit expert-parallel process group")
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    rows = _validate(tokens, probs, counts, rank, world_size)
    experts = shadows.experts if shadows is not None else ()
    plan = build_plan(rows, rank, world_size, group_size, group_order, shadows=experts)
    params = tuple(params)
    weights = tuple(shadows.flat_weights()) if shadows is not None else ()
    build_graph = torch.is_grad_enabled() and any(
        t.requires_grad for t in (tokens, probs, *params, *weights)
    )
    logger.debug(
        "rank %d smart_exchange: T=%d, n=%d steps, sent/step=%s, recv/step=%s",
        rank, tokens.shape[0], len(plan.steps),
        plan.tokens_sent_per_step(), plan.tokens_received_per_step(),
    )
    cfg = _Config(plan, expert_fn, group, tracer, build_graph,
                  shadow_fn=shadows.fn if shadows is not None else None,
                  shadow_ready=shadows.ready if shadows is not None else None,
                  num_params=len(params))
    return _SmartExchange.apply(cfg, tokens.contiguous(), probs.contiguous(), *params, *weights)
