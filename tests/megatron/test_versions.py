"""megatron-core version support: the supported range, both forms of the MoE layer spec, and
the no-silent-fallback check on models built with the installed megatron-core (this test runs
on every venv CI tests: 0.16.1 and 0.19.2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from packaging.version import Version

from megatron_moe_ext.megatron import versions
from tests.helpers import spawn

TINY = ["model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=48",
        "model.num_attention_heads=4", "model.seq_length=16", "model.vocab_size=128",
        "data.tokenizer.type=none", "moe.num_experts=4", "parallel.expert=2"]

CASES = {
    "gpt_fastermoe": ["moe.impl=fastermoe"],
    "gpt_fastermoe_freq2": ["moe.impl=fastermoe", "model.num_layers=4", "moe.layer_freq=2"],
    "gpt_fastermoe_topology": ["moe.impl=fastermoe", "moe.router.type=topology_aware",
                               "moe.router.offnode_fraction=0.5", "moe.router.workers_per_node=1"],
    "bert_fastermoe": ["moe.impl=fastermoe", "model.type=bert"],
    "gpt_megatron": ["moe.impl=megatron"],
    "gpt_megatron_shared": ["moe.impl=megatron", "moe.shared_expert_ffn_hidden_size=32"],
}


def _worker(rank: int, world: int, out_dir: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from megatron_moe_ext.config import RuntimeConfig
    from megatron_moe_ext.megatron import model as model_mod
    from megatron_moe_ext.megatron.layer_builder import config_from_overrides
    from megatron_moe_ext.runtime.device import setup_runtime

    setup_runtime(RuntimeConfig(device="cpu", num_threads=1), "cpu")
    ps.initialize_model_parallel(expert_model_parallel_size=2)
    model_parallel_cuda_manual_seed(1)
    pg = ProcessGroupCollection.use_mpu_process_groups()
    results: dict = {}
    for name, overrides in CASES.items():
        cfg = config_from_overrides([*TINY, *overrides])
        tconf = model_mod.build_transformer_config(cfg, "cpu")
        model = model_mod.build_model(cfg, tconf, 128, pg, True, True)
        layers = [m for m in model.modules() if isinstance(m, TransformerLayer)]
        results[name] = {
            "mlp": [type(layer.mlp).__name__ for layer in layers],
            "router": [type(getattr(layer.mlp, "router", None)).__name__ for layer in layers],
            "shared": [type(getattr(layer.mlp, "shared_experts", None)).__name__
                       for layer in layers],
        }
    # the check itself: a stock model presented as a FasterMoE one must be refused
    stock_cfg = config_from_overrides([*TINY, "moe.impl=megatron"])
    stock = model_mod._build_model(stock_cfg, model_mod.build_transformer_config(stock_cfg, "cpu"),
                                   128, pg, True, True)
    try:
        model_mod.check_moe_layers(stock, config_from_overrides([*TINY, "moe.impl=fastermoe"]))
        results["refused"] = None
    except model_mod.MoEImplementationError as exc:
        results["refused"] = str(exc)
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    results["results_queue"] = type(filesystem_async._results_queue).__module__
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    ps.destroy_model_parallel()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("versions")
    spawn(_worker, 2, str(out))
    return json.loads((out / "rank0.json").read_text())


@pytest.mark.timeout(300)
def test_fastermoe_model_has_only_fastermoe_layers(built):
    """The test that would have caught the 0.18 silent fallback to stock MoELayer."""
    assert built["gpt_fastermoe"]["mlp"] == ["FasterMoELayer"] * 2
    assert built["gpt_fastermoe"]["router"] == ["TopKRouter"] * 2
    assert built["gpt_fastermoe_freq2"]["mlp"] == ["FasterMoELayer", "MLP"] * 2
    assert built["gpt_fastermoe_topology"]["mlp"] == ["FasterMoELayer"] * 2
    assert built["gpt_fastermoe_topology"]["router"] == ["TopologyAwareRouter"] * 2
    assert built["bert_fastermoe"]["mlp"] == ["FasterMoELayer"] * 2
    assert built["gpt_megatron"]["mlp"] == ["MoELayer"] * 2
    assert built["gpt_megatron"]["shared"] == ["NoneType"] * 2
    assert built["gpt_megatron_shared"]["shared"] == ["SharedExpertMLP"] * 2


@pytest.mark.timeout(300)
def test_check_refuses_a_stock_layer_for_fastermoe(built):
    msg = built["refused"]
    assert msg is not None
    assert "decoder.layers.0.mlp" in msg and "FasterMoELayer" in msg
    assert "moe_layer.MoELayer" in msg and f"megatron-core {versions.version_string()}" in msg


@pytest.mark.timeout(300)
def test_cpu_runtime_keeps_checkpoint_results_in_process(built):
    """runtime/cpu.py: the save's write results go through an in-process queue, not a spawned
    Manager (which imports torch again: 2.6 s per process on the first save)."""
    assert built["results_queue"] == "queue"


def test_installed_version_is_supported():
    v = versions.check_supported()
    assert versions.MIN_VERSION <= v < versions.MAX_VERSION


@pytest.mark.parametrize("bad", ["0.15.3", "0.16.0", "0.20.0", "1.0.0"])
def test_unsupported_version_names_the_range(bad):
    with pytest.raises(versions.UnsupportedMegatronCore, match=r"megatron-core>=0\.16\.1,<0\.20"):
        versions.check_supported(Version(bad))


def test_change_table_versions():
    assert not versions.applies("moe_spec_partial", Version("0.17.0"))
    assert versions.applies("moe_spec_partial", Version("0.18.2"))
    assert versions.applies("router_is_mtp_layer", Version("0.17.0"))
    assert all(versions.MIN_VERSION < Version(c.since) < versions.MAX_VERSION
               for c in versions.CHANGES)


def test_setup_py_states_the_range():
    setup = (Path(__file__).resolve().parents[2] / "setup.py").read_text()
    assert f'"{versions.SUPPORTED_RANGE}"' in setup


@pytest.mark.parametrize("form", ["module_spec", "partial"])
def test_swap_handles_both_spec_forms(form):
    """ModuleSpec (megatron-core <= 0.17) and functools.partial (0.18+) MoE entries, whichever
    version is installed: the swap builds FasterMoELayer with the options and the router."""
    import functools

    from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megatron_moe_ext.megatron.fastermoe_layer import FasterMoELayer

    subs = MoESubmodules(experts=None, shared_experts=None)
    mlp = (ModuleSpec(module=MoELayer, submodules=subs) if form == "module_spec"
           else functools.partial(MoELayer, submodules=subs))

    def router(**kwargs):
        return kwargs

    new = versions.swap_moe_module(mlp, FasterMoELayer, {"options": "opts"}, router)
    assert versions.moe_module_class(new) is FasterMoELayer
    assert versions.moe_submodules(new).router is router
    assert versions.moe_submodules(mlp).router is not router  # the input is not changed
    assert versions.moe_module_class(mlp) is MoELayer
    same = versions.swap_moe_module(mlp, MoELayer, {}, None)
    assert versions.moe_module_class(same) is MoELayer
    assert versions.swap_moe_module("not an moe entry", FasterMoELayer, {}, router) == \
        "not an moe entry"


def test_option_this_version_cannot_do_is_a_config_error():
    """An install whose TransformerConfig lacks a field an option needs: a ConfigError naming
    the key, the field and the version (checked before any process group)."""
    import dataclasses

    from megatron_moe_ext.config import ConfigError, load_config

    @dataclasses.dataclass
    class OldTransformerConfig:
        num_moe_experts: int = 0

    cfg = load_config(None, ["data.mock=true", "moe.router.num_groups=2",
                             "moe.router.group_topk=1"])
    with pytest.raises(ConfigError, match=r"'moe.router.num_groups'.*moe_router_num_groups"):
        versions.validate_config(cfg, OldTransformerConfig)
    versions.validate_config(load_config(None, ["data.mock=true"]), OldTransformerConfig)
    versions.validate_config(cfg)  # the installed version has it


def test_checkpoint_layout_by_version(tmp_path):
    """0.19 keeps the common state in the torch_dist files; older versions need common.pt."""
    (tmp_path / "metadata.json").write_text("{}")
    (tmp_path / ".metadata").write_bytes(b"")
    missing = versions.checkpoint_files_missing(tmp_path)
    if versions.applies("dist_ckpt_common_state"):
        assert missing is None
    else:
        assert "megatron-core >= 0.19" in missing
    (tmp_path / "common.pt").write_bytes(b"")
    assert versions.checkpoint_files_missing(tmp_path) is None
    (tmp_path / "metadata.json").unlink()
    assert "metadata.json" in versions.checkpoint_files_missing(tmp_path)
