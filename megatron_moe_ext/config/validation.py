"""Value and cross-field checks of a :class:`~.schema.Config` (no process group needed; the
world size is passed in where it matters). Every failure is a :class:`~.schema.ConfigError`
naming the dotted key, the bad value and the accepted values."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import yaml

from megatron_moe_ext.core.plan import validate_group_size

from .schema import (
    COMM_PRIORITIES,
    LOAD_BALANCING_TYPES,
    SHADOW_POLICIES,
    SHADOW_PREFETCH_MODES,
    Config,
    ConfigError,
    MoEConfig,
    RouterConfig,
)

__all__ = ["validate", "validate_world"]

# --------------------------------------------------------------------------------------
# Validation (no process group needed; world size passed in where it matters)
# --------------------------------------------------------------------------------------


def _choice(key: str, value: Any, accepted: Sequence[Any]) -> None:
    if value not in accepted:
        raise ConfigError(
            f"config key '{key}': {value!r} is not accepted; choose one of {list(accepted)}"
        )


def _positive(key: str, value: Optional[float], allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"config key '{key}': {value!r} must be {bound}")


def validate(cfg: Config) -> None:
    """Value and cross-field checks that need no process group."""
    m, moe, par, tr = cfg.model, cfg.moe, cfg.parallel, cfg.train
    _choice("model.type", m.type, ["gpt", "bert"])
    _choice("model.position_embedding_type", m.position_embedding_type, ["rope", "learned_absolute"])
    _choice("model.normalization", m.normalization, ["LayerNorm", "RMSNorm"])
    _choice("model.activation", m.activation, ["gelu", "silu", "swiglu"])
    for k in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "seq_length"):
        _positive(f"model.{k}", getattr(m, k))
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            f"model.num_attention_heads={m.num_attention_heads} must divide "
            f"model.hidden_size={m.hidden_size}"
        )
    _choice("model.transformer_impl", m.transformer_impl, ["auto", "transformer_engine", "local"])
    _choice("moe.impl", moe.impl, ["megatron", "fastermoe"])
    if not isinstance(moe.grouped_gemm, bool):
        raise ConfigError(f"config key 'moe.grouped_gemm': {moe.grouped_gemm!r} must be true or false")
    if moe.grouped_gemm:
        ffn = moe.ffn_hidden_size or m.ffn_hidden_size
        if m.hidden_size % 8 or ffn % 8:
            raise ConfigError(
                f"moe.grouped_gemm: true needs model.hidden_size ({m.hidden_size}) and the expert "
                f"FFN size (moe.ffn_hidden_size or model.ffn_hidden_size: {ffn}) to be multiples "
                "of 8 (grouped_mm's 16-byte row alignment in bf16)")
    _choice("moe.token_dispatcher", moe.token_dispatcher, ["alltoall", "allgather"])
    _choice("moe.drop_policy", moe.drop_policy, ["probs", "position"])
    _choice("moe.router.type", moe.router.type, ["topk", "topology_aware"])
    _choice(
        "moe.router.load_balancing_type",
        moe.router.load_balancing_type,
        LOAD_BALANCING_TYPES,
    )
    _choice("moe.router.score_function", moe.router.score_function, ["softmax", "sigmoid"])
    _choice("moe.router.dtype", moe.router.dtype, ["fp32", "fp64", None])
    if moe.router.type == "topology_aware":
        _validate_topology_gate(moe.router)
    _validate_router_options(moe)
    _choice("moe.fastermoe.shadow.policy", moe.fastermoe.shadow.policy, list(SHADOW_POLICIES))
    _validate_prefetch(moe)
    _positive("moe.num_experts", moe.num_experts)
    _positive("moe.topk", moe.topk)
    _positive("moe.layer_freq", moe.layer_freq)
    _positive("moe.capacity_factor", moe.capacity_factor)
    _positive("moe.fastermoe.group_size", moe.fastermoe.group_size)
    if moe.topk > moe.num_experts:
        raise ConfigError(f"moe.topk={moe.topk} exceeds moe.num_experts={moe.num_experts}")
    if moe.topk == 1 and moe.router.score_function == "softmax" and not moe.router.pre_softmax:
        raise ConfigError("moe.topk: 1 with moe.router.score_function: softmax needs "
                          "moe.router.pre_softmax: true (megatron-core rule)")
    if moe.pad_to_capacity and moe.capacity_factor is None:
        raise ConfigError("moe.pad_to_capacity: true needs moe.capacity_factor to be set")
    for k in ("tensor", "pipeline", "expert", "expert_tensor"):
        _positive(f"parallel.{k}", getattr(par, k))
    if par.expert_tensor != 1:
        raise ConfigError("parallel.expert_tensor: only 1 is supported")
    if moe.num_experts % par.expert:
        raise ConfigError(
            f"moe.num_experts={moe.num_experts} is not divisible by parallel.expert={par.expert}"
        )
    if m.num_layers % par.pipeline:
        raise ConfigError(
            f"parallel.pipeline={par.pipeline} must divide model.num_layers={m.num_layers}"
        )
    if par.tensor > 1 and not par.sequence_parallel:
        raise ConfigError("MoE with parallel.tensor > 1 needs parallel.sequence_parallel: true")
    if moe.impl == "fastermoe":
        if moe.token_dispatcher != "alltoall":
            raise ConfigError("moe.impl: fastermoe replaces the dispatcher; leave "
                              "moe.token_dispatcher at 'alltoall'")
        if par.tensor != 1:
            raise ConfigError("moe.impl: fastermoe supports parallel.tensor: 1 only")
        if moe.pad_to_capacity:
            raise ConfigError("moe.impl: fastermoe does not support moe.pad_to_capacity yet; "
                              "use capacity_factor without padding")
    _choice("train.precision", tr.precision, ["fp32", "bf16"])
    _choice("train.lr_decay_style", tr.lr_decay_style, ["cosine", "linear", "constant"])
    for k in ("iters", "micro_batch_size", "global_batch_size"):
        _positive(f"train.{k}", getattr(tr, k))
    _positive("train.lr", tr.lr)
    _positive("train.min_lr", tr.min_lr, allow_zero=True)
    _positive("train.lr_warmup_iters", tr.lr_warmup_iters, allow_zero=True)
    _positive("train.clip_grad", tr.clip_grad, allow_zero=True)
    _positive("train.eval_interval", tr.eval_interval, allow_zero=True)
    _positive("train.eval_iters", tr.eval_iters, allow_zero=True)
    _choice("train.comm_priority", tr.comm_priority, list(COMM_PRIORITIES))
    _positive("train.grad_reduce_chunk_mb", tr.grad_reduce_chunk_mb)
    _positive("train.ddp_bucket_size", tr.ddp_bucket_size)
    if tr.comm_priority != "none" and not tr.overlap_grad_reduce:
        raise ConfigError(f"train.comm_priority: {tr.comm_priority} needs "
                          "train.overlap_grad_reduce: true (it reorders the reductions that "
                          "overlap backward; without overlap there is nothing to reorder)")
    decay = tr.lr_decay_iters or tr.iters
    if tr.lr_warmup_iters >= decay:
        raise ConfigError(
            f"train.lr_warmup_iters={tr.lr_warmup_iters} must be smaller than the decay length "
            f"(train.lr_decay_iters, default train.iters) = {decay}"
        )
    if tr.global_batch_size % tr.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size={tr.global_batch_size} must be a multiple of "
            f"train.micro_batch_size={tr.micro_batch_size}"
        )
    _choice("data.tokenizer.type", cfg.data.tokenizer.type, ["bpe", "byte", "none"])
    if not cfg.data.mock and not cfg.data.path:
        raise ConfigError("data.path is required unless data.mock: true "
                          "(make one with scripts/preprocess_data.py)")
    _choice("checkpoint.optimizer_sharding", cfg.checkpoint.optimizer_sharding,
            ["dp_reshardable", "fully_reshardable"])
    _positive("checkpoint.interval", cfg.checkpoint.interval, allow_zero=True)
    _positive("checkpoint.keep", cfg.checkpoint.keep, allow_zero=True)
    _positive("logging.interval", cfg.logging.interval)
    _choice("logging.level", cfg.logging.level, ["DEBUG", "INFO", "WARNING", "ERROR"])
    _choice("logging.wandb.mode", cfg.logging.wandb.mode, ["offline", "online", "disabled"])
    _choice("logging.imbalance_source", cfg.logging.imbalance_source,
            ["auto", "measured", "estimated"])
    _positive("logging.hot_experts", cfg.logging.hot_experts)
    if cfg.logging.tensorboard:
        _require_package("logging.tensorboard: true", "tensorboard", "tensorboard==2.21.0")
    if cfg.logging.wandb.enabled:
        _require_package("logging.wandb.enabled: true", "wandb", "wandb==0.31.0")
    _choice("runtime.device", cfg.runtime.device, ["auto", "cpu", "cuda"])
    _choice("runtime.backend", cfg.runtime.backend, ["auto", "nccl", "gloo"])
    _positive("logging.routing_trace_tokens", cfg.logging.routing_trace_tokens, allow_zero=True)
    if cfg.logging.routing_trace_tokens and not cfg.logging.routing_trace:
        raise ConfigError("logging.routing_trace_tokens needs logging.routing_trace: true")
    if cfg.logging.routing_trace and cfg.parallel.pipeline > 1:
        raise ConfigError("logging.routing_trace: pipeline parallel > 1 is not supported yet "
                          f"(parallel.pipeline={cfg.parallel.pipeline}); set it to false")


def _require_package(setting: str, module: str, pin: str) -> None:
    """A requested optional writer whose package is not importable is a config error."""
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except ValueError:  # in sys.modules as None: import blocked
        found = False
    if not found:
        raise ConfigError(f"config key '{setting.split(':')[0]}': {setting} needs the "
                          f"'{module}' package, which is not installed: pip install {pin}")


def _validate_router_options(moe: MoEConfig) -> None:
    """Expert bias, group-limited routing and shared experts (megatron-core's own rules, as
    config errors before any process group)."""
    r = moe.router
    if r.enable_expert_bias and r.score_function != "sigmoid":
        raise ConfigError("moe.router.enable_expert_bias: true needs "
                          "moe.router.score_function: sigmoid (megatron-core rule)")
    _positive("moe.router.bias_update_rate", r.bias_update_rate)
    if (r.num_groups is None) != (r.group_topk is None):
        raise ConfigError("group-limited routing needs both moe.router.num_groups and "
                          "moe.router.group_topk (or neither)")
    if r.num_groups is not None:
        _positive("moe.router.num_groups", r.num_groups)
        _positive("moe.router.group_topk", r.group_topk)
        if moe.num_experts % r.num_groups:
            raise ConfigError(f"moe.router.num_groups={r.num_groups} must divide "
                              f"moe.num_experts={moe.num_experts}")
        if r.group_topk > r.num_groups or r.group_topk > moe.topk:
            raise ConfigError(f"moe.router.group_topk={r.group_topk} must be <= "
                              f"moe.router.num_groups={r.num_groups} and <= moe.topk={moe.topk}")
        if r.group_topk * (moe.num_experts // r.num_groups) < moe.topk:
            raise ConfigError(f"moe.router.group_topk={r.group_topk} groups of "
                              f"{moe.num_experts // r.num_groups} experts hold fewer than "
                              f"moe.topk={moe.topk} experts")
        if r.type == "topology_aware":
            raise ConfigError("moe.router.type: topology_aware does not support group-limited "
                              "routing (moe.router.num_groups / group_topk)")
    _positive("moe.shared_expert_ffn_hidden_size", moe.shared_expert_ffn_hidden_size)
    if moe.shared_expert_ffn_hidden_size is not None and moe.impl == "fastermoe":
        raise ConfigError("moe.shared_expert_ffn_hidden_size (shared experts) is supported with "
                          "moe.impl: megatron only; FasterMoELayer has no shared-expert path")


def _validate_prefetch(moe: MoEConfig) -> None:
    """moe.fastermoe.shadow.prefetch: a known mode; other than none only where there are
    shadows to prefetch (moe.impl: fastermoe, a policy other than never)."""
    sh = moe.fastermoe.shadow
    _choice("moe.fastermoe.shadow.prefetch", sh.prefetch, list(SHADOW_PREFETCH_MODES))
    _positive("moe.fastermoe.shadow.prefetch_slack", sh.prefetch_slack, allow_zero=True)
    if sh.prefetch != "none" and (moe.impl != "fastermoe" or sh.policy == "never"):
        raise ConfigError(
            f"config key 'moe.fastermoe.shadow.prefetch': {sh.prefetch!r} needs moe.impl: "
            f"fastermoe and moe.fastermoe.shadow.policy other than never (got moe.impl: "
            f"{moe.impl}, policy: {sh.policy}); accepted values here: ['none']; with them: "
            f"{list(SHADOW_PREFETCH_MODES)}")


def _validate_topology_gate(r: RouterConfig) -> None:
    """moe.router.type: topology_aware needs a cluster or an explicit off-node fraction."""
    if r.cluster is None and r.offnode_fraction is None:
        raise ConfigError("moe.router.type: topology_aware needs moe.router.cluster (a name in "
                          "configs/clusters/ or a YAML path) or moe.router.offnode_fraction")
    if r.offnode_fraction is not None and not 0.0 < r.offnode_fraction <= 1.0:
        raise ConfigError(f"config key 'moe.router.offnode_fraction': {r.offnode_fraction!r} "
                          "must be in (0, 1]")
    if r.workers_per_node is not None and r.workers_per_node < 1:
        raise ConfigError(f"config key 'moe.router.workers_per_node': {r.workers_per_node!r} "
                          "must be >= 1")
    if r.load_balancing_type == "sinkhorn":
        raise ConfigError("moe.router.type: topology_aware does not support "
                          "moe.router.load_balancing_type: sinkhorn")
    if r.cluster is not None:
        from megatron_moe_ext.perf.topology import ClusterSpecError, load_cluster

        try:
            spec = load_cluster(r.cluster)
        except (ClusterSpecError, yaml.YAMLError, OSError) as exc:
            raise ConfigError(f"config key 'moe.router.cluster': {exc}") from None
        if r.offnode_fraction is None and spec.nodes > 1 and spec.workers_per_node == 1:
            raise ConfigError(f"moe.router.cluster: {r.cluster!r} has one worker per node, so "
                              "W_local is undefined; set moe.router.offnode_fraction")


def validate_world(cfg: Config, world_size: int, device: str) -> int:
    """Checks that need the world size and the resolved device; returns the data-parallel size."""
    par, tr = cfg.parallel, cfg.train
    model_parallel = par.tensor * par.pipeline
    if world_size % model_parallel:
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tensor x parallel.pipeline "
            f"= {par.tensor} x {par.pipeline}"
        )
    dp = world_size // model_parallel
    if (dp * par.tensor) % par.expert:
        raise ConfigError(
            f"parallel.expert={par.expert} must divide data-parallel x tensor size "
            f"= {dp} x {par.tensor} (world size {world_size})"
        )
    if tr.global_batch_size % (tr.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size={tr.global_batch_size} must be a multiple of "
            f"train.micro_batch_size x data-parallel size = {tr.micro_batch_size} x {dp}"
        )
    if cfg.moe.impl == "fastermoe":
        try:
            validate_group_size(par.expert, cfg.moe.fastermoe.group_size)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if device == "cpu":
        if par.tensor > 1:
            raise ConfigError("parallel.tensor > 1 with MoE is not supported on CPU "
                              "(gloo rejects the uneven all-gather it needs); use parallel.tensor: 1")
        if cfg.runtime.backend == "nccl":
            raise ConfigError("runtime.backend: nccl needs CUDA; use gloo or auto on CPU")
    return dp
