"""Communication priority (Lina, ATC'23): the MoE exchange goes first on the network.

Gradient reductions that data-parallel training launches during backward are cut into chunks
of at most ``chunk_bytes`` and handed to a :class:`CommPriorityScheduler`. The scheduler keeps
at most ``max_in_flight`` chunks of one process group on the wire and *holds the next chunk*
while an MoE exchange is in flight (an :class:`ExchangeSignal` raised by
:func:`exchange_in_flight` around each exchange), so an exchange that starts while a reduction
is running waits for one chunk at most instead of a whole bucket. :meth:`~CommPriorityScheduler.flush`
(end of backward, before the optimizer) releases everything regardless of the signal and waits.

Notation
--------
N      elements of one flat gradient bucket; W ranks of its process group (lane)
S      N / W, the shard of one rank under reduce-scatter
c      chunk elements: floor(chunk_bytes / element_size) for all-reduce, per shard
       floor(chunk_bytes / (W * element_size)) for reduce-scatter (same bytes on the wire)

The rule
--------
A chunk is issued when (a) fewer than ``max_in_flight`` chunks of its lane are outstanding, and
(b) no exchange is in flight, or a flush is in progress. Chunks of one lane are issued in
submission order (every rank must post the collectives of one process group in the same order),
each lane by its own thread, so lanes never wait on each other: a rank can never block on
lane A while its peer blocks on lane B. Holding only delays, it never reorders or changes what
is summed; on CPU (gloo) and CUDA (NCCL) a chunk's elementwise sums are the ones the whole
bucket would give (checked bit for bit in the tests).

CUDA: each chunk is issued on the scheduler's side stream after an event recorded on the
submitting stream when its gradients were ready; a chunk that was held also waits for an
event recorded on the stream where the exchange ended. :meth:`flush` makes the current stream
wait for the side stream.

No deadlock: holding needs only the signal of this process; :meth:`flush` ignores it, and a
signal left raised by an exchange that never ended is reset (with a warning) at flush.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterator, Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

__all__ = [
    "ExchangeSignal", "exchange_signal", "exchange_begin", "exchange_end", "exchange_in_flight",
    "CommPriorityScheduler", "chunk_ranges", "all_reduce_chunks", "reduce_scatter_chunks",
]

IssueFn = Callable[[], Any]
"""Posts one asynchronous collective and returns its Work (or None when nothing was posted)."""


# --------------------------------------------------------------------------- the signal


class ExchangeSignal:
    """How many MoE exchanges are in flight in this process (nesting and threads allowed)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._listeners: list["CommPriorityScheduler"] = []
        self.begins = 0
        """Exchanges begun since construction (for tests and metrics)."""
        self.timeline: Optional[list[list[float]]] = None
        """When set to a list: [start, end] (perf_counter) of every period the signal was up
        (the scale lab's iteration mode measures how much reduction overlapped them)."""

    def begin(self) -> None:
        with self._lock:
            self._depth += 1
            self.begins += 1
            if self._depth == 1 and self.timeline is not None:
                self.timeline.append([time.perf_counter(), float("nan")])

    def end(self) -> None:
        with self._lock:
            was_up = self._depth > 0
            if was_up:
                self._depth -= 1
            idle = self._depth == 0
            if idle and was_up and self.timeline:
                self.timeline[-1][1] = time.perf_counter()
            listeners = list(self._listeners)
        if idle:
            for s in listeners:
                s._exchange_ended()

    def busy(self) -> bool:
        return self._depth > 0

    def reset(self) -> int:
        """Lower the signal; returns how many exchanges were left open."""
        with self._lock:
            left, self._depth = self._depth, 0
            if left and self.timeline:
                self.timeline[-1][1] = time.perf_counter()
            listeners = list(self._listeners)
        if left:
            for s in listeners:
                s._exchange_ended()
        return left

    @contextmanager
    def in_flight(self) -> Iterator[None]:
        """Raise the signal for the body; lowered even when the body raises."""
        self.begin()
        try:
            yield
        finally:
            self.end()

    def _attach(self, s: "CommPriorityScheduler") -> None:
        with self._lock:
            self._listeners.append(s)

    def _detach(self, s: "CommPriorityScheduler") -> None:
        with self._lock:
            if s in self._listeners:
                self._listeners.remove(s)


_SIGNAL = ExchangeSignal()


def exchange_signal() -> ExchangeSignal:
    """The process-wide signal that exchanges raise and schedulers watch by default."""
    return _SIGNAL


def exchange_begin() -> None:
    """An MoE exchange starts using the links (pair with :func:`exchange_end`)."""
    _SIGNAL.begin()


def exchange_end() -> None:
    """The MoE exchange begun last has finished with the links."""
    _SIGNAL.end()


def exchange_in_flight():
    """Context manager around one MoE exchange (forward or backward communication batch)."""
    return _SIGNAL.in_flight()


# --------------------------------------------------------------------------- chunking (pure)


def chunk_ranges(numel: int, chunk_elems: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges of at most ``chunk_elems`` covering ``range(numel)``."""
    if chunk_elems < 1:
        raise ValueError(f"chunk_elems must be >= 1, got {chunk_elems}")
    return [(s, min(s + chunk_elems, numel)) for s in range(0, numel, chunk_elems)]


def all_reduce_chunks(buf: torch.Tensor, group: dist.ProcessGroup, op: Any,
                      chunk_bytes: int) -> list[tuple[IssueFn, int]]:
    """(issue, bytes) per chunk of an in-place all-reduce of the flat tensor ``buf``."""
    flat = buf.view(-1)
    c = max(1, chunk_bytes // flat.element_size())

    def issue(s: int, e: int) -> IssueFn:
        return lambda: dist.all_reduce(flat[s:e], op=op, group=group, async_op=True)

    return [(issue(s, e), (e - s) * flat.element_size()) for s, e in chunk_ranges(flat.numel(), c)]


def reduce_scatter_chunks(buf: torch.Tensor, group: dist.ProcessGroup, op: Any,
                          chunk_bytes: int) -> list[tuple[IssueFn, int]]:
    """(issue, bytes) per chunk of Megatron's reduce-scatter of the flat ``buf`` (N divisible by
    W): rank r ends with shard r = sum over ranks of buf[r*S:(r+1)*S], written in place; the
    other shards are left as they are, like ``reduce_scatter_tensor(shard_r, buf)``."""
    flat = buf.view(-1)
    w, r = dist.get_world_size(group), dist.get_rank(group)
    if flat.numel() % w:
        raise ValueError(f"reduce-scatter buffer of {flat.numel()} elements is not divisible by {w}")
    shard = flat.numel() // w
    c = max(1, chunk_bytes // (w * flat.element_size()))

    def issue(s: int, e: int) -> IssueFn:
        inputs = [flat[q * shard + s:q * shard + e] for q in range(w)]
        return lambda: dist.reduce_scatter(inputs[r], inputs, op=op, group=group, async_op=True)

    return [(issue(s, e), w * (e - s) * flat.element_size()) for s, e in chunk_ranges(shard, c)]


# --------------------------------------------------------------------------- scheduler


@dataclass
class _Chunk:
    label: str
    issue: IssueFn
    nbytes: int
    submitted: float
    ready: Any = None  # CUDA event on the submitting stream
    held: bool = False


@dataclass
class ChunkRecord:
    """One issued chunk, in issue order (for tests and metrics)."""

    lane: Hashable
    label: str
    nbytes: int
    held_s: float
    """Seconds between submission and issue."""
    held_by_exchange: bool
    """Whether an exchange in flight was the reason it waited."""


class _Lane:
    """The chunks of one process group: a FIFO, issued by one thread."""

    def __init__(self, key: Hashable, sched: "CommPriorityScheduler") -> None:
        self.key = key
        self.sched = sched
        self.cond = threading.Condition()
        self.queue: deque[_Chunk] = deque()
        self.inflight: deque[tuple[_Chunk, Any, Any]] = deque()
        self.issuing = 0  # popped from the queue, not yet in inflight
        self.force = False
        self.closed = False
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, name=f"comm-priority-{key}", daemon=True)
        self.thread.start()

    def idle(self) -> bool:
        return not self.queue and not self.inflight and not self.issuing

    def _next(self) -> tuple[Optional[_Chunk], bool]:
        """Under the lock: (chunk to issue, or None to wait for the oldest in flight); blocks
        while there is nothing to do. Returns (None, True) to stop."""
        s = self.sched
        while True:
            if self.error is not None or (self.closed and self.idle()):
                return None, True
            if self.queue and len(self.inflight) < s.max_in_flight:
                if self.force or not s.signal.busy():
                    self.issuing += 1
                    return self.queue.popleft(), False
                for c in self.queue:
                    c.held = True
            if self.inflight:
                return None, False
            self.cond.wait()

    def _run(self) -> None:
        s = self.sched
        if s.device is not None and s.device.type == "cuda":
            torch.cuda.set_device(s.device)
        try:
            while True:
                with self.cond:
                    chunk, stop = self._next()
                if stop:
                    return
                if chunk is not None:
                    work, done = s._issue(chunk)
                    s._record(self.key, chunk)
                    with self.cond:
                        self.inflight.append((chunk, work, done))
                        self.issuing -= 1
                else:
                    _, work, done = self.inflight[0]
                    s._wait(work, done)
                    with self.cond:
                        self.inflight.popleft()
                        if self.idle():
                            self.cond.notify_all()  # wakes a flush waiting for this lane
        except BaseException as exc:  # surfaced by flush(); never silent
            with self.cond:
                self.error = exc
                self.cond.notify_all()


class CommPriorityScheduler:
    """Issues gradient-reduction chunks, holding them while an MoE exchange is in flight.

    ``submit(lane, label, issue, nbytes)`` is called where the reduction would have been
    launched (a DDP grad hook); ``flush()`` where it would have been waited for.
    """

    def __init__(self, chunk_bytes: int, max_in_flight: int = 1,
                 signal: Optional[ExchangeSignal] = None,
                 device: Optional[torch.device] = None) -> None:
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.chunk_bytes = int(chunk_bytes)
        self.max_in_flight = max_in_flight
        self.signal = signal if signal is not None else _SIGNAL
        self.device = torch.device(device) if device is not None else None
        self._cuda = self.device is not None and self.device.type == "cuda"
        if self._cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._lanes: dict[Hashable, _Lane] = {}
        self._lock = threading.Lock()
        self.records: list[ChunkRecord] = []
        """Issued chunks in issue order since the last :meth:`clear_records`."""
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._end_event: Any = None
        self.signal._attach(self)

    # ------------------------------------------------------------ producer side
    def submit(self, lane: Hashable, label: str, issue: IssueFn, nbytes: int) -> None:
        """Queue one chunk on ``lane`` (one lane per process group)."""
        ready = None
        if self._cuda:
            ready = torch.cuda.Event()
            ready.record()  # gradients ready on the submitting stream
        chunk = _Chunk(label, issue, nbytes, time.perf_counter(), ready)
        ln = self._lane(lane)
        with ln.cond:
            if ln.closed:
                raise RuntimeError("CommPriorityScheduler is closed")
            ln.queue.append(chunk)
            ln.cond.notify_all()

    def flush(self, timeout_s: Optional[float] = None) -> None:
        """Release every chunk (ignoring the signal), wait until all completed, re-raise the
        first error of a lane. Called at the end of backward, before the optimizer."""
        left = self.signal.reset()
        if left:
            logger.warning("comm_priority: %d MoE exchange(s) began and never ended before the "
                           "gradient flush; the signal was reset", left)
        lanes = list(self._lanes.values())
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for ln in lanes:
            with ln.cond:
                ln.force = True
                ln.cond.notify_all()
        try:
            for ln in lanes:
                with ln.cond:
                    while not ln.idle() and ln.error is None:
                        if not ln.thread.is_alive():
                            raise RuntimeError(f"comm_priority lane {ln.key!r} thread died")
                        if deadline is not None and time.monotonic() > deadline:
                            raise TimeoutError(f"comm_priority flush: lane {ln.key!r} still has "
                                               f"{len(ln.queue)} queued, {len(ln.inflight)} in flight")
                        ln.cond.wait(timeout=0.5)
                    if ln.error is not None:
                        raise RuntimeError(f"comm_priority lane {ln.key!r} failed") from ln.error
        finally:
            for ln in lanes:
                with ln.cond:
                    ln.force = False
        if self._cuda:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)

    def pending(self) -> int:
        """Chunks queued or in flight over all lanes."""
        return sum(len(ln.queue) + len(ln.inflight) for ln in self._lanes.values())

    def clear_records(self) -> list[ChunkRecord]:
        with self._lock:
            out, self.records = self.records, []
        return out

    def close(self) -> None:
        """Flush (unless a lane already failed: that error was raised by flush), stop the lane
        threads, stop watching the signal."""
        try:
            if not any(ln.error is not None for ln in self._lanes.values()):
                self.flush()
        finally:
            for ln in self._lanes.values():
                with ln.cond:
                    ln.closed = True
                    ln.cond.notify_all()
            for ln in self._lanes.values():
                ln.thread.join(timeout=5.0)
            self.signal._detach(self)

    # ------------------------------------------------------------ internals
    def _lane(self, key: Hashable) -> _Lane:
        with self._lock:
            if key not in self._lanes:
                self._lanes[key] = _Lane(key, self)
            return self._lanes[key]

    def _exchange_ended(self) -> None:
        if self._cuda:
            ev = torch.cuda.Event()
            ev.record()  # on the stream where the exchange was enqueued
            self._end_event = ev
        for ln in list(self._lanes.values()):
            with ln.cond:
                ln.cond.notify_all()

    def _issue(self, chunk: _Chunk) -> tuple[Any, Any]:
        if not self._cuda:
            return chunk.issue(), None
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(chunk.ready)
            if chunk.held and self._end_event is not None:
                self._stream.wait_event(self._end_event)
            work = chunk.issue()
            if work is not None:
                work.wait()  # side stream waits for NCCL's stream (host does not block)
            done = torch.cuda.Event()
            done.record(self._stream)
        return work, done

    def _wait(self, work: Any, done: Any) -> None:
        if done is not None:  # CUDA: the chunk's completion on the side stream
            done.synchronize()
        elif work is not None:
            work.wait()

    def _record(self, lane: Hashable, chunk: _Chunk) -> None:
        rec = ChunkRecord(lane, chunk.label, chunk.nbytes, time.perf_counter() - chunk.submitted,
                          chunk.held)
        with self._lock:
            self.records.append(rec)
