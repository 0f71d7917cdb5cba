"""The one R^2 (megatron_moe_ext.bench.stats) and the one Zipf routing generator
(megatron_moe_ext.routing)."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_moe_ext.bench.stats import median, r_squared
from megatron_moe_ext.routing import zipf_counts, zipf_expert_counts


def test_r_squared_argument_order_and_edge_cases():
    meas = [1.0, 2.0, 3.0, 4.0]
    assert r_squared(meas, meas) == pytest.approx(1.0)
    # (measured, predicted): SS_tot comes from the measurements, so the order matters
    assert r_squared(meas, [2.5] * 4) == pytest.approx(0.0)
    assert r_squared([2.5] * 4, meas) is None  # no spread in the measurements
    pred = [1.5, 2.0, 2.5, 4.0]
    ss_res = 0.25 + 0 + 0.25 + 0
    assert r_squared(meas, pred) == pytest.approx(1 - ss_res / 5.0)
    assert r_squared([1, 2], [1, 2]) == pytest.approx(1.0)
    assert r_squared([1, 2], [1, 2], min_points=3) is None
    assert r_squared([1, None, 3, 5], [1, 7, None, 5]) == pytest.approx(1.0)  # None pairs dropped
    assert r_squared([1], [1]) is None
    assert median([3, 1, 2]) == 2.0 and median([]) is None


def test_zipf_counts_rows_are_the_benchmark_counts():
    row = zipf_expert_counts(1000, 8, 2, 1.2)
    c = zipf_counts(4, 8, 1000, 2, 1.2)
    assert c.shape == (4, 8) and (c == row).all()
    assert c.sum(axis=1).tolist() == [2000] * 4
    assert (np.diff(row) <= 0).all()  # expert 0 hottest
    # skew 0: balanced, the remainder to the lowest expert ids
    assert zipf_counts(2, 6, 100, 2, 0.0).tolist() == [[34, 34, 33, 33, 33, 33]] * 2
    # a seed permutes which expert gets which popularity rank, nothing else
    p = zipf_counts(3, 8, 1000, 2, 1.5, seed=7)
    assert sorted(p[0].tolist()) == sorted(zipf_expert_counts(1000, 8, 2, 1.5).tolist())
    assert (p == zipf_counts(3, 8, 1000, 2, 1.5, seed=7)).all()
    assert not (p[0] == zipf_expert_counts(1000, 8, 2, 1.5)).all()
    with pytest.raises(ValueError, match="num_workers"):
        zipf_counts(0, 4, 10)
