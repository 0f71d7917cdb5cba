"""mFabric's locality figures from routing counts, expert placement and a cluster.

Notation
--------
W        workers (trace rows); ep = expert-parallel group size, groups of consecutive rows
E        experts; placement[e] = EP rank (within its group) holding expert e
M        workers per node of the cluster
counts   [W, E] tokens (top-k copies) worker i routed to expert e in one iteration
T        [W, W] traffic matrix in tokens: T[i, j] = tokens worker i sends to worker j
         (bytes = tokens * H * element bytes, so every share below is also a byte share)
S        T + T^T, the undirected traffic between two workers
k        region size (workers); a region assignment partitions the W workers into W / k
         regions of k

Figures (docs/traffic.md explains them):

- :func:`region_share`: share of the routed tokens whose source and destination lie in the
  same region. ``include_self=True`` (default) counts a token routed to an expert of its own
  worker as staying in the region, so k = 1 gives the share that never leaves a worker and
  k = W gives 1.0; with ``include_self=False`` the denominator is the traffic that crosses
  the fabric.
- :func:`best_regions`: the assignment maximising :func:`region_share` (greedy seeding by
  heaviest traffic, then pairwise swaps while one gains; a local optimum, exact on
  block-structured traffic), against :func:`aligned_regions` (consecutive workers: nodes).
- :func:`peer_share`: share of a worker's off-worker traffic carried by its top-k peers,
  averaged over workers weighted by their traffic.
- :func:`similarity`: cosine similarity of two traffic matrices (off-diagonal), and
  :func:`stability`: how good regions chosen on iteration t stay on iteration t + d.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def traffic_matrix(counts: np.ndarray, ep_size: Optional[int] = None,
                   placement: Optional[np.ndarray] = None) -> np.ndarray:
    """T [W, W] tokens from counts [W, E]: worker i's tokens for expert e go to the worker of
    its own EP group holding e (placement[e]; default contiguous e // (E / ep))."""
    c = np.asarray(counts, dtype=float)
    W, E = c.shape
    ep = W if ep_size is None else int(ep_size)
    if W % ep or E % ep:
        raise ValueError(f"ep_size {ep} must divide workers {W} and experts {E}")
    place = np.arange(E) // (E // ep) if placement is None else np.asarray(placement)
    if place.shape != (E,) or place.min() < 0 or place.max() >= ep:
        raise ValueError(f"placement must be [E={E}] EP ranks in [0, {ep})")
    onehot = np.zeros((E, ep))
    onehot[np.arange(E), place] = 1.0
    per_rank = c @ onehot  # [W, ep]
    T = np.zeros((W, W))
    for g in range(W // ep):
        rows = slice(g * ep, (g + 1) * ep)
        T[rows, rows] = per_rank[rows]
    return T


def node_matrix(T: np.ndarray, workers_per_node: int) -> np.ndarray:
    """[W/M, W/M] tokens between nodes (node = worker // M; the diagonal stays in a node)."""
    t = np.asarray(T, dtype=float)
    W = t.shape[0]
    m = int(workers_per_node)
    if W % m:
        raise ValueError(f"{W} workers are not whole nodes of {m}")
    n = W // m
    return t.reshape(n, m, n, m).sum(axis=(1, 3))


def aligned_regions(num_workers: int, k: int) -> np.ndarray:
    """[W] region id of consecutive workers: worker w in region w // k."""
    _check_k(num_workers, k)
    return np.arange(num_workers) // k


def region_share(T: np.ndarray, regions: np.ndarray, include_self: bool = True) -> float:
    """Share of T inside regions (see the module docstring); 1.0 for no traffic at all."""
    t = np.asarray(T, dtype=float)
    if not include_self:
        t = t.copy()
        np.fill_diagonal(t, 0.0)
    total = t.sum()
    if total <= 0:
        return 1.0
    r = np.asarray(regions)
    return float(t[r[:, None] == r[None, :]].sum() / total)


def _check_k(num_workers: int, k: int) -> None:
    if k < 1 or num_workers % k:
        raise ValueError(f"region size {k} must divide the {num_workers} workers")


def best_regions(T: np.ndarray, k: int, max_swaps: Optional[int] = None) -> np.ndarray:
    """[W] region ids of W / k regions of k workers keeping the most of T inside.

    Greedy: each region starts from the unassigned worker with the most traffic and takes the
    unassigned worker with the most traffic to it until it has k; then the best pairwise swap
    between two regions is applied while it gains (at most ``max_swaps``, default W^2).
    """
    t = np.asarray(T, dtype=float)
    W = t.shape[0]
    _check_k(W, k)
    S = t + t.T
    np.fill_diagonal(S, 0.0)
    regions = np.full(W, -1)
    left = list(range(W))
    rid = 0
    while left:
        seed = max(left, key=lambda w: (S[w].sum(), -w))
        members = [seed]
        left.remove(seed)
        while len(members) < k:
            nxt = max(left, key=lambda w: (S[w, members].sum(), -w))
            members.append(nxt)
            left.remove(nxt)
        regions[members] = rid
        rid += 1
    if k == 1 or k == W:
        return regions
    for _ in range(W * W if max_swaps is None else max_swaps):
        onehot = np.zeros((W, W // k))
        onehot[np.arange(W), regions] = 1.0
        R = S @ onehot  # [W, regions]: traffic of w with each region
        to_other = R[:, regions]  # [a, b] = traffic of a with b's region
        own = R[np.arange(W), regions]
        gain = to_other - own[:, None] + to_other.T - own[None, :] - 2 * S
        gain[regions[:, None] == regions[None, :]] = -np.inf
        a, b = np.unravel_index(int(np.argmax(gain)), gain.shape)
        if not gain[a, b] > 1e-9 * max(S.sum(), 1.0):
            break
        regions[a], regions[b] = regions[b], regions[a]
    return regions


def region_sizes(num_workers: int) -> list[int]:
    """k = 1, 2, 4, ... dividing W, and W itself."""
    ks, k = [], 1
    while k < num_workers:
        if num_workers % k == 0:
            ks.append(k)
        k *= 2
    return ks + [num_workers]


def locality_curve(T: np.ndarray, ks: Optional[Sequence[int]] = None,
                   workers_per_node: Optional[int] = None,
                   include_self: bool = True) -> dict[int, dict[str, float]]:
    """{k: {"best": share with best regions, "aligned": share with consecutive regions}}."""
    W = np.asarray(T).shape[0]
    out = {}
    for k in (ks or region_sizes(W)):
        out[int(k)] = {
            "best": region_share(T, best_regions(T, k), include_self),
            "aligned": region_share(T, aligned_regions(W, k), include_self),
        }
    return out


def peer_share(T: np.ndarray, ks: Optional[Sequence[int]] = None) -> dict[int, float]:
    """{k: share of off-worker traffic sent to each worker's k heaviest destinations}."""
    t = np.asarray(T, dtype=float).copy()
    np.fill_diagonal(t, 0.0)
    W = t.shape[0]
    total = t.sum()
    ranked = -np.sort(-t, axis=1)  # each row's destinations, heaviest first
    out = {}
    for k in (ks or [k for k in region_sizes(W) if k < W]):
        out[int(k)] = float(ranked[:, :k].sum() / total) if total > 0 else 1.0
    return out


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two traffic matrices' off-diagonal entries (1: same shape)."""
    x, y = np.asarray(a, dtype=float).copy(), np.asarray(b, dtype=float).copy()
    np.fill_diagonal(x, 0.0)
    np.fill_diagonal(y, 0.0)
    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
    if nx == 0 or ny == 0:
        return 1.0 if nx == ny else 0.0
    return float((x * y).sum() / (nx * ny))


def windows(Ts: np.ndarray, window: int) -> np.ndarray:
    """[I // window, W, W]: the traffic of consecutive windows of iterations, summed."""
    t = np.asarray(Ts, dtype=float)
    n = t.shape[0] // window
    if n == 0:
        raise ValueError(f"window {window} is longer than the {t.shape[0]} iterations")
    return t[:n * window].reshape(n, window, *t.shape[1:]).sum(axis=1)


def stability(Ts: np.ndarray, k: int, lags: Sequence[int] = (1, 2, 4, 8),
              include_self: bool = True) -> dict[int, dict[str, float]]:
    """{lag d: {"similarity": mean cos(T_t, T_{t+d}), "retained": mean share of T_{t+d} inside
    the regions chosen on T_t divided by the share inside T_{t+d}'s own best regions}}.

    ``retained`` 1.0 means a region assignment made d windows ago is still as good as a fresh
    one; lags not shorter than the trace are left out.
    """
    t = np.asarray(Ts, dtype=float)
    n = t.shape[0]
    best = [best_regions(t[i], k) for i in range(n)]
    fresh = [region_share(t[i], best[i], include_self) for i in range(n)]
    out = {}
    for d in lags:
        if d >= n:
            continue
        sims = [similarity(t[i], t[i + d]) for i in range(n - d)]
        kept = [region_share(t[i + d], best[i], include_self) / fresh[i + d]
                if fresh[i + d] > 0 else 1.0 for i in range(n - d)]
        out[int(d)] = {"similarity": float(np.mean(sims)), "retained": float(np.mean(kept))}
    return out


def expert_popularity(counts: np.ndarray) -> np.ndarray:
    """[..., E] share of the routed tokens each expert receives (rows of [..., W, E] summed)."""
    c = np.asarray(counts, dtype=float).sum(axis=-2)
    tot = c.sum(axis=-1, keepdims=True)
    return np.divide(c, tot, out=np.zeros_like(c), where=tot > 0)


def successor_share(M: np.ndarray) -> float:
    """Share of transitions (an [E, E] ``core.popularity.transition_pairs`` matrix) that go to
    each expert's most frequent successor (weighted by the expert's transitions); independent
    layers with balanced routing give about 1 / E."""
    tot = M.sum()
    return float(M.max(axis=1).sum() / tot) if tot > 0 else 0.0
