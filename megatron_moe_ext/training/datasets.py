"""Megatron datasets: ``GPTDataset`` / ``MockGPTDataset`` or ``BERTMaskedWordPieceDataset``
splits through megatron-core's ``BlendedMegatronDatasetBuilder``, built identically on every rank
(no CUDA; works with or without a process group).

* :func:`build_datasets` -- the (train, valid, test) datasets of a run config.
* :func:`resolve_data_prefix` -- the indexed-dataset prefix for ``data.path``.

Checks up front turn megatron's hangs and IndexErrors on splits without usable data into
:class:`~megatron_moe_ext.config.ConfigError`. Two megatron-core 0.16.1 behaviours are worked
around here, each in one named function: the BERT dataset's unconditional
``torch.distributed.get_rank()`` (:func:`_rank_zero_without_process_group`) and the GPT dataset's
cached loss mask (:func:`_disable_mask_cache`).

Every name here is also importable from :mod:`megatron_moe_ext.training.data`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from contextlib import contextmanager, nullcontext
from typing import Any, Optional

import numpy as np
import torch

from megatron_moe_ext.config import Config, ConfigError
from megatron_moe_ext.training.tokenizers import _PREPROCESS_HINT, Tokenizer

logger = logging.getLogger(__name__)

#: Megatron's BERT sampler skips every document that holds a sentence longer than this.
BERT_LONG_SENTENCE_LEN = 512


def _quiet_megatron_import() -> None:
    import warnings

    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")


def resolve_data_prefix(path: str, model_type: str = "gpt") -> str:
    """The indexed-dataset prefix for data.path.

    Accepts the prefix itself, the ``.bin`` / ``.idx`` file, or the ``--output-prefix`` given to
    scripts/preprocess_data.py (then ``<path>_text_document`` for GPT, ``<path>_text_sentence``
    then ``_text_document`` for BERT). Raises FileNotFoundError naming data.path otherwise.
    """
    base = path[:-4] if path.endswith((".bin", ".idx")) else path
    suffixes = ["", "_text_sentence", "_text_document"] if model_type == "bert" else \
        ["", "_text_document"]
    tried = []
    for suffix in suffixes:
        prefix = base + suffix
        tried.append(prefix)
        if os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx"):
            if suffix:
                logger.info("data.path %s: using the indexed dataset %s", path, prefix)
            return prefix
    looked = ", ".join(f"{p}.bin/.idx" for p in tried)
    raise FileNotFoundError(
        f"data.path={path!r}: no Megatron indexed dataset found (looked for {looked}); "
        f"{_PREPROCESS_HINT}, then set data.path to the printed prefix "
        "(<output-prefix>_text_document, or <output-prefix>_text_sentence for BERT)"
    )


def _cache_dir(cfg: Config, prefix: str) -> str:
    """cfg.data.cache_dir or ``<data dir>/cache``, plus a folder per dataset fingerprint.

    Megatron's cache key covers the path, split, seed, lengths and tokenizer but not the
    file contents; the (size, mtime) fingerprint of the .idx keeps a re-preprocessed dataset
    at the same path from silently reusing stale indices.
    """
    root = cfg.data.cache_dir or os.path.join(os.path.dirname(os.path.abspath(prefix)), "cache")
    st = os.stat(prefix + ".idx")
    fp = hashlib.md5(f"{st.st_size}-{st.st_mtime_ns}".encode()).hexdigest()[:10]
    return os.path.join(root, f"{os.path.basename(prefix)}-{fp}")


@contextmanager
def _rank_zero_without_process_group():
    """megatron's masked (BERT) dataset calls torch.distributed.get_rank() unconditionally
    when building its sample index; without a process group that raises. We build on every
    rank, so a process-less build is rank 0. Patched only while building, only when no
    process group exists."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        yield
        return
    original = torch.distributed.get_rank
    torch.distributed.get_rank = lambda group=None: 0  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.distributed.get_rank = original  # type: ignore[assignment]


def _split_bounds(split_matrix, num_elements: int) -> list[Optional[tuple[int, int]]]:
    """The [beg, end) element range of each split, computed as megatron's builder does."""
    out = []
    for bookend in split_matrix:
        if bookend is None:
            out.append(None)
        else:
            out.append((int(round(bookend[0] * float(num_elements))),
                        int(round(bookend[1] * float(num_elements)))))
    return out


def _check_splits(cfg: Config, prefix: str, split_matrix, sizes, min_sentences: int) -> None:
    """Clear errors instead of megatron's hangs/IndexErrors for splits with no usable data."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    names = ("train", "valid", "test")
    ds = IndexedDataset(prefix)
    bert = cfg.model.type == "bert"
    if bert:
        doc_idx = np.asarray(ds.document_indices, dtype=np.int64)
        num = len(doc_idx) - 1
        unit = "documents"
    else:
        num = len(ds.sequence_lengths)
        unit = "sequences (documents)"
    for name, bounds, size in zip(names, _split_bounds(split_matrix, num), sizes):
        if bounds is None or not size:
            continue
        beg, end = bounds
        if end <= beg:
            raise ConfigError(
                f"data.split={cfg.data.split!r} leaves the {name} split of {prefix} empty "
                f"({num} {unit} in total) while {size} {name} samples are requested; use more "
                f"data or change data.split"
            )
        if bert:
            lengths = np.asarray(ds.sequence_lengths, dtype=np.int64)
            n_sent = doc_idx[beg + 1:end + 1] - doc_idx[beg:end]
            too_long = np.zeros(end - beg, dtype=bool)
            long_sent = np.nonzero(lengths > BERT_LONG_SENTENCE_LEN)[0]
            if len(long_sent):
                too_long = np.bincount(
                    np.searchsorted(doc_idx, long_sent, side="right") - 1, minlength=num
                )[beg:end] > 0
            usable = int(np.sum((n_sent >= min_sentences) & ~too_long))
            if usable == 0:
                raise ConfigError(
                    f"{prefix}: no document of the {name} split has >= {min_sentences} "
                    f"sentences (and none longer than {BERT_LONG_SENTENCE_LEN} tokens), which "
                    "megatron's BERT dataset needs"
                    + (" for the sentence-order head (model.bert_binary_head)" if min_sentences > 1
                       else "")
                    + "; preprocess with scripts/preprocess_data.py --split-sentences and use the "
                    "<output-prefix>_text_sentence dataset"
                )


def _bert_tokenizer_check(tok: Tokenizer) -> None:
    missing = [n for n in ("pad", "mask", "cls", "sep") if getattr(tok, n, None) is None]
    if missing:
        raise ConfigError(f"model.type 'bert' needs a tokenizer with {', '.join(missing)} tokens; "
                          f"the {tok.kind} tokenizer has none (use data.tokenizer.type bpe or byte)")
    if tok.pad != 0:
        raise ConfigError(
            f"model.type 'bert' needs the <pad> token to have id 0 (megatron's BERT dataset "
            f"writes the pad id into padding_mask), but it is {tok.pad}; retrain the tokenizer "
            "with scripts/preprocess_data.py, which puts <pad> first"
        )
    tok.inv_vocab  # noqa: B018 -- raises for tokenizers without a vocabulary


def build_datasets(
    cfg: Config,
    tokenizer: Tokenizer,
    train_samples: Optional[int],
    valid_samples: Optional[int],
    test_samples: Optional[int],
) -> tuple[Any, Any, Any]:
    """(train, valid, test) megatron datasets; a split is None when 0 samples are requested
    for it (or data.split gives it weight 0). ``None`` as a size means one epoch of that split.

    GPT: ``GPTDataset`` (or ``MockGPTDataset`` with data.mock) over the data.path prefix, split
    by data.split, seq_length model.seq_length, seed train.seed, no position/attention reset,
    no EOD loss masking, no materialised attention mask (causal). BERT:
    ``BERTMaskedWordPieceDataset`` with masking probability data.mask_prob, whole-word masking
    of up-to-3-grams, short-sequence probability 0.1 and the sentence-order head per
    model.bert_binary_head (as Megatron-LM's pretrain_bert).

    Built on every rank from the mmap'd files; index caches go to data.cache_dir or
    ``<data dir>/cache`` (rank 0 writes them first when a process group exists; all ranks must
    call this then). No CUDA is needed.
    """
    _quiet_megatron_import()
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )

    sizes = [train_samples, valid_samples, test_samples]
    bert = cfg.model.type == "bert"
    if cfg.data.mock:
        if bert:
            raise ConfigError("data.mock is only supported for model.type 'gpt'")
        prefix, cache = None, cfg.data.cache_dir
    else:
        prefix = resolve_data_prefix(cfg.data.path, cfg.model.type)
        cache = _cache_dir(cfg, prefix)
    common = dict(
        random_seed=cfg.train.seed,
        sequence_length=cfg.model.seq_length,
        blend=None if prefix is None else ([prefix], None),
        split=None if prefix is None else cfg.data.split,
        path_to_cache=cache,
        mmap_bin_files=True,
        tokenizer=tokenizer,
    )

    if bert:
        from megatron.core.datasets.bert_dataset import (
            BERTMaskedWordPieceDataset,
            BERTMaskedWordPieceDatasetConfig,
        )

        _bert_tokenizer_check(tokenizer)
        if not 0.0 < cfg.data.mask_prob < 1.0:
            raise ConfigError(f"data.mask_prob={cfg.data.mask_prob} must be in (0, 1)")
        if cfg.model.seq_length < 8:
            raise ConfigError(f"model.seq_length={cfg.model.seq_length} is too short for BERT")
        cls = BERTMaskedWordPieceDataset
        config = BERTMaskedWordPieceDatasetConfig(
            **common,
            masking_probability=cfg.data.mask_prob,
            short_sequence_probability=0.1,
            masking_max_ngram=3,
            masking_do_full_word=True,
            masking_do_permutation=False,
            masking_use_longer_ngrams=False,
            masking_use_geometric_distribution=False,
            classification_head=cfg.model.bert_binary_head,
        )
    else:
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

        cls = MockGPTDataset if prefix is None else GPTDataset
        config = GPTDatasetConfig(
            **common,
            reset_position_ids=False,
            reset_attention_mask=False,
            eod_mask_loss=False,
            create_attention_mask=False,
        )

    # Splits nobody asked for are not built (megatron would build them with a default size,
    # which fails or loops on splits that hold no data). Other bookends are left unchanged.
    for i, size in enumerate(sizes):
        if size is not None and size <= 0:
            config.split_matrix[i] = None
    if prefix is not None:
        _check_splits(cfg, prefix, config.split_matrix, sizes,
                      2 if (bert and cfg.model.bert_binary_head) else 1)

    builder = BlendedMegatronDatasetBuilder(
        cls, [s if s else None for s in sizes], lambda: True, config
    )
    with _rank_zero_without_process_group() if bert else nullcontext():
        train, valid, test = builder.build()
    for name, ds, size in zip(("train", "valid", "test"), (train, valid, test), sizes):
        if ds is not None:
            _disable_mask_cache(ds)
            logger.info("%s dataset: %d samples (requested %s)", name, len(ds), size)
            if size and len(ds) == 0:
                raise ConfigError(f"the {name} split of {prefix or 'mock data'} yields no samples "
                                  f"of model.seq_length={cfg.model.seq_length}; use more data")
    return train, valid, test


def _disable_mask_cache(dataset: Any) -> None:
    """megatron-core 0.16.1 GPTDataset.__getitem__ caches the loss mask of the first sample it
    builds *after* zeroing that sample's pad-label positions in place, so every later sample
    inherits those zeros: the loss mask then depends on which sample a process read first, and
    a resumed run diverges from an uninterrupted one. Recomputing the masks per sample (cheap)
    avoids it."""
    if hasattr(dataset, "masks_and_position_ids_are_cacheable"):
        dataset.masks_and_position_ids_are_cacheable = False
