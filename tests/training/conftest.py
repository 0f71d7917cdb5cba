"""Fixtures for end-to-end training tests: a small real-text dataset built once per session."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

# A small, fast model used by most end-to-end runs (seconds per run on 2 cores).
TINY = [
    "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
    "model.num_attention_heads=4", "model.seq_length=32", "moe.num_experts=4", "moe.topk=2",
    "train.micro_batch_size=4", "train.global_batch_size=8", "train.lr=3e-3",
    "train.lr_warmup_iters=2", "train.eval_interval=0", "train.eval_iters=0",
    "logging.interval=1", "checkpoint.interval=0",
]
MOCK = ["data.mock=true", "data.tokenizer.type=none", "model.vocab_size=256"]


@pytest.fixture(scope="session")
def text_data(tmp_path_factory) -> Path:
    """Python-docstring corpus -> BPE (vocab 1024) -> indexed dataset, with the sentence split
    BERT needs. Returns the output prefix (data.path takes it as is)."""
    out = tmp_path_factory.mktemp("data")
    corpus = out / "corpus.jsonl"
    subprocess.run(
        [sys.executable, str(REPO / "scripts/build_demo_corpus.py"), "--out", str(corpus),
         "--max-docs", "1500"], check=True, capture_output=True, cwd=REPO,
    )
    subprocess.run(
        [sys.executable, str(REPO / "scripts/preprocess_data.py"), "--input", str(corpus),
         "--output-prefix", str(out / "corpus"), "--tokenizer-type", "bpe", "--vocab-size", "1024",
         "--split-sentences"], check=True, capture_output=True, cwd=REPO,
    )
    return out / "corpus"


def run_args(tmp: Path, *overrides: str, base: list[str] | None = None) -> list[str]:
    """Entry-point arguments for a run whose logs and checkpoints live under `tmp`."""
    return [
        "--config", str(REPO / "configs/gpt_moe_tiny.yaml"), *(base if base is not None else TINY),
        f"logging.dir={tmp}", f"checkpoint.save={tmp / 'ckpt'}", *overrides,
    ]
