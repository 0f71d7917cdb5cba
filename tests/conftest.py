"""The Megatron-facing subset: tests that CI also runs on the second megatron-core version
(scripts/test.sh: `pytest -m megatron_facing` in .venv-mcore019). One list, here; 6 min of CPU
time, about 4-6 minutes on 2 quiet cores (docs/megatron_lm.md, "CI on two megatron-core
versions")."""

from __future__ import annotations

MEGATRON_FACING = (
    # version support and the no-silent-fallback check (builds GPT / BERT models)
    "tests/megatron/test_versions.py",
    # layer equivalence, stock vs FasterMoE (dispatcher preprocess, permute / unpermute, experts)
    "tests/megatron/test_fastermoe_equivalence.py::test_equivalence_ep2",
    # the topology-aware gate as a megatron-core router (router internals, aux losses, tracker)
    "tests/megatron/test_topology_gate.py::test_topology_router_ep2",
    "tests/megatron/test_topology_gate.py::test_config_validation",
    # training: impl equivalence, checkpoint crossover (dist_checkpointing), resume, BERT
    "tests/training/test_fastermoe_training.py::test_same_loss_every_step_ep2",
    "tests/training/test_fastermoe_training.py::test_checkpoint_crosses_over",
    "tests/training/test_training.py::test_resume_matches_uninterrupted_exactly",
    "tests/training/test_training.py::test_bert_moe_trains_with_both_implementations",
    # router options with both implementations (expert bias needs finalize_model_grads' update)
    "tests/training/test_router_options.py::test_both_implementations_same_loss[expert_bias]",
    "tests/training/test_router_options.py::test_both_implementations_same_loss[group_limited]",
    "tests/training/test_router_options.py::test_router_option_config_errors",
    "tests/training/test_router_options.py::test_options_reach_megatron",
    # the Megatron-LM habits that touch megatron-core (load == save); the flag translation is
    # pure config (and its job line asks for wandb, which .venv-mcore019 does not install)
    "tests/test_megatron_habits.py::test_load_equal_to_missing_save_starts_from_scratch",
    "tests/test_megatron_habits.py::test_docs_tables_match_the_code",
)
"""Node-id prefixes of the Megatron-facing tests."""


def pytest_collection_modifyitems(config, items):
    import pytest

    for item in items:
        if any(item.nodeid == p or item.nodeid.startswith(p + "::") or
               item.nodeid.startswith(p + "[") for p in MEGATRON_FACING):
            item.add_marker(pytest.mark.megatron_facing)
