"""The run schema: one dataclass per config section, a docstring on every field.

Defaults live here; loading (YAML + dotted overrides) is in :mod:`megatron_moe_ext.config`,
value and cross-field checks in :mod:`.validation`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from megatron_moe_ext.core.popularity import PREDICTORS as SHADOW_PREFETCH_MODES
from megatron_moe_ext.core.shadow_policy import SHADOW_POLICIES

__all__ = [
    "ConfigError", "TokenizerConfig", "ModelConfig", "RouterConfig", "ShadowConfig",
    "FasterMoEConfig", "MoEConfig", "ParallelConfig", "TrainConfig", "DataConfig",
    "CheckpointConfig", "WandbConfig", "LoggingConfig", "RuntimeConfig", "Config",
    "LOAD_BALANCING_TYPES", "COMM_PRIORITIES", "SHADOW_POLICIES", "SHADOW_PREFETCH_MODES",
]

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
    prefetch: str = "none"
    """Shadow prefetch (docs/lina.md, "Shadow prefetch"): predict each layer call's routing
    counts before its router runs, let the policy choose shadows from the prediction and start
    their weight broadcast then, so that it overlaps the router and the counts all-gather.
    `none`; `previous_iteration`: the layer's own counts of its previous call;
    `previous_layer`: the MoE layer below's counts of this forward through a transition matrix
    estimated online from both layers' routing (the first MoE layer of a pipeline stage uses
    previous_iteration). Needs moe.impl: fastermoe and a policy other than never. The
    prefetched set is used or ignored by the rule of `prefetch_slack`; outputs and gradients
    never depend on it."""
    prefetch_slack: float = 0.1
    """With prefetch: the prefetched shadow set is used when it equals the set the policy picks
    on the true counts, or when the performance model predicts it at most this fraction slower
    than the better of that set and no shadows; otherwise (and without a prediction or a
    cluster model) the prediction is ignored and the policy's set is broadcast as without
    prefetch. >= 0."""


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
