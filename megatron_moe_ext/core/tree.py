"""The shadow experts' broadcast and reduce trees: one plan, executed by :mod:`.shadow` and
priced by :mod:`megatron_moe_ext.perf.model`.

Notation
--------
W      workers in the expert-parallel group (group ranks 0..W-1)
r      the root: the shadowed expert's owner
i      a worker's position in the tree, relative to the root (the root is i = 0)
d      the distance of a step: 2^(ceil(log2 W) - 1), ..., 2, 1 (one step per d)

A binomial tree: at the step of distance d, every position i with i % 2d == 0 that holds the
data sends it to position i + d (when i + d < W). After the last step every worker holds it;
each receives exactly once, from a worker that already held it. The reduce runs the same
steps in reverse order with every edge reversed, each parent adding its child's partial sum.

Positions map to group ranks by ``rank = i XOR r`` when W is a power of two, otherwise
``rank = (i + r) mod W``. With the XOR map, the steps of distance d < D stay inside aligned
blocks of D consecutive ranks. So when each node holds a power of two of consecutive ranks,
only the first steps cross node boundaries: on 2 nodes x 8 the payload crosses the network
exactly once (the step d = 8), and the other 3 steps run inside the nodes.

The steps are not pipelined: step s + 1 starts when step s has ended on every worker
(per-step completion is the executor's barrier, the sum over steps is the model's time).
"""

from __future__ import annotations

from functools import lru_cache

__all__ = ["Send", "TreeSteps", "tree_steps", "broadcast_steps", "reduce_steps",
           "tree_position_rank"]

Send = tuple[int, int]
"""One message of a step: (source group rank, destination group rank)."""

TreeSteps = tuple[tuple[Send, ...], ...]
"""A tree: per step, its messages."""


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def tree_position_rank(position: int, root: int, world: int) -> int:
    """Group rank at tree position ``position`` of the tree rooted at ``root`` (see module)."""
    if _is_power_of_two(world):
        return position ^ root
    return (position + root) % world


@lru_cache(maxsize=4096)
def tree_steps(world: int) -> TreeSteps:
    """The binomial tree's steps in positions: step s is a tuple of (from, to) positions."""
    if world < 1:
        raise ValueError(f"a tree needs at least one worker, got {world}")
    d = 1
    while d < world:
        d *= 2
    steps = []
    d //= 2
    while d >= 1:
        steps.append(tuple((i, i + d) for i in range(0, world, 2 * d) if i + d < world))
        d //= 2
    return tuple(steps)


def broadcast_steps(root: int, world: int) -> TreeSteps:
    """The broadcast from ``root`` over ``world`` workers: one tuple of sends per step."""
    positions = tree_steps(world)
    if not 0 <= root < world:
        raise ValueError(f"root {root} out of range for a group of {world}")
    return tuple(
        tuple((tree_position_rank(a, root, world), tree_position_rank(b, root, world))
              for a, b in step)
        for step in positions
    )


def reduce_steps(root: int, world: int) -> TreeSteps:
    """The reduce-sum to ``root``: the broadcast's steps reversed, every edge reversed
    (a send (child, parent) adds the child's partial sum into the parent's)."""
    return tuple(tuple((dst, src) for src, dst in step)
                 for step in reversed(broadcast_steps(root, world)))
