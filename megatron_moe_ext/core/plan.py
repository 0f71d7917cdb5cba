"""Exchange plan of the FasterMoE smart schedule (pure Python, no process group).

Notation
--------
T    tokens (routed token copies) held by this rank, sorted by global expert
E    experts in total, laid out contiguously: expert e lives on worker e // E_l
E_l  local experts per worker, E_l = E // W
H    hidden size
W    workers in the expert-parallel group (ranks 0..W-1 of that group)
g    group size (``moe.fastermoe.group_size``), must divide W
n    number of groups, n = W / g

``counts[s, e]`` is the number of tokens worker ``s`` sends to global expert ``e``
(a [W, E] integer matrix, identical on every rank after an all-gather).

Groups follow ``group_order`` (a permutation of ranks in which the members of a
group are consecutive): group k = group_order[k*g:(k+1)*g]. The groups form a
ring; at step j (0 <= j < n) group i sends input tokens to group (i - j) mod n
and receives from group (i + j) mod n. Step 0 is the local group (self
included). Outputs computed at step j go back along the same pairs, reversed.

Peers that exchange zero tokens are skipped. Both sides derive this from the
same ``counts`` matrix, so skipping is always consistent.

Shadowed experts S (``shadows``): every worker computes its *own* tokens for e in S
locally, as the local chunks of step 0 (:attr:`ExchangePlan.shadow_chunks`, addressed
by offset in the expert-sorted token tensor); they are never sent. The exchange routes
the rest, i.e. ``counts`` with the columns of S zeroed. When a shadowed expert sits
among a peer's experts, the tokens for that peer are no longer one contiguous slice:
the plan then lists one :class:`SendSlice` per maximal run of non-shadowed experts (in
order), and the receiving :class:`RecvChunk` records the run lengths (``runs``), so both
sides post one message per run and no tokens are copied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

__all__ = [
    "SendSlice",
    "RecvChunk",
    "ShadowChunk",
    "ExchangeStep",
    "ExchangePlan",
    "build_plan",
    "make_groups",
    "ring_groups",
    "step_matrix",
    "validate_group_size",
    "pipeline_order",
    "PipelineOp",
    "counts_to_lists",
]

GROUP_SIZE_KEY = "moe.fastermoe.group_size"


class SendSlice(NamedTuple):
    """Contiguous slice ``tokens[offset:offset+length]`` sent to ``peer``'s experts."""

    peer: int
    offset: int
    length: int


class RecvChunk(NamedTuple):
    """Tokens received from ``peer`` for this rank's local experts (sorted by local expert)."""

    peer: int
    length: int
    expert_counts: tuple[int, ...]  # [E_l] tokens per local expert inside the chunk
    runs: tuple[int, ...] = ()
    """Lengths of the messages the chunk arrives in, in order, when it is more than one
    (a shadowed expert splits the sender's slice); () means one message of ``length``."""

    @property
    def run_lengths(self) -> tuple[int, ...]:
        """Lengths of the messages of this chunk, in order (always at least one)."""
        return self.runs or (self.length,)


class ShadowChunk(NamedTuple):
    """This rank's own tokens ``tokens[offset:offset+length]`` for shadowed expert ``expert``,
    computed locally at step 0 with the expert's broadcast weights (listed even when empty)."""

    expert: int
    offset: int
    length: int


@dataclass(frozen=True)
class ExchangeStep:
    """One step j of the ring: what this rank sends to and receives from whom."""

    index: int
    send_group: int  # group index receiving this rank's tokens at this step, (i - j) mod n
    recv_group: int  # group index whose tokens this rank computes at this step, (i + j) mod n
    rank: int
    sends: tuple[SendSlice, ...]
    recvs: tuple[RecvChunk, ...]

    @property
    def tokens_sent(self) -> int:
        """Tokens leaving this rank's input at this step (self traffic included)."""
        return sum(s.length for s in self.sends)

    @property
    def tokens_received(self) -> int:
        """Tokens this rank computes at this step (self traffic included)."""
        return sum(r.length for r in self.recvs)

    @property
    def remote_tokens_sent(self) -> int:
        """Tokens that actually cross the network at this step (self excluded)."""
        return sum(s.length for s in self.sends if s.peer != self.rank)

    @property
    def remote_tokens_received(self) -> int:
        """Tokens received over the network at this step (self excluded)."""
        return sum(r.length for r in self.recvs if r.peer != self.rank)

    @property
    def remote_sends(self) -> tuple[SendSlice, ...]:
        return tuple(s for s in self.sends if s.peer != self.rank)

    @property
    def remote_recvs(self) -> tuple[RecvChunk, ...]:
        return tuple(r for r in self.recvs if r.peer != self.rank)


@dataclass(frozen=True)
class ExchangePlan:
    """The full smart-schedule plan of one rank for one MoE layer invocation."""

    rank: int
    world_size: int
    group_size: int
    num_local_experts: int
    groups: tuple[tuple[int, ...], ...]
    steps: tuple[ExchangeStep, ...]
    num_input_tokens: int  # T = sum(counts[rank, :])
    shadow_chunks: tuple[ShadowChunk, ...] = ()
    """Local chunks of step 0: this rank's tokens for each shadowed expert (ascending ids)."""

    @property
    def shadows(self) -> tuple[int, ...]:
        """Shadowed expert ids (ascending)."""
        return tuple(c.expert for c in self.shadow_chunks)

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def num_compute_tokens(self) -> int:
        """Tokens this rank's experts process, summed over steps (B_w in the paper); the
        shadow chunks are not included (see :attr:`num_shadow_tokens`)."""
        return sum(step.tokens_received for step in self.steps)

    @property
    def num_shadow_tokens(self) -> int:
        """Tokens this rank computes locally for shadowed experts (at step 0)."""
        return sum(c.length for c in self.shadow_chunks)

    def tokens_sent_per_step(self, remote_only: bool = False) -> list[int]:
        """Tokens sent at each step (input direction; outputs return the same amounts)."""
        if remote_only:
            return [s.remote_tokens_sent for s in self.steps]
        return [s.tokens_sent for s in self.steps]

    def tokens_received_per_step(self, remote_only: bool = False) -> list[int]:
        """Tokens received (= computed) at each step."""
        if remote_only:
            return [s.remote_tokens_received for s in self.steps]
        return [s.tokens_received for s in self.steps]


def validate_group_size(world_size: int, group_size: int) -> int:
    """Check that ``group_size`` divides ``world_size``; return the number of groups n.

    The one wording of this error, for the config's world check and for the layer."""
    if world_size < 1:
        raise ValueError(f"expert-parallel world size must be >= 1, got {world_size}")
    if not isinstance(group_size, int) or group_size < 1 or world_size % group_size != 0:
        raise ValueError(
            f"{GROUP_SIZE_KEY}={group_size!r} must divide parallel.expert={world_size} "
            "(the expert-parallel size; a positive integer)"
        )
    return world_size // group_size


def make_groups(
    world_size: int, group_size: int, group_order: Sequence[int] | None = None
) -> tuple[tuple[int, ...], ...]:
    """Split ranks into n = W / g groups of consecutive entries of ``group_order``."""
    n = validate_group_size(world_size, group_size)
    order = list(range(world_size)) if group_order is None else [int(r) for r in group_order]
    if sorted(order) != list(range(world_size)):
        raise ValueError(
            f"group_order must be a permutation of range({world_size}), got {list(order)}"
        )
    return tuple(tuple(order[k * group_size : (k + 1) * group_size]) for k in range(n))


def ring_groups(group_index: int, num_groups: int) -> list[tuple[int, int]]:
    """(send_group, recv_group) of group ``group_index`` at each step j = 0..n-1."""
    return [
        ((group_index - j) % num_groups, (group_index + j) % num_groups)
        for j in range(num_groups)
    ]


def step_matrix(
    world_size: int, group_size: int, group_order: Sequence[int] | None = None
) -> list[list[int]]:
    """steps[i][w]: the step j at which sender i sends its tokens for w's experts to w.

    Derived from :func:`make_groups` and :func:`ring_groups` (the same rule
    :func:`build_plan` follows), so the performance model can charge each step's traffic
    without restating the ring. Step 0 pairs the members of a group (self included).
    """
    groups = make_groups(world_size, group_size, group_order)
    steps = [[0] * world_size for _ in range(world_size)]
    for k, senders in enumerate(groups):
        for j, (send_g, _) in enumerate(ring_groups(k, len(groups))):
            for i in senders:
                for w in groups[send_g]:
                    steps[i][w] = j
    return steps


class PipelineOp(NamedTuple):
    """One communication operation of the pipeline: ``kind`` ``"S"`` (step ``step``'s input
    tokens go out) or ``"R"`` (its outputs come back; needs C_step, the step's compute)."""

    kind: str
    step: int


def pipeline_order(num_steps: int) -> tuple[PipelineOp, ...]:
    """The order in which one rank issues the pipeline's communication, forward and backward
    alike: S_0, S_1, R_0, S_2, R_1, ..., S_{n-1}, R_{n-2}, R_{n-1}.

    S_{j+1} goes out before C_j starts (one step of look-ahead), R_j right after C_j, and C_j
    waits for S_j. The executor (:func:`megatron_moe_ext.core.exchange._run_pipeline`) walks
    this order, and the performance model
    (:func:`megatron_moe_ext.perf.model.simulate_two_stream`) prices it as one FIFO comm
    stream beside the compute stream. S_{j+2} is issued after R_j, hence after C_j ends: a
    send cannot run further ahead of the compute than one step.
    """
    if num_steps < 1:
        return ()
    order = [PipelineOp("S", 0)] + ([PipelineOp("S", 1)] if num_steps > 1 else [])
    for j in range(num_steps):
        order.append(PipelineOp("R", j))
        if j + 2 < num_steps:
            order.append(PipelineOp("S", j + 2))
    return tuple(order)


def counts_to_lists(counts: Any) -> list[list[int]]:
    """Convert a [W, E] torch tensor / numpy array / nested sequence to nested int lists."""
    if hasattr(counts, "detach"):  # torch.Tensor
        counts = counts.detach().cpu().tolist()
    elif hasattr(counts, "tolist"):  # numpy
        counts = counts.tolist()
    rows = [[int(v) for v in row] for row in counts]
    if not rows or any(len(r) != len(rows[0]) for r in rows):
        raise ValueError("counts must be a non-empty rectangular [W, E] matrix")
    if any(v < 0 for r in rows for v in r):
        raise ValueError("counts must be non-negative")
    return rows


def _prefix_sums(row: Sequence[int]) -> list[int]:
    out = [0]
    for v in row:
        out.append(out[-1] + v)
    return out


def _runs(lo: int, hi: int, shadowed: frozenset[int]) -> list[tuple[int, int]]:
    """(first expert, end expert) of each maximal run of non-shadowed experts in [lo, hi)."""
    runs, start = [], None
    for e in range(lo, hi):
        if e in shadowed:
            if start is not None:
                runs.append((start, e))
            start = None
        elif start is None:
            start = e
    if start is not None:
        runs.append((start, hi))
    return runs


def _step_sends(
    rows: list[list[int]], rank: int, peers: Sequence[int], e_l: int,
    shadowed: frozenset[int] = frozenset(),
) -> tuple[SendSlice, ...]:
    prefix = _prefix_sums(rows[rank])
    sends = []
    for p in peers:
        for a, b in _runs(p * e_l, (p + 1) * e_l, shadowed):
            offset = prefix[a]
            length = prefix[b] - offset
            if length > 0:
                sends.append(SendSlice(p, offset, length))
    return tuple(sends)


def _step_recvs(
    rows: list[list[int]], rank: int, peers: Sequence[int], e_l: int,
    shadowed: frozenset[int] = frozenset(),
) -> tuple[RecvChunk, ...]:
    lo, hi = rank * e_l, (rank + 1) * e_l
    recvs = []
    for s in peers:
        per_expert = tuple(0 if e in shadowed else rows[s][e] for e in range(lo, hi))
        length = sum(per_expert)
        if length > 0:
            runs = [sum(rows[s][a:b]) for a, b in _runs(lo, hi, shadowed)]
            runs = tuple(r for r in runs if r > 0)
            recvs.append(RecvChunk(s, length, per_expert, runs if len(runs) > 1 else ()))
    return tuple(recvs)


def build_plan(
    counts: Any,
    rank: int,
    world_size: int,
    group_size: int,
    group_order: Sequence[int] | None = None,
    shadows: Sequence[int] = (),
) -> ExchangePlan:
    """Compute this rank's grouped pairwise-exchange plan from the [W, E] count matrix.

    Args:
        counts: [W, E] integer matrix, counts[s, e] = tokens worker s sends to expert e.
        rank: this rank's index inside the expert-parallel group.
        world_size: W.
        group_size: g, must divide W (``moe.fastermoe.group_size``).
        group_order: optional permutation of ranks; members of a group are consecutive.
        shadows: shadowed global expert ids (the same on every rank): computed locally by
            every rank as the step-0 shadow chunks, left out of the exchange.

    Returns:
        An :class:`ExchangePlan` with n = W / g steps; step 0 is the local group.
    """
    n = validate_group_size(world_size, group_size)
    rows = counts_to_lists(counts)
    if len(rows) != world_size:
        raise ValueError(f"counts has {len(rows)} rows, expected world_size={world_size}")
    num_experts = len(rows[0])
    if num_experts % world_size != 0 or num_experts == 0:
        raise ValueError(f"number of experts {num_experts} must be a positive multiple of W={world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world_size {world_size}")
    e_l = num_experts // world_size
    shadowed = frozenset(int(e) for e in shadows)
    if any(not 0 <= e < num_experts for e in shadowed):
        raise ValueError(f"shadow ids {sorted(shadowed)} out of range for {num_experts} experts")
    groups = make_groups(world_size, group_size, group_order)
    my_group = next(k for k, grp in enumerate(groups) if rank in grp)
    steps = tuple(
        ExchangeStep(
            index=j,
            send_group=send_g,
            recv_group=recv_g,
            rank=rank,
            sends=_step_sends(rows, rank, groups[send_g], e_l, shadowed),
            recvs=_step_recvs(rows, rank, groups[recv_g], e_l, shadowed),
        )
        for j, (send_g, recv_g) in enumerate(ring_groups(my_group, n))
    )
    return ExchangePlan(
        rank=rank,
        world_size=world_size,
        group_size=group_size,
        num_local_experts=e_l,
        groups=groups,
        steps=steps,
        num_input_tokens=sum(rows[rank]),
        shadow_chunks=_shadow_chunks(rows[rank], shadowed),
    )


def _shadow_chunks(row: Sequence[int], shadowed: frozenset[int]) -> tuple[ShadowChunk, ...]:
    prefix = _prefix_sums(row)
    return tuple(ShadowChunk(e, prefix[e], row[e]) for e in sorted(shadowed))
