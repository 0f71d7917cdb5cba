"""What a run reports, read back from where it was written: wandb's offline run file and
tensorboard's event files hold the logged iterations, loss and MoE metrics at the right steps;
the training log has a progress line with the remaining time; every MoE layer record carries
the imbalance cost for both moe.impl values; with forced skewed routing through real layers
the cost is ~0 when balanced, grows with the skew and names the experts the routing made hot;
the plots draw from real runs; a requested but missing writer package is a config error."""

from __future__ import annotations

import re
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import read_metrics, spawn, torchrun
from tests.training.conftest import MOCK, run_args

IMBALANCE_KEYS = {"imbalance_cost_s", "rank_wait_s", "hot_experts", "shadow_saved_s", "source",
                  "rank_tokens", "rank_compute_s", "expert_tokens"}


def read_wandb_history(run_file: Path) -> list[dict]:
    """History rows ({key: value, '_step': step}) of a wandb offline run file (``run-*.wandb``).

    The file is wandb's transaction log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0),
    then 32 KiB blocks of records (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle,
    4 last), each payload a ``wandb.proto.wandb_internal_pb2.Record``. wandb 0.31 no longer
    ships a Python reader (its Go core writes and syncs the log), so the framing is read here
    and the records are parsed with wandb's own protobuf schema.
    """
    import json

    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0), data[:7]
    block, pos, pending, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left  # block trailer padding
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left  # zero-filled rest of the block
            continue
        payload = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + payload) & 0xFFFFFFFF == crc, f"bad crc at {pos}"
        pos += 7 + length
        pending = payload if kind in (1, 2) else pending + payload
        if kind not in (1, 4):
            continue
        rec = pb.Record()
        rec.ParseFromString(pending)
        if rec.WhichOneof("record_type") == "history":
            row = {"_step": rec.history.step.num}
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows


def read_tensorboard(folder: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of every scalar in the event files under `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """6 iterations per implementation (EP=2, logging every 2), tensorboard and offline wandb;
    FasterMoE with one forced shadow. Returns {impl: (run folder, log output)}."""
    out = {}
    for impl, extra in (("megatron", []),
                        ("fastermoe", ["moe.fastermoe.shadow.policy=top_k",
                                       "moe.fastermoe.shadow.max_experts=1"])):
        tmp = tmp_path_factory.mktemp(impl)
        proc = torchrun(run_args(tmp, *MOCK, "train.iters=6", "parallel.expert=2",
                                 "logging.interval=2", "logging.tensorboard=true",
                                 "logging.wandb.enabled=true", "logging.wandb.mode=offline",
                                 f"moe.impl={impl}", *extra), nproc=2)
        out[impl] = (tmp, proc.stdout + proc.stderr)
    return out


@pytest.mark.timeout(400)
@pytest.mark.parametrize("impl", ["megatron", "fastermoe"])
def test_wandb_offline_run_reads_back(runs, impl):
    tmp, _ = runs[impl]
    files = sorted((tmp / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files  # rank 0 only
    rows = read_wandb_history(files[0])
    metrics = {r["iteration"]: r for r in read_metrics(tmp / "metrics.jsonl")}
    assert sorted(metrics) == [2, 4, 6]
    by_step = {}
    for row in rows:
        by_step.setdefault(row["_step"], {}).update(row)
    assert sorted(by_step) == [2, 4, 6]
    for step, row in by_step.items():
        rec = metrics[step]
        assert row["iteration"] == step
        assert row["loss"] == pytest.approx(rec["loss"], rel=1e-12)
        for layer in ("layer_1", "layer_2"):
            m = rec["moe"][layer]
            assert row[f"moe/{layer}/max_tokens"] == pytest.approx(m["max_tokens"])
            assert row[f"moe/{layer}/imbalance_cost_s"] == pytest.approx(m["imbalance_cost_s"])
            assert row[f"moe/{layer}/rank_wait_s/1"] == pytest.approx(m["rank_wait_s"][1])
            assert row[f"moe/{layer}/shadow_saved_s"] == pytest.approx(m["shadow_saved_s"])


@pytest.mark.timeout(400)
@pytest.mark.parametrize("impl", ["megatron", "fastermoe"])
def test_tensorboard_events_read_back(runs, impl):
    tmp, _ = runs[impl]
    scalars = read_tensorboard(tmp / "tensorboard")
    metrics = {r["iteration"]: r for r in read_metrics(tmp / "metrics.jsonl")}
    for tag in ("loss", "lr", "tokens_per_s", "moe/layer_1/imbalance_cost_s",
                "moe/layer_2/rank_wait_s/0", "moe/layer_2/expert_tokens/3"):
        assert sorted(scalars[tag]) == [2, 4, 6], tag
    for step, rec in metrics.items():
        assert scalars["loss"][step] == pytest.approx(rec["loss"], rel=1e-6)
        cost = rec["moe"]["layer_1"]["imbalance_cost_s"]
        assert scalars["moe/layer_1/imbalance_cost_s"][step] == pytest.approx(cost, rel=1e-6,
                                                                              abs=1e-12)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("impl", ["megatron", "fastermoe"])
def test_imbalance_record_per_layer_and_progress_line(runs, impl):
    tmp, log = runs[impl]
    for rec in read_metrics(tmp / "metrics.jsonl"):
        for layer in ("layer_1", "layer_2"):
            m = rec["moe"][layer]
            assert IMBALANCE_KEYS <= set(m), sorted(m)
            assert m["source"] == "measured"  # SequentialMLP experts are timed on every rank
            assert len(m["rank_wait_s"]) == len(m["rank_compute_s"]) == 2
            assert min(m["rank_wait_s"]) == 0.0 and all(w >= 0 for w in m["rank_wait_s"])
            assert all(t > 0 for t in m["rank_compute_s"])
            assert m["imbalance_cost_s"] >= 0
            # 8 samples x 32 tokens x top-2 per iteration over 4 experts, all on 2 EP ranks
            assert sum(m["expert_tokens"]) == pytest.approx(8 * 32 * 2)
            assert m["mean_tokens"] == pytest.approx(8 * 32 * 2 / 4)  # per iteration
            for e, tokens in m["hot_experts"]:
                assert tokens == pytest.approx(m["expert_tokens"][e])
                assert tokens > m["mean_tokens"]
            if impl == "megatron":
                assert m["shadow_saved_s"] == 0.0
            else:
                assert len(m["shadows"]) >= 1  # union over the logging window
                assert m["shadow_saved_s"] != 0.0  # the model's time without minus with
    lines = re.findall(r"iter (\d+)/6 \|.*\| eta (\S+)", log)
    assert [int(i) for i, _ in lines] == [2, 4, 6], log[-3000:]
    assert lines[-1][1] == "0s"
    assert all(re.fullmatch(r"\d+s|\d+m\d\ds|\d+h\d\dm", eta) for _, eta in lines)
    assert "[rank1] INFO" not in log  # rank 0 logs


@pytest.mark.timeout(400)
def test_plots_from_real_runs_side_by_side(runs, tmp_path):
    import subprocess

    from tests.helpers import REPO

    from matplotlib.image import imread

    out = tmp_path / "plots"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts/plot_moe_load.py"), str(runs["megatron"][0]),
         "--compare", str(runs["fastermoe"][0]), "--labels", "megatron", "fastermoe",
         "--out", str(out)], cwd=REPO, capture_output=True, text=True, check=True)
    names = [Path(p).name for p in proc.stdout.split()]
    assert names == ["expert_load.png", "imbalance_cost.png", "rank_wait.png"]
    for name in names:
        img = imread(out / name)
        assert img.shape[0] > 200 and img.shape[1] > 500, (name, img.shape)  # two columns
        assert float(np.asarray(img[..., :3]).std()) > 0.05, name  # not a blank canvas
    bad = subprocess.run([sys.executable, str(REPO / "scripts/plot_moe_load.py"),
                          str(tmp_path / "nothing"), "--out", str(out)], cwd=REPO,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "no metrics file" in bad.stderr


def test_missing_optional_writer_is_a_config_error(monkeypatch, capsys):
    """Before any process group: load_config (and so the entry point) rejects a writer whose
    package cannot be imported, naming the key and the pip command."""
    from megatron_moe_ext.config import ConfigError, load_config
    from tests.helpers import REPO

    monkeypatch.syspath_prepend(str(REPO))  # the entry point is a top-level script
    import pretrain_gpt_moe

    base = ["data.mock=true", "data.tokenizer.type=none", "model.vocab_size=256"]
    for module, key, pin in (("wandb", "logging.wandb.enabled", "pip install wandb==0.31.0"),
                             ("tensorboard", "logging.tensorboard",
                              "pip install tensorboard==2.21.0")):
        monkeypatch.setitem(sys.modules, module, None)  # import blocked
        with pytest.raises(ConfigError, match=re.escape(key)) as err:
            load_config(None, [*base, f"{key}=true"])
        assert pin in str(err.value)
        assert pretrain_gpt_moe.main([*base, f"{key}=true"]) == 2
        assert pin in capsys.readouterr().err
        monkeypatch.delitem(sys.modules, module)
    load_config(None, [*base, "logging.wandb.enabled=true", "logging.tensorboard=true"])


# ------------------------------------------------------------------ forced skewed routing
SKEWS = (0.0, 1.0, 2.0)


def _skew_worker(rank: int, world: int, out: str) -> None:
    """Both implementations' real layers (identical weights), Zipf(skew) routing forced on every
    rank, one forward + backward per skew; the trainer's trackers turn it into records."""
    import json

    import torch

    from megatron_moe_ext.megatron import layer_builder
    from megatron_moe_ext.training.metrics import ExpertLoadTracker, ImbalanceTracker
    from tests.megatron.layer_cases import _setup

    ps, pg = _setup(world)
    ep = ps.get_expert_model_parallel_group()
    results: dict = {}
    for source in ("estimated", "measured"):
        cfg = layer_builder.config_from_overrides([
            "model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_attention_heads=4",
            "moe.num_experts=4", "moe.topk=2", f"parallel.expert={world}",
            f"logging.imbalance_source={source}"])
        stock, faster = layer_builder.build_pair(cfg, pg)
        for name, layer in (("megatron", stock), ("fastermoe", faster)):
            loads = ExpertLoadTracker([layer], cfg.moe.num_experts)
            cost = ImbalanceTracker([layer], cfg)
            for skew in SKEWS:
                T = 64
                routing, bias = layer_builder.make_routing(T, 4, 2, skew, seed=7 + rank)
                x = torch.randn(T, 1, 32, generator=torch.Generator().manual_seed(rank))
                layer_builder.apply_routing({name: layer}, bias, x, routing)
                y, _ = layer(x.requires_grad_(True))
                y.sum().backward()
                mats = loads.count_matrices(ep, window=1)
                loads.collect(None, None)
                rec = cost.collect(mats, ep, None, window=1)[1]
                results[f"{source}/{name}/{skew}"] = dict(rec, counts=mats[1].tolist())
                layer_builder.unforce_routing(layer)
    if rank == 0:
        Path(out).write_text(json.dumps(results))


@pytest.mark.timeout(300)
def test_forced_skew_cost_grows_and_names_the_hot_experts(tmp_path):
    import json

    out = tmp_path / "skew.json"
    spawn(_skew_worker, 2, str(out))
    res = json.loads(out.read_text())
    for name in ("megatron", "fastermoe"):
        est = [res[f"estimated/{name}/{s}"] for s in SKEWS]
        assert all(r["source"] == "estimated" for r in est)
        assert est[0]["imbalance_cost_s"] == pytest.approx(0.0, abs=1e-12)
        assert est[0]["hot_experts"] == [] and est[0]["rank_wait_s"] == [0.0, 0.0]
        costs = [r["imbalance_cost_s"] for r in est]
        assert costs[0] < costs[1] < costs[2], costs
        for r in est[1:]:
            assert r["hot_experts"][0][0] == 0  # Zipf: expert 0 hottest
            assert r["rank_wait_s"][0] == 0.0 and r["rank_wait_s"][1] > 0  # rank 0 owns it
        # per rank Zipf counts: skew 1 [61, 31, 21, 15], skew 2 [64, 37, 17, 10]; x 2 ranks,
        # mean 64 per expert: skew 1 makes expert 0 hot, skew 2 experts 0 and 1
        assert est[1]["hot_experts"] == [[0, 122]]
        assert est[2]["hot_experts"] == [[0, 128], [1, 74]]
        assert est[2]["rank_tokens"] == [202.0, 54.0]
        meas = [res[f"measured/{name}/{s}"] for s in SKEWS]
        assert all(r["source"] == "measured" and min(r["rank_compute_s"]) > 0 for r in meas)
    for s in SKEWS:  # both implementations see the same [W, E] counts and the same record
        a, b = res[f"estimated/megatron/{s}"], res[f"estimated/fastermoe/{s}"]
        assert a["counts"] == b["counts"]
        assert a["hot_experts"] == b["hot_experts"]
        for key in ("rank_tokens", "rank_wait_s", "imbalance_cost_s"):
            assert a[key] == pytest.approx(b[key]), key
