"""Invariants of the shadow experts' broadcast / reduce trees (megatron_moe_ext.core.tree),
the one plan that core.shadow executes and perf.model prices.

Notation: W workers, r the root, d a step's distance.
"""

from __future__ import annotations

import math

import pytest

from megatron_moe_ext.core.tree import broadcast_steps, reduce_steps, tree_position_rank


@pytest.mark.parametrize("world", list(range(1, 21)) + [32, 64])
def test_broadcast_reaches_everyone_once_from_a_holder(world: int) -> None:
    for root in range(world):
        steps = broadcast_steps(root, world)
        assert len(steps) == (math.ceil(math.log2(world)) if world > 1 else 0)
        have = {root}
        received = []
        for step in steps:
            srcs = [s for s, _ in step]
            dsts = [d for _, d in step]
            assert set(srcs) <= have, (root, step)  # only holders send
            assert len(set(srcs)) == len(srcs)  # one message per sender per step
            assert not set(dsts) & have  # nobody receives twice
            have |= set(dsts)
            received += dsts
        assert have == set(range(world)) and sorted(received) == sorted(set(range(world)) - {root})
        # positions are a permutation of the ranks
        assert sorted(tree_position_rank(i, root, world) for i in range(world)) == list(range(world))


@pytest.mark.parametrize("world", [2, 3, 4, 6, 8, 16])
def test_reduce_is_the_broadcast_reversed(world: int) -> None:
    for root in range(world):
        bc, red = broadcast_steps(root, world), reduce_steps(root, world)
        assert red == tuple(tuple((d, s) for s, d in step) for step in reversed(bc))
        # a partial sum leaves a worker only after all its children's sums arrived
        pending = {w: sum(1 for step in red for _, p in step if p == w) for w in range(world)}
        for step in red:
            for child, _ in step:
                assert pending[child] == 0, (root, child)
            for _, parent in step:
                pending[parent] -= 1
        senders = [c for step in red for c, _ in step]
        assert sorted(senders) == sorted(set(range(world)) - {root})


@pytest.mark.parametrize("nodes,per_node", [(2, 8), (16, 4), (4, 2), (2, 2)])
def test_power_of_two_nodes_cross_the_network_once_per_node(nodes: int, per_node: int) -> None:
    """With consecutive ranks per node, every non-root node receives the payload over the
    network exactly once, and all network steps come before the intra-node ones."""
    world = nodes * per_node
    for root in range(world):
        steps = broadcast_steps(root, world)
        crossing = [[(s, d) for s, d in step if s // per_node != d // per_node] for step in steps]
        assert sum(len(c) for c in crossing) == nodes - 1
        k = int(math.log2(nodes))
        assert all(crossing[i] for i in range(k)) and not any(crossing[k:])


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="root 4 out of range"):
        broadcast_steps(4, 4)
    with pytest.raises(ValueError, match="at least one worker"):
        broadcast_steps(0, 0)
