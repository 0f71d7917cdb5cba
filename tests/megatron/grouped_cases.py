"""Worker code for the grouped-GEMM expert tests (runs inside spawned processes).

* :func:`module_cases`: SequentialMLP vs our GroupedGemmExperts with identical weights on given
  token counts (empty experts, empty input included): output, input / probs / weight grads.
* :func:`layer_cases`: stock MoELayer with sequential experts (the reference) vs stock and
  FasterMoE layers with grouped experts (and with shadows), built from our specs.
* :func:`checkpoint_crossover`: dist-checkpointing save with one expert layout / moe.impl, load
  with the other, same tensors.
* :func:`count_host_syncs`: host syncs (``.cpu()``, ``.tolist()``, ``.item()``, ``.numpy()``)
  of one FasterMoE layer forward + backward, by call site.

Notation: T routed rows, E_l local experts, H hidden, W expert-parallel workers.
"""

from __future__ import annotations

import collections
import json
import sys
import traceback
from pathlib import Path
from typing import Any

import torch

from tests.megatron.layer_cases import _rel, _setup, run_layer


def _cfg(overrides: list[str]):
    from megatron_moe_ext.megatron import layer_builder

    return layer_builder.config_from_overrides(overrides)


def build_layer(overrides: list[str], pg, impl: str, grouped: bool):
    """One MoE layer (module) from our specs: moe.impl ``impl``, grouped experts or not."""
    from megatron.core.transformer.spec_utils import build_module

    from megatron_moe_ext.megatron import specs
    from megatron_moe_ext.megatron.model import (
        _moe_layer_class,
        _swap_moe,
        build_transformer_config,
    )

    cfg = _cfg([*overrides, f"moe.impl={impl}", f"moe.grouped_gemm={str(grouped).lower()}"])
    tconf = build_transformer_config(cfg, "cpu")
    spec = _swap_moe(specs.moe_layer_spec(cfg, device="cpu"), _moe_layer_class(cfg), cfg)
    layer = build_module(spec.submodules.mlp, config=tconf, pg_collection=pg)
    layer.set_layer_number(1)
    return layer, cfg


# ------------------------------------------------------------------ module equivalence


def module_cases(pg, cases: list[dict]) -> dict[str, Any]:
    """SequentialMLP vs GroupedGemmExperts (copied weights) for each case's counts."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    from megatron_moe_ext.megatron import specs
    from megatron_moe_ext.megatron.grouped_experts import GroupedGemmExperts
    from megatron_moe_ext.megatron.model import build_transformer_config

    out = {}
    for case in cases:
        cfg = _cfg(case["overrides"])
        tconf = build_transformer_config(cfg, "cpu")
        if case.get("probs_on_input"):
            tconf.moe_apply_probs_on_input = True
        e_l = cfg.moe.num_experts // cfg.parallel.expert
        seq_spec = get_gpt_layer_local_spec(num_experts=cfg.moe.num_experts).submodules.mlp
        seq = build_module(seq_spec.submodules.experts, e_l, tconf, pg_collection=pg)
        grp = build_module(specs.grouped_experts_spec(), e_l, tconf, pg_collection=pg)
        assert isinstance(grp, GroupedGemmExperts)
        grp.load_state_dict(seq.state_dict())
        dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        counts = case["counts"]
        gen = torch.Generator().manual_seed(5)
        x = torch.randn(sum(counts), cfg.model.hidden_size, generator=gen).to(dtype)
        p = torch.rand(sum(counts), generator=gen)
        gy = torch.randn(x.shape, generator=gen)
        res = []
        for mod in (seq, grp):
            mod.zero_grad(set_to_none=True)
            xi, pi = x.clone().requires_grad_(True), p.clone().requires_grad_(True)
            y, bias = mod(xi, torch.tensor(counts, dtype=torch.long), pi)
            assert bias is None
            (y.float() * gy).sum().backward()
            grads = {n: (q.grad if q.grad is not None else torch.zeros_like(q))
                     for n, q in mod.named_parameters()}
            res.append((y.detach(), xi.grad, pi.grad, grads))
        (y1, gx1, gp1, g1), (y2, gx2, gp2, g2) = res
        out[case["name"]] = {
            "out": _rel(y2, y1) if y1.numel() else 0.0,
            "grad_input": _rel(gx2, gx1) if gx1.numel() else 0.0,
            "grad_probs": _rel(gp2, gp1) if gp1.numel() else 0.0,
            "grad_params": max(_rel(g2[k], g1[k]) for k in g1),
            "param_names_equal": sorted(g1) == sorted(g2),
            "rows": int(y2.shape[0]),
        }
    return out


def layout_cases(pg, overrides: list[str]) -> dict[str, Any]:
    """ExpertLayout.apply(expert_params(e)) vs the expert module on expert e's rows alone
    (sequential and grouped layouts): outputs and the gradients of x, probs and weights."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    from megatron_moe_ext.megatron import specs
    from megatron_moe_ext.megatron.expert_layouts import expert_layout
    from megatron_moe_ext.megatron.model import build_transformer_config

    cfg = _cfg(overrides)
    tconf = build_transformer_config(cfg, "cpu")
    e_l = cfg.moe.num_experts // cfg.parallel.expert
    seq_spec = get_gpt_layer_local_spec(num_experts=cfg.moe.num_experts).submodules.mlp
    out = {}
    for name, spec in (("sequential", seq_spec.submodules.experts),
                       ("grouped", specs.grouped_experts_spec())):
        mod = build_module(spec, e_l, tconf, pg_collection=pg)
        layout = expert_layout(mod)
        counts = [0] * e_l
        e = e_l - 1
        counts[e] = 7
        gen = torch.Generator().manual_seed(11)
        x = torch.randn(7, cfg.model.hidden_size, generator=gen)
        p = torch.rand(7, generator=gen)
        gy = torch.randn(x.shape, generator=gen)
        xi, pi = x.clone().requires_grad_(True), p.clone().requires_grad_(True)
        y1, _ = mod(xi, torch.tensor(counts), pi)
        g1 = torch.autograd.grad((y1 * gy).sum(), [xi, pi, *layout.expert_params(e)])
        weights = [w.detach().clone().requires_grad_(True) for w in layout.expert_params(e)]
        xj, pj = x.clone().requires_grad_(True), p.clone().requires_grad_(True)
        y2 = layout.apply(weights, xj, pj)
        g2 = torch.autograd.grad((y2 * gy).sum(), [xj, pj, *weights])
        out[name] = {
            "kind": layout.kind, "names": list(layout.names),
            "n_tensors": len(layout.expert_params(e)),
            "out": _rel(y2, y1.detach()), "grads": max(_rel(a, b) for a, b in zip(g2, g1)),
            "own_params_untouched": all(w.grad is None for w in layout.expert_params(e)),
        }
    return out


# ------------------------------------------------------------------ layer equivalence


def layer_equivalence(pg, rank: int, cases: list[dict]) -> dict[str, Any]:
    """Reference: stock layer, sequential experts. Variants: grouped experts in both impls."""
    out = {}
    for case in cases:
        ref, cfg = build_layer(case["overrides"], pg, "megatron", grouped=False)
        dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        gen = torch.Generator().manual_seed(1000 + rank)
        S, B, H = case.get("seq", 16), case.get("batch", 3), cfg.model.hidden_size
        x = torch.randn(S, B, H, generator=gen).to(dtype)
        gy = torch.randn(S, B, H, generator=gen)
        o1, gx1, g1 = run_layer(ref, x, gy)
        res = {}
        for impl in ("megatron", "fastermoe"):
            layer, _ = build_layer(case["overrides"], pg, impl, grouped=True)
            layer.load_state_dict(ref.state_dict())  # same names: the layouts cross over
            o2, gx2, g2 = run_layer(layer, x, gy)
            assert set(g1) == set(g2), (sorted(g1), sorted(g2))
            res[impl] = {
                "experts": type(layer.experts).__name__,
                "out": _rel(o2, o1),
                "grad_input": _rel(gx2, gx1),
                "grad_params": max(_rel(g2[k], g1[k]) for k in g1),
                "shadows": list(getattr(layer, "last_shadows", [])),
            }
        out[case["name"]] = res
    return out


# ------------------------------------------------------------------ checkpoint crossover


def checkpoint_crossover(pg, rank: int, overrides: list[str], root: str) -> dict[str, Any]:
    """Save (stock, sequential) -> load (fastermoe, grouped), and back: tensors equal."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    out = {}
    pairs = [(("megatron", False), ("fastermoe", True)), (("fastermoe", True), ("megatron", False)),
             (("megatron", True), ("megatron", False))]
    for i, (src, dst) in enumerate(pairs):
        path = Path(root, f"ckpt{i}")
        if rank == 0:
            path.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        model_parallel_cuda_manual_seed(10 + i)
        a, _ = build_layer(overrides, pg, *src)
        dist_checkpointing.save(a.sharded_state_dict(prefix="moe."), str(path))
        model_parallel_cuda_manual_seed(99 + i)  # a different init, overwritten by the load
        b, _ = build_layer(overrides, pg, *dst)
        differs_before = any(not torch.equal(b.state_dict()[k], v)
                             for k, v in a.state_dict().items() if "experts" in k)
        loaded = dist_checkpointing.load(b.sharded_state_dict(prefix="moe."), str(path))
        b.load_state_dict({k[len("moe."):]: v for k, v in loaded.items()})
        sa, sb = a.state_dict(), b.state_dict()
        out[f"{src}->{dst}"] = {
            "experts": [type(a.experts).__name__, type(b.experts).__name__],
            "differs_before": differs_before,
            "keys_equal": sorted(k for k in sa if torch.is_tensor(sa[k]))
            == sorted(k for k in sb if torch.is_tensor(sb[k])),
            "equal": all(torch.equal(sa[k], sb[k]) for k in sa if torch.is_tensor(sa[k])),
        }
        dist.barrier()
    return out


# ------------------------------------------------------------------ host syncs


_SYNC_METHODS = {"cpu", "tolist", "item", "numpy", "__bool__", "__int__", "__float__",
                 "__index__"}
_FACTORIES = {"tensor", "as_tensor", "from_numpy", "zeros", "ones", "empty", "full", "arange",
              "zeros_like", "ones_like", "empty_like", "full_like", "randn", "rand"}


class HostSyncCounter(torch.overrides.TorchFunctionMode):
    """Counts, by call site, the calls that would make the host wait for the GPU in a CUDA run
    (``.cpu()`` / ``.to('cpu')`` / ``.tolist()`` / ``.item()`` / ``.numpy()`` / ``bool()`` ...
    of a device tensor) and the host-to-device tensor creations, on the CPU.

    On the CPU every tensor is a CPU tensor, so the mode tracks where each tensor *would* live
    on CUDA: host tensors are the results of ``.cpu()`` / ``.to('cpu')``, factories without a
    ``device`` (``torch.tensor(list)``, ``torch.zeros(n)``), numpy conversions, and anything
    computed from host tensors only; every other tensor (parameters, inputs, factories with a
    ``device``, anything touching a device tensor) is a device tensor."""

    def __init__(self):
        super().__init__()
        self.syncs: collections.Counter = collections.Counter()
        self.h2d: collections.Counter = collections.Counter()

    @staticmethod
    def _is_host(t) -> bool:
        return bool(getattr(t, "_mx_host", False))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        for a in args:
            if isinstance(a, (list, tuple)):
                tensors += [t for t in a if isinstance(t, torch.Tensor)]
        to_cpu = name == "cpu" or (name == "to" and any(
            (isinstance(a, str) and a.startswith("cpu")) or
            (isinstance(a, torch.device) and a.type == "cpu") for a in (*args[1:], kwargs.get(
                "device"))))
        to_dev = name == "to" and not to_cpu and any(
            isinstance(a, (str, torch.device)) for a in (*args[1:], kwargs.get("device")))
        self_t = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if self_t is not None and not self._is_host(self_t) and (name in _SYNC_METHODS or to_cpu):
            self.syncs[f"{name} {_site(sys._getframe(1))}"] += 1
        if self_t is not None and self._is_host(self_t) and to_dev:
            self.h2d[f"{name} {_site(sys._getframe(1))}"] += 1
        out = func(*args, **kwargs)
        factory_host = name in _FACTORIES and kwargs.get("device") is None and not tensors
        factory_h2d = name in ("tensor", "as_tensor") and kwargs.get("device") is not None \
            and not tensors
        if factory_h2d:
            self.h2d[f"{name} {_site(sys._getframe(1))}"] += 1
        host = to_cpu or factory_host or name == "from_numpy" or (
            not to_dev and tensors and all(self._is_host(t) for t in tensors))
        if host:
            for o in (out if isinstance(out, (list, tuple)) else (out,)):
                if isinstance(o, torch.Tensor):
                    try:
                        o._mx_host = True
                    except (AttributeError, RuntimeError):
                        pass
        return out


def count_host_syncs(pg, rank: int, overrides: list[str]) -> dict[str, Any]:
    """Would-be host syncs and host-to-device creations of one FasterMoE layer forward +
    backward (after a warm-up call), keyed by call site."""
    layer, cfg = build_layer(overrides, pg, "fastermoe", grouped="moe.grouped_gemm=true"
                             in overrides)
    gen = torch.Generator().manual_seed(3 + rank)
    x = torch.randn(16, 2, cfg.model.hidden_size, generator=gen)
    gy = torch.randn(x.shape, generator=gen)
    run_layer(layer, x, gy)  # warm-up (lazy init, caches)
    with HostSyncCounter() as counter:
        run_layer(layer, x, gy)
    return {"syncs": sum(counter.syncs.values()), "sync_sites": dict(counter.syncs),
            "h2d": sum(counter.h2d.values()), "h2d_sites": dict(counter.h2d)}


def _site(frame) -> str:
    """file:line of the nearest frame outside torch, the CPU runtime and this test module."""
    while frame is not None:
        f = frame.f_code.co_filename
        if ("/torch/" not in f and not f.endswith("grouped_cases.py")
                and not f.endswith("runtime/cpu.py")):
            parts = Path(f).parts
            key = "megatron_moe_ext" if "megatron_moe_ext" in parts else "megatron"
            tail = parts[parts.index(key):] if key in parts else parts[-2:]
            return f"{'/'.join(tail)}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


# ------------------------------------------------------------------ entry


def worker(rank: int, world: int, ep: int, job: dict, out_dir: str) -> None:
    """Spawned entry: run the parts named in ``job``, write rank-local results as JSON."""
    ps, pg = _setup(ep)
    results: dict[str, Any] = {}
    try:
        if "module" in job:
            results["module"] = module_cases(pg, job["module"])
        if "layouts" in job:
            results["layouts"] = layout_cases(pg, job["layouts"])
        if "layer" in job:
            results["layer"] = layer_equivalence(pg, rank, job["layer"])
        if "checkpoint" in job:
            results["checkpoint"] = checkpoint_crossover(pg, rank, job["checkpoint"],
                                                         str(Path(out_dir, "ckpt")))
        if "syncs" in job:
            results["syncs"] = count_host_syncs(pg, rank, job["syncs"])
    except Exception:  # noqa: BLE001 - reported through the JSON, then re-raised
        results["error"] = traceback.format_exc()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        raise
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    import torch.distributed as dist

    dist.barrier()
    ps.destroy_model_parallel()
    dist.destroy_process_group()
