"""Distributed tests of ``smart_exchange`` (gloo, spawned CPU processes).

Notation: T routed token copies per rank, E = W * E_l experts, H hidden, F ffn hidden,
W expert-parallel workers, g group size.

Every rank generates the *whole* problem (all ranks' tokens, routing, expert weights and
output gradients) from one seed, which is the same information an all-gather of
everything would give. The reference is ordinary single-process autograd over all ranks;
the distributed run uses only this rank's part (and the real all-gathered counts). Output,
grads of tokens (through a top-k gather, so duplicates are summed), probs and all local
expert params are compared. Each spawned job runs many cases and writes metrics to JSON;
the pytest functions only read them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from megatron_moe_ext.core.exchange import Shadows, smart_exchange
from megatron_moe_ext.core.trace import Tracer

H, FFN = 8, 16
TOL = {"float32": 1e-5, "bfloat16": 3e-2}  # max|a-b| / max|ref|, per quantity
REPO = Path(__file__).resolve().parents[2]

# name, W (group size of the EP group), g, E_l, top-k, dtype, routing kind, group_order, extras
CASES_W2 = [
    dict(name="w2_g1", W=2, g=1, e_l=2, topk=2, dtype="float32", routing="uniform"),
    dict(name="w2_g2", W=2, g=2, e_l=2, topk=2, dtype="float32", routing="uniform"),
    dict(name="w2_g1_sparse", W=2, g=1, e_l=3, topk=2, dtype="float32", routing="sparse"),
    dict(name="w2_g2_sparse_el1", W=2, g=2, e_l=1, topk=1, dtype="float32", routing="sparse"),
    dict(name="w2_g2_bf16", W=2, g=2, e_l=2, topk=2, dtype="bfloat16", routing="uniform"),
    dict(name="w2_g1_bf16_sparse", W=2, g=1, e_l=2, topk=2, dtype="bfloat16", routing="sparse"),
    dict(name="w2_g1_frozen", W=2, g=1, e_l=2, topk=2, dtype="float32", routing="uniform",
         frozen=True),
    # W=1 on singleton subgroups of the 2-process world
    dict(name="w1_g1", W=1, g=1, e_l=3, topk=2, dtype="float32", routing="uniform"),
    # shadowed experts: computed locally at step 0, the rest exchanged (expert 1 sits in the
    # middle of rank 0's experts, so rank 0's slice for itself and its peers is split)
    dict(name="w2_g1_shadow_mid", W=2, g=1, e_l=3, topk=2, dtype="float32", routing="uniform",
         shadows=[1]),
    dict(name="w2_g2_shadow_two", W=2, g=2, e_l=2, topk=2, dtype="float32", routing="uniform",
         shadows=[0, 3]),
    dict(name="w2_g1_shadow_sparse_bf16", W=2, g=1, e_l=2, topk=2, dtype="bfloat16",
         routing="sparse", shadows=[0, 2]),
]
CASES_W4 = [
    dict(name="w4_g1", W=4, g=1, e_l=2, topk=2, dtype="float32", routing="uniform"),
    dict(name="w4_g2", W=4, g=2, e_l=2, topk=2, dtype="float32", routing="uniform"),
    dict(name="w4_g4", W=4, g=4, e_l=2, topk=2, dtype="float32", routing="uniform"),
    dict(name="w4_g2_sparse", W=4, g=2, e_l=2, topk=2, dtype="float32", routing="sparse"),
    dict(name="w4_g1_sparse_el3", W=4, g=1, e_l=3, topk=3, dtype="float32", routing="sparse"),
    dict(name="w4_g2_order", W=4, g=2, e_l=1, topk=2, dtype="float32", routing="uniform",
         order=[3, 0, 2, 1]),
    dict(name="w4_g4_bf16", W=4, g=4, e_l=2, topk=2, dtype="bfloat16", routing="uniform"),
    dict(name="w4_g2_bf16_sparse", W=4, g=2, e_l=2, topk=2, dtype="bfloat16", routing="sparse"),
    # W=2 on subgroups {0,2} and {1,3}: group ranks differ from global ranks
    dict(name="w4sub_w2_g1", W=2, g=1, e_l=2, topk=2, dtype="float32", routing="sparse"),
    dict(name="w4_g1_trace", W=4, g=1, e_l=2, topk=2, dtype="float32", routing="uniform",
         trace=True),
    dict(name="w4_g2_shadow", W=4, g=2, e_l=3, topk=3, dtype="float32", routing="sparse",
         shadows=[1, 6, 7], order=[3, 0, 2, 1]),
    dict(name="w4_g1_shadow_trace", W=4, g=1, e_l=2, topk=2, dtype="float32",
         routing="uniform", shadows=[2], trace=True),
]


# ----------------------------------------------------------------------------- problem


def _problem(case: dict, seed: int) -> dict:
    """All ranks' data for one case, generated identically on every process."""
    gen = torch.Generator().manual_seed(seed)
    w, e_l, topk = case["W"], case["e_l"], case["topk"]
    e = w * e_l
    dtype = getattr(torch, case["dtype"])
    allowed = torch.ones(w, e, dtype=torch.bool)
    n_tok = torch.randint(3, 10, (w,), generator=gen).tolist()
    if case["routing"] == "sparse":
        if e > 2:
            allowed[:, 0] = False  # expert 0 never gets a token
        if w > 1:
            allowed[0, e_l:2 * e_l] = False  # rank 0 never sends to rank 1
            n_tok[w - 1] = 0  # last rank has no tokens at all
    ranks = []
    for s in range(w):
        x = torch.randn(n_tok[s], H, generator=gen).to(dtype)
        src, exp, prob = [], [], []
        choices = allowed[s].nonzero().flatten()
        k = min(topk, len(choices))
        for t in range(n_tok[s]):
            pick = choices[torch.randperm(len(choices), generator=gen)[:k]]
            src += [t] * k
            exp += pick.tolist()
            prob += torch.rand(k, generator=gen).add(0.1).tolist()
        exp_t = torch.tensor(exp, dtype=torch.long)
        order = torch.sort(exp_t, stable=True).indices
        src_t = torch.tensor(src, dtype=torch.long)[order]
        ranks.append(dict(
            x=x, src=src_t, expert=exp_t[order],
            probs=torch.tensor(prob, dtype=torch.float32)[order],
            counts=torch.bincount(exp_t, minlength=e),
            gy=torch.randn(len(src), H, generator=gen).to(dtype),
        ))
    params = []
    for _ in range(e):
        params.append([
            (torch.randn(FFN, H, generator=gen) / H ** 0.5).to(dtype),
            (torch.randn(FFN, generator=gen) * 0.1).to(dtype),
            (torch.randn(H, FFN, generator=gen) / FFN ** 0.5).to(dtype),
            (torch.randn(H, generator=gen) * 0.1).to(dtype),
        ])
    return dict(ranks=ranks, params=params, counts=torch.stack([r["counts"] for r in ranks]))


def _mlp(x: torch.Tensor, p: torch.Tensor, w1, b1, w2, b2) -> torch.Tensor:
    """Megatron-style expert: fc2(gelu(fc1(x)) * p)."""
    h = F.gelu(F.linear(x, w1, b1)) * p[:, None].to(x.dtype)
    return F.linear(h, w2, b2)


def _make_expert_fn(local_params: list[list[torch.Tensor]]):
    def expert_fn(x: torch.Tensor, p: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        assert len(tokens_per_expert) == len(local_params)
        xs = torch.split(x, tokens_per_expert)
        ps = torch.split(p, tokens_per_expert)
        return torch.cat([_mlp(xi, pi, *w) for xi, pi, w in zip(xs, ps, local_params)])
    return expert_fn


def _reference(prob: dict) -> list[dict]:
    """Single-process autograd over all ranks; fp32 math on the (possibly bf16) data."""
    params = [[t.float().clone().requires_grad_() for t in ws] for ws in prob["params"]]
    outs, leaves = [], []
    for r in prob["ranks"]:
        x = r["x"].float().clone().requires_grad_()
        p = r["probs"].clone().requires_grad_()
        tok = x[r["src"]]
        rows = [
            _mlp(tok[i:i + 1], p[i:i + 1], *params[int(r["expert"][i])])
            for i in range(len(r["src"]))
        ]
        out = torch.cat(rows) if rows else torch.zeros(0, H)
        outs.append(out)
        leaves.append((x, p))
    loss = sum((o * r["gy"].float()).sum() for o, r in zip(outs, prob["ranks"]))
    if loss.requires_grad:
        loss.backward()

    def grad(t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(t) if t.grad is None else t.grad

    return [dict(out=o.detach(), gx=grad(x), gp=grad(p)) for o, (x, p) in zip(outs, leaves)] + [
        dict(param_grads=[[grad(t) for t in ws] for ws in params])
    ]


# ----------------------------------------------------------------------------- worker


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a-b| / max|b| (0 for empty tensors)."""
    a, b = a.detach(), b.detach()
    if b.numel() == 0:
        return 0.0 if a.numel() == 0 else float("inf")
    scale = b.float().abs().max().clamp_min(1e-6)
    return float((a.float() - b.float()).abs().max() / scale)


def _run_case(case: dict, group, seed: int, tmpdir: str) -> dict:
    rank, w = dist.get_rank(group), dist.get_world_size(group)
    assert w == case["W"]
    prob = _problem(case, seed)
    ref = _reference(prob)
    mine = prob["ranks"][rank]
    e_l = case["e_l"]
    frozen = case.get("frozen", False)  # tokens and every fc1 weight without grad
    local = [[t.detach().clone().requires_grad_(not (frozen and k == 0))
              for k, t in enumerate(prob["params"][e])]
             for e in range(rank * e_l, (rank + 1) * e_l)]
    shadows = case.get("shadows", [])
    # stand-ins for the broadcast replicas: every rank's own leaf copy of the shadowed weights
    replicas = {e: [t.detach().clone().requires_grad_() for t in prob["params"][e]]
                for e in shadows}
    flat = [t for e, ws in zip(range(rank * e_l, (rank + 1) * e_l), local)
            if e not in shadows for t in ws]
    flat += [t for e in shadows for t in replicas[e]]
    hook_calls = [0] * len(flat)
    for i, t in enumerate(flat):
        if t.requires_grad:
            t.register_post_accumulate_grad_hook(
                lambda _t, i=i: hook_calls.__setitem__(i, hook_calls[i] + 1))

    gathered = [torch.zeros_like(mine["counts"]) for _ in range(w)]
    dist.all_gather(gathered, mine["counts"], group=group)  # the real counts exchange
    counts = torch.stack(gathered)
    assert torch.equal(counts, prob["counts"])

    x = mine["x"].clone().requires_grad_(not frozen)
    p = mine["probs"].clone().requires_grad_()
    tracer = Tracer(rank=dist.get_rank()) if case.get("trace") else None
    kw = dict(group=group, group_size=case["g"], group_order=case.get("order"))
    owned = [t for e, ws in zip(range(rank * e_l, (rank + 1) * e_l), local)
             if e not in shadows for t in ws]
    if shadows:
        kw["shadows"] = Shadows(weights=replicas, fn=lambda e, xs, ps, ws: _mlp(xs, ps, *ws))
    out = smart_exchange(x[mine["src"]], p, counts, _make_expert_fn(local), owned,
                         tracer=tracer, **kw)
    out.backward(mine["gy"])
    with torch.no_grad():
        out_nograd = smart_exchange(x[mine["src"]], p, counts, _make_expert_fn(local), owned,
                                    **kw)
    for e in shadows:  # what the broadcast's backward does: sum the replicas' grads
        for t in replicas[e]:
            dist.all_reduce(t.grad, group=group)

    ref_pg = [t for e in range(rank * e_l, (rank + 1) * e_l) if e not in shadows
              for t in ref[-1]["param_grads"][e]]
    ref_pg += [t for e in shadows for t in ref[-1]["param_grads"][e]]
    errs = {
        "out": _err(out, ref[rank]["out"]),
        "out_nograd": _err(out_nograd, ref[rank]["out"]),
        "grad_tokens": 0.0 if frozen else _err(x.grad, ref[rank]["gx"]),
        "grad_probs": _err(p.grad, ref[rank]["gp"]),
        "grad_params": max([_err(a.grad, b) for a, b in zip(flat, ref_pg) if a.requires_grad]),
    }
    if frozen:  # no gradient may appear on what does not require one
        errs["frozen_has_grad"] = float(x.grad is not None) + sum(
            float(a.grad is not None) for a in flat if not a.requires_grad)
        hook_calls = [c for c, a in zip(hook_calls, flat) if a.requires_grad]
    info = {
        "errs": errs,
        "hook_calls": hook_calls,
        "dtype_ok": out.dtype == mine["x"].dtype and p.grad.dtype == torch.float32
        and (frozen or x.grad.dtype == x.dtype),
        "num_tokens": int(len(mine["src"])),
    }
    if tracer is not None:
        path = os.path.join(tmpdir, f"trace_rank{dist.get_rank()}.json")
        tracer.write_chrome_trace(path)
        info["trace"] = path
    return info


def _worker(rank: int, world: int, port: int, cases: list[dict], tmpdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    try:
        world_group = dist.new_group(list(range(world)))
        singles = [dist.new_group([r]) for r in range(world)]
        pairs = [dist.new_group([0, 2]), dist.new_group([1, 3])] if world == 4 else []
        results = {}
        for i, case in enumerate(cases):
            if case["W"] == world:
                group = world_group
            elif case["W"] == 1:
                group = singles[rank]
            else:
                group = pairs[rank % 2]
            # one seed per case and EP group, identical inside the group
            seed = 1000 * i + min(dist.get_process_group_ranks(group))
            results[case["name"]] = _run_case(case, group, seed, tmpdir)
        dist.barrier(group=world_group)
        with open(os.path.join(tmpdir, f"result_rank{rank}.json"), "w") as fh:
            json.dump(results, fh)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int, cases: list[dict], tmpdir: Path) -> list[dict]:
    mp.start_processes(_worker, args=(world, _free_port(), cases, str(tmpdir)), nprocs=world,
                       join=True, start_method="spawn")
    return [json.loads((tmpdir / f"result_rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def results_w2(tmp_path_factory) -> list[dict]:
    return _spawn(2, CASES_W2, tmp_path_factory.mktemp("w2"))


@pytest.fixture(scope="module")
def results_w4(tmp_path_factory) -> list[dict]:
    return _spawn(4, CASES_W4, tmp_path_factory.mktemp("w4"))


# ----------------------------------------------------------------------------- tests


def _check(results: list[dict], case: dict) -> None:
    tol = TOL[case["dtype"]]
    for rank, res in enumerate(results):
        info = res[case["name"]]
        for what, err in info["errs"].items():
            assert err <= tol, f"{case['name']} rank {rank}: {what} rel err {err:.3g} > {tol}"
        assert info["dtype_ok"], f"{case['name']} rank {rank}: wrong output/grad dtype"
        assert info["hook_calls"] == [1] * len(info["hook_calls"]), (
            f"{case['name']} rank {rank}: param grads must be accumulated exactly once, "
            f"got {info['hook_calls']}"
        )


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", CASES_W2, ids=[c["name"] for c in CASES_W2])
def test_matches_reference_w2(results_w2, case):
    _check(results_w2, case)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", CASES_W4, ids=[c["name"] for c in CASES_W4])
def test_matches_reference_w4(results_w4, case):
    _check(results_w4, case)


@pytest.mark.timeout(300)
def test_sparse_case_really_has_empty_peers(results_w4):
    # the sparse generator gives the last rank no tokens; guards against a silent change
    assert results_w4[3]["w4_g2_sparse"]["num_tokens"] == 0
    assert results_w4[0]["w4_g2_sparse"]["num_tokens"] > 0


@pytest.mark.timeout(300)
def test_tracer_chrome_trace(results_w4, tmp_path):
    case = next(c for c in CASES_W4 if c.get("trace"))
    n = case["W"] // case["g"]
    paths = []
    for rank, res in enumerate(results_w4):
        path = res[case["name"]]["trace"]
        paths.append(path)
        doc = json.loads(Path(path).read_text())
        spans = [e for e in doc["traceEvents"] if e["ph"] == "X"]
        names = {e["name"] for e in spans}
        for j in range(n):
            for prefix in ("", "bwd_"):
                for op in "SCR":
                    assert f"{prefix}{op}{j}" in names, f"rank {rank}: missing {prefix}{op}{j}"
        for e in spans:
            assert e["pid"] == rank and e["dur"] >= 0 and e["ts"] > 0
            assert e["cat"] in ("send", "compute", "return")
            assert e["tid"] == (0 if e["cat"] == "compute" else 1)
        by_name = {e["name"]: e for e in spans}
        for pre in ("", "bwd_"):
            for j in range(n):
                s, c, r = (by_name[f"{pre}{op}{j}"] for op in "SCR")
                # C_j starts after S_j was waited for; R_j is issued after C_j ends
                assert c["ts"] >= s["ts"] + s["dur"] - 1.0
                assert r["ts"] >= c["ts"] + c["dur"] - 1.0
                # pipelining: S_{j+1} is already in flight when C_j starts
                if j + 1 < n:
                    assert by_name[f"{pre}S{j + 1}"]["ts"] <= c["ts"]
        # forward waited for all its communication before returning; backward comes later
        fwd_end = max(e["ts"] + e["dur"] for e in spans if not e["name"].startswith("bwd_"))
        assert min(e["ts"] for e in spans if e["name"].startswith("bwd_")) >= fwd_end - 1.0
    png = tmp_path / "timeline.png"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "render_timeline.py"), *paths, "--out", str(png)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(300)
def test_shadow_chunks_run_at_step_zero_while_sends_fly(results_w4):
    """The shadowed experts' local compute is part of step 0: after S_0 and S_1 were issued,
    before C_0, in forward and in backward."""
    for rank, res in enumerate(results_w4):
        doc = json.loads(Path(res["w4_g1_shadow_trace"]["trace"]).read_text())
        by_name = {e["name"]: e for e in doc["traceEvents"] if e["ph"] == "X"}
        for pre in ("", "bwd_"):
            sh, c0 = by_name[f"{pre}C0_shadow"], by_name[f"{pre}C0"]
            assert by_name[f"{pre}S1"]["ts"] <= sh["ts"], f"rank {rank}: {pre}S1 not in flight"
            assert sh["ts"] + sh["dur"] <= c0["ts"] + 1.0, f"rank {rank}: {pre}C0 before shadows"
            assert sh["cat"] == "compute"


@pytest.mark.parametrize("n", [1, 2, 4, 7])
def test_pipeline_driver_walks_the_plan_order(n: int) -> None:
    """The executor's loop issues communication exactly in core.plan.pipeline_order (the
    order the performance model prices), computes C_j after S_j was waited for, and runs the
    shadow chunks before the first compute."""
    from megatron_moe_ext.core.exchange import _run_pipeline
    from megatron_moe_ext.core.plan import pipeline_order

    log: list[tuple[str, int]] = []

    class Op:
        def __init__(self, j: int) -> None:
            self.j = j

        def wait(self, tracer) -> None:
            log.append(("wait", self.j))

    class Comm:
        tracer = None

        def poll(self) -> None:
            pass

        def wait_all(self) -> None:
            log.append(("wait_all", -1))

    def issue_s(j):
        log.append(("S", j))
        return Op(j), f"data{j}"

    def compute(j, data):
        assert data == f"data{j}"
        log.append(("C", j))
        return j

    def issue_r(j, result):
        assert result == j
        log.append(("R", j))

    _run_pipeline(Comm(), n, issue_s, compute, issue_r, local=lambda: log.append(("local", 0)))
    issued = [e for e in log if e[0] in ("S", "R")]
    assert issued == [tuple(op) for op in pipeline_order(n)]
    for j in range(n):
        assert log.index(("wait", j)) < log.index(("C", j)) < log.index(("R", j))
    assert log.index(("local", 0)) < log.index(("C", 0))
    assert log[-1] == ("wait_all", -1)
