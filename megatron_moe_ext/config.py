"""The run configuration: one schema of dataclasses, loaded from YAML plus dotted CLI overrides.

``load_config("configs/gpt_moe_tiny.yaml", ["moe.num_experts=8", "train.iters=50"])`` merges the
YAML file and the overrides onto the defaults with OmegaConf (unknown keys and wrong types are
rejected there), then :func:`validate` checks values and cross-field rules. Every error is a
:class:`ConfigError` that names the dotted key, the bad value and the accepted values, and it is
raised before any process group exists, so a bad config never hangs a job.

Each field carries its documentation as an attribute docstring; ``pretrain_gpt_moe.py
--help-config`` prints them (see :func:`field_docs`).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from megatron_moe_ext.core.plan import validate_group_size
from megatron_moe_ext.core.shadow_policy import SHADOW_POLICIES


class ConfigError(ValueError):
    """A configuration problem, phrased for the user: names the key and the accepted values."""


# --------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------


@dataclass
class TokenizerConfig:
    """How text becomes token ids."""

    type: str = "bpe"
    """`bpe`: a byte-level BPE trained by scripts/preprocess_data.py and saved as
    `tokenizer.json` next to the data; `byte`: raw UTF-8 bytes (vocab 256 + specials);
    `none`: ids are used as given (mock data; needs model.vocab_size)."""
    path: Optional[str] = None
    """Path of the `tokenizer.json` (type bpe). Default: `<data.path directory>/tokenizer.json`."""


@dataclass
class ModelConfig:
    """The transformer trunk."""

    type: str = "gpt"
    """`gpt` (causal LM) or `bert` (masked LM + sentence-order head)."""
    num_layers: int = 2
    """Number of transformer layers."""
    hidden_size: int = 64
    """Hidden size H."""
    ffn_hidden_size: int = 128
    """FFN hidden size of dense layers (and of experts unless moe.ffn_hidden_size is set)."""
    num_attention_heads: int = 4
    """Attention heads; must divide hidden_size."""
    seq_length: int = 64
    """Tokens per sample."""
    max_position_embeddings: Optional[int] = None
    """Position table size for learned positions. Default: seq_length."""
    vocab_size: Optional[int] = None
    """Vocabulary size. Default: taken from the tokenizer (padded to a multiple of 128)."""
    position_embedding_type: str = "rope"
    """`rope` or `learned_absolute`."""
    normalization: str = "LayerNorm"
    """`LayerNorm` or `RMSNorm`."""
    activation: str = "gelu"
    """Expert and dense MLP activation: `gelu`, `silu` or `swiglu`."""
    hidden_dropout: float = 0.0
    """Dropout after attention and MLP."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    init_method_std: float = 0.02
    """Std of the normal weight initialisation."""
    untie_embeddings_and_output_weights: bool = False
    """Use a separate output projection instead of the input embedding."""
    bert_binary_head: bool = True
    """BERT only: train the sentence-order prediction head."""
    transformer_impl: str = "auto"
    """Layer implementation: `transformer_engine` (megatron-core's Transformer Engine specs:
    TE linears, fused / flash attention, TE norms; needs TE and CUDA), `local` (megatron-core's
    torch modules) or `auto` (TE when it imports and the device is CUDA, else local; one log
    line says which). On CUDA Megatron's fusions are on where their dependencies exist, on the
    CPU they are off (see megatron_moe_ext/megatron/specs.py)."""


@dataclass
class RouterConfig:
    """Megatron's router options (identical for both moe.impl values)."""

    type: str = "topk"
    """`topk` (Megatron's TopKRouter) or `topology_aware` (FasterMoE's topology-aware gate: at
    most a fraction of each worker's routed copies go to experts on other nodes, the rest are
    re-routed to local-node experts; see docs/topology_gate.md)."""
    load_balancing_type: str = "aux_loss"
    """`aux_loss` (per micro-batch), `seq_aux_loss` (per sequence, DeepSeek-V2/V3),
    `global_aux_loss` (over the global batch), `sinkhorn` or `none`."""
    aux_loss_coeff: float = 0.01
    """Weight of the load-balancing loss."""
    z_loss_coeff: Optional[float] = None
    """Weight of the router z-loss (None: off)."""
    score_function: str = "softmax"
    """`softmax` or `sigmoid`."""
    pre_softmax: bool = False
    """Apply softmax before top-k selection."""
    cluster: Optional[str] = None
    """topology_aware: cluster description (a name in configs/clusters/ or a YAML path) giving
    the off-node fraction W_net / (M * W_local) and the workers per node M."""
    offnode_fraction: Optional[float] = None
    """topology_aware: the off-node fraction f in (0, 1] directly (overrides the cluster's); a
    worker sends at most floor(f * tokens * topk) routed copies to other nodes."""
    workers_per_node: Optional[int] = None
    """topology_aware: workers per node M for the expert-parallel rank -> node mapping (rank r
    of the EP group is on node r // M); overrides the cluster's, for emulated clusters.
    Default: the cluster's, else the launcher's LOCAL_WORLD_SIZE."""
    dtype: Optional[str] = "fp32"
    """Router logits dtype: `fp32`, `fp64` or None (model dtype)."""
    enable_expert_bias: bool = False
    """Aux-loss-free load balancing (DeepSeek-V3): a per-expert bias added to the scores for
    the top-k selection only, updated after every optimizer step towards equal loads (by
    megatron-core's finalize_model_grads). Needs score_function: sigmoid; combine with
    load_balancing_type: none for no aux loss at all."""
    bias_update_rate: float = 1e-3
    """With enable_expert_bias: the bias step per iteration (bias += rate * sign(mean load -
    load))."""
    num_groups: Optional[int] = None
    """Group-limited routing: experts form num_groups equal groups (e.g. one per device or
    node); each token first picks group_topk groups, then its top-k experts inside them.
    Must divide moe.num_experts; set together with group_topk."""
    group_topk: Optional[int] = None
    """Group-limited routing: groups each token may use (<= num_groups, <= moe.topk)."""


LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none")
"""Accepted values of moe.router.load_balancing_type."""

COMM_PRIORITIES = ("none", "moe_first")
"""Accepted values of train.comm_priority."""


@dataclass
class ShadowConfig:
    """FasterMoE dynamic shadow experts (replicate popular experts for one iteration)."""

    policy: str = "never"
    """`never`; `predictor`: the paper's Algorithm 1 (greedy over the hottest experts, judged by
    the synchronous formula 3 C + 4 A of the busiest worker, nothing hidden); `model`: the same
    greedy judged by the full performance model's layer time with the smart schedule (knows
    what the schedule already hides, so it does not shadow when the weight broadcast costs
    more than the overlap leaves to gain); `top_k`: always the `max_experts` hottest."""
    max_experts: int = 1
    """With policy top_k: how many of the most loaded experts to shadow every iteration."""


@dataclass
class FasterMoEConfig:
    """Options of the FasterMoE expert layer (moe.impl: fastermoe)."""

    group_size: int = 1
    """Workers per group of the grouped pairwise exchange; must divide the expert-parallel size."""
    trace: bool = False
    """Record send / compute / return step timings and write a Chrome trace per rank."""
    trace_dir: Optional[str] = None
    """Where traces go. Default: `<logging.dir>/traces`."""
    shadow: ShadowConfig = field(default_factory=ShadowConfig)
    """Shadow experts."""
    cluster: Optional[str] = None
    """Cluster description for the performance model (shadow predictor and predicted layer
    time): a name in configs/clusters/ or a YAML path. Default: `local-cpu`."""


@dataclass
class MoEConfig:
    """Mixture-of-Experts layers."""

    num_experts: int = 4
    """Experts per MoE layer (E); must be divisible by parallel.expert."""
    topk: int = 2
    """Experts each token is routed to."""
    impl: str = "megatron"
    """`megatron`: stock MoELayer with the alltoall dispatcher; `fastermoe`: this project's layer
    (same router, same weights layout, same math)."""
    ffn_hidden_size: Optional[int] = None
    """Expert FFN hidden size. Default: model.ffn_hidden_size."""
    layer_freq: int = 1
    """Every n-th layer is an MoE layer (1: all layers)."""
    token_dispatcher: str = "alltoall"
    """Dispatcher of the megatron impl: `alltoall` or `allgather`."""
    capacity_factor: Optional[float] = None
    """Expert capacity factor; None means no token dropping."""
    pad_to_capacity: bool = False
    """Pad every expert's input to its capacity (needs capacity_factor)."""
    drop_policy: str = "probs"
    """Which tokens are dropped over capacity: `probs` (lowest probability) or `position`."""
    grouped_gemm: bool = False
    """Run the local experts as grouped GEMMs instead of one GEMM pair per expert: TE's
    TEGroupedMLP with model.transformer_impl transformer_engine, else our grouped experts on
    torch.nn.functional.grouped_mm (CPU and GPU; hidden and expert FFN sizes must be multiples
    of 8). Same parameters and checkpoint layout as the sequential experts, both moe.impl."""
    shared_expert_ffn_hidden_size: Optional[int] = None
    """Shared experts (every token goes through them, next to its routed experts): their
    total FFN hidden size (megatron's moe_shared_expert_intermediate_size). None: no shared
    experts. moe.impl: megatron only."""
    router: RouterConfig = field(default_factory=RouterConfig)
    """Router settings."""
    fastermoe: FasterMoEConfig = field(default_factory=FasterMoEConfig)
    """FasterMoE layer settings."""


@dataclass
class ParallelConfig:
    """Parallel layout; the data-parallel size is derived: world / (tensor * pipeline)."""

    tensor: int = 1
    """Tensor-parallel size (must be 1 on CPU with MoE)."""
    pipeline: int = 1
    """Pipeline-parallel size; must divide model.num_layers."""
    expert: int = 1
    """Expert-parallel size; must divide the data-parallel x tensor size and moe.num_experts."""
    expert_tensor: int = 1
    """Expert tensor-parallel size (only 1 is supported)."""
    sequence_parallel: bool = False
    """Sequence parallelism (needed by MoE when tensor > 1)."""


@dataclass
class TrainConfig:
    """Optimisation."""

    iters: int = 100
    """Total training iterations (optimizer steps)."""
    micro_batch_size: int = 4
    """Samples per micro-batch per data-parallel rank."""
    global_batch_size: int = 16
    """Samples per iteration over all data-parallel ranks; multiple of micro x data-parallel."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Final learning rate of the decay."""
    lr_warmup_iters: int = 10
    """Linear warm-up iterations."""
    lr_decay_style: str = "cosine"
    """`cosine`, `linear` or `constant`."""
    lr_decay_iters: Optional[int] = None
    """Iterations of the decay. Default: train.iters."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.95
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Gradient clipping by global norm (0: off)."""
    seed: int = 1234
    """Random seed (weights, data order, dropout)."""
    precision: str = "fp32"
    """`fp32` or `bf16` (mixed precision with fp32 main weights)."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (Megatron's DistributedOptimizer)."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduction with backward."""
    comm_priority: str = "none"
    """`none`: Megatron DDP launches each bucket's reduction when its gradients are ready;
    `moe_first` (Lina): the reductions are cut into chunks of at most grad_reduce_chunk_mb and
    the next chunk is held while an MoE exchange is in flight, so the all-to-all goes first on
    the links; everything is flushed before the optimizer, the math is unchanged (both moe.impl
    values; needs train.overlap_grad_reduce: true; docs/lina.md)."""
    ddp_bucket_size: Optional[int] = None
    """Parameters (elements) per Megatron DDP gradient bucket with overlap_grad_reduce: a
    bucket's reduction starts when all its gradients are ready. Default: megatron-core's,
    max(40M, 1M x data-parallel size), i.e. one bucket for small models."""
    grad_reduce_chunk_mb: float = 4.0
    """comm_priority moe_first: largest gradient-reduction chunk in MiB (bytes on the wire of
    one collective); an exchange that starts waits for at most one chunk per process group."""
    eval_interval: int = 0
    """Evaluate on the validation split every n iterations (0: only at the end if eval_iters)."""
    eval_iters: int = 2
    """Micro-batch rounds per evaluation."""
    exit_after_iters: Optional[int] = None
    """Stop (after saving a checkpoint) once this iteration is reached; for tests and slurm slices."""


@dataclass
class DataConfig:
    """Training data."""

    path: Optional[str] = None
    """Prefix of a Megatron indexed dataset (`<path>.bin` / `<path>.idx`), made by
    scripts/preprocess_data.py. Required unless mock is true."""
    mock: bool = False
    """Use Megatron's mock (random token) dataset; for speed tests."""
    split: str = "949,50,1"
    """Train / validation / test split weights."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Tokenizer settings."""
    cache_dir: Optional[str] = None
    """Where dataset index caches go. Default: next to the data."""
    mask_prob: float = 0.15
    """BERT only: masked-LM probability."""


@dataclass
class CheckpointConfig:
    """Distributed checkpointing (megatron-core dist_checkpointing)."""

    save: Optional[str] = None
    """Directory for checkpoints (None: no saving)."""
    load: Optional[str] = None
    """Directory to resume from. Default: checkpoint.save. A missing folder is an error, except
    when it equals checkpoint.save (Megatron-LM's `--save X --load X`): the first run of such a
    job starts from scratch."""
    interval: int = 0
    """Save every n iterations (0: only at the end and on SIGTERM/SIGUSR1)."""
    keep: int = 2
    """Keep the newest n complete checkpoints (0: keep all)."""
    resume: bool = True
    """Resume automatically from the latest complete checkpoint in `load`."""
    optimizer_sharding: str = "fully_reshardable"
    """Distributed-optimizer state layout on disk: `fully_reshardable` (loads under any parallel
    layout, e.g. a different parallel.expert; gathers optimizer state over data-parallel ranks when
    saving) or `dp_reshardable` (cheaper saves; resumable only with the same parallel layout)."""
    save_on_signal: bool = True
    """Save and exit cleanly on SIGTERM / SIGUSR1 (slurm preemption)."""


@dataclass
class WandbConfig:
    """Weights & Biases logging."""

    enabled: bool = False
    """Log to wandb."""
    project: str = "megatron-moe-ext"
    """wandb project."""
    mode: str = "offline"
    """`offline` (works without network) or `online`."""
    name: Optional[str] = None
    """Run name."""


@dataclass
class LoggingConfig:
    """What the run reports."""

    interval: int = 1
    """Log every n iterations."""
    dir: str = "runs/default"
    """Run folder: resolved config, metrics, traces, tensorboard."""
    metrics_file: Optional[str] = None
    """JSON-lines metrics file. Default: `<logging.dir>/metrics.jsonl`."""
    tensorboard: bool = False
    """Write tensorboard events to `<logging.dir>/tensorboard`."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """wandb settings."""
    level: str = "INFO"
    """Log level of rank 0 (others log warnings only)."""
    imbalance_source: str = "auto"
    """Per-rank expert compute time behind the imbalance cost of each MoE layer: `measured`
    (forward expert time timed on every rank, backward taken as 2x forward), `estimated` (from
    the routed loads with the performance model on moe.fastermoe.cluster) or `auto` (measured
    where the experts are per-expert modules, else estimated)."""
    hot_experts: int = 3
    """How many of the most loaded experts each MoE layer's record names (`hot_experts`)."""
    routing_trace: bool = False
    """Write the routing trace: per logged iteration and MoE layer, the all-gathered [W, E]
    token counts (W data-parallel ranks, E experts) to `<logging.dir>/routing_trace.bin`
    (megatron_moe_ext/traffic/trace.py; read it with `scripts/traffic_report.py`). One
    all-gather per logging step; pipeline parallel 1 only."""
    routing_trace_tokens: int = 0
    """With `routing_trace`: also record the experts chosen by this many tokens of each rank's
    first micro-batch in every layer (the same tokens in consecutive layers). 0: counts only."""


@dataclass
class RuntimeConfig:
    """Device and process-group runtime."""

    device: str = "auto"
    """`auto` (cuda when available), `cpu` (with the CPU runtime for megatron-core) or `cuda`."""
    backend: str = "auto"
    """torch.distributed backend: `auto` (nccl on cuda, gloo on cpu), `nccl` or `gloo`."""
    num_threads: Optional[int] = None
    """CPU only: torch intra-op threads per process. Default: OMP_NUM_THREADS when the launcher
    set it (torchrun, the cluster emulator), else usable cores / local processes."""
    timeout_minutes: int = 10
    """Process-group timeout."""


@dataclass
class Config:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Model."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """MoE layers."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging."""
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    """Runtime."""


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        keys.append(key)
        if dataclasses.is_dataclass(f.type if isinstance(f.type, type) else None):
            keys.extend(_all_keys(f.type, key + "."))
        elif isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
            keys.extend(_all_keys(f.default_factory, key + "."))
    return keys


def _suggest(key: str) -> str:
    match = difflib.get_close_matches(key, _all_keys(Config), n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else ""


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.sub=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{key}': '{p}' is not a section")
        node = nxt
    node[parts[-1]] = value


def load_config(path: Optional[str | Path], overrides: Sequence[str] = ()) -> Config:
    """Defaults <- YAML file <- dotted overrides, validated. Raises ConfigError."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
        tree = loaded
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(tree, key, value)
    cfg = _merge(tree)
    validate(cfg)
    return cfg


def _merge(tree: dict) -> Config:
    schema = OmegaConf.structured(Config)
    try:
        merged = OmegaConf.merge(schema, OmegaConf.create(tree))
    except ConfigKeyError as exc:
        key = str(exc.full_key or exc.key)
        raise ConfigError(f"unknown config key '{key}'{_suggest(key)}") from None
    except ValidationError as exc:
        key = str(exc.full_key or exc.key)
        raise ConfigError(
            f"config key '{key}': value {exc.value!r} has the wrong type"
            f" ({exc.msg.splitlines()[0]})"
        ) from None
    except OmegaConfBaseException as exc:
        raise ConfigError(f"invalid config: {exc}") from None
    return OmegaConf.to_object(merged)


def to_dict(cfg: Config) -> dict:
    """Plain nested dict of the config."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what is printed at start and saved next to checkpoints)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


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


# --------------------------------------------------------------------------------------
# Documentation
# --------------------------------------------------------------------------------------


def _attribute_docs(cls: type) -> dict[str, str]:
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr):
            if isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())  # type: ignore
    return docs


def field_docs(cls: type = Config, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, docstring) for every leaf field, for --help-config."""
    rows = []
    docs = _attribute_docs(cls)
    instance = cls()
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            rows.extend(field_docs(type(value), key + "."))
        else:
            rows.append((key, value, docs.get(f.name, "")))
    return rows
