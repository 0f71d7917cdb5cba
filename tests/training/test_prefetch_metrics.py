"""The per-layer shadow-prefetch figures of the metrics record (training/metrics.py,
``prefetch_summary``) from the layer calls' ``FasterMoELayer.last_prefetch`` (pure)."""

from __future__ import annotations

import pytest

from megatron_moe_ext.training.metrics import prefetch_summary


def _call(err, match, used, exposed):
    return {"source": "previous_layer" if err is not None else "none", "used": used,
            "set_match": match, "hot_load_error": err, "exposed_s": exposed}


def test_summary_averages_over_predicted_calls_and_sums_waits():
    calls = [_call(None, None, False, None),  # first call: no prediction yet
             _call(0.0, True, True, 0.002), _call(0.5, False, False, 0.001),
             _call(0.1, False, True, 0.003)]
    s = prefetch_summary(calls)
    assert s["prefetch_hot_load_error"] == pytest.approx(0.2)
    assert s["prefetch_set_match"] == pytest.approx(1 / 3)
    assert s["prefetch_used"] == pytest.approx(0.5)
    assert s["prefetch_exposed_s"] == pytest.approx(0.006)


def test_summary_without_any_prediction():
    s = prefetch_summary([_call(None, None, False, None)])
    assert s == {"prefetch_hot_load_error": None, "prefetch_set_match": None,
                 "prefetch_used": 0.0, "prefetch_exposed_s": 0.0}
