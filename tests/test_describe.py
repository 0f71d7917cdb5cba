"""megatron_moe_ext.describe: parameter counts against real megatron models, the model zoo
against FasterMoE Table 2, FLOPs / memory / performance-model plumbing, and the --describe CLI.

Size convention (docs/models.md): Table 2 counts the transformer layers' attention and expert
weight matrices only, L * (E * 2 alpha H^2 + 4 H^2) with alpha = expert ffn / H = 2, i.e.
``parameters["paper_convention"]``; megatron's full count (embeddings, norms, router, heads)
is ``parameters["total"]``, 0.5-6% larger.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_moe_ext.config import ConfigError, load_config
from megatron_moe_ext.describe import (
    BREAKDOWN_KEYS,
    PAPER_TABLE2,
    count_parameters,
    describe,
    flops_per_token,
    format_description,
)
from tests.helpers import REPO, spawn

MODELS = REPO / "configs" / "models"

SMALL = ["data.mock=true", "data.tokenizer.type=none", "model.vocab_size=100",
         "model.hidden_size=32", "model.ffn_hidden_size=48", "model.num_attention_heads=4",
         "model.num_layers=3", "moe.num_experts=4", "parallel.expert=2"]

CASES = {
    "gpt_rope_tied": SMALL + ["model.type=gpt"],
    "gpt_learned_untied_rms_swiglu_freq2": SMALL + [
        "model.type=gpt", "model.position_embedding_type=learned_absolute",
        "model.max_position_embeddings=80", "model.untie_embeddings_and_output_weights=true",
        "model.normalization=RMSNorm", "model.activation=swiglu", "moe.layer_freq=2",
        "moe.ffn_hidden_size=40"],
    "bert_binary_learned_tied": SMALL + [
        "model.type=bert", "model.position_embedding_type=learned_absolute"],
    "bert_nohead_untied_rms_swiglu": SMALL + [
        "model.type=bert", "model.bert_binary_head=false", "model.normalization=RMSNorm",
        "model.untie_embeddings_and_output_weights=true", "model.activation=swiglu",
        "moe.layer_freq=2"],
    "zoo_gpt_s_tiny": ["--config", str(MODELS / "moe-gpt-s-tiny.yaml"), "model.vocab_size=4096"],
    "zoo_bert_deep_tiny": ["--config", str(MODELS / "moe-bert-deep-tiny.yaml"),
                           "model.vocab_size=4096"],
}


def _load(args: list[str]):
    if args and args[0] == "--config":
        return load_config(args[1], args[2:])
    return load_config(None, args)


def count_worker(rank: int, world: int, out_dir: str) -> None:
    """Spawned (world 2, expert parallel 2): build every case with megatron and record the
    rank's dense / expert parameter counts and the all-reduced expert total."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_moe_ext.config import RuntimeConfig
    from megatron_moe_ext.megatron.model import build_model, build_transformer_config
    from megatron_moe_ext.runtime.device import setup_runtime

    setup_runtime(RuntimeConfig(device="cpu", num_threads=1), "cpu")
    ps.initialize_model_parallel(expert_model_parallel_size=2)
    model_parallel_cuda_manual_seed(7)
    pg = ProcessGroupCollection.use_mpu_process_groups()
    res = {}
    for name, args in CASES.items():
        cfg = _load(args)
        model = build_model(cfg, build_transformer_config(cfg, "cpu"), cfg.model.vocab_size, pg,
                            True, True)
        expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
        dense = sum(p.numel() for n, p in model.named_parameters() if ".experts." not in n)
        t = torch.tensor([expert], dtype=torch.int64)
        dist.all_reduce(t, group=ps.get_expert_model_parallel_group())
        res[name] = {"dense": dense, "expert": expert, "expert_total": int(t.item())}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res))
    dist.barrier()
    ps.destroy_model_parallel()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def megatron_counts(tmp_path_factory) -> dict:
    """Counts of real megatron models, rank 0 of a 2-process expert-parallel world."""
    out = tmp_path_factory.mktemp("counts")
    spawn(count_worker, 2, str(out))
    return json.loads((out / "rank0.json").read_text())


@pytest.mark.parametrize("name", sorted(CASES))
def test_counts_match_megatron(megatron_counts: dict, name: str) -> None:
    cfg = _load(CASES[name])
    real = megatron_counts[name]
    p = count_parameters(cfg)
    assert p["total"] == real["dense"] + real["expert_total"]
    assert p["breakdown"]["experts"] == real["expert_total"]
    assert sum(p["breakdown"].values()) == p["total"]
    mem = describe(cfg, world_size=2)["memory_per_gpu"]
    assert (mem["dense_params"], mem["expert_params"]) == (real["dense"], real["expert"])


# --------------------------------------------------------------------------------------
# Model zoo vs FasterMoE Table 2
# --------------------------------------------------------------------------------------

TABLE2_SHAPES = {  # stem: (type, layers, experts, H, expert parallel = GPUs of the cluster)
    "moe-gpt-s": ("gpt", 12, 16, 1024, 16), "moe-gpt": ("gpt", 12, 16, 2048, 16),
    "moe-gpt-l": ("gpt", 12, 16, 4096, 16), "moe-bert-deep": ("bert", 24, 16, 1024, 16),
    "moe-bert-deep-l": ("bert", 24, 16, 4096, 16), "moe-bert-wide": ("bert", 12, 64, 1024, 64),
    "moe-bert-wide-l": ("bert", 12, 64, 2048, 64),
}


@pytest.mark.parametrize("stem", sorted(PAPER_TABLE2))
def test_zoo_matches_table2(stem: str) -> None:
    cfg = load_config(MODELS / f"{stem}.yaml")
    typ, layers, experts, H, ep = TABLE2_SHAPES[stem]
    m = cfg.model
    assert (m.type, m.num_layers, cfg.moe.num_experts, m.hidden_size, cfg.parallel.expert) == \
        (typ, layers, experts, H, ep)
    assert cfg.moe.topk == 2 and (cfg.moe.ffn_hidden_size or m.ffn_hidden_size) == 2 * H
    assert m.num_attention_heads == H // 64
    assert (m.seq_length, m.vocab_size) == ((1024, 50257) if typ == "gpt" else (512, 30522))
    p = describe(cfg)["parameters"]
    paper = PAPER_TABLE2[stem]["size"]
    # Documented convention: attention + expert matrices; Table 2 rounds to 3 digits.
    assert abs(p["paper_convention"] - paper) / paper < 0.01
    # Megatron's full count adds embeddings, norms, router and heads: a few percent more.
    assert paper < p["total"] < 1.07 * paper


@pytest.mark.parametrize("stem", ["moe-gpt-s-tiny", "moe-bert-deep-tiny"])
def test_tiny_variants(stem: str) -> None:
    cfg = load_config(MODELS / f"{stem}.yaml")
    assert cfg.parallel.expert == 2 and cfg.data.path == "data/demo/corpus_text_document"
    assert cfg.moe.topk == 2 and cfg.moe.ffn_hidden_size == 2 * cfg.model.hidden_size
    d = describe(cfg, vocab_size=4096, cluster="local-cpu")
    assert d["parallel"]["data"] == 2 and d["parameters"]["total"] < 5e6
    assert d["perf"]["workers"] == 2


# --------------------------------------------------------------------------------------
# FLOPs, memory, performance model
# --------------------------------------------------------------------------------------


def test_flops_hand_computed() -> None:
    cfg = load_config(None, SMALL + ["model.type=gpt", "model.seq_length=16", "moe.topk=2"])
    f = flops_per_token(cfg, 100)
    H, S, L, F, E = 32, 16, 3, 48, 4
    per_layer = 8 * H * H + 4 * S * H + 2 * (2 * 2 * H * F) + 2 * E * H
    assert f["forward"] == L * per_layer + 2 * 100 * H
    assert f["training"] == 3 * f["forward"]


def test_memory_accounting() -> None:
    base = SMALL + ["model.type=gpt", "parallel.expert=2"]
    on = describe(load_config(None, base), world_size=4)["memory_per_gpu"]
    off = describe(load_config(None, base + ["train.use_distributed_optimizer=false"]),
                   world_size=4)["memory_per_gpu"]
    n = on["dense_params"] + on["expert_params"]
    assert on["weights"] == 4 * n and on["grads"] == 4 * n
    assert off["optimizer"] == 8 * n  # fp32 Adam m + v, unsharded
    # sharded: dense over dp 4, experts over expert-dp 4 / 2 = 2
    assert on["optimizer"] == pytest.approx(8 * (on["dense_params"] / 4 + on["expert_params"] / 2))
    bf = describe(load_config(None, base + ["train.precision=bf16"]), world_size=4)
    assert bf["memory_per_gpu"]["weights"] == 2 * n


def test_perf_prediction_johnny() -> None:
    d = describe(load_config(MODELS / "moe-gpt.yaml"), cluster="johnny")
    perf = d["perf"]
    assert perf["workers"] == 16 and perf["tokens_per_worker"] == 4 * 1024
    for s in ("sync", "smart"):
        assert perf[s]["total_ms"] > 0 and perf[s]["r_cc"] > 0
        assert 0 < perf[s]["throughput_tflops"] <= perf[s]["peak_tflops"]
    assert perf["smart"]["total_ms"] < perf["sync"]["total_ms"]
    assert 1.0 < perf["smart_speedup"] <= 1.71 + 1e-9  # the paper's per-layer bound
    text = format_description(d)
    assert "smart g=2" in text and "R_CC" in text


def test_perf_skipped_when_ep_does_not_fit_cluster() -> None:
    cfg = load_config(None, SMALL + ["model.type=gpt"])
    assert "skipped" in describe(cfg, cluster="johnny")["perf"]


def test_bad_world_size() -> None:
    with pytest.raises(ConfigError, match="parallel.expert"):
        describe(load_config(None, SMALL), world_size=3)


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def _cli(*args: str, world_size: str | None = None) -> subprocess.CompletedProcess:
    """pretrain_gpt_moe.py as a command (WORLD_SIZE unset unless given)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("WORLD_SIZE", None)
    if world_size is not None:
        env["WORLD_SIZE"] = world_size
    return subprocess.run([sys.executable, str(REPO / "pretrain_gpt_moe.py"), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


def test_cli_describe_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "d" / "moe-bert-deep.json"
    proc = _cli("--config", str(MODELS / "moe-bert-deep.yaml"), "--describe",
                "--cluster", "johnny", "--json", str(out), "train.micro_batch_size=4")
    assert proc.returncode == 0, proc.stderr
    assert "parameters: total" in proc.stdout and "smart" in proc.stdout
    d = json.loads(out.read_text())
    assert set(d["parameters"]["breakdown"]) == set(BREAKDOWN_KEYS)
    assert {"total", "active_per_token", "paper_convention"} <= set(d["parameters"])
    assert d["parallel"]["world_size"] == 16 and d["parallel"]["micro_batch_size"] == 4
    assert d["perf"]["cluster"] == "johnny" and "r_cc" in d["perf"]["sync"]


def test_cli_describe_errors() -> None:
    cfg = str(MODELS / "moe-gpt-s.yaml")
    p = _cli("--config", cfg, "--describe", "--world-size", "8")
    assert p.returncode == 2 and "parallel.expert" in p.stderr
    p = _cli("--config", cfg, "--describe", "--cluster", "nope")
    assert p.returncode == 2 and "nope" in p.stderr
    p = _cli("--config", cfg, "--json", "x.json")
    assert p.returncode == 2 and "--describe" in p.stderr
    p = _cli("--config", cfg, "--describe", "train.global_batch_size=128", world_size="32")
    assert p.returncode == 0, p.stderr
    assert "world 32 = tp 1 x pp 1 x dp 32" in p.stdout
