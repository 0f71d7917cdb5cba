"""Communication primitives of the smart exchange: tagged p2p batches and the counts all-gather.

Notation: W workers in the expert-parallel group, E experts.

Every point-to-point message carries a tag ``(part * 2^16 + step) * 8 + kind`` (:func:`tag`):
``kind`` < 8 says what the message holds, ``part`` numbers the messages of one step to the
same peer. On backends that ignore tags (NCCL) both sides post each batch in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .trace import Tracer

__all__ = ["P2PBatch", "P2PComm", "gather_counts", "tag", "SHADOW_TAG_BASE"]


def gather_counts(local_counts: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """The [W, E] count matrix of the expert-parallel ``group``: all-gather of every rank's
    tokens-per-expert row ``local_counts`` [E]; int64 on the CPU, identical on every rank."""
    if group is None:
        raise ValueError("gather_counts needs an explicit expert-parallel process group")
    local = local_counts.detach().reshape(-1).to(torch.int64).contiguous()
    world = dist.get_world_size(group)
    gathered = torch.empty(world * local.numel(), dtype=local.dtype, device=local.device)
    dist.all_gather_into_tensor(gathered, local, group=group)
    return gathered.view(world, -1).cpu()


_KINDS_PER_STEP = 8


_MAX_STEPS = 1 << 16


SHADOW_TAG_BASE = 1 << 28
"""The shadow trees' tags (:mod:`.shadow`) start here; every exchange tag is below it, so the
two never match each other's messages on tagged backends (gloo)."""


def tag(step: int, kind: int, part: int = 0) -> int:
    """The exchange tag of a message (module docstring); below :data:`SHADOW_TAG_BASE`."""
    t = (part * _MAX_STEPS + step) * _KINDS_PER_STEP + kind
    if not (0 <= kind < _KINDS_PER_STEP and 0 <= step < _MAX_STEPS and t < SHADOW_TAG_BASE):
        raise ValueError(f"exchange tag out of range: step {step}, kind {kind}, part {part}")
    return t


# --------------------------------------------------------------------------- communication


@dataclass
class P2PBatch:
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


class P2PComm:
    """Issues batched isend/irecv on ``group`` (on a side stream when on CUDA)."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device, tracer: Tracer | None):
        self.group = group
        self.tracer = tracer
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._global = [dist.get_global_rank(group, r) for r in range(self.world_size)]
        self.stream = _comm_stream(device) if device.type == "cuda" else None
        self.pending: list[P2PBatch] = []

    def issue(
        self,
        name: str,
        category: str,
        step: int,
        sends: list[tuple[int, torch.Tensor, int, int]],
        recvs: list[tuple[int, torch.Tensor, int, int]],
    ) -> P2PBatch:
        """Post sends/recvs given as (group peer, contiguous tensor, kind, part)."""
        start = Tracer.now()
        ops = [
            dist.P2POp(dist.isend, t, self._global[p], self.group, tag(step, k, part))
            for p, t, k, part in sends
        ] + [
            dist.P2POp(dist.irecv, t, self._global[p], self.group, tag(step, k, part))
            for p, t, k, part in recvs
        ]
        tensors = [op.tensor for op in ops]
        works: list = []
        if ops:
            if self.stream is not None:
                works = self._issue_cuda(ops)
            else:
                works = dist.batch_isend_irecv(ops)
        op = P2PBatch(name, category, list(works), start, tensors)
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
