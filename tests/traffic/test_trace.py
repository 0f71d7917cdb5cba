"""Routing traces: the file round-trips, a cut-short record is dropped, and replay turns the
counts read back into forced routing with exactly those counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_moe_ext.traffic.replay import (
    replay_counts,
    replay_routing,
    routing_for_counts,
    scale_counts,
)
from megatron_moe_ext.traffic.trace import (
    TRACE_FILE,
    TraceHeader,
    TraceWriter,
    read_trace,
    trace_path,
    write_trace,
)


def _header(**kw) -> TraceHeader:
    base = dict(num_workers=4, num_experts=8, layers=(1, 3), topk=2, ep_size=2,
                meta={"hidden_size": 64, "precision": "fp32"})
    base.update(kw)
    return TraceHeader(**base)


def _counts(rng: np.random.Generator, h: TraceHeader, tokens: int = 32) -> np.ndarray:
    """[L, W, E] top-k counts of `tokens` tokens per worker (each expert <= tokens)."""
    out = np.zeros((len(h.layers), h.num_workers, h.num_experts), dtype=np.int64)
    for l in range(len(h.layers)):
        for w in range(h.num_workers):
            for _ in range(tokens):
                out[l, w, rng.choice(h.num_experts, h.topk, replace=False)] += 1
    return out


def test_round_trip_counts_choices_and_header(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    h = _header()
    recs = [_counts(rng, h) for _ in range(5)]
    choices = [None, rng.integers(-1, 8, size=(2, 4, 3, 2)), None, None,
               rng.integers(0, 8, size=(2, 4, 3, 2))]
    path = write_trace(tmp_path / TRACE_FILE, h, recs, iterations=[10, 20, 30, 40, 50],
                       choices=choices)
    tr = read_trace(tmp_path)  # a run directory resolves to its trace file
    assert tr.header == h and len(tr) == 5
    assert tr.iterations.tolist() == [10, 20, 30, 40, 50]
    assert np.array_equal(tr.counts, np.stack(recs))
    assert tr.choices[0] is None and tr.choices[2] is None
    assert np.array_equal(tr.choices[1], choices[1]) and np.array_equal(tr.choices[4], choices[4])
    assert np.array_equal(tr.layer_counts(3), np.stack(recs)[:, 1])
    # appending with the same header continues the file; a crash mid-record loses that record
    with TraceWriter(path, h) as w:
        w.append(60, recs[0])
    assert len(read_trace(path)) == 6
    with open(path, "ab") as fh:
        fh.write(b"\x01\x02\x03")
    assert len(read_trace(path)) == 6


def test_bad_shapes_and_files_are_errors(tmp_path: Path) -> None:
    h = _header()
    with TraceWriter(tmp_path / "t.bin", h) as w:
        with pytest.raises(ValueError, match=r"counts must be \[2, 4, 8\]"):
            w.append(1, np.zeros((2, 4, 7)))
        with pytest.raises(ValueError, match="choices"):
            w.append(1, np.zeros((2, 4, 8)), choices=np.zeros((2, 4, 3, 1)))
    with pytest.raises(ValueError, match="another shape"):
        TraceWriter(tmp_path / "t.bin", _header(num_experts=4))
    with pytest.raises(ValueError, match="ep_size"):
        _header(ep_size=3)
    with pytest.raises(FileNotFoundError, match="routing_trace"):
        trace_path(tmp_path / "nothing")
    (tmp_path / "x.bin").write_bytes(b"garbage!")
    with pytest.raises(ValueError, match="not a routing trace"):
        read_trace(tmp_path / "x.bin")


def test_replay_reproduces_the_recorded_counts_exactly(tmp_path: Path) -> None:
    """Counts written -> read back -> forced routing whose routing map has exactly those
    counts per expert, and whose logits make a top-k router choose that map."""
    rng = np.random.default_rng(1)
    h = _header()
    recs = [_counts(rng, h, tokens=40) for _ in range(3)]
    write_trace(tmp_path / "t.bin", h, recs)
    tr = read_trace(tmp_path / "t.bin")
    for j, (it, c) in enumerate(replay_counts(tr, layer=3, group=1)):
        assert it == j and np.array_equal(c, recs[j][1, 2:4])
        for w in range(c.shape[0]):
            rmap, bias = routing_for_counts(c[w], topk=2, seed=w)
            assert rmap.sum(dim=0).tolist() == c[w].tolist()
            assert (rmap.sum(dim=1) == 2).all()
            # what Megatron's top-k router does with the forced logits
            top = torch.topk(bias, 2, dim=1).indices
            chosen = torch.zeros_like(rmap).scatter_(1, top, True)
            assert torch.equal(chosen, rmap)
    for it, row, rmap, _ in replay_routing(tr, rank=1, layer=1, group=0):
        assert np.array_equal(row, recs[it][0, 1]) and rmap.sum(0).tolist() == row.tolist()
    scaled = list(replay_routing(tr, rank=0, num_tokens=10))
    assert all(r.sum() == 20 and m.shape == (10, 8) for _, r, m, _ in scaled)
    with pytest.raises(ValueError, match="layer 2 is not in the trace"):
        tr.layer_counts(2)


def test_scale_counts_keeps_the_law_and_the_constraints() -> None:
    c = np.array([50, 30, 15, 5])
    assert scale_counts(c, 50, 2).tolist() == [50, 30, 15, 5]  # already k T
    s = scale_counts(c, 20, 2)
    assert s.sum() == 40 and s.max() <= 20 and s.tolist() == [20, 12, 6, 2]
    s = scale_counts(np.array([100, 0, 0, 0]), 10, 2)  # capped at T, excess spread
    assert s.sum() == 20 and s[0] == 10
