"""The FasterMoE expert layer as a megatron-core MoELayer subclass.

What stays Megatron's: the router (TopKRouter with all its routing / aux-loss / capacity
options), the expert module (SequentialMLP: same parameter names and layout, so checkpoints
cross over between ``moe.impl`` values), the local permutation before dispatch and the
un-permutation after combine.

What changes: the all-to-all -> experts -> all-to-all middle is replaced by
:func:`megatron_moe_ext.core.exchange.smart_exchange`, the grouped pairwise exchange whose
send / compute / return steps overlap (forward and backward), plus dynamic shadow experts
(``moe.fastermoe.shadow``): every forward, from the all-gathered [W, E] counts, a policy picks
experts to replicate; their owners broadcast the weights, every rank computes its own tokens
for them locally with the same expert MLP function (the local chunks of step 0 of the exchange,
computed while the first sends are in flight), and their gradients are reduce-summed back to
the owners in backward (:mod:`megatron_moe_ext.core.shadow`). Shadowing never changes the
math: outputs and gradients equal stock Megatron's up to floating-point summation order.
With shadow prefetch (``moe.fastermoe.shadow.prefetch``, :mod:`megatron_moe_ext.core.prefetch`)
the broadcast of a set chosen from predicted counts starts before the router and is kept or
dropped on the true counts (docs/lina.md, "Shadow prefetch").

Options: :class:`FasterMoEOptions` (built from the run config by
:meth:`FasterMoEOptions.from_moe_config`). No performance-model work runs per call for the
``never`` / ``top_k`` policies; :attr:`FasterMoELayer.last_predicted_s` is computed on access.

Notation: T routed token copies on this rank, E experts, E_l = E / W local experts,
W expert-parallel workers, H hidden size, alpha = (expert parameters) / (2 H^2),
S shadowed expert ids.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_moe_ext.core.comm import gather_counts
from megatron_moe_ext.core.exchange import Shadows, smart_exchange
from megatron_moe_ext.core.plan import validate_group_size
from megatron_moe_ext.core.popularity import PREDICTORS, prediction_metrics
from megatron_moe_ext.core.prefetch import DEFAULT_SLACK, PopularityState, use_prefetched
from megatron_moe_ext.core.shadow import PendingBroadcast, start_broadcast
from megatron_moe_ext.core.shadow_policy import SHADOW_POLICIES, choose_shadows, pick_shadows
from megatron_moe_ext.core.trace import Tracer
from megatron_moe_ext.megatron.expert_layouts import expert_layout
from megatron_moe_ext.perf.model import LayerPrediction, predict_layer
from megatron_moe_ext.perf.topology import ClusterSpecError, Topology, ep_topology

logger = logging.getLogger(__name__)

DEFAULT_CLUSTER = "local-cpu"
"""Cluster used by the performance model when ``moe.fastermoe.cluster`` is not set."""

_MEMO_SIZE = 64  # count matrices whose shadows / predictions a layer remembers
_warned_clusters: set[str] = set()


@dataclass(frozen=True)
class FasterMoEOptions:
    """What a :class:`FasterMoELayer` needs beyond Megatron's TransformerConfig.

    Built from the run config at the Megatron boundary (:meth:`from_moe_config`); the layer
    does not depend on the application's config schema.
    """

    group_size: int = 1
    """g, workers per group of the grouped pairwise exchange (``moe.fastermoe.group_size``);
    must divide the expert-parallel size."""
    shadow_policy: str = "never"
    """How shadowed experts are chosen per call (``moe.fastermoe.shadow.policy``): one of
    ``never``, ``predictor``, ``model``, ``top_k``."""
    shadow_max_experts: int = 1
    """With ``top_k``: how many of the most loaded experts to shadow
    (``moe.fastermoe.shadow.max_experts``)."""
    cluster: Optional[str] = None
    """Cluster description for the performance model (``moe.fastermoe.cluster``): a bundled
    name or a YAML path; None: :data:`DEFAULT_CLUSTER`."""
    trace: bool = False
    """Record send / compute / return spans for a Chrome trace (``moe.fastermoe.trace``)."""
    shadow_prefetch: str = "none"
    """Predict the shadows before routing and broadcast them early
    (``moe.fastermoe.shadow.prefetch``): ``none``, ``previous_iteration``, ``previous_layer``;
    the predictor state is attached with :meth:`FasterMoELayer.attach_prefetch`."""
    prefetch_slack: float = DEFAULT_SLACK
    """Slack of the rule for ignoring a prediction (``moe.fastermoe.shadow.prefetch_slack``,
    :func:`core.prefetch.use_prefetched`)."""

    def __post_init__(self) -> None:
        if self.shadow_policy not in SHADOW_POLICIES:
            raise ValueError(f"moe.fastermoe.shadow.policy={self.shadow_policy!r} is not one of "
                             f"{', '.join(SHADOW_POLICIES)}")
        if self.shadow_prefetch not in PREDICTORS:
            raise ValueError(f"moe.fastermoe.shadow.prefetch={self.shadow_prefetch!r} is not one "
                             f"of {', '.join(PREDICTORS)}")

    @classmethod
    def from_moe_config(cls, moe: Any) -> "FasterMoEOptions":
        """From the run config's ``moe`` section (``moe.fastermoe.*``)."""
        f = moe.fastermoe
        return cls(group_size=int(f.group_size), shadow_policy=str(f.shadow.policy),
                   shadow_max_experts=int(f.shadow.max_experts),
                   cluster=None if f.cluster is None else str(f.cluster), trace=bool(f.trace),
                   shadow_prefetch=str(f.shadow.prefetch),
                   prefetch_slack=float(f.shadow.prefetch_slack))


class CountsDispatcher(MoEAlltoAllTokenDispatcher):
    """The alltoall dispatcher's local permutation, plus the all-gathered routing counts.

    `preprocess` replaces the split-size bookkeeping of the stock dispatcher (which the smart
    schedule does not use) by one all-gather of each rank's tokens-per-expert row, giving the
    [W, E] count matrix every rank needs to plan the exchange and to pick shadows.
    """

    counts: Optional[torch.Tensor] = None
    """[W, E] int64 on the CPU: tokens worker w sends to expert e, this iteration."""

    def preprocess(self, routing_map: torch.Tensor) -> torch.Tensor:
        local = routing_map.sum(dim=0).long()  # [E]
        if self.config.moe_expert_capacity_factor is not None:
            self.num_out_tokens = local.sum()
        else:
            self.num_out_tokens = routing_map.size(0) * self.config.moe_router_topk
        self.counts = gather_counts(local, self.ep_group)
        first = self.local_expert_indices[0]
        local_cols = self.counts[:, first : first + self.num_local_experts]
        # Kept for the stock bookkeeping that dispatch_preprocess still touches.
        self.num_global_tokens_per_local_expert = local_cols
        return local_cols.sum(dim=0)


class FasterMoELayer(MoELayer):
    """MoELayer whose dispatch / expert compute / combine run as the FasterMoE smart schedule,
    with dynamic shadow experts.

    Per forward it records :attr:`last_shadows`; :attr:`last_predicted_s` is computed from
    them on access only.
    """

    last_shadows: list[int]
    """Global expert ids shadowed in the latest forward (in the policy's order; [] if none)."""
    last_prefetch: Optional[dict]
    """With shadow prefetch, the latest forward's: ``source`` (predictor used or ``none``),
    ``used`` (the prefetched set was used), ``set_match`` (prefetched set == the policy's set on
    the true counts), ``hot_load_error`` (:func:`core.popularity.prediction_metrics`'
    ``hot_load_rel_err``), ``exposed_s`` (seconds waited for the prefetched broadcast); the
    last two are None without a prediction. None without prefetch."""

    @staticmethod
    def options_from_moe_config(moe: Any) -> FasterMoEOptions:
        """This layer's options from the run config's ``moe`` section (used by the model
        builder's spec swap)."""
        return FasterMoEOptions.from_moe_config(moe)

    def __init__(
        self,
        config: TransformerConfig,
        submodules: Optional[MoESubmodules] = None,
        layer_number: Optional[int] = None,
        pg_collection=None,
        options: Optional[FasterMoEOptions] = None,
        **kwargs: Any,
    ) -> None:
        """``kwargs``: further arguments of newer megatron-core MLP builders (e.g.
        ``is_mtp_layer``, ``name``), forwarded to MoELayer as given."""
        if pg_collection is None:  # as MoELayer does when built inside a TransformerLayer
            from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

            pg_collection = get_default_pg_collection()
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         pg_collection=pg_collection, **kwargs)
        if config.moe_token_dispatcher_type != "alltoall":
            raise ValueError("FasterMoELayer needs moe_token_dispatcher_type='alltoall'")
        if config.moe_pad_expert_input_to_capacity:
            raise ValueError("FasterMoELayer does not support moe.pad_to_capacity")
        if self.tp_group.size() > 1 or self.experts.tp_group.size() > 1:
            raise ValueError("FasterMoELayer supports tensor / expert-tensor parallel size 1 only")
        if self.use_shared_expert:
            raise ValueError("FasterMoELayer does not support shared experts")
        self.options = options or FasterMoEOptions()
        self.token_dispatcher = CountsDispatcher(
            self.num_local_experts, self.local_expert_indices, config=config, pg_collection=pg_collection
        )
        self.group_size = self.options.group_size
        validate_group_size(self.ep_group.size(), self.group_size)
        self.tracer: Optional[Tracer] = None
        if self.options.trace:
            self.tracer = Tracer(rank=dist.get_rank(), cuda_sync=torch.cuda.is_available())
        self.last_shadows = []
        self.last_prefetch = None
        self.prefetch_state: Optional[PopularityState] = None
        self._prefetch: Optional[tuple] = None  # (prediction, source, shadows, pending)
        self._routing_map: Optional[torch.Tensor] = None
        self._last: Optional[tuple[torch.Tensor, list[int]]] = None  # counts, shadows
        self._predictions: OrderedDict[tuple, Optional[LayerPrediction]] = OrderedDict()
        self._chosen: OrderedDict[bytes, list[int]] = OrderedDict()
        self._init_shadowing()

    # ------------------------------------------------------------------ shadow setup
    def _init_shadowing(self) -> None:
        """Policy, expert layout for broadcasts, and the performance-model constants."""
        self.shadow_policy = self.options.shadow_policy
        if self.shadow_policy != "never" and (self.config.fp8 or self.config.fp4):
            raise ValueError("shadow experts do not support fp8 / fp4 experts")
        self.expert_layout = expert_layout(self.experts)  # sequential, grouped or TE grouped
        templates = self.expert_layout.templates()
        self._param_dtype = templates[0].dtype
        numel = sum(p.numel() for p in templates)
        H = self.config.hidden_size
        self._H = H
        self._alpha = numel / (2.0 * H * H)  # 2 alpha H^2 parameters per expert
        self._dtype_name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
            self._param_dtype, "fp32")
        self._dtype_bytes = templates[0].element_size()
        self.cluster = self.options.cluster or DEFAULT_CLUSTER
        self.topology: Optional[Topology] = None
        self._net_bandwidth = float("inf")
        self.group_order: Optional[list[int]] = None  # None: identity (no topology)
        try:
            self.topology = ep_topology(self.cluster, self.ep_group.size())
        except (ClusterSpecError, OSError) as exc:
            if self.shadow_policy in ("predictor", "model"):
                raise ValueError(f"moe.fastermoe.cluster={self.cluster!r} (needed by "
                                 f"moe.fastermoe.shadow.policy={self.shadow_policy}): {exc}"
                                 ) from exc
            if self.cluster not in _warned_clusters:
                _warned_clusters.add(self.cluster)
                logger.warning("moe.fastermoe.cluster=%r cannot be loaded (%s): no performance "
                               "model, last_predicted_s is None and the exchange uses the "
                               "identity group order", self.cluster, exc)
        if self.topology is not None:
            self._net_bandwidth = self.topology.net_bandwidth()
            if self._dtype_name not in self.topology.spec.gemm_tflops:
                self._dtype_name = "bf16" if self._dtype_name == "fp16" else "fp32"
            self.group_order = self.topology.group_order(self.group_size)
        logger.debug("FasterMoELayer shadow policy %s, cluster %s, alpha %.3f, group order %s",
                     self.shadow_policy, self.cluster, self._alpha, self.group_order)

    def _gemm_flops(self, counts: np.ndarray) -> float:
        """P for this dtype (a curve is evaluated at the mean tokens per worker)."""
        p = self.topology.gemm_throughput(self._dtype_name)
        if callable(p):
            return float(p(np.asarray(counts.sum() / counts.shape[0])))
        return float(p)

    def select_shadows(self, counts: torch.Tensor) -> list[int]:
        """Experts to shadow for this [W, E] count matrix under the configured policy.

        Deterministic and identical on every rank of the EP group (same all-gathered counts).
        ``never`` and ``top_k`` run no model; ``predictor`` and ``model`` remember their
        choice (and ``model`` every prediction it made) per count matrix.
        """
        if self.shadow_policy in ("never", "top_k") or counts.shape[0] < 2:
            return pick_shadows(self.shadow_policy, counts, self.options.shadow_max_experts)
        key = _counts_key(counts)
        if key in self._chosen:
            self._chosen.move_to_end(key)
            return list(self._chosen[key])
        chosen = pick_shadows(
            self.shadow_policy, counts, self.options.shadow_max_experts,
            cost=lambda shadows: self._predict(counts, shadows, key).total_s,
            algorithm1=lambda c: choose_shadows(
                c, self.num_local_experts, H=self._H, alpha=self._alpha,
                dtype_bytes=self._dtype_bytes, gemm_flops=self._gemm_flops(c),
                net_bandwidth=self._net_bandwidth))
        _remember(self._chosen, key, list(chosen))
        return chosen

    def predict(self, counts: torch.Tensor, shadows: list[int]) -> Optional[LayerPrediction]:
        """perf.model.predict_layer for this layer call (smart schedule, these shadows,
        this layer's group order); memoized per count matrix and shadow set."""
        return self._predict(counts, shadows, _counts_key(counts))

    def _predict(self, counts: torch.Tensor, shadows: list[int],
                 key: bytes) -> Optional[LayerPrediction]:
        if self.topology is None:
            return None
        memo = (key, tuple(shadows))
        if memo not in self._predictions:
            _remember(self._predictions, memo, predict_layer(
                counts.numpy().astype(np.float64), None, self._H, self._alpha,
                self._dtype_bytes, self.topology, dtype=self._dtype_name, schedule="smart",
                group_size=self.group_size, shadow_experts=shadows,
            ))
        self._predictions.move_to_end(memo)
        return self._predictions[memo]

    @property
    def last_predicted_s(self) -> Optional[float]:
        """Predicted fwd + bwd time (s) of the latest forward's layer call with its shadows and
        the smart schedule (perf.model.predict_layer); None before the first forward or
        without a cluster model. Computed when read (memoized), never on the hot path."""
        return self.deferred_predicted_s()()

    def deferred_predicted_s(self) -> Callable[[], Optional[float]]:
        """:attr:`last_predicted_s` of the latest forward as a function, to evaluate later
        (e.g. by the metrics at a logging step): no model work until it is called."""
        last = self._last

        def predicted_s() -> Optional[float]:
            pred = None if last is None else self.predict(*last)
            return None if pred is None else float(pred.total_s)

        return predicted_s

    # ------------------------------------------------------------------ forward pieces
    # The stock forward calls dispatch -> routed_experts_compute -> combine; the whole exchange
    # happens in routed_experts_compute, so dispatch and combine are identities.
    def dispatch(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        """No communication here: the smart schedule sends tokens step by step."""
        return hidden_states, probs

    def _expert_fn(self, x: torch.Tensor, p: torch.Tensor, tokens_per_expert: list[int]):
        out, bias = self.experts(x, torch.tensor(tokens_per_expert, dtype=torch.long), p)
        assert bias is None
        return out

    def _shadow_expert_fn(self, expert: int, x: torch.Tensor, p: torch.Tensor,
                          weights: list[torch.Tensor]) -> torch.Tensor:
        """Shadowed ``expert`` on this rank's own tokens with its broadcast weights, applied the
        way the configured expert module applies one expert (megatron/expert_layouts.py)."""
        return self.expert_layout.apply(weights, x, p)

    def _start_broadcast(self, shadows: list[int]) -> PendingBroadcast:
        """Issue the broadcast of the (sorted) ``shadows``' weights from their owners."""
        layout = self.expert_layout
        templates = layout.templates()
        first, e_l = self.local_expert_indices[0], self.num_local_experts
        rank = self.ep_group.rank()
        tensors, owners, tmpl = [], [], []
        for e in shadows:
            owner = e // e_l
            own = layout.expert_params(e - first) if owner == rank else [None] * len(templates)
            tensors += own
            owners += [owner] * len(templates)
            tmpl += templates
        reduce_dtype = torch.float32 if self._param_dtype in (torch.bfloat16, torch.float16) else None
        return start_broadcast(tensors, owners, tmpl, self.ep_group, reduce_dtype=reduce_dtype)

    def _shadows(self, order: list[int], pending: PendingBroadcast) -> Shadows:
        """The exchange's shadows: ``order``'s weights from ``pending`` (grad-linked), read
        once ``pending`` is waited for (at the shadow compute of step 0)."""
        flat, n = pending.link(), len(self.expert_layout.templates())
        weights = {e: flat[i * n:(i + 1) * n] for i, e in enumerate(order)}
        return Shadows(weights=weights, fn=self._shadow_expert_fn, ready=pending.wait)

    # ------------------------------------------------------------------ shadow prefetch
    def attach_prefetch(self, state: PopularityState) -> None:
        """Share ``state`` (one per model stage, :func:`megatron.model.attach_shadow_prefetch`)
        for ``moe.fastermoe.shadow.prefetch``."""
        if self.options.shadow_prefetch == "none":
            raise ValueError("attach_prefetch: moe.fastermoe.shadow.prefetch is none")
        state.register(self.layer_number, on_ready=self._start_prefetch)
        self.prefetch_state = state

    def route(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Megatron's routing; with prefetch, the predicted shadows' broadcast was started when
        the MoE layer below finished (else it starts here, before the router)."""
        if self.options.shadow_prefetch != "none" and self._prefetch is None:
            self._start_prefetch()
        probs, routing_map = super().route(hidden_states, *args, **kwargs)
        self._routing_map = routing_map if self.prefetch_state is not None else None
        return probs, routing_map

    def _start_prefetch(self) -> None:
        """Predict this layer's counts, choose shadows from them, issue their broadcast."""
        if self.prefetch_state is None:
            raise RuntimeError(f"layer {self.layer_number}: moe.fastermoe.shadow.prefetch="
                               f"{self.options.shadow_prefetch} needs attach_prefetch(state)")
        if self._prefetch is not None and self._prefetch[3] is not None:
            self._prefetch[3].wait()  # started for a forward that never came: drop it
        pred, source = self.prefetch_state.predict(self.layer_number)
        if self.ep_group.size() < 2:
            pred, source = None, "none"
        shadows = None if pred is None else self.select_shadows(torch.from_numpy(pred))
        pending = self._start_broadcast(sorted(set(shadows))) if shadows else None
        self._prefetch = (pred, source, shadows, pending)

    def _resolve_prefetch(self, counts: torch.Tensor, chosen: list[int]
                          ) -> tuple[list[int], Optional[PendingBroadcast]]:
        """(shadows to use, their pending broadcast or None) by core.prefetch.use_prefetched;
        records :attr:`last_prefetch`. An ignored broadcast is waited for and dropped."""
        pf, self._prefetch = self._prefetch, None
        if pf is None:
            return chosen, None
        pred, source, shadows, pending = pf

        def cost(s: list[int]) -> Optional[float]:
            p = self.predict(counts, s)
            return None if p is None else p.total_s

        use = use_prefetched(shadows, chosen, cost if self.topology is not None else None,
                             self.options.prefetch_slack)
        rec = {"source": source, "used": use, "set_match": None, "hot_load_error": None,
               "exposed_s": None}
        if pred is not None:
            rec["set_match"] = sorted(shadows) == sorted(chosen)
            rec["hot_load_error"] = prediction_metrics(pred, counts)["hot_load_rel_err"]
            rec["exposed_s"] = 0.0
        self.last_prefetch = rec
        if use:
            return list(shadows), pending
        if pending is not None:
            pending.wait()
            rec["exposed_s"] = pending.waited_s
        return chosen, None

    def routed_experts_compute(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        """The grouped pairwise exchange; shadowed experts are its local chunks of step 0."""
        counts = self.token_dispatcher.counts
        shadows, pending = self._resolve_prefetch(counts, self.select_shadows(counts))
        self.last_shadows = list(shadows)
        self._last = (counts, list(shadows))
        logger.debug("layer %s: shadows %s", self.layer_number, shadows)
        if not shadows:
            params = list(self.experts.parameters())
            out = self._exchange(hidden_states, probs, counts, params, None)
        else:
            order = sorted(set(shadows))
            prefetched = pending is not None
            if not prefetched:  # blocking, as without prefetch
                pending = self._start_broadcast(order)
                pending.wait()
            # The owners' shadowed parameters get their gradient from the broadcast's backward.
            first = self.local_expert_indices[0]
            skip = {id(p) for e in order if 0 <= e - first < self.num_local_experts
                    for p in self.expert_layout.expert_params(e - first)}
            params = [p for p in self.experts.parameters() if id(p) not in skip]
            out = self._exchange(hidden_states, probs, counts, params,
                                 self._shadows(order, pending))
            if prefetched:
                pending.wait()  # a rank without tokens for the shadows never reached ready()
                self.last_prefetch["exposed_s"] = pending.waited_s
        if self.prefetch_state is not None:
            self.prefetch_state.observe(self.layer_number, counts, self._routing_map,
                                        self.ep_group)
            self._routing_map = None
        return out, None

    def _exchange(self, tokens: torch.Tensor, probs: torch.Tensor, counts: torch.Tensor,
                  params: list[torch.Tensor], shadows: Optional[Shadows]) -> torch.Tensor:
        """Grouped pairwise exchange with overlapped send / compute / return steps, in the
        topology's group order (the one the performance model assumes)."""
        return smart_exchange(
            tokens,
            probs,
            counts,
            self._expert_fn,
            params,
            group=self.ep_group,
            group_size=self.group_size,
            group_order=self.group_order,
            tracer=self.tracer,
            shadows=shadows,
        )

    def combine(self, output: torch.Tensor):
        """Outputs already came back with the return steps."""
        return output

    def write_trace(self, directory: str) -> Optional[str]:
        """Write this layer's Chrome trace (if tracing) as <dir>/rank<r>_layer<l>.json."""
        if self.tracer is None:
            return None
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"rank{dist.get_rank()}_layer{self.layer_number}.json")
        self.tracer.write_chrome_trace(path)
        return path


def _counts_key(counts: torch.Tensor) -> bytes:
    """Memo key of a [W, E] count matrix (its shape and bytes)."""
    return repr(tuple(counts.shape)).encode() + counts.numpy().tobytes()


def _remember(memo: OrderedDict, key: Any, value: Any) -> None:
    """Insert into a small LRU memo (at most _MEMO_SIZE entries)."""
    memo[key] = value
    memo.move_to_end(key)
    while len(memo) > _MEMO_SIZE:
        memo.popitem(last=False)
