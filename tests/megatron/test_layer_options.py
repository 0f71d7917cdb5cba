"""FasterMoELayer options and hot-path bookkeeping (real megatron-core layers, gloo, 2 ranks).

- No performance-model work per call for the ``never`` / ``top_k`` policies: predict_layer
  runs only when ``last_predicted_s`` is read, once per count matrix and shadow set.
- A group size larger than the expert-parallel size, a missing cluster a policy needs, and an
  unknown policy are errors naming the key; a missing cluster no policy needs is a warning.
- The exchange runs in the topology's group order (the order the performance model assumes).

Notation: S sequence, B batch, H hidden, E experts, W expert-parallel workers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import spawn
from tests.megatron import layer_cases
from tests.megatron.test_fastermoe_equivalence import BASE

EP2 = BASE + ["moe.num_experts=4", "moe.topk=2", "parallel.expert=2"]


def _forward_backward(layer, rank: int) -> None:
    gen = torch.Generator().manual_seed(3000 + rank)
    x = torch.randn(16, 3, 32, generator=gen, requires_grad=True)
    out, _ = layer(x)
    out.sum().backward()


def _error(overrides: list[str], pg) -> str:
    try:
        layer_cases.build_pair(overrides, pg)
    except ValueError as exc:
        return str(exc)
    return ""


def worker(rank: int, world: int, out_dir: str) -> None:
    import logging

    import torch.distributed as dist

    from megatron_moe_ext.megatron import fastermoe_layer as fl
    from megatron_moe_ext.perf.model import predict_layer

    ps, pg = layer_cases._setup(2)
    calls = [0]

    def counting(*args, **kwargs):
        calls[0] += 1
        return predict_layer(*args, **kwargs)

    fl.predict_layer = counting
    res: dict = {}
    for policy in ("never", "top_k", "model"):
        _, faster, _ = layer_cases.build_pair(
            EP2 + [f"moe.fastermoe.shadow.policy={policy}"], pg)
        calls[0] = 0
        for _ in range(3):  # three calls, same routing each time
            _forward_backward(faster, rank)
        per_call = calls[0]
        deferred = faster.deferred_predicted_s()  # what the metrics keep per call
        after_defer = calls[0]
        later = deferred()
        first = faster.last_predicted_s
        second = faster.last_predicted_s
        direct = faster.predict(faster.token_dispatcher.counts, faster.last_shadows)
        res[policy] = dict(
            calls_in_forward=per_call, calls_after_defer=after_defer, later=later,
            calls_after_read=calls[0],
            first=first, second=second, direct=float(direct.total_s),
            shadows=faster.last_shadows, group_order=faster.group_order,
            topology_order=faster.topology.group_order(faster.group_size),
        )
    res["group_size_error"] = _error(EP2 + ["moe.fastermoe.group_size=4"], pg)
    res["missing_cluster_predictor"] = _error(
        EP2 + ["moe.fastermoe.shadow.policy=predictor", "moe.fastermoe.cluster=no-such-cluster"],
        pg)
    records: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    fl.logger.addHandler(_Keep())
    _, faster, _ = layer_cases.build_pair(
        EP2 + ["moe.fastermoe.shadow.policy=top_k", "moe.fastermoe.cluster=no-such-cluster"], pg)
    layer_cases.build_pair(
        EP2 + ["moe.fastermoe.shadow.policy=top_k", "moe.fastermoe.cluster=no-such-cluster"], pg)
    _forward_backward(faster, rank)
    res["missing_cluster_top_k"] = dict(
        warnings=[m for m in records if "no-such-cluster" in m],
        predicted=faster.last_predicted_s, shadows=faster.last_shadows,
        group_order=faster.group_order)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res))
    dist.barrier()
    ps.destroy_model_parallel()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("layer_options")
    spawn(worker, 2, str(out))
    return {r: json.loads((out / f"rank{r}.json").read_text()) for r in range(2)}


@pytest.mark.timeout(400)
@pytest.mark.parametrize("policy", ["never", "top_k"])
def test_no_model_work_per_call_and_one_prediction_on_read(results, policy):
    for rank, res in results.items():
        r = res[policy]
        assert r["calls_in_forward"] == r["calls_after_defer"] == 0, (rank, r)
        # evaluated later, read twice, predicted directly: memoized, one predict_layer call
        assert r["calls_after_read"] == 1, (rank, r)
        assert r["later"] == r["first"] == r["second"] == pytest.approx(r["direct"])
        assert r["first"] > 0
    if policy == "top_k":
        assert results[0][policy]["shadows"] == results[1][policy]["shadows"] != []


@pytest.mark.timeout(400)
def test_model_policy_reuses_its_predictions(results):
    for rank, res in results.items():
        r = res["model"]
        # the greedy predicts the first call's candidates; the same counts later cost nothing,
        # and reading last_predicted_s reuses the greedy's prediction of the chosen set
        assert 1 <= r["calls_in_forward"] <= 5, (rank, r)
        assert r["calls_after_read"] == r["calls_in_forward"], (rank, r)


@pytest.mark.timeout(400)
def test_exchange_uses_the_topology_group_order(results):
    for res in results.values():
        assert res["never"]["group_order"] == res["never"]["topology_order"]


@pytest.mark.timeout(400)
def test_group_size_larger_than_ep_is_an_error(results):
    for res in results.values():
        msg = res["group_size_error"]
        assert "moe.fastermoe.group_size=4 must divide parallel.expert=2" in msg, msg


@pytest.mark.timeout(400)
def test_missing_cluster(results):
    for rank, res in results.items():
        msg = res["missing_cluster_predictor"]
        assert "moe.fastermoe.cluster='no-such-cluster'" in msg and "predictor" in msg, msg
        r = res["missing_cluster_top_k"]
        assert len(r["warnings"]) == 1, r  # one clear warning, not one per layer
        assert r["predicted"] is None and r["group_order"] is None and r["shadows"], r


def test_options_validate_and_come_from_the_run_config():
    from megatron_moe_ext.megatron.fastermoe_layer import FasterMoELayer, FasterMoEOptions
    from megatron_moe_ext.megatron.layer_builder import config_from_overrides

    with pytest.raises(ValueError, match=r"moe\.fastermoe\.shadow\.policy='sometimes'"):
        FasterMoEOptions(shadow_policy="sometimes")
    cfg = config_from_overrides(EP2 + ["moe.fastermoe.shadow.policy=top_k",
                                       "moe.fastermoe.shadow.max_experts=3",
                                       "moe.fastermoe.group_size=2", "moe.fastermoe.trace=true",
                                       "moe.fastermoe.cluster=johnny"])
    opts = FasterMoELayer.options_from_moe_config(cfg.moe)
    assert opts == FasterMoEOptions(group_size=2, shadow_policy="top_k", shadow_max_experts=3,
                                    cluster="johnny", trace=True)
    with pytest.raises(Exception):
        opts.group_size = 1  # type: ignore[misc]  # frozen
