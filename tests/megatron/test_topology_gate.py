"""The topology-aware router (moe.router.type: topology_aware) inside real megatron-core MoE
layers on spawned gloo CPU processes, and end-to-end training with it under torchrun.

Notation: S sequence, B batch, H hidden, T = S * B tokens per rank, E experts, k top-k,
W expert-parallel ranks, M workers per node, f off-node fraction, L = floor(f * T * k).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.core.test_gate import reference_gate
from tests.helpers import read_metrics, spawn, torchrun
from tests.megatron.layer_cases import _setup

BASE = ["model.hidden_size=32", "model.ffn_hidden_size=48", "model.num_attention_heads=4"]
TOPO = ["moe.router.type=topology_aware"]


# ------------------------------------------------------------------------- worker side
def _build(overrides: list[str], pg, impl: str):
    """(layer with TopKRouter, layer with TopologyAwareRouter, cfg): same weights, built through
    model._swap_moe exactly as the GPT / BERT specs are."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_moe_ext.config import load_config
    from megatron_moe_ext.megatron.model import _moe_layer_class, _swap_moe, build_transformer_config
    from megatron_moe_ext.megatron.versions import build_moe

    cfg = load_config(None, ["data.mock=true", f"moe.impl={impl}", *overrides])
    plain_cfg = load_config(None, ["data.mock=true", f"moe.impl={impl}",
                                   *[o for o in overrides if not o.startswith("moe.router.")
                                     or o.startswith(("moe.router.score", "moe.router.pre",
                                                      "moe.router.load", "moe.router.z_",
                                                      "moe.router.aux"))]])
    assert plain_cfg.moe.router.type == "topk"
    tconf = build_transformer_config(cfg, "cpu")
    base_spec = get_gpt_layer_local_spec(num_experts=cfg.moe.num_experts)
    layers = []
    for c in (plain_cfg, cfg):
        spec = _swap_moe(base_spec, _moe_layer_class(c), c).submodules.mlp
        layers.append(build_moe(spec, tconf, pg))  # ModuleSpec or (megatron-core 0.18+) partial
    plain, topo = layers
    topo.load_state_dict(plain.state_dict())
    for layer in layers:
        layer.set_layer_number(1)
    return plain, topo, cfg


def _tracker() -> dict[str, float]:
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    return {k: float(v["values"][0]) for k, v in get_moe_layer_wise_logging_tracker().items()}


def _clear() -> None:
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    clear_aux_losses_tracker()


def _fwd_bwd(layer, x, gy):
    layer.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_(True)
    out, _ = layer(xi)
    (out * gy).sum().backward()
    return out.detach(), xi.grad.detach(), layer.router.weight.grad.detach().clone()


def _exact_case(case: dict, pg, rank: int) -> dict[str, Any]:
    """f large enough never to bind: the topology router must be TopKRouter, bit for bit."""
    plain, topo, cfg = _build(case["overrides"], pg, case.get("impl", "megatron"))
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(12, 3, cfg.model.hidden_size, generator=gen)
    gy = torch.randn(12, 3, cfg.model.hidden_size, generator=gen)
    res: dict[str, Any] = {}
    _clear()
    p1, m1 = plain.router(x)
    aux1 = _tracker()
    _clear()
    p2, m2 = topo.router(x)
    aux2 = _tracker()
    res["probs_equal"] = bool(torch.equal(p1, p2))
    res["map_equal"] = bool(torch.equal(m1, m2))
    res["aux_plain"] = {k: v for k, v in aux1.items() if not k.startswith("topo_gate_")}
    res["aux_topo"] = {k: v for k, v in aux2.items() if not k.startswith("topo_gate_")}
    o1, gx1, gw1 = _fwd_bwd(plain, x, gy)
    o2, gx2, gw2 = _fwd_bwd(topo, x, gy)
    res["layer_equal"] = bool(torch.equal(o1, o2) and torch.equal(gx1, gx2) and torch.equal(gw1, gw2))
    res["rerouted"] = int(topo.router.last_stats["rerouted"])
    return res


def _capped_case(case: dict, pg, rank: int, ep_rank: int) -> dict[str, Any]:
    """f = 0.25: the cap binds; check the rule, the stats, the aux loss and the layer."""
    plain, topo, cfg = _build(case["overrides"], pg, case.get("impl", "megatron"))
    router = topo.router
    E, k, coeff = cfg.moe.num_experts, cfg.moe.topk, cfg.moe.router.aux_loss_coeff
    gen = torch.Generator().manual_seed(200 + rank)
    S, B = 16, 4
    x = torch.randn(S, B, cfg.model.hidden_size, generator=gen)
    gy = torch.randn(S, B, cfg.model.hidden_size, generator=gen)
    T = S * B
    m = cfg.moe.router.workers_per_node
    ep = cfg.parallel.expert
    expert_node = (torch.arange(E) // (E // ep)) // m
    local_node = ep_rank // m
    limit = int(0.25 * T * k)

    _clear()
    probs, rmap = router(x)
    tracked = _tracker()
    logits = router.gating(x).view(-1, E).detach()
    scores = torch.softmax(logits, dim=-1)
    ref, counts = reference_gate(scores, k, expert_node, local_node, limit, selection=logits)
    ref_map = torch.zeros(T, E, dtype=torch.bool)
    for t, row in enumerate(ref):
        for e in row:
            if e >= 0:
                ref_map[t, e] = True
    plain_map = plain.router(x)[1]
    offnode_copies = int((rmap & (expert_node != local_node)).sum())
    # Megatron's aux-loss formula on the final map (tp_cp group of size 1: T tokens in all)
    aux_expected = float((scores.sum(0) * rmap.sum(0)).sum() * E / (k * T * T))
    # probs: post-softmax routing normalises over the final k logits
    sel = logits.masked_fill(~rmap, float("-inf"))
    probs_expected = torch.softmax(sel, dim=-1) * rmap
    stats = {n: int(v) for n, v in router.last_stats.items()}
    res = {
        "limit": limit,
        "router_limit": router.last_limit,
        "offnode_copies": offnode_copies,
        "copies_per_token": rmap.sum(1).unique().tolist(),
        "matches_reference": bool(torch.equal(rmap, ref_map)),
        "ref_counts": counts,
        "stats": stats,
        "differs_from_plain": bool(not torch.equal(rmap, plain_map)),
        "probs_err": float((probs.detach() - probs_expected).abs().max()),
        "aux_tracked": tracked.get("load_balancing_loss", float("nan")),
        "aux_expected": aux_expected,
        "tracker_names": sorted(tracked),
        "tracked_rerouted": tracked.get("topo_gate_rerouted", float("nan")),
        "tracked_dropped": tracked.get("topo_gate_dropped", float("nan")),
        "coeff": coeff,
    }
    # full layer forward / backward works, and the aux loss reaches the router weight
    _, _, gw = _fwd_bwd(topo, x, gy)
    res["router_grad_finite"] = bool(torch.isfinite(gw).all())
    # eval / no-grad still applies the gate, without touching the tracker
    _clear()
    topo.eval()
    with torch.no_grad():
        _, emap = topo.router(x)
    res["eval_offnode_copies"] = int((emap & (expert_node != local_node)).sum())
    res["eval_tracker_quiet"] = all(v == 0.0 for v in _tracker().values())
    topo.train()
    return res


def _impl_pair_case(case: dict, pg, rank: int) -> dict[str, Any]:
    """Same topology router under moe.impl megatron and fastermoe: same outputs and grads."""
    _, topo_m, cfg = _build(case["overrides"], pg, "megatron")
    _, topo_f, _ = _build(case["overrides"], pg, "fastermoe")
    topo_f.load_state_dict(topo_m.state_dict())
    gen = torch.Generator().manual_seed(300 + rank)
    x = torch.randn(16, 2, cfg.model.hidden_size, generator=gen)
    gy = torch.randn(16, 2, cfg.model.hidden_size, generator=gen)
    o1, gx1, gw1 = _fwd_bwd(topo_m, x, gy)
    o2, gx2, gw2 = _fwd_bwd(topo_f, x, gy)

    def rel(a, b):
        return float((a - b).abs().max() / max(float(b.abs().max()), 1e-12))

    return {"out": rel(o2, o1), "grad_input": rel(gx2, gx1), "grad_router": rel(gw2, gw1),
            "rerouted": int(topo_m.router.last_stats["rerouted"])}


def worker(rank: int, world: int, ep: int, cases: list[dict], out_dir: str) -> None:
    """Spawned entry: run every case, write rank-local results as JSON."""
    warnings.filterwarnings("ignore")
    ps, pg = _setup(ep)
    ep_rank = ps.get_expert_model_parallel_rank()
    results = {}
    for case in cases:
        kind = case["kind"]
        if kind == "exact":
            results[case["name"]] = _exact_case(case, pg, rank)
        elif kind == "capped":
            results[case["name"]] = _capped_case(case, pg, rank, ep_rank)
        else:
            results[case["name"]] = _impl_pair_case(case, pg, rank)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    import torch.distributed as dist

    dist.barrier()
    ps.destroy_model_parallel()
    dist.destroy_process_group()


# ------------------------------------------------------------------------- test side
EP2 = BASE + ["moe.num_experts=4", "moe.topk=2", "parallel.expert=2"]
EXACT = TOPO + ["moe.router.offnode_fraction=1.0", "moe.router.workers_per_node=1"]
CAP2 = TOPO + ["moe.router.offnode_fraction=0.25", "moe.router.workers_per_node=1"]

CASES_2 = [
    dict(name="exact_softmax", kind="exact", overrides=EP2 + EXACT),
    dict(name="exact_pre_softmax_z", kind="exact",
         overrides=EP2 + EXACT + ["moe.router.pre_softmax=true", "moe.router.z_loss_coeff=0.001"]),
    dict(name="exact_sigmoid_seq_aux", kind="exact",
         overrides=EP2 + EXACT + ["moe.router.score_function=sigmoid",
                                  "moe.router.load_balancing_type=seq_aux_loss"]),
    dict(name="exact_top1_capacity", kind="exact",
         overrides=BASE + ["moe.num_experts=4", "moe.topk=1", "moe.router.pre_softmax=true",
                           "parallel.expert=2", "moe.capacity_factor=1.0"] + EXACT),
    dict(name="exact_fastermoe", kind="exact", impl="fastermoe", overrides=EP2 + EXACT),
    dict(name="capped", kind="capped", overrides=EP2 + CAP2),
    dict(name="capped_fastermoe", kind="capped", impl="fastermoe", overrides=EP2 + CAP2),
    dict(name="impl_pair", kind="pair", overrides=EP2 + CAP2),
    # one expert per node < top-2: rejected copies find no free local expert and are dropped
    # (a capacity factor that never binds: megatron-core 0.17+ needs one for dropped copies)
    dict(name="capped_drop", kind="capped", expect_drop=True,
         overrides=BASE + ["moe.num_experts=2", "moe.topk=2", "parallel.expert=2",
                           "moe.capacity_factor=4.0"] + CAP2),
]

CASES_4 = [  # 4 ranks, 2 emulated nodes of 2 workers, 2 experts per rank
    dict(name="capped_ep4", kind="capped",
         overrides=BASE + ["moe.num_experts=8", "moe.topk=2", "parallel.expert=4"] + TOPO
         + ["moe.router.offnode_fraction=0.25", "moe.router.workers_per_node=2"]),
    dict(name="exact_ep4", kind="exact",
         overrides=BASE + ["moe.num_experts=8", "moe.topk=2", "parallel.expert=4"] + TOPO
         + ["moe.router.offnode_fraction=1.0", "moe.router.workers_per_node=2"]),
    dict(name="impl_pair_ep4", kind="pair",
         overrides=BASE + ["moe.num_experts=8", "moe.topk=2", "parallel.expert=4",
                           "moe.fastermoe.group_size=2"] + TOPO
         + ["moe.router.offnode_fraction=0.25", "moe.router.workers_per_node=2"]),
]


def _run(tmp_path: Path, world: int, ep: int, cases: list[dict]) -> dict:
    spawn(worker, world, ep, cases, str(tmp_path))
    return {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)}


def _check(results: dict, cases: list[dict]) -> None:
    for case in cases:
        name = case["name"]
        for rank, res in results.items():
            r = res[name]
            where = f"{name} rank {rank}"
            if case["kind"] == "exact":
                assert r["probs_equal"] and r["map_equal"], where
                assert r["layer_equal"], where
                assert r["rerouted"] == 0, where
                assert r["aux_topo"] == r["aux_plain"], (where, r)
                assert any(v > 0 for v in r["aux_topo"].values()), (where, r)  # aux loss computed
            elif case["kind"] == "capped":
                assert r["router_limit"] == r["limit"], where
                assert r["offnode_copies"] <= r["limit"], (where, r)
                assert r["matches_reference"], (where, r)
                st, ref = r["stats"], r["ref_counts"]
                assert st == {"offnode_wanted": ref["wanted"], "offnode_sent": ref["sent"],
                              "rerouted": ref["rerouted"], "dropped": ref["dropped"]}, where
                assert st["offnode_sent"] == r["offnode_copies"], where
                assert r["differs_from_plain"], where
                if case.get("expect_drop"):
                    assert st["dropped"] > 0 and st["rerouted"] == 0, (where, r)
                    assert r["copies_per_token"] == [1, 2], where
                else:
                    assert st["offnode_wanted"] > r["limit"] and st["rerouted"] > 0, (where, r)
                    assert st["dropped"] == 0, where
                    assert r["copies_per_token"] == [2], where  # top-k kept, no duplicates
                assert r["probs_err"] < 1e-6, (where, r)
                assert r["aux_tracked"] == pytest.approx(r["aux_expected"], rel=1e-5), (where, r)
                assert "topo_gate_offnode_sent" in r["tracker_names"], where
                assert r["tracked_rerouted"] == pytest.approx(st["rerouted"] / (64 * 2)), where
                assert r["tracked_dropped"] == pytest.approx(st["dropped"] / (64 * 2)), where
                assert r["router_grad_finite"], where
                assert r["eval_offnode_copies"] <= r["limit"], where
                assert r["eval_tracker_quiet"], where
            else:
                for key in ("out", "grad_input", "grad_router"):
                    assert r[key] <= 1e-5, (where, key, r)
                assert r["rerouted"] > 0, where


@pytest.mark.timeout(300)
def test_topology_router_ep2(tmp_path):
    _check(_run(tmp_path, 2, 2, CASES_2), CASES_2)


@pytest.mark.timeout(400)
def test_topology_router_ep4_two_nodes(tmp_path):
    _check(_run(tmp_path, 4, 4, CASES_4), CASES_4)


TRAIN = [
    "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
    "model.num_attention_heads=4", "model.seq_length=32", "moe.num_experts=4", "moe.topk=2",
    "train.micro_batch_size=4", "train.global_batch_size=8", "train.lr=3e-3",
    "train.iters=20", "train.lr_warmup_iters=2", "train.eval_interval=0", "train.eval_iters=0",
    "logging.interval=1", "checkpoint.save=null",
    "data.mock=true", "data.tokenizer.type=none", "model.vocab_size=256",
    "moe.router.type=topology_aware", "moe.router.offnode_fraction=0.25",
    "moe.router.workers_per_node=1", "parallel.expert=2",
]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("impl", ["megatron", "fastermoe"])
def test_tiny_model_trains_with_topology_gate(tmp_path, impl):
    from tests.helpers import REPO

    torchrun(["--config", str(REPO / "configs/gpt_moe_tiny.yaml"), *TRAIN, f"moe.impl={impl}",
              f"logging.dir={tmp_path}"], nproc=2)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == list(range(1, 21))
    losses = [r["loss"] for r in rows]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.5, losses
    # the gate's per-layer stats reach the metrics, and it did cap: sent <= f, some re-routed
    layer = rows[-1]["moe"]["layer_1"]
    assert layer["topo_gate_offnode_sent"] <= 0.25 + 1e-6, layer
    assert layer["topo_gate_offnode_wanted"] >= layer["topo_gate_offnode_sent"], layer
    assert sum(r["moe"]["layer_1"]["topo_gate_rerouted"] for r in rows) > 0
    assert "load_balancing_loss" in layer


# ------------------------------------------------------------------------- pure checks
def test_config_validation():
    from megatron_moe_ext.config import ConfigError, load_config

    base = ["data.mock=true", "moe.router.type=topology_aware"]
    cfg = load_config(None, base + ["moe.router.cluster=johnny"])
    assert cfg.moe.router.cluster == "johnny"
    cfg = load_config(None, base + ["moe.router.offnode_fraction=0.5",
                                    "moe.router.workers_per_node=2"])
    assert (cfg.moe.router.offnode_fraction, cfg.moe.router.workers_per_node) == (0.5, 2)
    for bad, msg in [
        ([], "needs moe.router.cluster"),
        (["moe.router.offnode_fraction=0"], "must be in (0, 1]"),
        (["moe.router.offnode_fraction=1.5"], "must be in (0, 1]"),
        (["moe.router.offnode_fraction=0.5", "moe.router.workers_per_node=0"], "must be >= 1"),
        (["moe.router.cluster=no-such-cluster"], "cluster 'no-such-cluster' not found"),
        (["moe.router.cluster=johnny", "moe.router.load_balancing_type=sinkhorn"], "sinkhorn"),
    ]:
        with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            load_config(None, base + bad)
    assert load_config(None, ["data.mock=true"]).moe.router.type == "topk"


def test_cluster_fraction_and_overrides():
    from megatron_moe_ext.config import RouterConfig
    from megatron_moe_ext.megatron.router import cluster_offnode_fraction, resolve_gate_options

    # f = W_net / (M * W_local): node NIC bandwidth over M times the slowest intra-node path
    assert cluster_offnode_fraction("johnny") == (pytest.approx(50 / (8 * 88)), 8)
    assert cluster_offnode_fraction("trevor") == (pytest.approx(62 / (4 * 171)), 4)
    assert cluster_offnode_fraction("dgx-h100") == (pytest.approx(8 * 400 / (8 * 3600)), 8)
    assert cluster_offnode_fraction("local-cpu") == (1.0, 2)  # one node: no network, no cap
    opts = RouterConfig(type="topology_aware", cluster="johnny", offnode_fraction=0.3,
                        workers_per_node=1)
    assert resolve_gate_options(opts, ep_size=2) == (0.3, 1)
    opts = RouterConfig(type="topology_aware", cluster="trevor")
    assert resolve_gate_options(opts, ep_size=8) == (pytest.approx(62 / 684), 4)
