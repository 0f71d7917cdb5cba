"""logging.routing_trace in real training (megatron-core on CPU, gloo, 2 processes): one record
per logging step with the counts of that iteration, for both moe.impl values; the report and
the planner run on the trace; config errors name the key."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_moe_ext.config import ConfigError, load_config
from megatron_moe_ext.perf.topology import load_cluster
from megatron_moe_ext.traffic.report import build_report
from megatron_moe_ext.traffic.trace import read_trace
from tests.helpers import torchrun
from tests.training.conftest import MOCK, run_args

TOKENS = 4 * 32  # micro_batch_size x seq_length of the TINY model


@pytest.mark.parametrize("impl", ["megatron", "fastermoe"])
def test_training_writes_one_record_per_logging_step(tmp_path, impl) -> None:
    torchrun(run_args(tmp_path, *MOCK, "train.iters=4", "parallel.expert=2", f"moe.impl={impl}",
                      "logging.interval=2", "logging.routing_trace=true",
                      "logging.routing_trace_tokens=8"), nproc=2)
    tr = read_trace(tmp_path)
    h = tr.header
    assert (h.num_workers, h.num_experts, h.layers, h.topk, h.ep_size) == (2, 4, (1, 2), 2, 2)
    assert h.meta["moe_impl"] == impl and h.meta["hidden_size"] == 64
    assert tr.iterations.tolist() == [2, 4]
    # one iteration = global batch 8 / (micro 4 x dp 2) = 1 micro-batch of 128 tokens x top-2
    assert (tr.counts.sum(axis=-1) == TOKENS * 2).all()
    for ch, counts in zip(tr.choices, tr.counts):
        assert ch.shape == (2, 2, 8, 2) and ((ch >= 0) & (ch < 4)).all()
        assert (ch[..., 0] != ch[..., 1]).all()  # a token's two experts differ
    s = build_report(tr, tmp_path / "report", load_cluster("local-cpu"))
    assert (tmp_path / "report" / "summary.md").is_file()
    assert s["layers"][0]["region_share"][2]["best"] == 1.0


def test_routing_trace_config_errors() -> None:
    with pytest.raises(ConfigError, match="logging.routing_trace_tokens needs"):
        load_config(None, ["data.mock=true", "logging.routing_trace_tokens=4"])
    with pytest.raises(ConfigError, match="pipeline parallel > 1"):
        load_config(None, ["data.mock=true", "logging.routing_trace=true",
                           "parallel.pipeline=2", "model.num_layers=2"])
    with pytest.raises(ConfigError, match="routing_trace_tokens"):
        load_config(None, ["data.mock=true", "logging.routing_trace=true",
                           "logging.routing_trace_tokens=-1"])
