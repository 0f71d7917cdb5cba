"""Routing traces: a compact, append-only file of per-iteration expert counts.

Notation
--------
I        logged iterations in the trace
L        MoE layers recorded (the layer numbers are in the header)
W        workers whose routing was gathered (the data-parallel ranks of one pipeline stage;
         EP group g holds rows g * ep_size ... (g + 1) * ep_size - 1, Megatron's rank order
         with tensor parallel 1)
E        experts per layer (global ids; expert e lives on EP rank e // (E / ep_size))
t, k     recorded tokens per worker, top-k

File layout (``routing_trace.bin`` in the run directory, little endian)::

    b"MOETRACE"  uint32 version (1)  uint32 n   n bytes of UTF-8 JSON header
    record*      int64 iteration, int32 window, int32 t,
                 int32 counts[L, W, E],
                 int16 choices[L, W, t, k]       (only when t > 0; -1 = no expert)

``counts[l, w, e]`` is the number of tokens worker w routed to expert e in layer l during
the iteration (top-k copies counted, micro-batches summed; ``window`` says over how many
iterations the counts were summed, 1 for the recorder's per-iteration counts).
``choices[l, w, j]`` are the experts chosen by worker w's j-th token of the first
micro-batch in layer l, the same tokens in every layer (for transition estimates between
consecutive layers). A record cut short by a crash is ignored by the reader.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

MAGIC = b"MOETRACE"
VERSION = 1
TRACE_FILE = "routing_trace.bin"
"""File name of the trace inside a run directory (``logging.dir``)."""

_REC = struct.Struct("<qii")


@dataclass(frozen=True)
class TraceHeader:
    """What every record of a trace has in common."""

    num_workers: int
    """W, rows of every count matrix."""
    num_experts: int
    """E, columns of every count matrix."""
    layers: tuple[int, ...]
    """Megatron layer numbers (1-based) of the L recorded MoE layers, in record order."""
    topk: int
    """Experts per token."""
    ep_size: int
    """Expert-parallel group size; W / ep_size groups of consecutive rows."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Free-form facts of the run: hidden_size, ffn_hidden_size, precision, moe_impl,
    seq_length, micro_batch_size, num_microbatches, config path ..."""

    def __post_init__(self) -> None:
        """Check the shapes are consistent."""
        if self.num_workers < 1 or self.num_experts < 1 or not self.layers:
            raise ValueError(f"trace header needs W, E >= 1 and a layer, got {self}")
        if self.ep_size < 1 or self.num_workers % self.ep_size:
            raise ValueError(f"ep_size {self.ep_size} must divide num_workers {self.num_workers}")
        if self.num_experts % self.ep_size:
            raise ValueError(f"ep_size {self.ep_size} must divide num_experts {self.num_experts}")

    def to_json(self) -> bytes:
        """The header as UTF-8 JSON."""
        d = asdict(self)
        d["layers"] = list(self.layers)
        return json.dumps(d, sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes) -> "TraceHeader":
        """Inverse of :meth:`to_json`."""
        d = json.loads(raw.decode("utf-8"))
        d["layers"] = tuple(int(x) for x in d["layers"])
        return cls(**d)


@dataclass
class RoutingTrace:
    """A whole trace in memory."""

    header: TraceHeader
    """Shapes and run facts."""
    iterations: np.ndarray
    """[I] int64 iteration numbers."""
    windows: np.ndarray
    """[I] int32 iterations summed into each record."""
    counts: np.ndarray
    """[I, L, W, E] int32 token counts."""
    choices: Optional[list[Optional[np.ndarray]]] = None
    """Per record: int16 [L, W, t, k] expert choices, or None when not recorded."""

    def layer_index(self, layer: Optional[int]) -> int:
        """Position in :attr:`counts` of Megatron layer number ``layer`` (None: the first)."""
        if layer is None:
            return 0
        try:
            return self.header.layers.index(int(layer))
        except ValueError:
            raise ValueError(f"layer {layer} is not in the trace (layers "
                             f"{list(self.header.layers)})") from None

    def layer_counts(self, layer: Optional[int] = None) -> np.ndarray:
        """[I, W, E] counts of one layer (Megatron layer number; None: the first)."""
        return self.counts[:, self.layer_index(layer)]

    def __len__(self) -> int:
        """Number of records."""
        return int(self.iterations.shape[0])


class TraceWriter:
    """Appends records to a trace file; creates it (with the header) when missing.

    Appending to an existing file requires the same header (a resumed run continues its trace).
    """

    def __init__(self, path: str | Path, header: TraceHeader) -> None:
        """Open ``path`` for appending."""
        self.path = Path(path)
        self.header = header
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size > 0:
            old = read_trace(self.path).header
            if (old.num_workers, old.num_experts, old.layers, old.topk, old.ep_size) != (
                    header.num_workers, header.num_experts, header.layers, header.topk,
                    header.ep_size):
                raise ValueError(f"{self.path}: existing trace has another shape ({old}); "
                                 "move it away or use another logging.dir")
            self._fh = open(self.path, "ab")
        else:
            self._fh = open(self.path, "wb")
            raw = header.to_json()
            self._fh.write(MAGIC + struct.pack("<II", VERSION, len(raw)) + raw)
            self._fh.flush()

    def append(self, iteration: int, counts: np.ndarray, choices: Optional[np.ndarray] = None,
               window: int = 1) -> None:
        """Write one record: counts [L, W, E] (non-negative ints), choices [L, W, t, k]."""
        h = self.header
        c = np.asarray(counts)
        shape = (len(h.layers), h.num_workers, h.num_experts)
        if c.shape != shape:
            raise ValueError(f"counts must be {list(shape)}, got {list(c.shape)}")
        if c.size and (c.min() < 0 or c.max() > np.iinfo(np.int32).max):
            raise ValueError("counts must be in [0, 2^31)")
        t = 0
        if choices is not None:
            ch = np.asarray(choices)
            if ch.ndim != 4 or ch.shape[:2] != shape[:2] or ch.shape[3] != h.topk:
                raise ValueError(f"choices must be [L={shape[0]}, W={shape[1]}, t, k={h.topk}], "
                                 f"got {list(ch.shape)}")
            t = int(ch.shape[2])
        self._fh.write(_REC.pack(int(iteration), int(window), t))
        self._fh.write(c.astype("<i4").tobytes())
        if t:
            self._fh.write(np.asarray(choices).astype("<i2").tobytes())
        self._fh.flush()

    def close(self) -> None:
        """Close the file."""
        self._fh.close()

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def trace_path(run_or_trace: str | Path) -> Path:
    """The trace file of a run directory, or the path itself when it is a file."""
    p = Path(run_or_trace)
    if p.is_dir():
        p = p / TRACE_FILE
    if not p.is_file():
        raise FileNotFoundError(f"no routing trace at {p} (set logging.routing_trace: true in "
                                "the run's config, or give the trace file)")
    return p


def read_trace(run_or_trace: str | Path) -> RoutingTrace:
    """Read a trace file (or the trace of a run directory)."""
    path = trace_path(run_or_trace)
    data = path.read_bytes()
    if data[:8] != MAGIC:
        raise ValueError(f"{path}: not a routing trace (bad magic)")
    version, n = struct.unpack_from("<II", data, 8)
    if version != VERSION:
        raise ValueError(f"{path}: trace version {version}, this reader knows {VERSION}")
    header = TraceHeader.from_json(data[16:16 + n])
    L, W, E, k = len(header.layers), header.num_workers, header.num_experts, header.topk
    pos = 16 + n
    its, wins, counts, choices = [], [], [], []
    while pos + _REC.size <= len(data):
        it, win, t = _REC.unpack_from(data, pos)
        size = 4 * L * W * E + 2 * L * W * t * k
        if pos + _REC.size + size > len(data):
            break  # truncated last record
        pos += _REC.size
        counts.append(np.frombuffer(data, "<i4", L * W * E, pos).reshape(L, W, E))
        pos += 4 * L * W * E
        if t:
            choices.append(np.frombuffer(data, "<i2", L * W * t * k, pos).reshape(L, W, t, k))
            pos += 2 * L * W * t * k
        else:
            choices.append(None)
        its.append(it)
        wins.append(win)
    return RoutingTrace(
        header=header, iterations=np.array(its, dtype=np.int64),
        windows=np.array(wins, dtype=np.int32),
        counts=np.stack(counts).astype(np.int32) if counts else np.zeros((0, L, W, E), np.int32),
        choices=choices if any(c is not None for c in choices) else None,
    )


def write_trace(path: str | Path, header: TraceHeader, counts: Sequence[np.ndarray],
                iterations: Optional[Sequence[int]] = None,
                choices: Optional[Sequence[Optional[np.ndarray]]] = None) -> Path:
    """Write a whole trace (a new file) from per-record counts [L, W, E]."""
    path = Path(path)
    if path.exists():
        path.unlink()
    its = list(range(len(counts))) if iterations is None else list(iterations)
    with TraceWriter(path, header) as w:
        for j, c in enumerate(counts):
            w.append(its[j], c, None if choices is None else choices[j])
    return path
