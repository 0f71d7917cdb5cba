"""Pure tests of the smart-schedule exchange plan (no process group)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from megatron_moe_ext.core.plan import (
    pipeline_order,
    ExchangePlan,
    RecvChunk,
    SendSlice,
    build_plan,
    make_groups,
    ring_groups,
)

CONFIGS = [(1, 1), (2, 1), (2, 2), (4, 1), (4, 2), (4, 4), (6, 2), (6, 3), (8, 2), (8, 4)]


def _random_counts(w: int, e_l: int, seed: int, zero_frac: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 7, size=(w, w * e_l))
    counts[rng.random(counts.shape) < zero_frac] = 0
    return counts


def _plans(counts, w: int, g: int, order=None) -> list[ExchangePlan]:
    return [build_plan(counts, r, w, g, order) for r in range(w)]


def _group_of(plan: ExchangePlan, rank: int) -> int:
    return next(k for k, grp in enumerate(plan.groups) if rank in grp)


@pytest.mark.parametrize("w,g", CONFIGS)
def test_ring_pairing(w: int, g: int) -> None:
    n = w // g
    plans = _plans(np.ones((w, w), dtype=int), w, g)
    for plan in plans:
        assert len(plan.steps) == n and plan.num_groups == n
        i = _group_of(plan, plan.rank)
        for j, step in enumerate(plan.steps):
            assert step.index == j
            assert step.send_group == (i - j) % n
            assert step.recv_group == (i + j) % n
            # with all-ones counts nothing is skipped: peers are exactly the group members
            assert [s.peer for s in step.sends] == list(plan.groups[step.send_group])
            assert [r.peer for r in step.recvs] == list(plan.groups[step.recv_group])
        # step 0 is the local group, self included
        assert plan.steps[0].send_group == plan.steps[0].recv_group == i
        assert plan.rank in [s.peer for s in plan.steps[0].sends]
        # over all steps every worker is sent to / received from exactly once
        assert sorted(s.peer for st in plan.steps for s in st.sends) == list(range(w))
        assert sorted(r.peer for st in plan.steps for r in st.recvs) == list(range(w))


def test_ring_groups_explicit() -> None:
    assert ring_groups(0, 4) == [(0, 0), (3, 1), (2, 2), (1, 3)]
    assert ring_groups(2, 3) == [(2, 2), (1, 0), (0, 1)]


@pytest.mark.parametrize("w,g", CONFIGS)
@pytest.mark.parametrize("e_l", [1, 3])
def test_offsets_and_lengths_match_counts(w: int, g: int, e_l: int) -> None:
    counts = _random_counts(w, e_l, seed=w * 100 + g * 10 + e_l)
    for plan in _plans(counts, w, g):
        r = plan.rank
        assert plan.num_local_experts == e_l
        assert plan.num_input_tokens == counts[r].sum()
        covered = []
        for step in plan.steps:
            for s in step.sends:
                assert s.offset == counts[r, : s.peer * e_l].sum()
                assert s.length == counts[r, s.peer * e_l:(s.peer + 1) * e_l].sum() > 0
                covered.append((s.offset, s.offset + s.length))
            for c in step.recvs:
                expected = tuple(int(v) for v in counts[c.peer, r * e_l:(r + 1) * e_l])
                assert c.expert_counts == expected and len(c.expert_counts) == e_l
                assert c.length == sum(expected) > 0
        # the send slices tile [0, T) exactly, without overlap
        covered.sort()
        pos = 0
        for a, b in covered:
            assert a == pos
            pos = b
        assert pos == plan.num_input_tokens
        assert plan.num_compute_tokens == counts[:, r * e_l:(r + 1) * e_l].sum()


@pytest.mark.parametrize("w,g", CONFIGS)
@pytest.mark.parametrize("use_order", [False, True])
def test_send_recv_symmetry(w: int, g: int, use_order: bool) -> None:
    e_l = 2
    counts = _random_counts(w, e_l, seed=7 * w + g, zero_frac=0.4)
    order = list(np.random.default_rng(w + g).permutation(w)) if use_order else None
    plans = _plans(counts, w, g, order)
    for a, b in itertools.product(range(w), repeat=2):
        for j in range(len(plans[0].steps)):
            sent = [s for s in plans[a].steps[j].sends if s.peer == b]
            expected = [c for c in plans[b].steps[j].recvs if c.peer == a]
            assert len(sent) == len(expected) <= 1, (a, b, j)
            if sent:
                assert sent[0].length == expected[0].length
                # what a sends to b is b's slice of a's expert-sorted input
                lo, hi = sent[0].offset, sent[0].offset + sent[0].length
                assert hi - lo == sum(expected[0].expert_counts)
    # the totals a performance model uses are consistent across the group
    for j in range(len(plans[0].steps)):
        assert sum(p.tokens_sent_per_step()[j] for p in plans) == sum(
            p.tokens_received_per_step()[j] for p in plans
        )
        assert sum(p.tokens_sent_per_step(remote_only=True)[j] for p in plans) == sum(
            p.tokens_received_per_step(remote_only=True)[j] for p in plans
        )


def test_zero_count_peers_skipped_on_both_sides() -> None:
    w, e_l, g = 4, 2, 2
    counts = np.full((w, w * e_l), 3)
    counts[0, 2 * e_l:3 * e_l] = 0  # rank 0 sends nothing to rank 2
    counts[1, :] = 0  # rank 1 has no tokens at all
    counts[:, 3 * e_l] = 0  # first expert of rank 3 is empty for everyone (rank 3 still gets some)
    plans = _plans(counts, w, g)
    all_sends = {(p.rank, s.peer) for p in plans for st in p.steps for s in st.sends}
    all_recvs = {(c.peer, p.rank) for p in plans for st in p.steps for c in st.recvs}
    assert all_sends == all_recvs
    assert (0, 2) not in all_sends
    assert not any(src == 1 for src, _ in all_sends)
    assert plans[1].num_input_tokens == 0
    assert all(not st.sends for st in plans[1].steps)
    chunks_of_3 = [c for st in plans[3].steps for c in st.recvs]
    assert chunks_of_3 and all(c.expert_counts[0] == 0 for c in chunks_of_3)


def test_self_traffic_in_step_zero() -> None:
    counts = torch.tensor([[2, 1, 0, 4], [0, 0, 5, 1]])  # W=2, E_l=2
    p0 = build_plan(counts, 0, 2, 1)
    assert p0.steps[0].sends == (SendSlice(0, 0, 3),)
    assert p0.steps[0].recvs == (RecvChunk(0, 3, (2, 1)),)
    assert p0.steps[0].remote_tokens_sent == 0 and p0.steps[0].tokens_sent == 3
    assert p0.steps[1].sends == (SendSlice(1, 3, 4),)
    assert p0.steps[1].recvs == ()  # rank 1 sends nothing to rank 0's experts
    p1 = build_plan(counts, 1, 2, 1)
    assert p1.steps[0].sends == (SendSlice(1, 0, 6),)
    assert p1.steps[1].recvs == (RecvChunk(0, 4, (0, 4)),)
    assert p1.tokens_received_per_step() == [6, 4]
    assert p1.tokens_received_per_step(remote_only=True) == [0, 4]


def test_group_order_follows_topology() -> None:
    order = [0, 2, 1, 3]
    assert make_groups(4, 2, order) == ((0, 2), (1, 3))
    plan = build_plan(np.ones((4, 4), dtype=int), 2, 4, 2, order)
    assert [s.peer for s in plan.steps[0].sends] == [0, 2]
    assert [s.peer for s in plan.steps[1].sends] == [1, 3]


@pytest.mark.parametrize("w,g", [(4, 3), (2, 4), (6, 4), (4, 0), (4, -2)])
def test_bad_group_size(w: int, g: int) -> None:
    with pytest.raises(ValueError, match=r"moe\.fastermoe\.group_size"):
        build_plan(np.ones((w, w), dtype=int), 0, w, g)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="permutation"):
        build_plan(np.ones((4, 4), dtype=int), 0, 4, 2, [0, 1, 1, 3])
    with pytest.raises(ValueError, match="multiple"):
        build_plan(np.ones((4, 6), dtype=int), 0, 4, 2)
    with pytest.raises(ValueError, match="rows"):
        build_plan(np.ones((2, 4), dtype=int), 0, 4, 2)
    with pytest.raises(ValueError, match="non-negative"):
        build_plan(-np.ones((2, 2), dtype=int), 0, 2, 1)
    with pytest.raises(ValueError, match="rank"):
        build_plan(np.ones((2, 2), dtype=int), 2, 2, 1)


def test_plan_is_frozen() -> None:
    plan = build_plan(np.ones((2, 2), dtype=int), 0, 2, 1)
    with pytest.raises(Exception):
        plan.rank = 1  # type: ignore[misc]


# --------------------------------------------------------------------------- shadow chunks


def _shadow_cases():
    rng = np.random.default_rng(3)
    for w, g in [(2, 1), (2, 2), (4, 1), (4, 2), (6, 3)]:
        for e_l in (1, 2, 3):
            e = w * e_l
            for _ in range(3):
                k = int(rng.integers(1, min(e, 4) + 1))
                yield w, g, e_l, sorted(rng.choice(e, size=k, replace=False).tolist())


@pytest.mark.parametrize("w,g,e_l,shadows", list(_shadow_cases()))
def test_shadow_chunks_and_runs_cover_every_token_once(w, g, e_l, shadows) -> None:
    counts = _random_counts(w, e_l, seed=w * 31 + e_l + sum(shadows), zero_frac=0.3)
    plans = [build_plan(counts, r, w, g, shadows=shadows) for r in range(w)]
    for r, plan in enumerate(plans):
        prefix = np.concatenate([[0], np.cumsum(counts[r])])
        # shadow chunks: this rank's block of each shadowed expert, by offset, even if empty
        assert plan.shadows == tuple(shadows)
        assert plan.shadow_chunks == tuple(
            (e, int(prefix[e]), int(counts[r, e])) for e in shadows)
        assert plan.num_shadow_tokens == counts[r, shadows].sum()
        # sends + shadow chunks tile [0, T) exactly, each slice inside one peer's experts
        pieces = sorted([(s.offset, s.length) for st in plan.steps for s in st.sends]
                        + [(c.offset, c.length) for c in plan.shadow_chunks if c.length])
        pos = 0
        for off, length in pieces:
            assert off == pos and length > 0
            pos += length
        assert pos == plan.num_input_tokens
        # the exchange computes exactly the non-shadowed load of this rank's experts
        mine = [e for e in range(r * e_l, (r + 1) * e_l) if e not in shadows]
        assert plan.num_compute_tokens == counts[:, mine].sum()
    for a, b in itertools.product(range(w), repeat=2):
        for j in range(len(plans[0].steps)):
            sent = [s for s in plans[a].steps[j].sends if s.peer == b]
            got = [c for c in plans[b].steps[j].recvs if c.peer == a]
            assert len(got) == (1 if sent else 0)
            if sent:
                # one message per run, in order; the receiver expects the same lengths
                assert tuple(s.length for s in sent) == got[0].run_lengths
                assert all(got[0].expert_counts[e - b * e_l] == 0
                           for e in shadows if b * e_l <= e < (b + 1) * e_l)


def test_shadow_in_the_middle_splits_the_slice() -> None:
    counts = [[1, 2, 3, 4, 5, 6], [1, 1, 1, 1, 1, 1]]  # W=2, E_l=3; shadows 1 and 4
    p0 = build_plan(counts, 0, 2, 1, shadows=[1, 4])
    assert p0.steps[0].sends == (SendSlice(0, 0, 1), SendSlice(0, 3, 3))
    assert p0.steps[0].recvs == (RecvChunk(0, 4, (1, 0, 3), (1, 3)),)
    assert p0.steps[1].sends == (SendSlice(1, 6, 4), SendSlice(1, 15, 6))
    assert p0.shadow_chunks == ((1, 1, 2), (4, 10, 5))
    p1 = build_plan(counts, 1, 2, 1, shadows=[1, 4])
    assert p1.steps[1].recvs == (RecvChunk(0, 10, (4, 0, 6), (4, 6)),)
    assert p1.steps[0].recvs == (RecvChunk(1, 2, (1, 0, 1), (1, 1)),)
    # no shadows: the same plan as before, one message per peer
    plain = build_plan(counts, 0, 2, 1)
    assert plain.shadow_chunks == () and plain.steps[0].recvs[0].run_lengths == (6,)


def test_bad_shadow_ids() -> None:
    with pytest.raises(ValueError, match="shadow ids"):
        build_plan(np.ones((2, 4), dtype=int), 0, 2, 1, shadows=[4])


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_pipeline_order(n: int) -> None:
    """Each S and R once; S_j before R_j; S_{j+1} before R_j (one step of look-ahead) but
    S_{j+2} only after R_j."""
    order = pipeline_order(n)
    pos = {(op.kind, op.step): i for i, op in enumerate(order)}
    assert len(order) == 2 * n and len(pos) == 2 * n
    assert sorted(pos) == sorted([("S", j) for j in range(n)] + [("R", j) for j in range(n)])
    for j in range(n):
        assert pos[("S", j)] < pos[("R", j)]
        if j + 1 < n:
            assert pos[("S", j + 1)] < pos[("R", j)]
            assert pos[("R", j)] < pos[("R", j + 1)]
        if j + 2 < n:
            assert pos[("R", j)] < pos[("S", j + 2)]
    assert pipeline_order(0) == ()
