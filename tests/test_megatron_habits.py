"""Megatron-LM habits: flag translation (--megatron-args), `--save X --load X` on the first run,
and the docs tables that must match the code (flags, megatron-core version changes)."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_moe_ext import megatron_lm_args as mla
from megatron_moe_ext.config import ConfigError, load_config
from megatron_moe_ext.megatron import versions
from megatron_moe_ext.training.checkpoint import find_resume_point

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs/gpt_moe_tiny.yaml")
DOC = REPO / "docs/megatron_lm.md"


def test_translates_a_megatron_lm_job_line():
    line = ("--num-layers 4 --hidden-size 128 --ffn-hidden-size 256 --num-attention-heads 8 "
            "--seq-length 64 --num-experts 8 --moe-router-topk 2 --expert-model-parallel-size 2 "
            "--tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 "
            "--moe-aux-loss-coeff 1e-2 --moe-router-load-balancing-type seq_aux_loss "
            "--lr 3e-4 --min-lr=3e-5 --micro-batch-size 2 --global-batch-size 16 "
            "--train-iters 100 --save ck --load ck --save-interval 50 --seed 7 --bf16 "
            "--use-mcore-models --disable-bias-linear --mock-data --vocab-size 256 "
            "--clip-grad 1.0 --init-method-std 0.01")
    cfg = load_config(TINY, mla.translate(mla.split_args(line)))
    m, moe, tr, ck = cfg.model, cfg.moe, cfg.train, cfg.checkpoint
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads,
            m.seq_length, m.vocab_size, m.init_method_std) == (4, 128, 256, 8, 64, 256, 0.01)
    assert (moe.num_experts, moe.topk, cfg.parallel.expert) == (8, 2, 2)
    assert moe.router.aux_loss_coeff == 0.01 and moe.router.load_balancing_type == "seq_aux_loss"
    assert (tr.lr, tr.min_lr, tr.micro_batch_size, tr.global_batch_size, tr.iters, tr.seed) == \
        (3e-4, 3e-5, 2, 16, 100, 7)
    assert tr.precision == "bf16" and tr.clip_grad == 1.0 and cfg.data.mock
    assert (ck.save, ck.load, ck.interval) == ("ck", "ck", 50)


def test_dotted_overrides_win_and_last_flag_wins():
    over = mla.translate(["--lr", "1e-3", "--lr", "2e-3", "--wandb-project", "p"])
    cfg = load_config(TINY, [*over, "train.lr=5e-3", "data.mock=true"])
    assert cfg.train.lr == 5e-3 and cfg.logging.wandb.enabled and cfg.logging.wandb.project == "p"
    assert load_config(TINY, [*over, "data.mock=true"]).train.lr == 2e-3


def test_every_untranslatable_flag_is_named():
    with pytest.raises(mla.MegatronArgsError) as err:
        mla.translate(mla.split_args(
            "--num-layers 2 --recompute-granularity full --moe-grouped-gemm --foo a b --lr"))
    msg = str(err.value)
    assert "--recompute-granularity, --moe-grouped-gemm, --foo" in msg
    assert "--lr needs a value" in msg and "--num-layers" not in msg
    with pytest.raises(mla.MegatronArgsError, match="--bf16 takes no value"):
        mla.translate(["--bf16=1"])
    with pytest.raises(mla.MegatronArgsError, match="takes one value"):
        mla.translate(["--data-path", "1.0", "a", "0.5", "b"])
    assert mla.translate(["--moe-z-loss-coeff", "-1e-3"]) == ["moe.router.z_loss_coeff=-1e-3"]


def test_entry_point_reads_a_flags_file(tmp_path):
    args = tmp_path / "job.args"
    args.write_text("# a job script's flags\n--num-layers 6 \\\n  --moe-router-topk 1 "
                    "--moe-router-pre-softmax\n")
    run = [sys.executable, str(REPO / "pretrain_gpt_moe.py"), "--config", TINY,
           "--megatron-args-file", str(args), "--megatron-args", "--lr 2e-4", "--print-config",
           "data.mock=true"]
    out = subprocess.run(run, capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert "num_layers: 6" in out and "topk: 1" in out and "lr: 0.0002" in out
    bad = subprocess.run(run[:-2] + ["--megatron-args", "--no-such-flag 3", "--print-config"],
                         capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "--no-such-flag" in bad.stderr


def test_every_translation_targets_a_config_key():
    from megatron_moe_ext.config import field_docs

    keys = {k for k, _, _ in field_docs()}
    assert not [f.key for f in mla.FLAGS if f.key not in keys]
    assert len({f.flag for f in mla.FLAGS}) == len(mla.FLAGS)


def _between(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0].strip() + "\n"


def test_docs_tables_match_the_code():
    text = DOC.read_text()
    assert _between(text, "<!-- flags table: generated, do not edit by hand -->",
                    "<!-- end of flags table -->") == mla.markdown_table()
    assert _between(text, "<!-- versions table: generated, do not edit by hand -->",
                    "<!-- end of versions table -->") == versions.markdown_table()


def test_load_equal_to_missing_save_starts_from_scratch(tmp_path, caplog):
    ck = tmp_path / "ck"
    cfg = load_config(TINY, ["data.mock=true", f"checkpoint.save={ck}", f"checkpoint.load={ck}"])
    with caplog.at_level(logging.INFO, logger="megatron_moe_ext.training.checkpoint"):
        assert find_resume_point(cfg) is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "starting from scratch" in lines[0]
    # the same folder spelled differently is still the same folder
    cfg = load_config(TINY, ["data.mock=true", f"checkpoint.save={ck}",
                             f"checkpoint.load={tmp_path}/./ck"])
    assert find_resume_point(cfg) is None
    # a different missing load folder stays an error
    cfg = load_config(TINY, ["data.mock=true", f"checkpoint.save={ck}",
                             f"checkpoint.load={tmp_path / 'other'}"])
    with pytest.raises(ConfigError, match="checkpoint.load: folder not found"):
        find_resume_point(cfg)
