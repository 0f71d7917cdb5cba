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
for them locally with the same expert MLP function, and their gradients are reduce-summed back
to the owners in backward (:mod:`megatron_moe_ext.core.shadow`). Shadowing never changes the
math: outputs and gradients equal stock Megatron's up to floating-point summation order.

Notation: T routed token copies on this rank, E experts, E_l = E / W local experts,
W expert-parallel workers, H hidden size, alpha = (expert parameters) / (2 H^2),
S shadowed expert ids.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_moe_ext.config import SHADOW_POLICIES, MoEConfig
from megatron_moe_ext.core.exchange import smart_exchange
from megatron_moe_ext.core.shadow import (
    ShadowSplit,
    broadcast_from_owners,
    functional_apply,
    routed_counts,
)
from megatron_moe_ext.core.shadow_policy import (
    choose_shadows,
    choose_shadows_by_cost,
    top_k_shadows,
)
from megatron_moe_ext.core.trace import Tracer
from megatron_moe_ext.perf.model import LayerPrediction, predict_layer
from megatron_moe_ext.perf.topology import GBIT, ClusterSpec, LinkSpec, Topology, load_cluster

logger = logging.getLogger(__name__)

DEFAULT_CLUSTER = "local-cpu"
"""Cluster used by the performance model when ``moe.fastermoe.cluster`` is not set."""


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
        gathered = torch.empty(self.ep_size * local.numel(), dtype=local.dtype, device=local.device)
        dist.all_gather_into_tensor(gathered, local.contiguous(), group=self.ep_group)
        self.counts = gathered.view(self.ep_size, -1).cpu()
        first = self.local_expert_indices[0]
        local_cols = self.counts[:, first : first + self.num_local_experts]
        # Kept for the stock bookkeeping that dispatch_preprocess still touches.
        self.num_global_tokens_per_local_expert = local_cols
        return local_cols.sum(dim=0)


@functools.lru_cache(maxsize=None)
def ep_topology(cluster: str, num_workers: int) -> Topology:
    """The topology the performance model uses for an expert-parallel group of W workers.

    The cluster file's own topology when it has exactly W workers (EP rank w = worker w).
    Otherwise a stand-in: one switch ``sw`` with W workers attached by links of the cluster's
    W_net, and the cluster's GEMM throughput (a warning says so).
    """
    spec = load_cluster(cluster)
    if spec.num_workers == num_workers:
        return Topology(spec)
    w_net = Topology(spec).net_bandwidth()
    logger.warning(
        "cluster %s has %d workers but the expert-parallel group has %d: the performance model "
        "uses %d workers on one switch with the cluster's W_net (%.3g Gbit/s) and GEMM rates",
        spec.name, spec.num_workers, num_workers, num_workers, w_net / GBIT,
    )
    star = ClusterSpec(
        name=f"{spec.name}-star{num_workers}", nodes=1, workers_per_node=num_workers,
        gemm_tflops=dict(spec.gemm_tflops), gemm_curve=dict(spec.gemm_curve),
        links=tuple(LinkSpec(a=f"w{i}", b="sw", gbps=w_net / GBIT, kind="stand-in")
                    for i in range(num_workers)) if num_workers > 1 else (),
        description=f"stand-in for {spec.name} with {num_workers} workers",
    )
    return Topology(star)


class FasterMoELayer(MoELayer):
    """MoELayer whose dispatch / expert compute / combine run as the FasterMoE smart schedule,
    with dynamic shadow experts.

    Per forward it records :attr:`last_shadows` and :attr:`last_predicted_s`.
    """

    last_shadows: list[int]
    """Global expert ids shadowed in the latest forward (in the policy's order; [] if none)."""
    last_predicted_s: Optional[float]
    """Predicted fwd + bwd time (s) of the latest forward's layer call with its shadows and the
    smart schedule (perf.model.predict_layer); None when no cluster model is available."""

    def __init__(
        self,
        config: TransformerConfig,
        submodules: Optional[MoESubmodules] = None,
        layer_number: Optional[int] = None,
        pg_collection=None,
        moe_options: Optional[MoEConfig] = None,
    ) -> None:
        if pg_collection is None:  # as MoELayer does when built inside a TransformerLayer
            from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

            pg_collection = get_default_pg_collection()
        super().__init__(
            config=config, submodules=submodules, layer_number=layer_number, pg_collection=pg_collection
        )
        if config.moe_token_dispatcher_type != "alltoall":
            raise ValueError("FasterMoELayer needs moe_token_dispatcher_type='alltoall'")
        if config.moe_pad_expert_input_to_capacity:
            raise ValueError("FasterMoELayer does not support moe.pad_to_capacity")
        if self.tp_group.size() > 1 or self.experts.tp_group.size() > 1:
            raise ValueError("FasterMoELayer supports tensor / expert-tensor parallel size 1 only")
        if self.use_shared_expert:
            raise ValueError("FasterMoELayer does not support shared experts")
        self.options = moe_options or MoEConfig(impl="fastermoe")
        self.token_dispatcher = CountsDispatcher(
            self.num_local_experts, self.local_expert_indices, config=config, pg_collection=pg_collection
        )
        self.group_size = min(self.options.fastermoe.group_size, self.ep_group.size())
        if self.ep_group.size() % self.group_size:
            raise ValueError(
                f"moe.fastermoe.group_size={self.group_size} must divide the expert-parallel "
                f"size {self.ep_group.size()}"
            )
        self.tracer: Optional[Tracer] = None
        if self.options.fastermoe.trace:
            self.tracer = Tracer(rank=dist.get_rank(), cuda_sync=torch.cuda.is_available())
        self.last_shadows = []
        self.last_predicted_s = None
        self._init_shadowing()

    # ------------------------------------------------------------------ shadow setup
    def _init_shadowing(self) -> None:
        """Policy, expert layout for broadcasts, and the performance-model constants."""
        shadow = self.options.fastermoe.shadow
        self.shadow_policy = shadow.policy
        if self.shadow_policy not in SHADOW_POLICIES:
            raise ValueError(f"moe.fastermoe.shadow.policy={self.shadow_policy!r} is not one of "
                             f"{', '.join(SHADOW_POLICIES)}")
        if self.shadow_policy != "never" and (self.config.fp8 or self.config.fp4):
            raise ValueError("shadow experts do not support fp8 / fp4 experts")
        experts = self.experts.local_experts
        self._expert_names = [n for n, _ in experts[0].named_parameters()]
        for m in experts[1:]:
            if [n for n, _ in m.named_parameters()] != self._expert_names:
                raise ValueError("shadow experts need identically structured local experts")
        templates = list(experts[0].parameters())
        self._param_dtype = templates[0].dtype
        numel = sum(p.numel() for p in templates)
        H = self.config.hidden_size
        self._H = H
        self._alpha = numel / (2.0 * H * H)  # 2 alpha H^2 parameters per expert
        self._dtype_name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
            self._param_dtype, "fp32")
        self._dtype_bytes = templates[0].element_size()
        self.cluster = self.options.fastermoe.cluster or DEFAULT_CLUSTER
        self.topology: Optional[Topology] = None
        self._net_bandwidth = float("inf")
        try:
            self.topology = ep_topology(self.cluster, self.ep_group.size())
            self._net_bandwidth = self.topology.net_bandwidth()
            if self._dtype_name not in self.topology.spec.gemm_tflops:
                self._dtype_name = "bf16" if self._dtype_name == "fp16" else "fp32"
        except Exception as exc:  # noqa: BLE001 - the predictor cannot run without it
            if self.shadow_policy in ("predictor", "model"):
                raise ValueError(f"moe.fastermoe.cluster={self.cluster!r}: {exc}") from exc
            logger.warning("no performance model for layer %s (cluster %r: %s); "
                           "last_predicted_s stays None", self.layer_number, self.cluster, exc)
        logger.debug("FasterMoELayer shadow policy %s, cluster %s, alpha %.3f",
                     self.shadow_policy, self.cluster, self._alpha)

    def _gemm_flops(self, counts: np.ndarray) -> float:
        """P for this dtype (a curve is evaluated at the mean tokens per worker)."""
        p = self.topology.gemm_throughput(self._dtype_name)
        if callable(p):
            return float(p(np.asarray(counts.sum() / counts.shape[0])))
        return float(p)

    def select_shadows(self, counts: torch.Tensor,
                       predictions: Optional[dict[tuple[int, ...], LayerPrediction]] = None
                       ) -> list[int]:
        """Experts to shadow for this [W, E] count matrix under the configured policy.

        Deterministic and identical on every rank of the EP group (same all-gathered counts).
        With policy ``model``, every prediction the greedy makes is stored in ``predictions``
        (keyed by the shadow tuple), so the caller need not predict the chosen set again.
        """
        W = counts.shape[0]
        if self.shadow_policy == "never" or W < 2:
            return []
        if self.shadow_policy == "top_k":
            return [int(e) for e in top_k_shadows(counts, self.options.fastermoe.shadow.max_experts)]
        if self.shadow_policy == "model":
            seen = {} if predictions is None else predictions

            def cost(shadows: list[int]) -> float:
                seen[tuple(shadows)] = pred = self.predict(counts, shadows)
                return pred.total_s

            return choose_shadows_by_cost(counts, cost)
        c = counts.numpy().astype(np.float64)
        return [int(e) for e in choose_shadows(
            c, self.num_local_experts, H=self._H, alpha=self._alpha,
            dtype_bytes=self._dtype_bytes, gemm_flops=self._gemm_flops(c),
            net_bandwidth=self._net_bandwidth,
        )]

    def predict(self, counts: torch.Tensor, shadows: list[int]) -> Optional[LayerPrediction]:
        """perf.model.predict_layer for this layer call (smart schedule, these shadows)."""
        if self.topology is None:
            return None
        return predict_layer(
            counts.numpy().astype(np.float64), None, self._H, self._alpha, self._dtype_bytes,
            self.topology, dtype=self._dtype_name, schedule="smart",
            group_size=self.group_size, shadow_experts=shadows,
        )

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

    def _shadow_expert_fn(self, weights: list[torch.Tensor], x: torch.Tensor, p: torch.Tensor):
        """One expert on this rank's own tokens with broadcast weights: the same MLP forward
        (with per_token_scale = probs) that SequentialMLP runs for each local expert."""
        if self.config.moe_apply_probs_on_input:  # mirrors SequentialMLP.forward
            x = (p.unsqueeze(-1) * x).to(x.dtype)
            p = torch.ones_like(p)
        out, bias = functional_apply(self.experts.local_experts[0], self._expert_names, weights, x, p)
        assert bias is None
        return out

    def _broadcast_shadows(self, shadows: list[int]) -> dict[int, list[torch.Tensor]]:
        """{expert: its weights on this rank} broadcast from the owners (grad-linked)."""
        experts = self.experts.local_experts
        templates = list(experts[0].parameters())
        first, e_l = self.local_expert_indices[0], self.num_local_experts
        rank = self.ep_group.rank()
        tensors, owners, tmpl = [], [], []
        for e in shadows:
            owner = e // e_l
            own = list(experts[e - first].parameters()) if owner == rank else [None] * len(templates)
            tensors += own
            owners += [owner] * len(templates)
            tmpl += templates
        reduce_dtype = torch.float32 if self._param_dtype in (torch.bfloat16, torch.float16) else None
        flat = broadcast_from_owners(tensors, owners, tmpl, self.ep_group, reduce_dtype=reduce_dtype)
        n = len(templates)
        return {e: flat[i * n:(i + 1) * n] for i, e in enumerate(shadows)}

    def routed_experts_compute(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        """Shadowed experts locally, the rest by the grouped pairwise exchange."""
        counts = self.token_dispatcher.counts
        predictions: dict[tuple[int, ...], LayerPrediction] = {}
        shadows = self.select_shadows(counts, predictions)
        self.last_shadows = list(shadows)
        pred = predictions.get(tuple(shadows))
        if pred is None:  # policies other than `model` predict nothing while choosing
            pred = self.predict(counts, shadows)
        self.last_predicted_s = None if pred is None else float(pred.total_s)
        logger.debug("layer %s: shadows %s, predicted %s s", self.layer_number, shadows,
                     self.last_predicted_s)
        if not shadows:
            return self._exchange(hidden_states, probs, counts, list(self.experts.parameters())), None
        order = sorted(set(shadows))
        weights = self._broadcast_shadows(order)
        split = ShadowSplit.build(counts[self.ep_group.rank()].tolist(), order)
        x_rest, x_blocks = split.split(hidden_states)
        p_rest, p_blocks = split.split(probs)
        y_blocks = {e: self._shadow_expert_fn(weights[e], x_blocks[e], p_blocks[e]) for e in order}
        # The owners' shadowed parameters get their gradient from the broadcast's backward only.
        first = self.local_expert_indices[0]
        skip = {id(p) for e in order if 0 <= e - first < self.num_local_experts
                for p in self.experts.local_experts[e - first].parameters()}
        params = [p for p in self.experts.parameters() if id(p) not in skip]
        y_rest = self._exchange(x_rest, p_rest, routed_counts(counts, order), params)
        return split.merge(y_rest, y_blocks), None

    def _exchange(self, tokens: torch.Tensor, probs: torch.Tensor, counts: torch.Tensor,
                  params: list[torch.Tensor]) -> torch.Tensor:
        """Grouped pairwise exchange with overlapped send / compute / return steps."""
        return smart_exchange(
            tokens,
            probs,
            counts,
            self._expert_fn,
            params,
            group=self.ep_group,
            group_size=self.group_size,
            tracer=self.tracer,
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
