"""Tokenizers, Megatron datasets, and deterministic data-parallel batch iterators.

Public API (used by :mod:`megatron_moe_ext.training.loop`):

* :func:`build_tokenizer` -- ``bpe`` (a ``tokenizer.json`` trained by
  ``scripts/preprocess_data.py``), ``byte`` (UTF-8 bytes) or ``none`` (ids as given, mock data).
  The returned object is what megatron-core's dataset configs take as ``tokenizer``.
* :func:`build_datasets` -- megatron-core's ``GPTDataset`` / ``MockGPTDataset`` or
  ``BERTMaskedWordPieceDataset`` splits through ``BlendedMegatronDatasetBuilder``, built
  identically on every rank (no CUDA; works with or without a process group).
* :func:`build_data_iterator` -- sequential, resumable, data-parallel-sliced micro-batches.
* :func:`get_batch` -- one micro-batch as CPU tensors, exactly the keys megatron's dataset yields.

Modules: :mod:`.tokenizers` (the tokenizers and :func:`build_tokenizer`), :mod:`.datasets`
(megatron dataset construction, the split checks and the megatron-core workarounds); this module
holds the iteration (sampler, iterator, batch) and re-exports every name of the other two, so
``megatron_moe_ext.training.data`` stays the one import path.

Token id layout (bpe and byte): the special tokens come first, ``<pad>`` = 0,
``<|endoftext|>`` = 1 (EOD), ``<mask>`` = 2, ``<cls>`` = 3, ``<sep>`` = 4. ``pad`` must be 0 for
megatron's BERT dataset, which writes the pad id itself into ``padding_mask`` (and into
``types``) at padded positions, so only pad = 0 yields a 1/0 padding mask.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import torch

from megatron_moe_ext.config import Config
from megatron_moe_ext.training.datasets import (  # noqa: F401 -- re-exported: one import path
    BERT_LONG_SENTENCE_LEN,
    build_datasets,
    resolve_data_prefix,
)
from megatron_moe_ext.training.tokenizers import (  # noqa: F401 -- re-exported: one import path
    CLS,
    EOD,
    MASK,
    PAD,
    SEP,
    SPECIAL_TOKENS,
    BPETokenizer,
    ByteTokenizer,
    NullTokenizer,
    Tokenizer,
    build_tokenizer,
    default_tokenizer_path,
)

__all__ = [
    "BERT_LONG_SENTENCE_LEN", "CLS", "EOD", "MASK", "PAD", "SEP", "SPECIAL_TOKENS",
    "BPETokenizer", "ByteTokenizer", "DataParallelSequentialBatchSampler", "NullTokenizer",
    "Tokenizer", "build_data_iterator", "build_datasets", "build_tokenizer",
    "default_tokenizer_path", "get_batch", "resolve_data_prefix",
]


class DataParallelSequentialBatchSampler:
    """Index lists of one micro-batch for one data-parallel rank, forever.

    Samples are taken in dataset order (megatron's datasets are already shuffled with
    train.seed). Micro-batch k of rank r holds global sample indices
    ``consumed + k*dp_size*mbs + r*mbs + i`` for i < mbs, taken modulo len(dataset) (a new
    pass starts once the dataset is used up; training datasets are built large enough that
    this does not happen). So the ranks' slices of every global batch are disjoint, and a run
    resumed with ``consumed`` samples sees exactly the batches an uninterrupted run would.
    """

    def __init__(self, total: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 consumed_samples: int = 0) -> None:
        if total <= 0:
            raise ValueError("cannot iterate over an empty dataset")
        if micro_batch_size <= 0 or dp_size <= 0 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad micro_batch_size={micro_batch_size}, dp_rank={dp_rank}, "
                             f"dp_size={dp_size}")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples={consumed_samples} must be >= 0")
        self.total, self.mbs = total, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed = consumed_samples

    def __iter__(self) -> Iterator[list[int]]:
        start = self.consumed + self.dp_rank * self.mbs
        step = self.dp_size * self.mbs
        while True:
            yield [(start + i) % self.total for i in range(self.mbs)]
            start += step


def build_data_iterator(dataset, micro_batch_size: int, dp_rank: int, dp_size: int,
                        consumed_samples: int, seed: int) -> Iterator:
    """Endless iterator of collated micro-batches for one data-parallel rank.

    See :class:`DataParallelSequentialBatchSampler` for the order. ``seed`` is accepted for
    API stability; the order itself is sequential (megatron's dataset shuffle, seeded by
    train.seed, already randomises it). Runs in the main process (num_workers=0), no CUDA.
    Returns None for a None dataset.
    """
    del seed
    if dataset is None:
        return None
    sampler = DataParallelSequentialBatchSampler(
        len(dataset), micro_batch_size, dp_rank, dp_size, consumed_samples
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=0, pin_memory=False
    )
    return iter(loader)


_GPT_KEYS = {"tokens": torch.long, "labels": torch.long, "loss_mask": torch.float,
             "position_ids": torch.long}
_BERT_KEYS = {"text": torch.long, "types": torch.long, "labels": torch.long,
              "is_random": torch.long, "loss_mask": torch.float, "padding_mask": torch.long,
              "truncated": torch.long}


def get_batch(cfg: Config, data_iterator: Optional[Iterator]) -> Optional[dict[str, Any]]:
    """The next micro-batch as CPU tensors (None when data_iterator is None).

    GPT: tokens, labels, position_ids [b, s] long; loss_mask [b, s] float; attention_mask
    None (causal). BERT: text, types, labels, padding_mask [b, s] long, loss_mask [b, s]
    float, is_random, truncated [b] long -- as megatron's BERT dataset yields them: labels are
    -1 where nothing is masked (loss_mask 0 there), padding_mask is 1 on tokens, 0 on padding.
    """
    if data_iterator is None:
        return None
    raw = next(data_iterator)
    keys = _BERT_KEYS if cfg.model.type == "bert" else _GPT_KEYS
    batch: dict[str, Any] = {
        k: torch.as_tensor(raw[k]).to(dtype=dt) for k, dt in keys.items() if k in raw
    }
    if cfg.model.type != "bert":
        am = raw.get("attention_mask")
        batch["attention_mask"] = None if am is None else torch.as_tensor(am)
    return batch
