"""The FasterMoE topology-aware gate as a megatron-core router (``moe.router.type: topology_aware``).

:class:`TopologyAwareRouter` is Megatron's :class:`TopKRouter` with one step replaced: the
top-k selection that turns logits into (probs, routing_map). The selection goes through
:func:`megatron_moe_ext.core.gate.cap_offnode`, which lets at most L = floor(f * T * k) of this
worker's routed copies go to experts on other nodes and re-routes the rest to local-node
experts. Everything around it is Megatron's code: gating linear, input jitter, z-loss, the
score function (softmax before / after top-k, sigmoid), top-k scaling factor, capacity factor
and token dropping, aux loss / seq aux loss / global aux loss, expert-bias accounting.

The load-balancing losses are Megatron's formulas evaluated on the *final* routing map (after
the gate, before capacity dropping, as Megatron does with its own map), so they see the loads
the experts really get. With a limit that never binds, probs and routing map are bit-identical
to TopKRouter's.

Placement (documented rule): experts are laid out contiguously over the expert-parallel (EP)
group, expert e on EP rank e // (E / EP); EP rank r is on node r // M, where M is
``moe.router.workers_per_node``, else the cluster's ``workers_per_node``, else the launcher's
``LOCAL_WORLD_SIZE``, else EP (one node). This holds when each EP group starts on a node
boundary, as with Megatron's default rank order and EP a multiple or a divisor of M.

Notation: T tokens of this rank per forward, E experts, k top-k, M workers per node,
f off-node fraction, L off-node limit.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Optional

import torch
from megatron.core.transformer.moe.moe_utils import (
    apply_router_token_dropping,
    compute_routing_scores_for_aux_loss,
)
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_moe_ext.config import RouterConfig
from megatron_moe_ext.core.gate import cap_offnode, offnode_limit, topology_offnode_fraction
from megatron_moe_ext.megatron.versions import applies, record_moe_metric, version_string

logger = logging.getLogger(__name__)

STAT_NAMES = ("offnode_wanted", "offnode_sent", "rerouted", "dropped")
"""Per-forward counts kept in :attr:`TopologyAwareRouter.last_stats`."""

TRACKER_PREFIX = "topo_gate_"
"""Prefix of the per-layer fractions written to Megatron's aux-loss tracker (training only)."""


@functools.lru_cache(maxsize=None)
def cluster_offnode_fraction(name_or_path: str) -> tuple[float, int]:
    """(f, M) of a cluster description: f by :func:`core.gate.topology_offnode_fraction`,
    M its workers per node. One worker per node: an error naming
    ``moe.router.offnode_fraction``, the key to set instead."""
    from megatron_moe_ext.perf.topology import build_topology

    topo = build_topology(name_or_path)
    try:
        return topology_offnode_fraction(topo), topo.workers_per_node
    except ValueError as exc:
        raise ValueError(f"{exc}; set moe.router.offnode_fraction") from exc


def resolve_gate_options(options: RouterConfig, ep_size: int) -> tuple[float, int]:
    """(f, M) for a router config: explicit values override the cluster description."""
    fraction, m = None, None
    if options.cluster is not None:
        fraction, m = cluster_offnode_fraction(str(options.cluster))
    if options.offnode_fraction is not None:
        fraction = float(options.offnode_fraction)
    if options.workers_per_node is not None:
        m = int(options.workers_per_node)
    if fraction is None:
        raise ValueError("moe.router.type: topology_aware needs moe.router.cluster or "
                         "moe.router.offnode_fraction")
    if m is None:
        m = int(os.environ.get("LOCAL_WORLD_SIZE", ep_size))
    return fraction, max(1, m)


class TopologyAwareRouter(TopKRouter):
    """TopKRouter whose top-k selection caps the copies sent to other nodes (FasterMoE 4.3).

    Attributes refreshed on every forward (for logging):
        last_limit (int): L of the last forward.
        last_tokens (int): B = T * k of the last forward.
        last_stats (dict[str, Tensor]): 0-d long tensors ``offnode_wanted`` (copies whose
            plain top-k expert is off-node), ``offnode_sent`` (<= L), ``rerouted`` (moved to a
            local-node expert) and ``dropped`` (no free local expert; only when the local node
            hosts fewer than k experts). wanted = sent + rerouted + dropped.

    While training with gradients on, the same numbers divided by B go to Megatron's per-layer
    aux-loss tracker as ``topo_gate_offnode_wanted`` etc., so the training loop's per-layer
    MoE metrics show them next to ``load_balancing_loss``.
    """

    def __init__(
        self,
        config: TransformerConfig,
        pg_collection=None,
        options: Optional[RouterConfig] = None,
        **kwargs,
    ) -> None:
        # megatron-core 0.17+ passes is_mtp_layer= (versions.CHANGES "router_is_mtp_layer")
        super().__init__(config=config, pg_collection=pg_collection, **kwargs)
        if self.routing_type == "sinkhorn":
            raise ValueError("moe.router.type: topology_aware does not support sinkhorn routing")
        if config.moe_router_num_groups or config.moe_router_group_topk:
            raise ValueError("topology_aware router: group-limited top-k is not supported")
        if config.moe_enable_routing_replay or config.moe_router_fusion:
            raise ValueError("topology_aware router: routing replay / fused routing unsupported")
        options = options or RouterConfig(type="topology_aware")
        ep_group = pg_collection.ep if pg_collection is not None else None
        ep_size = ep_group.size() if ep_group is not None else 1
        ep_rank = ep_group.rank() if ep_group is not None else 0
        self.offnode_fraction, self.workers_per_node = resolve_gate_options(options, ep_size)
        m = self.workers_per_node
        experts_per_rank = self.num_experts // ep_size
        owner = torch.arange(self.num_experts) // experts_per_rank
        self.register_buffer("expert_node", owner // m, persistent=False)
        self.local_node = ep_rank // m
        local_experts = int((self.expert_node == self.local_node).sum())
        self._may_drop = local_experts < self.topk
        if (self._may_drop and config.moe_expert_capacity_factor is None
                and applies("permute_exact_copies")):
            raise ValueError(
                f"topology_aware router: node {self.local_node} hosts {local_experts} experts < "
                f"top-k {self.topk}, so the gate may drop copies; megatron-core "
                f"{version_string()} (>= 0.17) then needs moe.capacity_factor (e.g. "
                f"moe.num_experts / moe.topk, which never drops for capacity)")
        if self._may_drop:
            logger.warning(
                "topology_aware router: node %d hosts %d experts < top-k %d; re-routed copies "
                "that find no free local expert are dropped", self.local_node, local_experts,
                self.topk,
            )
        if ep_size > m and ep_size % m:
            logger.warning("topology_aware router: EP size %d is not a multiple of "
                           "workers_per_node %d; node mapping r // M may not match the "
                           "machines", ep_size, m)
        self.last_limit = 0
        self.last_tokens = 0
        self.last_stats: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ selection
    def topology_topk(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Megatron's topk_routing_with_score_function (unfused, no groups) with the gate.

        Returns ([T, E] probs, [T, E] bool routing map), like the Megatron function.
        """
        num_tokens, num_experts = logits.shape
        k = self.topk
        if self.score_function == "softmax":
            scores = torch.softmax(logits, dim=-1, dtype=torch.float32).type_as(logits)
            selection = scores if self.config.moe_router_pre_softmax else logits
        elif self.score_function == "sigmoid":
            scores = torch.sigmoid(logits.float()).type_as(logits)
            selection = scores if self.expert_bias is None else scores + self.expert_bias
        else:
            raise ValueError(f"Invalid score_function: {self.score_function}")

        limit = offnode_limit(num_tokens * k, self.offnode_fraction)
        gate = cap_offnode(
            scores.detach(), k, self.expert_node, self.local_node, limit,
            selection=selection.detach(),
        )
        self.last_limit, self.last_tokens = limit, num_tokens * k
        self.last_stats = dict(zip(STAT_NAMES, (gate.wanted, gate.sent, gate.rerouted,
                                                gate.dropped)))
        indices = gate.indices
        valid = indices >= 0
        safe = indices.clamp(min=0)

        # probs exactly as Megatron computes them from its top-k, with dropped copies at 0
        if self.score_function == "softmax":
            if self.config.moe_router_pre_softmax:
                probs = scores.gather(1, safe)
            else:
                chosen = logits.gather(1, safe)
                if self._may_drop:
                    chosen = torch.where(valid, chosen, torch.finfo(chosen.dtype).min)
                probs = torch.softmax(chosen, dim=-1, dtype=torch.float32).type_as(logits)
        else:
            probs = scores.gather(1, safe)
            if self._may_drop:
                probs = probs * valid
            if k > 1:
                probs = probs / (probs.sum(dim=-1, keepdim=True) + 1e-20)
        if self._may_drop:
            probs = probs * valid
        if self.config.moe_router_topk_scaling_factor:
            probs = probs * self.config.moe_router_topk_scaling_factor

        if self._may_drop:  # no duplicate-free [T, k] layout: build through one-hot
            one_hot = torch.nn.functional.one_hot(safe, num_experts).to(probs.dtype)
            one_hot = one_hot * valid.unsqueeze(-1)
            routing_probs = (one_hot * probs.unsqueeze(-1)).sum(dim=1)
            routing_map = one_hot.sum(dim=1) > 0
        elif torch.are_deterministic_algorithms_enabled():
            routing_probs = torch.zeros_like(logits)
            rows = torch.arange(num_tokens, device=logits.device).unsqueeze(1)
            routing_probs.index_put_((rows, indices), probs, accumulate=False)
            routing_map = torch.zeros_like(logits)
            routing_map.index_put_((rows, indices), torch.ones_like(probs), accumulate=False)
            routing_map = routing_map.bool()
        else:
            routing_probs = torch.zeros_like(logits).scatter(1, indices, probs)
            routing_map = torch.zeros_like(logits).int().scatter(1, indices, 1).bool()
        return routing_probs, routing_map

    # ------------------------------------------------------------------ routing
    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """TopKRouter.routing (megatron-core 0.16.1) with the gate as the selection step."""
        seq_length, bsz = logits.shape[:2]
        logits = logits.view(-1, self.config.num_moe_experts)
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1)

        logits = self.apply_z_loss(logits, padding_mask=padding_mask)
        probs, routing_map = self.topology_topk(logits)
        map_for_aux_loss = routing_map  # final selection, before capacity dropping

        if self.config.moe_expert_capacity_factor is not None:
            probs, routing_map = apply_router_token_dropping(
                probs,
                routing_map,
                router_topk=self.topk,
                capacity_factor=self.config.moe_expert_capacity_factor,
                drop_policy=self.config.moe_token_drop_policy,
                pad_to_capacity=self.config.moe_pad_expert_input_to_capacity,
            )

        if self.training and torch.is_grad_enabled():
            if self.is_aux_loss_enabled():
                _, scores_for_aux_loss = compute_routing_scores_for_aux_loss(
                    logits, self.topk, self.score_function, fused=False, padding_mask=padding_mask,
                )
                if padding_mask is not None:
                    map_for_aux_loss = map_for_aux_loss & (~padding_mask).unsqueeze(-1)
                with_pad = padding_mask is not None
                probs = self._apply_aux_loss(
                    probs, scores_for_aux_loss, map_for_aux_loss, with_padding_mask=with_pad
                )
                probs = self._apply_seq_aux_loss(
                    probs, scores_for_aux_loss, map_for_aux_loss, seq_length, bsz,
                    with_padding_mask=with_pad,
                )
                probs = self._apply_global_aux_loss(
                    probs, scores_for_aux_loss, map_for_aux_loss, with_padding_mask=with_pad
                )
            self._track_stats()

        self._apply_expert_bias(routing_map, padding_mask=padding_mask)
        return probs, routing_map

    def _track_stats(self) -> None:
        """Per-layer fractions of B into Megatron's aux-loss tracker (summed over micro-batches;
        the training loop averages them)."""
        if self.layer_number is None or not self.last_stats or self.last_tokens == 0:
            return
        num_layers = self.config.num_layers + (self.config.mtp_num_layers or 0)
        for name, count in self.last_stats.items():
            record_moe_metric(
                TRACKER_PREFIX + name, count.float() / self.last_tokens, self.layer_number,
                num_layers,
            )

    def extra_repr(self) -> str:
        return (f"offnode_fraction={self.offnode_fraction:.4g}, "
                f"workers_per_node={self.workers_per_node}, local_node={self.local_node}")


def topology_router_builder(options: RouterConfig):
    """A MoESubmodules.router builder: ``builder(config=..., pg_collection=..., **kwargs)``."""
    return functools.partial(TopologyAwareRouter, options=options)
