"""The topology-aware gate's capping rule (megatron_moe_ext/core/gate.py) against a slow,
loop-based reference of the rule as the paper states it, plus its invariants."""

from __future__ import annotations

import itertools

import pytest
import torch

from megatron_moe_ext.core.gate import (
    cap_offnode,
    offnode_fraction,
    offnode_limit,
    to_routing_map,
)


def reference_gate(scores, topk, expert_node, local_node, limit, selection=None):
    """Plain-Python statement of the rule: [T][k] expert lists (-1: dropped) and counts."""
    sel = (scores if selection is None else selection).tolist()
    sc = scores.tolist()
    node = expert_node.tolist()
    T, E = len(sc), len(sc[0])
    # plain top-k by selection, ties: lower expert index (torch.topk on distinct values)
    choice = [sorted(range(E), key=lambda e: (-sel[t][e], e))[:topk] for t in range(T)]
    off = [(t, j) for t in range(T) for j in range(topk) if node[choice[t][j]] != local_node]
    ranked = sorted(off, key=lambda tj: (-sc[tj[0]][choice[tj[0]][tj[1]]], tj[0], tj[1]))
    rejected = set(ranked[limit:])
    out = [list(c) for c in choice]
    rerouted = dropped = 0
    for t in range(T):
        taken = set(choice[t])
        local_order = [e for e in sorted(range(E), key=lambda e: (-sel[t][e], e))
                       if node[e] == local_node and e not in taken]
        for j in range(topk):
            if (t, j) in rejected:
                if local_order:
                    out[t][j] = local_order.pop(0)
                    rerouted += 1
                else:
                    out[t][j] = -1
                    dropped += 1
    return out, dict(wanted=len(off), sent=len(off) - len(rejected), rerouted=rerouted,
                     dropped=dropped)


def _case(seed, T, E, nodes, k, local_node):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g) * 2
    scores = torch.softmax(logits, dim=-1)
    expert_node = torch.arange(E) // (E // nodes)
    return logits, scores, expert_node


def _check_against_reference(res, ref, counts):
    assert res.indices.tolist() == ref
    for name in ("wanted", "sent", "rerouted", "dropped"):
        assert int(getattr(res, name)) == counts[name], name


def test_offnode_limit_and_fraction():
    assert offnode_limit(8, 0.25) == 2
    assert offnode_limit(10, 0.25) == 2  # floor
    assert offnode_limit(3, 1.0) == 3
    assert offnode_limit(0, 0.5) == 0
    assert offnode_limit(7, 0.0) == 0
    assert offnode_limit(1000, 0.07) == 70  # 0.07 * 1000 = 70.00000000000001 or 69.999...
    with pytest.raises(ValueError):
        offnode_limit(4, 1.5)
    # johnny: NIC 50 Gb/s, 8 workers per node, PCIe 88 Gb/s
    assert offnode_fraction(50, 88, 8) == pytest.approx(50 / 704)
    assert offnode_fraction(100, 10, 2) == 1.0  # clamped
    with pytest.raises(ValueError):
        offnode_fraction(0, 1, 1)


@pytest.mark.parametrize(
    "seed,T,E,nodes,k,local_node,fraction",
    [
        (s, T, E, n, k, ln, f)
        for s, (T, E, n, k), ln, f in itertools.product(
            range(3),
            [(32, 8, 2, 2), (50, 16, 4, 2), (20, 8, 2, 1), (40, 12, 3, 3), (16, 4, 2, 2)],
            [0, 1],
            [0.0, 0.1, 0.25, 0.6, 1.0],
        )
    ],
)
def test_matches_reference(seed, T, E, nodes, k, local_node, fraction):
    logits, scores, expert_node = _case(seed, T, E, nodes, k, local_node)
    limit = offnode_limit(T * k, fraction)
    res = cap_offnode(scores, k, expert_node, local_node, limit)
    ref, counts = reference_gate(scores, k, expert_node, local_node, limit)
    _check_against_reference(res, ref, counts)
    # invariants
    assert int(res.sent) <= limit
    assert int(res.sent) == min(int(res.wanted), limit)
    assert int(res.wanted) == int(res.sent) + int(res.rerouted) + int(res.dropped)
    valid = res.indices >= 0
    chosen_off = (expert_node[res.indices.clamp(min=0)] != local_node) & valid
    assert torch.equal(chosen_off, res.offnode)
    assert int(chosen_off.sum()) == int(res.sent)
    for row in res.indices.tolist():  # never the same expert twice
        picked = [e for e in row if e >= 0]
        assert len(picked) == len(set(picked))
    local_experts = int((expert_node == local_node).sum())
    if local_experts >= k:
        assert int(res.dropped) == 0
    rmap = to_routing_map(res.indices, E)
    assert rmap.sum(dim=1).tolist() == valid.sum(dim=1).tolist()


def test_selection_key_orders_tokens_scores_rank_copies():
    """Post-softmax routing: per-token order from the logits, cross-token rank from scores."""
    logits, scores, expert_node = _case(7, 64, 8, 2, 2, 0)
    limit = offnode_limit(64 * 2, 0.2)
    res = cap_offnode(scores, 2, expert_node, 0, limit, selection=logits)
    ref, counts = reference_gate(scores, 2, expert_node, 0, limit, selection=logits)
    _check_against_reference(res, ref, counts)
    assert int(res.rerouted) > 0


def test_large_limit_is_plain_topk():
    logits, scores, expert_node = _case(3, 100, 16, 4, 2, 2)
    plain_s, plain_i = torch.topk(logits, 2, dim=1)
    for limit in (200, 10_000):
        res = cap_offnode(scores, 2, expert_node, 2, limit, selection=logits)
        assert torch.equal(res.indices, plain_i)
        assert int(res.rerouted) == 0 and int(res.dropped) == 0
    # a limit that does not bind (wanted <= L < B) takes the capping path and changes nothing
    wanted = int(cap_offnode(scores, 2, expert_node, 2, 200, selection=logits).wanted)
    assert wanted < 200
    res = cap_offnode(scores, 2, expert_node, 2, wanted, selection=logits)
    assert torch.equal(res.indices, plain_i)
    assert torch.equal(res.scores, scores.gather(1, plain_i))


def test_highest_scored_offnode_copies_go():
    """Hand-made case: 4 tokens, 4 experts, node 0 = {0, 1}, node 1 = {2, 3}, top-1, L = 2."""
    scores = torch.tensor([
        [0.05, 0.05, 0.80, 0.10],  # wants 2 (0.80): goes
        [0.30, 0.10, 0.40, 0.20],  # wants 2 (0.40): rejected -> best local is 0
        [0.10, 0.20, 0.05, 0.65],  # wants 3 (0.65): goes
        [0.60, 0.30, 0.05, 0.05],  # local already
    ])
    expert_node = torch.tensor([0, 0, 1, 1])
    res = cap_offnode(scores, 1, expert_node, 0, limit=2)
    assert res.indices.squeeze(1).tolist() == [2, 0, 3, 0]
    assert (int(res.wanted), int(res.sent), int(res.rerouted)) == (3, 2, 1)
    # top-2 of token 1 is {2, 0}; if 2 is rejected the token takes 1 (0 is already taken)
    res = cap_offnode(scores, 2, expert_node, 0, limit=0)
    assert res.indices.tolist() == [[0, 1], [1, 0], [0, 1], [0, 1]]  # token 2: 3 -> 0
    assert int(res.sent) == 0


def test_too_few_local_experts_drop():
    """Node 0 hosts only expert 0; top-2 copies rejected with no free local expert drop."""
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.6, 0.3, 0.1]])
    expert_node = torch.tensor([0, 1, 1])
    res = cap_offnode(scores, 2, expert_node, 0, limit=0)
    assert res.indices.tolist() == [[0, -1], [0, -1]]
    assert (int(res.rerouted), int(res.dropped)) == (1, 2)
    assert res.scores.tolist()[0] == [pytest.approx(0.1), 0.0]
    assert to_routing_map(res.indices, 3).tolist() == [[True, False, False], [True, False, False]]


def test_single_node_is_plain_topk():
    logits, scores, _ = _case(1, 30, 8, 1, 2, 0)
    res = cap_offnode(scores, 2, torch.zeros(8, dtype=torch.long), 0, limit=0)
    assert torch.equal(res.indices, torch.topk(scores, 2, dim=1).indices)
    assert int(res.wanted) == 0


def test_bad_arguments():
    s = torch.rand(4, 4)
    with pytest.raises(ValueError):
        cap_offnode(s, 5, torch.zeros(4, dtype=torch.long), 0, 1)
    with pytest.raises(ValueError):
        cap_offnode(s, 2, torch.zeros(3, dtype=torch.long), 0, 1)
    with pytest.raises(ValueError):
        cap_offnode(s, 2, torch.zeros(4, dtype=torch.long), 0, -1)
