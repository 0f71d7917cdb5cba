"""Popularity prediction measured on traces: hand-built traces whose right answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_moe_ext.traffic.prediction import (
    format_accuracy,
    predictor_accuracies,
    predictor_accuracy,
)
from megatron_moe_ext.traffic.trace import TraceHeader, read_trace, write_trace

W, E, T = 2, 4, 12  # workers, experts, recorded tokens per worker (top-1)


def _trace(tmp_path, hot_of_record, succ, records: int = 6):
    """Top-1 trace over layers (0, 1): in record i every token of layer 0 picks
    hot_of_record(i) or the next expert (3 : 1), and in layer 1 it picks succ[its layer-0
    expert]; choices hold all tokens, so counts follow from them exactly."""
    h = TraceHeader(num_workers=W, num_experts=E, layers=(0, 1), topk=1, ep_size=W,
                    meta={"hidden_size": 8})
    counts, choices = [], []
    for i in range(records):
        hot = hot_of_record(i)
        lo = np.where(np.arange(T) % 4 == 3, (hot + 1) % E, hot)  # [T]
        lo = np.broadcast_to(lo, (W, T))
        hi = np.asarray(succ)[lo]
        ch = np.stack([lo, hi])[..., None]  # [L, W, T, 1]
        c = np.stack([[np.bincount(row, minlength=E) for row in layer] for layer in ch[..., 0]])
        counts.append(c)
        choices.append(ch)
    return read_trace(write_trace(tmp_path / "t.bin", h, counts, choices=choices))


def test_steady_popularity_is_predicted_exactly_by_both(tmp_path) -> None:
    acc = predictor_accuracy(_trace(tmp_path, lambda i: 2, succ=[1, 2, 3, 0]))
    p = acc["predictors"]
    assert p["previous_iteration"][0] == {"hot_load_rel_err": 0.0, "same_set": 1.0, "n": 5}
    assert p["previous_layer"][1]["hot_load_rel_err"] == 0.0
    assert p["previous_layer"][1]["same_set"] == 1.0
    assert p["previous_layer"][1]["n"] == 5  # from the second record on (P needs one record)
    assert 0 not in p["previous_layer"]  # the first layer has no layer below
    assert p["balanced"][0]["hot_load_rel_err"] == pytest.approx(1 - (2 * T / E) / (2 * T * .75))


def test_drifting_popularity_defeats_the_last_iteration_not_the_layer_below(tmp_path) -> None:
    """The hot pair of experts alternates ({0, 1} / {2, 3}) every record; the layer-to-layer
    map stays. previous_iteration always picks the wrong shadow; previous_layer misses only
    record 1, whose experts' transitions were never seen (uniform rows), and is exact after."""
    acc = predictor_accuracy(_trace(tmp_path, lambda i: 2 * (i % 2), succ=[3, 0, 1, 2]))
    p = acc["predictors"]
    assert p["previous_iteration"][1]["same_set"] == 0.0
    assert p["previous_iteration"][1]["hot_load_rel_err"] == 1.0  # hot experts predicted idle
    assert p["previous_layer"][1]["same_set"] == pytest.approx(4 / 5)
    assert 0 < p["previous_layer"][1]["hot_load_rel_err"] < 0.2
    md = format_accuracy(acc)
    assert "| previous_iteration | 1 | 100.0% | 0% | 5 |" in md and "| previous_layer | 1 |" in md


def test_one_record_is_an_error(tmp_path) -> None:
    with pytest.raises(ValueError, match=">= 2 records"):
        predictor_accuracy(_trace(tmp_path, lambda i: 0, succ=[0, 1, 2, 3], records=1))


def test_a_later_start_scores_only_the_settled_records(tmp_path) -> None:
    """Hot expert 0 for three records, then 2 for good: from record 4 on the last iteration is
    right again; the transition rows seen by then make previous_layer exact too."""
    tr = _trace(tmp_path, lambda i: 0 if i < 3 else 2, succ=[1, 2, 3, 0], records=8)
    late = predictor_accuracy(tr, start=4)["predictors"]
    assert late["previous_iteration"][0] == {"hot_load_rel_err": 0.0, "same_set": 1.0, "n": 4}
    assert late["previous_layer"][1]["same_set"] == 1.0
    assert predictor_accuracy(tr)["predictors"]["previous_iteration"][0]["same_set"] < 1.0
    with pytest.raises(ValueError, match="start=8"):
        predictor_accuracy(tr, start=8)
    # one pass for several starts gives what separate passes give (the report's two tables)
    assert predictor_accuracies(tr, (1, 4)) == [predictor_accuracy(tr),
                                                predictor_accuracy(tr, start=4)]
