"""Config schema: YAML + dotted overrides, validation errors that name the key and the fix."""

import os
from pathlib import Path

import pytest

from megatron_moe_ext.config import ConfigError, field_docs, load_config, validate_world
from megatron_moe_ext.training.checkpoint import find_resume_point

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "gpt_moe_tiny.yaml"


def _err(*overrides, path=TINY) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(path, list(overrides))
    return str(exc.value)


def test_yaml_and_overrides_merge():
    cfg = load_config(TINY, ["moe.num_experts=8", "train.iters=50", "moe.fastermoe.group_size=2"])
    assert cfg.moe.num_experts == 8 and cfg.train.iters == 50
    assert cfg.moe.fastermoe.group_size == 2
    assert cfg.model.hidden_size == 128  # from the YAML
    assert cfg.train.seed == 1234  # default


def test_unknown_key_names_closest_valid_one():
    msg = _err("moe.num_expert=8")
    assert "moe.num_expert" in msg and "moe.num_experts" in msg


def test_wrong_type_names_key():
    assert "moe.topk" in _err("moe.topk=two")


def test_bad_choice_lists_accepted_values():
    msg = _err("moe.impl=deepspeed")
    assert "moe.impl" in msg and "megatron" in msg and "fastermoe" in msg


@pytest.mark.parametrize("overrides, needle", [
    (["moe.num_experts=6", "parallel.expert=4"], "not divisible by parallel.expert"),
    (["moe.topk=1"], "pre_softmax"),
    (["model.num_attention_heads=3"], "must divide"),
    (["train.global_batch_size=10", "train.micro_batch_size=4"], "multiple"),
    (["train.lr_warmup_iters=500"], "lr_warmup_iters"),
    (["parallel.pipeline=3"], "must divide model.num_layers"),
    (["data.path=null"], "data.path is required"),
    (["moe.impl=fastermoe", "moe.token_dispatcher=allgather"], "dispatcher"),
])
def test_value_rules(overrides, needle):
    assert needle in _err(*overrides)


def test_shadow_prefetch_key():
    """moe.fastermoe.shadow.prefetch: unknown values list the modes; a mode other than none
    needs moe.impl fastermoe and a shadow policy other than never."""
    msg = _err("moe.fastermoe.shadow.prefetch=next_layer")
    assert "moe.fastermoe.shadow.prefetch" in msg and "previous_layer" in msg, msg
    for bad in (["moe.impl=megatron", "moe.fastermoe.shadow.policy=top_k"],
                ["moe.impl=fastermoe", "moe.fastermoe.shadow.policy=never"]):
        msg = _err(*bad, "moe.fastermoe.shadow.prefetch=previous_iteration")
        assert "moe.fastermoe.shadow.prefetch" in msg and "['none']" in msg, msg
        assert "moe.impl: fastermoe" in msg and "policy other than never" in msg, msg
    assert "prefetch_slack" in _err("moe.impl=fastermoe", "moe.fastermoe.shadow.policy=top_k",
                                    "moe.fastermoe.shadow.prefetch=previous_layer",
                                    "moe.fastermoe.shadow.prefetch_slack=-1")
    cfg = load_config(TINY, ["moe.impl=fastermoe", "moe.fastermoe.shadow.policy=model",
                             "moe.fastermoe.shadow.prefetch=previous_layer"])
    assert cfg.moe.fastermoe.shadow.prefetch == "previous_layer"
    assert load_config(TINY, []).moe.fastermoe.shadow.prefetch == "none"


def test_world_size_rules():
    cfg = load_config(TINY, ["parallel.expert=4"])
    with pytest.raises(ConfigError, match="parallel.expert=4 must divide"):
        validate_world(cfg, 2, "cpu")
    cfg = load_config(TINY, ["parallel.pipeline=2"])
    with pytest.raises(ConfigError, match="not divisible"):
        validate_world(cfg, 3, "cpu")
    cfg = load_config(TINY, ["parallel.tensor=2", "parallel.sequence_parallel=true",
                             "parallel.expert=1"])
    with pytest.raises(ConfigError, match="not supported on CPU"):
        validate_world(cfg, 2, "cpu")
    cfg = load_config(TINY, ["moe.impl=fastermoe", "moe.fastermoe.group_size=3", "moe.num_experts=4"])
    with pytest.raises(ConfigError, match="group_size"):
        validate_world(cfg, 2, "cpu")
    assert validate_world(load_config(TINY, ["train.global_batch_size=32"]), 4, "cpu") == 4


def test_checkpoint_folder_checks(tmp_path):
    root = tmp_path / "ck"
    (root / "iter_0000005").mkdir(parents=True)  # interrupted save: no COMPLETE marker
    cfg = load_config(TINY, [f"checkpoint.load={root}"])
    with pytest.raises(ConfigError, match="incomplete"):
        find_resume_point(cfg)
    (root / "iter_0000005" / "COMPLETE").write_text("5\n")
    with pytest.raises(ConfigError, match="corrupt"):
        find_resume_point(cfg)
    (root / "iter_0000005" / "metadata.json").write_text("{}")
    (root / "iter_0000005" / "common.pt").write_bytes(b"")
    (root / "iter_0000009").mkdir()  # newer but incomplete: ignored
    assert find_resume_point(cfg).iteration == 5
    cfg = load_config(TINY, [f"checkpoint.save={root}", "checkpoint.resume=false"])
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        find_resume_point(cfg)
    with pytest.raises(ConfigError, match="not found"):
        find_resume_point(load_config(TINY, [f"checkpoint.load={tmp_path / 'nope'}"]))


def test_every_field_is_documented():
    rows = field_docs()
    assert len(rows) > 60
    undocumented = [key for key, _, doc in rows if not doc]
    assert not undocumented, undocumented


def test_cpu_threads_default_honours_omp_num_threads(monkeypatch):
    """runtime.num_threads > OMP_NUM_THREADS (set by torchrun / the emulator) > cores // local."""
    from megatron_moe_ext.config import RuntimeConfig
    from megatron_moe_ext.runtime.device import default_threads

    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert default_threads(RuntimeConfig(), 1) == cores
    assert default_threads(RuntimeConfig(), cores * 2) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert default_threads(RuntimeConfig(), 1) == 1  # one emulated node = one local process
    monkeypatch.setenv("OMP_NUM_THREADS", "3,2")  # nested levels: the outer one
    assert default_threads(RuntimeConfig(), 1) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "junk")
    assert default_threads(RuntimeConfig(), 1) == cores
    assert default_threads(RuntimeConfig(num_threads=5), 1) == 5
