"""Megatron-LM command-line flags -> our dotted config overrides.

``pretrain_gpt_moe.py --megatron-args "--num-layers 4 --lr 3e-4 --bf16"`` (or
``--megatron-args-file job.args``) lets a Megatron-LM job script keep its flags. Every flag of
:data:`FLAGS` becomes an override (``--num-layers 4`` -> ``model.num_layers=4``); a flag that is
not in the table is an error that lists every such flag, so nothing a user asked for is dropped.

Order: YAML file <- translated Megatron-LM flags <- dotted overrides (``key.sub=value`` on the
command line win over ``--megatron-args``). Both ``--flag value`` and ``--flag=value`` work; a
flag given twice takes the last value (as Megatron-LM's argparse does).

``docs/megatron_lm.md`` holds :func:`markdown_table` (a test keeps the two equal);
``python -m megatron_moe_ext.megatron_lm_args`` prints it.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from megatron_moe_ext.config import ConfigError


@dataclass(frozen=True)
class Flag:
    """One Megatron-LM flag and what it sets."""

    flag: str
    """The Megatron-LM flag, e.g. ``--num-layers``."""
    key: str
    """The config key it sets."""
    value: Optional[str] = None
    """For a flag without an argument (``--bf16``): the value it sets; None: the flag takes
    one argument, passed on as the value."""
    note: str = ""
    """What differs from Megatron-LM, if anything."""


FLAGS: tuple[Flag, ...] = (
    # model
    Flag("--num-layers", "model.num_layers"),
    Flag("--hidden-size", "model.hidden_size"),
    Flag("--ffn-hidden-size", "model.ffn_hidden_size"),
    Flag("--num-attention-heads", "model.num_attention_heads"),
    Flag("--seq-length", "model.seq_length"),
    Flag("--max-position-embeddings", "model.max_position_embeddings"),
    Flag("--vocab-size", "model.vocab_size"),
    Flag("--position-embedding-type", "model.position_embedding_type",
         note="rope or learned_absolute"),
    Flag("--normalization", "model.normalization", note="LayerNorm or RMSNorm"),
    Flag("--swiglu", "model.activation", "swiglu"),
    Flag("--hidden-dropout", "model.hidden_dropout"),
    Flag("--attention-dropout", "model.attention_dropout"),
    Flag("--init-method-std", "model.init_method_std"),
    Flag("--untie-embeddings-and-output-weights", "model.untie_embeddings_and_output_weights",
         "true"),
    # MoE
    Flag("--num-experts", "moe.num_experts"),
    Flag("--moe-router-topk", "moe.topk"),
    Flag("--moe-ffn-hidden-size", "moe.ffn_hidden_size"),
    Flag("--moe-layer-freq", "moe.layer_freq", note="an integer (no pattern lists)"),
    Flag("--moe-token-dispatcher-type", "moe.token_dispatcher", note="alltoall or allgather"),
    Flag("--moe-expert-capacity-factor", "moe.capacity_factor"),
    Flag("--moe-pad-expert-input-to-capacity", "moe.pad_to_capacity", "true"),
    Flag("--moe-token-drop-policy", "moe.drop_policy"),
    Flag("--moe-shared-expert-intermediate-size", "moe.shared_expert_ffn_hidden_size"),
    Flag("--moe-router-load-balancing-type", "moe.router.load_balancing_type",
         note="one type (no per-type lists)"),
    Flag("--moe-aux-loss-coeff", "moe.router.aux_loss_coeff", note="one value (no lists)"),
    Flag("--moe-z-loss-coeff", "moe.router.z_loss_coeff"),
    Flag("--moe-router-score-function", "moe.router.score_function"),
    Flag("--moe-router-pre-softmax", "moe.router.pre_softmax", "true"),
    Flag("--moe-router-dtype", "moe.router.dtype"),
    Flag("--moe-router-enable-expert-bias", "moe.router.enable_expert_bias", "true"),
    Flag("--moe-router-bias-update-rate", "moe.router.bias_update_rate"),
    Flag("--moe-router-num-groups", "moe.router.num_groups"),
    Flag("--moe-router-group-topk", "moe.router.group_topk"),
    # parallelism
    Flag("--tensor-model-parallel-size", "parallel.tensor"),
    Flag("--pipeline-model-parallel-size", "parallel.pipeline"),
    Flag("--expert-model-parallel-size", "parallel.expert"),
    Flag("--expert-tensor-parallel-size", "parallel.expert_tensor"),
    Flag("--sequence-parallel", "parallel.sequence_parallel", "true"),
    # training
    Flag("--train-iters", "train.iters"),
    Flag("--micro-batch-size", "train.micro_batch_size"),
    Flag("--global-batch-size", "train.global_batch_size"),
    Flag("--lr", "train.lr"),
    Flag("--min-lr", "train.min_lr"),
    Flag("--lr-warmup-iters", "train.lr_warmup_iters"),
    Flag("--lr-decay-style", "train.lr_decay_style", note="cosine, linear or constant"),
    Flag("--lr-decay-iters", "train.lr_decay_iters"),
    Flag("--weight-decay", "train.weight_decay"),
    Flag("--adam-beta1", "train.adam_beta1"),
    Flag("--adam-beta2", "train.adam_beta2"),
    Flag("--adam-eps", "train.adam_eps"),
    Flag("--clip-grad", "train.clip_grad"),
    Flag("--seed", "train.seed"),
    Flag("--bf16", "train.precision", "bf16"),
    Flag("--use-distributed-optimizer", "train.use_distributed_optimizer", "true"),
    Flag("--overlap-grad-reduce", "train.overlap_grad_reduce", "true"),
    Flag("--eval-interval", "train.eval_interval"),
    Flag("--eval-iters", "train.eval_iters"),
    # data, checkpoints, logging, runtime
    Flag("--data-path", "data.path", note="one prefix (no weighted blends)"),
    Flag("--split", "data.split"),
    Flag("--mock-data", "data.mock", "true"),
    Flag("--save", "checkpoint.save"),
    Flag("--load", "checkpoint.load",
         note="equal to --save and not there yet: the run starts from scratch"),
    Flag("--save-interval", "checkpoint.interval"),
    Flag("--log-interval", "logging.interval"),
    Flag("--wandb-project", "logging.wandb.project", note="also set logging.wandb.enabled=true"),
    Flag("--wandb-exp-name", "logging.wandb.name"),
    Flag("--distributed-timeout-minutes", "runtime.timeout_minutes"),
    Flag("--distributed-backend", "runtime.backend"),
)
"""Every Megatron-LM flag that translates, in the order of docs/megatron_lm.md."""

ALWAYS_ON: dict[str, str] = {
    "--use-mcore-models": "the models are always megatron-core's",
    "--disable-bias-linear": "linear layers never have biases here (add_bias_linear=False)",
}
"""Flags accepted without an override because this stack always behaves that way."""

_BY_FLAG = {f.flag: f for f in FLAGS}


class MegatronArgsError(ConfigError):
    """Megatron-LM flags that cannot be translated (names every one of them)."""


def split_args(text: str) -> list[str]:
    """Shell-like split of a flags string or file (``#`` comments and line continuations)."""
    return shlex.split(text.replace("\\\n", " "), comments=True)


def read_args_file(path: str | Path) -> list[str]:
    """The flags of a file (as a job script would pass them)."""
    p = Path(path)
    if not p.is_file():
        raise MegatronArgsError(f"--megatron-args-file: file not found: {p}")
    return split_args(p.read_text())


def translate(argv: Sequence[str]) -> list[str]:
    """Megatron-LM flags -> dotted overrides (``key=value``), in the given order. Raises
    MegatronArgsError listing every flag that has no translation or lacks its value."""
    out: list[str] = []
    unknown: list[str] = []
    problems: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if not token.startswith("--"):
            problems.append(f"{token!r} is not a flag")
            continue
        name, eq, inline = token.partition("=")
        if name in ALWAYS_ON:
            if eq:
                problems.append(f"{name} takes no value")
            continue
        spec = _BY_FLAG.get(name)
        if spec is None:
            unknown.append(name)
            # skip the flag's arguments, if any, so that they are not reported as flags
            while not eq and i < len(argv) and not argv[i].startswith("--"):
                i += 1
            continue
        if spec.value is not None:
            if eq:
                problems.append(f"{name} takes no value")
                continue
            out.append(f"{spec.key}={spec.value}")
            continue
        if eq:
            value = inline
        elif i < len(argv) and not _is_flag(argv[i]):
            value = argv[i]
            i += 1
        else:
            problems.append(f"{name} needs a value")
            continue
        if i < len(argv) and not _is_flag(argv[i]):
            extra = []
            while i < len(argv) and not _is_flag(argv[i]):
                extra.append(argv[i])
                i += 1
            problems.append(f"{name} takes one value, got {[value, *extra]}")
            continue
        out.append(f"{spec.key}={value}")
        if spec.flag == "--wandb-project":
            out.append("logging.wandb.enabled=true")
    if unknown:
        problems.insert(0, "no translation for " + ", ".join(dict.fromkeys(unknown)))
    if problems:
        raise MegatronArgsError(
            "Megatron-LM flags: " + "; ".join(problems)
            + " (the flags that translate: docs/megatron_lm.md)")
    return out


def _is_flag(token: str) -> bool:
    """A flag, not a (possibly negative) number."""
    if not token.startswith("-"):
        return False
    try:
        float(token)
        return False
    except ValueError:
        return True


def markdown_table() -> str:
    """The flag -> key table of docs/megatron_lm.md."""
    lines = ["| Megatron-LM flag | config key | notes |", "|---|---|---|"]
    for f in FLAGS:
        key = f"`{f.key}={f.value}`" if f.value is not None else f"`{f.key}`"
        lines.append(f"| `{f.flag}` | {key} | {f.note} |")
    for flag, why in ALWAYS_ON.items():
        lines.append(f"| `{flag}` | (nothing to set) | {why} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    sys.stdout.write(markdown_table())
