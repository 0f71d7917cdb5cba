"""Shadow-expert mechanics (megatron_moe_ext.core.shadow): broadcast / reduce autograd on real
gloo process groups, functional expert calls (the shadow chunks themselves are part of the
exchange plan: tests/core/test_plan.py, tests/core/test_exchange.py).

Notation: W processes, a toy "expert" is y = (x @ A) * p[:, None] @ B with parameters A, B.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_moe_ext.core.shadow import broadcast_from_owners, functional_apply, start_broadcast
from tests.helpers import spawn

H, F = 5, 7


def _expert_params(rank: int, dtype=torch.float32) -> list[torch.Tensor]:
    """Rank r's own expert: deterministic so every rank can rebuild everybody's."""
    g = torch.Generator().manual_seed(10 + rank)
    a = torch.randn(H, F, generator=g).to(dtype)
    b = torch.randn(F, H, generator=g).to(dtype)
    return [torch.nn.Parameter(a), torch.nn.Parameter(b)]


def _tokens(rank: int, n: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(100 + rank)
    return (torch.randn(n, H, generator=g).to(dtype), torch.rand(n, generator=g),
            torch.randn(n, H, generator=g))


def _expert(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return (((x @ a) * p[:, None].to(x.dtype)) @ b)


def _rows(world: int) -> list[int]:
    return [3, 0, 4, 2][:world]  # rank 1 has no tokens at all


def _reference_grads(owner: int, world: int, dtype) -> list[torch.Tensor]:
    """d(sum_r <gy_r, expert_owner(x_r)>)/d(params of owner), computed on one process."""
    params = _expert_params(owner, dtype)
    for r in range(world):
        x, p, gy = _tokens(r, _rows(world)[r], dtype)
        (_expert(*params, x, p).float() * gy).sum().backward()
    return [q.grad.float() for q in params]


def _check_case(rank: int, world: int, owners_of_items: list[int], dtype, tol: float) -> None:
    group = dist.new_group(list(range(world)))
    mine = _expert_params(rank, dtype)
    hook_calls = [0] * len(mine)
    for i, q in enumerate(mine):
        q.register_post_accumulate_grad_hook(lambda _q, i=i: hook_calls.__setitem__(i, hook_calls[i] + 1))
    x, p, gy = _tokens(rank, _rows(world)[rank], dtype)
    x.requires_grad_(True)
    shadows = sorted(set(owners_of_items))  # one expert per owner here
    tensors, owners, tmpl = [], [], []
    for o in shadows:
        tensors += mine if o == rank else [None, None]
        owners += [o, o]
        tmpl += mine
    reduce_dtype = torch.float32 if dtype == torch.bfloat16 else None
    for step in range(2):  # gradient accumulation over two "micro-batches"
        if step == 0:
            out = broadcast_from_owners(tensors, owners, tmpl, group, reduce_dtype=reduce_dtype)
        else:  # issued early, linked before it completes, waited for before use (prefetch)
            pending = start_broadcast(tensors, owners, tmpl, group, reduce_dtype=reduce_dtype)
            out = pending.link()
            assert pending.wait() >= 0.0 and pending.done and pending.wait() == 0.0
        for k, o in enumerate(shadows):
            ref = _expert_params(o, dtype)
            assert torch.equal(out[2 * k], ref[0]) and torch.equal(out[2 * k + 1], ref[1])
            assert out[2 * k].data_ptr() != mine[0].data_ptr()  # never aliases the owner's
        y = sum(_expert(out[2 * k], out[2 * k + 1], x, p) for k in range(len(shadows)))
        (y.float() * gy).sum().backward()
        for k, o in enumerate(shadows):
            if o == rank:
                ref = _reference_grads(o, world, dtype)
                for q, g in zip(mine, ref):
                    assert q.grad is not None
                    err = (q.grad.float() - (step + 1) * g).abs().max() / g.abs().max()
                    assert err <= tol, (rank, step, float(err))
        if rank not in shadows:
            assert all(q.grad is None for q in mine)
        assert hook_calls == [step + 1 if rank in shadows else 0] * len(mine), hook_calls
    # owner parameters were only read
    assert all(torch.equal(q.detach(), r) for q, r in zip(mine, _expert_params(rank, dtype)))
    # input gradient of this rank's own tokens is purely local
    x2 = x.detach().clone().requires_grad_(True)
    refp = [q.detach().clone().requires_grad_(True) for o in shadows for q in _expert_params(o, dtype)]
    y2 = sum(_expert(refp[2 * k], refp[2 * k + 1], x2, p) for k in range(len(shadows)))
    (y2.float() * gy).sum().backward()
    assert torch.allclose(x.grad.float(), 2 * x2.grad.float(), rtol=tol, atol=tol)
    # forward only (evaluation): plain broadcast, no graph
    with torch.no_grad():
        out = broadcast_from_owners(tensors, owners, tmpl, group)
    assert all(not t.requires_grad for t in out)


def _worker(rank: int, world: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _check_case(rank, world, [0], torch.float32, 1e-6)
        _check_case(rank, world, [world - 1, 1], torch.float32, 1e-6)  # rank 1 has no tokens
        _check_case(rank, world, [0, 2], torch.bfloat16, 2e-2)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [3, 4])
def test_broadcast_reduce_autograd_gloo(world: int) -> None:
    """Replicas equal the owner's tensors; grads of all ranks sum into the owner exactly once
    per backward (and accumulate over micro-batches); non-owners get none; bf16 too. The trees
    (core.tree) map positions to ranks by rotation for W = 3 and by XOR for W = 4."""
    spawn(_worker, world)


# --------------------------------------------------------------------------- pure helpers


def test_functional_apply_routes_grads_to_the_given_tensors() -> None:
    lin = torch.nn.Linear(3, 2, bias=False)
    w = torch.randn(2, 3, requires_grad=True)
    x = torch.randn(4, 3)
    y = functional_apply(lin, ["weight"], [w], x)
    y.sum().backward()
    assert lin.weight.grad is None
    assert torch.allclose(w.grad, x.sum(0).expand(2, 3))
    assert torch.allclose(y, x @ w.T)
