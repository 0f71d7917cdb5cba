"""Describe a run config without building it: parameters, FLOPs, memory per GPU, predicted speed.

``describe(cfg, world_size, cluster, tokens_per_worker)`` works from the config alone (no model,
no process group, no megatron import) and returns a JSON-serialisable dict;
``format_description`` renders it for humans. ``pretrain_gpt_moe.py --describe`` is the CLI.

Notation
--------
L layers (L_moe of them MoE), H hidden, V vocabulary, S seq_length, a attention heads,
E experts, k top-k, f expert ffn hidden, f_d dense ffn hidden, b micro-batch size,
e bytes per element of the model dtype (fp32 4, bf16 2).

Parameter layout (megatron-core 0.16 GPTModel / BertModel with our local specs,
add_bias_linear False; verified exactly against built models in tests/test_describe.py):

- embeddings: word V*H; learned_absolute positions P*H (P = max_position_embeddings or S);
  BERT with the sentence-order head: token types 2*H.
- per layer: input and pre-MLP norm (H weight, + H bias for LayerNorm), linear_qkv 3H*H,
  linear_proj H*H; MoE layers: router E*H and E experts of fc1 f1*H + fc2 H*f
  (f1 = 2f for swiglu, else f); dense layers: the same MLP with f_d.
- final norm. GPT: output_layer V*H when untied. BERT: lm_head dense H*H + bias H, lm_head
  norm, output bias V (+ V*H weight when untied); with the binary head also pooler dense
  H*H + bias H and binary head 2H + 2.
- BERT layers are all MoE (our BERT spec ignores moe.layer_freq); GPT layer i is MoE when
  i % moe.layer_freq == 0 (megatron's rule).

Paper convention (FasterMoE Table 2): size = L * (E * 2 alpha H^2 + 4 H^2) with
alpha = f / H, i.e. the weight matrices of attention and experts only (no embeddings, norms,
router, heads). It reproduces all seven Table 2 sizes with f = 2H (alpha = 2).

FLOPs per token (2 per multiply-add; Megatron convention, no causal halving):
forward = sum over layers [8H^2 + 4 S H + (MoE: k * 2 * expert params + 2 E H | dense:
2 * MLP params)] + 2 V H (+ 2 H^2 for BERT's lm_head dense); training = 3 x forward.

Memory per GPU (the heaviest pipeline stage; dense weights split over tensor parallel,
experts over expert parallel): weights e per param, gradients 4 (fp32 main grads),
Adam 8 (fp32) or 12 (bf16: fp32 master + m + v) per param, divided by the data-parallel size
(dense) / expert-data-parallel size (experts) with the distributed optimizer.
Activations (Korthikanti et al. 2022 scaled by e/2, no recomputation, local attention that
stores the S x S scores) per layer and micro-batch:
e/2 * [18 S b H + 5 a S^2 b + k' S b (2H + 4f)] with k' = k for MoE layers (1 for dense),
times the micro-batches in flight (min(pipeline, micro-batches); 1 without pipelining),
plus the logits S b V (e + 4) bytes on the last stage.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Optional

from megatron_moe_ext.config import Config, ConfigError, validate_world

logger = logging.getLogger(__name__)

GIB = 1024**3
"""Bytes per GiB."""

PAPER_TABLE2: dict[str, dict[str, Any]] = {
    "moe-gpt-s": {"name": "MoE-GPT-S", "size": 0.86e9, "cluster": "johnny"},
    "moe-gpt": {"name": "MoE-GPT", "size": 3.42e9, "cluster": "johnny"},
    "moe-gpt-l": {"name": "MoE-GPT-L", "size": 13.7e9, "cluster": "johnny"},
    "moe-bert-deep": {"name": "MoE-BERT-Deep", "size": 1.71e9, "cluster": "johnny"},
    "moe-bert-deep-l": {"name": "MoE-BERT-Deep-L", "size": 27.4e9, "cluster": "johnny"},
    "moe-bert-wide": {"name": "MoE-BERT-Wide", "size": 3.27e9, "cluster": "trevor"},
    "moe-bert-wide-l": {"name": "MoE-BERT-Wide-L", "size": 13.1e9, "cluster": "trevor"},
}
"""FasterMoE Table 2 sizes (parameters), keyed by the file stem in configs/models/."""

BREAKDOWN_KEYS = ("embeddings", "attention", "experts", "dense_mlp", "router", "norms",
                  "heads", "biases")
"""Keys of ``describe(...)["parameters"]["breakdown"]``; they sum to the total."""

ELEMENT_BYTES = {"fp32": 4, "bf16": 2}
"""Bytes per weight / activation element of train.precision."""


# --------------------------------------------------------------------------------------
# Shapes and parameters
# --------------------------------------------------------------------------------------


def resolve_vocab(cfg: Config, vocab_size: Optional[int] = None) -> tuple[int, str]:
    """(V, where it came from): argument, model.vocab_size, or the tokenizer padded to 128
    (what training does). Raises ConfigError when none is available."""
    if vocab_size:
        return int(vocab_size), "argument"
    if cfg.model.vocab_size:
        return int(cfg.model.vocab_size), "model.vocab_size"
    try:
        from megatron_moe_ext.training.data import build_tokenizer

        tok = build_tokenizer(cfg)
    except (ConfigError, FileNotFoundError, OSError) as exc:
        raise ConfigError(f"cannot tell the vocabulary size ({exc}); set model.vocab_size") from None
    padded = ((tok.vocab_size + 127) // 128) * 128
    return padded, f"{cfg.data.tokenizer.type} tokenizer ({tok.vocab_size}, padded to 128)"


def moe_layer_pattern(cfg: Config) -> list[bool]:
    """Per layer: True for an MoE layer (BERT: all; GPT: i % moe.layer_freq == 0)."""
    n = cfg.model.num_layers
    if cfg.model.type == "bert":
        return [True] * n
    return [i % cfg.moe.layer_freq == 0 for i in range(n)]


def _mlp_params(H: int, f: int, activation: str) -> int:
    """fc1 (f or 2f rows for swiglu) + fc2, no biases."""
    return (2 * f if activation == "swiglu" else f) * H + H * f


def _shapes(cfg: Config) -> dict[str, int]:
    m = cfg.model
    H = m.hidden_size
    f = cfg.moe.ffn_hidden_size or m.ffn_hidden_size
    norm = 2 * H if m.normalization == "LayerNorm" else H
    return {
        "H": H, "f": f, "fd": m.ffn_hidden_size, "norm": norm,
        "attn": 4 * H * H,
        "expert": _mlp_params(H, f, m.activation),
        "dense": _mlp_params(H, m.ffn_hidden_size, m.activation),
        "router": cfg.moe.num_experts * H,
    }


def _layer_params(cfg: Config, layers: list[bool], ep: int = 1, tp: int = 1) -> dict[str, int]:
    """Breakdown of the given layers (True = MoE); experts split over ep, dense over tp."""
    s = _shapes(cfg)
    moe = sum(layers)
    dense = len(layers) - moe
    return {
        "attention": len(layers) * s["attn"] // tp,
        "experts": moe * (cfg.moe.num_experts // ep) * s["expert"],
        "dense_mlp": dense * s["dense"] // tp,
        "router": moe * s["router"],
        "norms": len(layers) * 2 * s["norm"],
    }


def _outer_params(cfg: Config, V: int, first: bool, last: bool,
                  tp: int = 1, pp: int = 1) -> dict[str, int]:
    """Embeddings (first stage) and final norm / heads / biases (last stage)."""
    m = cfg.model
    s = _shapes(cfg)
    H = s["H"]
    bert = m.type == "bert"
    tied = not m.untie_embeddings_and_output_weights
    out = dict.fromkeys(("embeddings", "norms", "heads", "biases"), 0)
    if first:
        out["embeddings"] += V * H // tp
        if m.position_embedding_type == "learned_absolute":
            out["embeddings"] += (m.max_position_embeddings or m.seq_length) * H
        if bert and m.bert_binary_head:
            out["embeddings"] += 2 * H
    if last:
        out["norms"] += s["norm"]
        if not tied:
            out["heads"] += V * H // tp
        elif pp > 1 and not first:
            out["embeddings"] += V * H // tp  # megatron's copy of the tied word embeddings
        if bert:
            out["heads"] += H * H
            out["biases"] += H + V // tp
            out["norms"] += s["norm"]
            if m.bert_binary_head:
                out["heads"] += H * H + 2 * H
                out["biases"] += H + 2
    return out


def count_parameters(cfg: Config, vocab_size: Optional[int] = None) -> dict[str, Any]:
    """Whole-model parameter counts: breakdown, total, active per token, paper convention."""
    V, _ = resolve_vocab(cfg, vocab_size)
    layers = moe_layer_pattern(cfg)
    bd = dict.fromkeys(BREAKDOWN_KEYS, 0)
    for part in (_layer_params(cfg, layers), _outer_params(cfg, V, True, True)):
        for k, v in part.items():
            bd[k] += v
    s = _shapes(cfg)
    total = sum(bd.values())
    n_moe = sum(layers)
    inactive = n_moe * (cfg.moe.num_experts - cfg.moe.topk) * s["expert"]
    return {
        "breakdown": bd,
        "total": total,
        "active_per_token": total - inactive,
        "per_expert": s["expert"],
        "paper_convention": len(layers) * s["attn"] + bd["experts"] + bd["dense_mlp"],
        "non_embedding": total - bd["embeddings"],
    }


def _layer_flops(cfg: Config, is_moe: bool) -> dict[str, float]:
    """Forward FLOPs per token of one layer: attention projections, attention scores, the
    experts (MoE: k copies) and the rest of the MLP part (MoE: router; dense: the MLP)."""
    s = _shapes(cfg)
    return {"attention_projections": 2.0 * s["attn"],
            "attention_scores": 4.0 * cfg.model.seq_length * s["H"],
            "experts": cfg.moe.topk * 2.0 * s["expert"] if is_moe else 0.0,
            "mlp_other": 2.0 * s["router"] if is_moe else 2.0 * s["dense"]}


def _head_flops(cfg: Config, V: int) -> float:
    """Forward FLOPs per token of the output head (logits; BERT also its lm_head dense)."""
    H = cfg.model.hidden_size
    return 2.0 * V * H + (2.0 * H * H if cfg.model.type == "bert" else 0.0)


def iteration_stages(cfg: Config, V: int) -> list[dict[str, Any]]:
    """One pipeline of the model in forward order, for the scale lab's iteration mode:
    ``embedding``, ``layer0`` ... ``layer{L-1}``, ``head``. Each stage: ``moe`` (has experts),
    ``dense_params`` (the data-parallel replicated parameters, in registration order: (name,
    elements) -- experts are excluded, they are expert-parallel), ``flops_per_token`` (forward
    FLOPs per token outside the experts; the experts' are the exchange's). Same counts as
    :func:`count_parameters` and :func:`flops_per_token`."""
    s = _shapes(cfg)
    first = _outer_params(cfg, V, True, False)
    last = _outer_params(cfg, V, False, True)
    stages: list[dict[str, Any]] = [{
        "name": "embedding", "moe": False, "flops_per_token": 0.0,
        "dense_params": [(k, v) for k, v in first.items() if v]}]
    for i, is_moe in enumerate(moe_layer_pattern(cfg)):
        f = _layer_flops(cfg, is_moe)
        params = [("input_norm", s["norm"]), ("linear_proj", s["attn"] // 4),
                  ("linear_qkv", 3 * s["attn"] // 4), ("pre_mlp_norm", s["norm"]),
                  ("router", s["router"]) if is_moe else ("mlp", s["dense"])]
        stages.append({"name": f"layer{i}", "moe": is_moe, "dense_params": params,
                       "flops_per_token": f["attention_projections"] + f["attention_scores"]
                       + f["mlp_other"]})
    stages.append({"name": "head", "moe": False, "flops_per_token": _head_flops(cfg, V),
                   "dense_params": [(k, v) for k, v in last.items() if v]})
    return stages


def flops_per_token(cfg: Config, V: int) -> dict[str, float]:
    """Forward / training FLOPs per token (see the module docstring)."""
    layers = [_layer_flops(cfg, is_moe) for is_moe in moe_layer_pattern(cfg)]
    proj = sum(f["attention_projections"] for f in layers)
    scores = sum(f["attention_scores"] for f in layers)
    mlp = sum(f["experts"] + f["mlp_other"] for f in layers)
    head = _head_flops(cfg, V)
    fwd = proj + scores + mlp + head
    return {"attention_projections": proj, "attention_scores": scores, "mlp": mlp,
            "logits": head, "forward": fwd, "training": 3.0 * fwd}


# --------------------------------------------------------------------------------------
# Parallel layout and memory
# --------------------------------------------------------------------------------------


def default_world_size(cfg: Config) -> int:
    """Smallest world that fits the layout: tp * pp * dp with dp * tp a multiple of ep."""
    p = cfg.parallel
    dp = p.expert // math.gcd(p.expert, p.tensor)
    return p.tensor * p.pipeline * dp


def _layout(cfg: Config, world: int) -> dict[str, Any]:
    p, tr = cfg.parallel, cfg.train
    dp = validate_world(cfg, world, "cuda")
    edp = world // (p.pipeline * p.expert * p.expert_tensor)
    return {
        "world_size": world, "tensor": p.tensor, "pipeline": p.pipeline, "expert": p.expert,
        "data": dp, "expert_data": edp,
        "micro_batch_size": tr.micro_batch_size, "global_batch_size": tr.global_batch_size,
        "num_microbatches": tr.global_batch_size // (tr.micro_batch_size * dp),
        "distributed_optimizer": tr.use_distributed_optimizer,
    }


def _activation_bytes(cfg: Config, layers: list[bool], V: int, last: bool, tp: int) -> float:
    m, s = cfg.model, _shapes(cfg)
    e = ELEMENT_BYTES[cfg.train.precision]
    S, b, H, a = m.seq_length, cfg.train.micro_batch_size, s["H"], m.num_attention_heads
    total = 0.0
    for is_moe in layers:
        k = cfg.moe.topk if is_moe else 1
        f = s["f"] if is_moe else s["fd"]
        total += e / 2 * (18 * S * b * H + 5 * a * S * S * b / tp + k * S * b * (2 * H + 4 * f))
    if last:
        total += S * b * V / tp * (e + 4)
    return total


def memory_per_gpu(cfg: Config, layout: dict[str, Any], V: int) -> dict[str, Any]:
    """Bytes per GPU of the heaviest pipeline stage (see the module docstring)."""
    tp, pp, ep = cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.expert
    e = ELEMENT_BYTES[cfg.train.precision]
    adam = 12 if cfg.train.precision == "bf16" else 8
    shard_d = layout["data"] if layout["distributed_optimizer"] else 1
    shard_e = layout["expert_data"] if layout["distributed_optimizer"] else 1
    in_flight = 1 if pp == 1 else min(pp, layout["num_microbatches"])
    pattern = moe_layer_pattern(cfg)
    per_stage = len(pattern) // pp
    best: Optional[dict[str, Any]] = None
    for stage in range(pp):
        layers = pattern[stage * per_stage:(stage + 1) * per_stage]
        first, last = stage == 0, stage == pp - 1
        parts = _layer_params(cfg, layers, ep=ep, tp=tp)
        for k, v in _outer_params(cfg, V, first, last, tp=tp, pp=pp).items():
            parts[k] = parts.get(k, 0) + v
        expert = parts.pop("experts")
        dense = sum(parts.values())
        act = _activation_bytes(cfg, layers, V, last, tp) * (in_flight if first else 1)
        mem = {
            "stage": stage, "dense_params": dense, "expert_params": expert,
            "weights": (dense + expert) * e,
            "grads": (dense + expert) * 4,
            "optimizer": adam * (dense / shard_d + expert / shard_e),
            "activations": act,
        }
        mem["total"] = mem["weights"] + mem["grads"] + mem["optimizer"] + mem["activations"]
        if best is None or mem["total"] > best["total"]:
            best = mem
    assert best is not None
    best["total_gib"] = best["total"] / GIB
    best["micro_batches_in_flight"] = in_flight
    return best


# --------------------------------------------------------------------------------------
# Performance model
# --------------------------------------------------------------------------------------


def predict(cfg: Config, cluster: str, tokens_per_worker: int,
            layout: dict[str, Any]) -> dict[str, Any]:
    """Per-MoE-layer latency and roofline position for sync EP and the smart schedule,
    balanced routing (perf/model.py predict_layer)."""
    from megatron_moe_ext.perf.model import ideal_throughput, predict_layer, semi_ideal_throughput
    from megatron_moe_ext.routing import zipf_counts
    from megatron_moe_ext.perf.topology import (
        calibration_note,
        ep_topology,
        is_stand_in,
        load_cluster,
    )

    ep = cfg.parallel.expert
    out: dict[str, Any] = {"cluster": cluster, "tokens_per_worker": tokens_per_worker}
    full = load_cluster(cluster)  # a missing or invalid cluster is an error, whatever ep is
    if ep < 2:
        out["skipped"] = "expert parallel size 1: no all-to-all to model"
        return out
    topo = ep_topology(cluster, ep)
    if is_stand_in(topo):
        out["skipped"] = (f"parallel.expert={ep} does not map to whole nodes of {cluster} "
                          "(the layer would model it on a one-switch stand-in)")
        return out
    note = ("" if full.num_workers == ep else
            f"EP group = {topo.nodes} of the {full.nodes} nodes of {full.name}")
    out["calibration_note"] = calibration_note(full)
    s = _shapes(cfg)
    H, n = s["H"], topo.num_workers
    alpha = s["expert"] / (2.0 * H * H)  # perf model: 2 alpha H^2 MACs per token and expert
    dtype = cfg.train.precision
    counts = zipf_counts(n, cfg.moe.num_experts, tokens_per_worker, cfg.moe.topk)
    g = min(cfg.moe.fastermoe.group_size, n)
    if n % g:
        note += f"; group_size {g} does not divide {n}, smart schedule uses 1"
        g = 1
    layers_per_iter = sum(moe_layer_pattern(cfg)) / cfg.parallel.pipeline
    out.update({"workers": n, "alpha": alpha, "dtype": dtype, "group_size": g, "note": note,
                "world_vs_cluster": f"world {layout['world_size']}, cluster "
                                    f"{topo.spec.name} {topo.spec.num_workers} workers"})
    for sched in ("sync", "smart"):
        p = predict_layer(counts, None, H, alpha, None, topo, dtype, schedule=sched,
                          group_size=g)
        out[sched] = {
            "fwd_ms": p.fwd_s * 1e3, "bwd_ms": p.bwd_s * 1e3, "total_ms": p.total_s * 1e3,
            "comp_ms": p.comp_s * 1e3, "comm_ms": p.comm_s * 1e3, "r_cc": p.r_cc,
            "throughput_tflops": p.throughput / 1e12, "peak_tflops": p.peak_flops / 1e12,
            "fraction_of_peak": p.throughput / p.peak_flops if p.peak_flops else 0.0,
            "ideal_tflops": float(ideal_throughput(p.peak_flops, p.r_cc)) / 1e12,
            "semi_ideal_tflops": float(semi_ideal_throughput(p.peak_flops, p.r_cc)) / 1e12,
            "moe_ms_per_iteration": p.total_s * 1e3 * layers_per_iter
                                    * layout["num_microbatches"],
        }
    out["smart_speedup"] = out["sync"]["total_ms"] / out["smart"]["total_ms"]
    return out


# --------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------


def describe(cfg: Config, world_size: Optional[int] = None, cluster: Optional[str] = None,
             tokens_per_worker: Optional[int] = None, *,
             vocab_size: Optional[int] = None) -> dict[str, Any]:
    """Everything about a config that needs no model: see the module docstring.

    world_size defaults to :func:`default_world_size`; tokens_per_worker (tokens each worker
    routes per MoE layer, before top-k copies) to micro_batch_size * seq_length.
    Raises ConfigError for an inconsistent world size or an unknown vocabulary.
    """
    m = cfg.model
    V, vsrc = resolve_vocab(cfg, vocab_size)
    world = world_size or default_world_size(cfg)
    layout = _layout(cfg, world)
    params = count_parameters(cfg, V)
    flops = flops_per_token(cfg, V)
    tokens_iter = cfg.train.global_batch_size * m.seq_length
    flops["training_per_iteration"] = flops["training"] * tokens_iter
    flops["training_per_gpu_per_iteration"] = flops["training_per_iteration"] / world
    s = _shapes(cfg)
    d: dict[str, Any] = {
        "model": {
            "type": m.type, "num_layers": m.num_layers, "moe_layers": sum(moe_layer_pattern(cfg)),
            "hidden_size": s["H"], "ffn_hidden_size": s["fd"], "expert_ffn_hidden_size": s["f"],
            "alpha": s["f"] / s["H"], "num_experts": cfg.moe.num_experts, "topk": cfg.moe.topk,
            "num_attention_heads": m.num_attention_heads, "seq_length": m.seq_length,
            "vocab_size": V, "vocab_source": vsrc, "activation": m.activation,
            "position_embedding_type": m.position_embedding_type,
            "precision": cfg.train.precision, "moe_impl": cfg.moe.impl,
        },
        "parameters": params,
        "flops_per_token": flops,
        "parallel": layout,
        "memory_per_gpu": memory_per_gpu(cfg, layout, V),
        "perf": None,
    }
    if cluster:
        d["perf"] = predict(cfg, cluster, tokens_per_worker
                            or cfg.train.micro_batch_size * m.seq_length, layout)
    logger.debug("described %s: %d parameters", m.type, params["total"])
    return d


def _n(x: float) -> str:
    """Human count: 1.23B / 45.6M / 7.8K."""
    for div, suf in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suf}"
    return f"{x:.0f}"


def format_description(d: dict[str, Any]) -> str:
    """A readable multi-line summary of :func:`describe`'s dict."""
    m, p, f = d["model"], d["parameters"], d["flops_per_token"]
    lay, mem = d["parallel"], d["memory_per_gpu"]
    lines = [
        f"model: {m['type']}, {m['num_layers']} layers ({m['moe_layers']} MoE), H={m['hidden_size']}, "
        f"{m['num_attention_heads']} heads, {m['num_experts']} experts (ffn {m['expert_ffn_hidden_size']}"
        f" = {m['alpha']:g} H), top-{m['topk']}, seq {m['seq_length']}, vocab {m['vocab_size']} "
        f"({m['vocab_source']}), {m['precision']}, impl {m['moe_impl']}",
        f"parameters: total {_n(p['total'])} ({p['total']:,}), active per token "
        f"{_n(p['active_per_token'])}, paper convention (attention + expert matrices) "
        f"{_n(p['paper_convention'])}, one expert {_n(p['per_expert'])}",
        "  " + ", ".join(f"{k} {_n(v)}" for k, v in p["breakdown"].items() if v),
        f"FLOPs per token: forward {_n(f['forward'])} (attention scores {_n(f['attention_scores'])}),"
        f" training {_n(f['training'])}; per iteration {_n(f['training_per_iteration'])}, "
        f"per GPU {_n(f['training_per_gpu_per_iteration'])}",
        f"layout: world {lay['world_size']} = tp {lay['tensor']} x pp {lay['pipeline']} x dp "
        f"{lay['data']}; ep {lay['expert']} (expert dp {lay['expert_data']}); micro-batch "
        f"{lay['micro_batch_size']}, global {lay['global_batch_size']}, micro-batches per "
        f"iteration {lay['num_microbatches']}; distributed optimizer "
        f"{'on' if lay['distributed_optimizer'] else 'off'}",
        f"memory per GPU (stage {mem['stage']}): {mem['total_gib']:.2f} GiB = weights "
        f"{mem['weights'] / GIB:.2f} + grads {mem['grads'] / GIB:.2f} + Adam "
        f"{mem['optimizer'] / GIB:.2f} + activations {mem['activations'] / GIB:.2f} "
        f"({_n(mem['dense_params'])} dense + {_n(mem['expert_params'])} expert params)",
    ]
    perf = d.get("perf")
    if perf:
        if "skipped" in perf:
            lines.append(f"perf on {perf['cluster']}: skipped ({perf['skipped']})")
        else:
            lines.append(
                f"perf on {perf['cluster']} ({perf['workers']} workers, {perf['tokens_per_worker']}"
                f" tokens/worker/layer, balanced routing, {perf['dtype']}, alpha {perf['alpha']:g}"
                f"{'; ' + perf['note'] if perf['note'] else ''}):")
            for sched in ("sync", "smart"):
                q = perf[sched]
                label = sched if sched == "sync" else f"smart g={perf['group_size']}"
                lines.append(
                    f"  {label:<10} {q['total_ms']:.3f} ms/layer (fwd {q['fwd_ms']:.3f}, bwd "
                    f"{q['bwd_ms']:.3f}; comp {q['comp_ms']:.3f}, a2a {q['comm_ms']:.3f}), R_CC "
                    f"{q['r_cc']:.3g}, {q['throughput_tflops']:.3g} TFLOP/s per worker "
                    f"({100 * q['fraction_of_peak']:.0f}% of {q['peak_tflops']:g}), "
                    f"{q['moe_ms_per_iteration']:.1f} ms MoE per iteration")
            lines.append(f"  smart schedule speedup {perf['smart_speedup']:.2f}x")
            if perf.get("calibration_note"):
                lines.append(f"  warning: {perf['calibration_note']}")
    return "\n".join(lines) + "\n"


def env_world_size() -> Optional[int]:
    """WORLD_SIZE from the launcher environment, if set."""
    value = os.environ.get("WORLD_SIZE")
    return int(value) if value else None
