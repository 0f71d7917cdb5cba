"""mFabric's locality figures on hand-built traffic matrices."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_moe_ext.core.popularity import transition_pairs
from megatron_moe_ext.traffic import locality as loc


def _block_diag(W: int, k: int, rng: np.random.Generator, perm=None) -> np.ndarray:
    T = np.zeros((W, W))
    for b in range(W // k):
        T[b * k:(b + 1) * k, b * k:(b + 1) * k] = rng.integers(1, 10, size=(k, k))
    if perm is not None:
        T = T[np.ix_(perm, perm)]
    return T


def test_block_diagonal_traffic_stays_in_its_blocks() -> None:
    rng = np.random.default_rng(0)
    T = _block_diag(8, 4, rng)
    assert loc.region_share(T, loc.aligned_regions(8, 4)) == 1.0
    assert loc.region_share(T, loc.best_regions(T, 4)) == 1.0
    # the same blocks with the workers shuffled: consecutive regions miss, the best finds them
    perm = rng.permutation(8)
    Tp = T[np.ix_(perm, perm)]
    best = loc.best_regions(Tp, 4)
    assert loc.region_share(Tp, best) == pytest.approx(1.0)
    assert loc.region_share(Tp, loc.aligned_regions(8, 4)) < 1.0
    blocks = {frozenset(np.flatnonzero(perm // 4 == b)) for b in range(2)}
    assert {frozenset(np.flatnonzero(best == r)) for r in range(2)} == blocks
    curve = loc.locality_curve(Tp)
    assert sorted(curve) == [1, 2, 4, 8]
    assert curve[4]["best"] == pytest.approx(1.0) and curve[8]["best"] == 1.0
    assert curve[1]["best"] == pytest.approx(np.trace(Tp) / Tp.sum())
    assert curve[2]["best"] < 1.0


def test_uniform_traffic_shares_are_the_region_fractions() -> None:
    W = 8
    T = np.ones((W, W))
    for k in (1, 2, 4, 8):
        assert loc.region_share(T, loc.best_regions(T, k)) == pytest.approx(k / W)
        # network-only share: k - 1 of the W - 1 peers are in the region
        assert loc.region_share(T, loc.aligned_regions(W, k), include_self=False) == \
            pytest.approx((k - 1) / (W - 1))
    assert loc.peer_share(T) == pytest.approx({1: 1 / 7, 2: 2 / 7, 4: 4 / 7})


def test_peer_share_of_a_ring() -> None:
    """Every worker sends 3 tokens to its successor and 1 to its predecessor."""
    W = 6
    T = np.zeros((W, W))
    for i in range(W):
        T[i, (i + 1) % W] = 3
        T[i, (i - 1) % W] = 1
    assert loc.peer_share(T, [1, 2]) == {1: 0.75, 2: 1.0}


def test_traffic_matrix_from_counts_placement_and_groups() -> None:
    # 4 workers, 2 EP groups of 2, 4 experts: experts 0,1 on EP rank 0, experts 2,3 on rank 1
    counts = np.array([[1, 2, 3, 4], [5, 6, 7, 8], [1, 1, 1, 1], [0, 0, 2, 2]])
    T = loc.traffic_matrix(counts, ep_size=2)
    assert T.tolist() == [[3, 7, 0, 0], [11, 15, 0, 0], [0, 0, 2, 2], [0, 0, 0, 4]]
    T2 = loc.traffic_matrix(counts, ep_size=2, placement=np.array([1, 0, 0, 1]))
    assert T2[0].tolist() == [5, 5, 0, 0]
    assert loc.node_matrix(T, 2).tolist() == [[36, 0], [0, 8]]
    with pytest.raises(ValueError, match="ep_size 3"):
        loc.traffic_matrix(counts, ep_size=3)


def test_similarity_and_stability() -> None:
    rng = np.random.default_rng(3)
    A = _block_diag(8, 2, rng)
    B = _block_diag(8, 2, rng, perm=np.array([1, 2, 3, 4, 5, 6, 7, 0]))  # blocks shifted
    assert loc.similarity(A, A * 3) == pytest.approx(1.0)
    assert loc.similarity(A, B) < 0.5
    steady = np.stack([A, A * 2, A])
    st = loc.stability(steady, k=2, lags=(1, 2, 5))
    assert sorted(st) == [1, 2] and st[1]["retained"] == pytest.approx(1.0)
    flip = np.stack([A, B, A, B])
    st = loc.stability(flip, k=2, lags=(1, 2))
    assert st[1]["retained"] < 0.9 and st[2]["retained"] == pytest.approx(1.0)
    assert loc.windows(flip, 2).shape == (2, 8, 8)


def test_successor_share_of_consecutive_layers() -> None:
    """Tokens {0,1}->{1,2}, {2}->{2,3}, {3,0}->{1} (-1: no expert): each token's copies below
    are split over its experts above, so M = [[0, 1.5, .5, 0], [0, .5, .5, 0], [0, 0, .5, .5],
    [0, 1, 0, 0]] (5 copies); most frequent successors carry 1.5 + .5 + .5 + 1 of them."""
    a = np.array([[0, 1], [2, -1], [3, 0]])  # [t=3, k=2]
    b = np.array([[1, 2], [2, 3], [1, -1]])
    M = transition_pairs(a, b, 4)
    assert M.tolist() == [[0, 1.5, .5, 0], [0, .5, .5, 0], [0, 0, .5, .5], [0, 1, 0, 0]]
    assert loc.successor_share(M) == 3.5 / 5
    top1 = np.array([[0], [1], [2], [3], [0]])
    assert loc.successor_share(transition_pairs(top1, (top1 + 1) % 4, 4)) == 1.0
    # leading dims (workers of a trace record) flatten to tokens
    assert np.array_equal(transition_pairs(a[None], b[None], 4), M)
