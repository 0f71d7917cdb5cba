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

Token id layout (bpe and byte): the special tokens come first, ``<pad>`` = 0,
``<|endoftext|>`` = 1 (EOD), ``<mask>`` = 2, ``<cls>`` = 3, ``<sep>`` = 4. ``pad`` must be 0 for
megatron's BERT dataset, which writes the pad id itself into ``padding_mask`` (and into
``types``) at padded positions, so only pad = 0 yields a 1/0 padding mask.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from megatron_moe_ext.config import Config, ConfigError

logger = logging.getLogger(__name__)

#: Special tokens, in id order (ids 0..4) for the bpe and byte tokenizers.
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<|endoftext|>", "<mask>", "<cls>", "<sep>")
PAD, EOD, MASK, CLS, SEP = SPECIAL_TOKENS

#: Megatron's BERT sampler skips every document that holds a sentence longer than this.
BERT_LONG_SENTENCE_LEN = 512

_PREPROCESS_HINT = (
    "make one with: python scripts/preprocess_data.py --input <corpus.jsonl> "
    "--output-prefix <dir>/<name> (see scripts/preprocess_data.py --help)"
)


# --------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------


class Tokenizer:
    """Common interface; also what megatron-core's datasets read from ``config.tokenizer``.

    Attributes read by megatron-core 0.16.1 datasets:
    ``vocab_size`` and ``eod`` (GPTDatasetConfig, GPTDataset, MockGPTLowLevelDataset), ``pad``
    (MegatronDataset: padding id, checked against ``eod`` for collisions), ``unique_identifiers``
    (JSON-serialised into the dataset cache key), and for BERT ``cls``, ``sep``, ``mask`` and
    ``inv_vocab`` (id -> piece; pieces starting with ``##`` continue the previous word, used for
    whole-word masking; its keys are the pool of random replacement tokens).
    """

    kind: str = ""
    vocab_size: int
    eod: Optional[int] = None
    pad: Optional[int] = None
    mask: Optional[int] = None
    cls: Optional[int] = None
    sep: Optional[int] = None

    def tokenize(self, text: str) -> list[int]:
        raise NotImplementedError

    def detokenize(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        raise NotImplementedError

    @property
    def inv_vocab(self) -> dict[int, str]:
        raise NotImplementedError(f"the {self.kind} tokenizer has no vocabulary")

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict(
            [("class", f"{type(self).__module__}.{type(self).__qualname__}"),
             ("vocab_size", self.vocab_size)]
        )

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, eod={self.eod}, "
                f"pad={self.pad}, mask={self.mask}, cls={self.cls}, sep={self.sep})")


def _wordpiece_view(pieces: dict[int, str], specials: set[int],
                    starts_word) -> dict[int, str]:
    """inv_vocab in WordPiece convention: continuation pieces get a ``##`` prefix."""
    out = {}
    for i in sorted(pieces):
        p = pieces[i]
        out[i] = p if (i in specials or starts_word(p)) else "##" + p
    return out


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes: ids 0..4 are SPECIAL_TOKENS, byte b is id b + 5 (vocab 261)."""

    kind = "byte"
    OFFSET = len(SPECIAL_TOKENS)

    def __init__(self) -> None:
        self.vocab_size = 256 + self.OFFSET
        self.pad, self.eod, self.mask, self.cls, self.sep = range(self.OFFSET)
        self._inv_vocab: Optional[dict[int, str]] = None

    def tokenize(self, text: str) -> list[int]:
        return (np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
                + self.OFFSET).tolist()

    def detokenize(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        out, buf = [], bytearray()
        for i in (int(x) for x in ids):
            if i >= self.OFFSET:
                buf.append(i - self.OFFSET)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if not skip_special_tokens and 0 <= i < self.OFFSET:
                out.append(SPECIAL_TOKENS[i])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    @property
    def inv_vocab(self) -> dict[int, str]:
        if self._inv_vocab is None:
            pieces = {i: t for i, t in enumerate(SPECIAL_TOKENS)}
            pieces.update({b + self.OFFSET: chr(b) for b in range(256)})
            # Letters, digits and UTF-8 continuation/lead bytes continue a word; whitespace and
            # punctuation start one (so " word" is one whole-word masking candidate).
            self._inv_vocab = _wordpiece_view(
                pieces, set(range(self.OFFSET)), lambda p: not (p.isalnum() or ord(p) >= 0x80)
            )
        return self._inv_vocab


class BPETokenizer(Tokenizer):
    """Byte-level BPE loaded from a ``tokenizer.json`` with the ``tokenizers`` package."""

    kind = "bpe"

    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.path = os.path.abspath(path)
        self._tok = HFTokenizer.from_file(self.path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        ids = {t: self._tok.token_to_id(t) for t in SPECIAL_TOKENS}
        if ids[EOD] is None:
            raise ValueError(f"{self.path}: the tokenizer has no {EOD} token (needed as EOD); "
                             "train one with scripts/preprocess_data.py")
        self.pad, self.eod, self.mask, self.cls, self.sep = (ids[t] for t in SPECIAL_TOKENS)
        with open(self.path, "rb") as f:
            self._sha = hashlib.sha256(f.read()).hexdigest()[:16]
        self._inv_vocab: Optional[dict[int, str]] = None

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @property
    def vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    @property
    def inv_vocab(self) -> dict[int, str]:
        if self._inv_vocab is None:
            pieces = {i: t for t, i in self.vocab.items()}
            specials = {i for i in (self.pad, self.eod, self.mask, self.cls, self.sep)
                        if i is not None}
            # Byte-level alphabet: 'Ġ' space, 'Ċ' newline, 'ĉ' tab, 'č' CR start a word, and so
            # does punctuation; letters/digits (and other bytes) continue the previous word.
            self._inv_vocab = _wordpiece_view(
                pieces, specials, lambda p: p[:1] in ("Ġ", "Ċ", "ĉ", "č") or not p[:1].isalnum()
            )
        return self._inv_vocab

    @property
    def unique_identifiers(self) -> OrderedDict:
        ids = super().unique_identifiers
        ids["tokenizer_path"] = self.path
        ids["tokenizer_sha256"] = self._sha
        return ids


class NullTokenizer(Tokenizer):
    """Ids are used as given (mock data): vocab from model.vocab_size, EOD = vocab_size - 1.

    ``pad`` is -1 (megatron's own "no pad" id, which never occurs in data); mask/cls/sep None.
    """

    kind = "none"

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = int(vocab_size)
        self.eod = self.vocab_size - 1
        self.pad = -1

    def tokenize(self, text: str) -> list[int]:
        return [int(x) for x in text.split()]

    def detokenize(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return " ".join(str(int(i)) for i in ids
                        if not (skip_special_tokens and int(i) == self.eod))


def default_tokenizer_path(cfg: Config) -> Optional[str]:
    """data.tokenizer.path, else ``<directory of data.path>/tokenizer.json`` (None if neither)."""
    if cfg.data.tokenizer.path:
        return cfg.data.tokenizer.path
    if cfg.data.path:
        return os.path.join(os.path.dirname(os.path.abspath(cfg.data.path)), "tokenizer.json")
    return None


def build_tokenizer(cfg: Config) -> Tokenizer:
    """The tokenizer of cfg.data.tokenizer (see the module docstring for the id layout).

    Raises ConfigError for inconsistent settings and FileNotFoundError for a missing
    tokenizer.json.
    """
    kind = cfg.data.tokenizer.type
    if kind == "bpe":
        path = default_tokenizer_path(cfg)
        if path is None:
            raise ConfigError(
                "data.tokenizer.type 'bpe' needs data.tokenizer.path (or data.path, next to which "
                "tokenizer.json is looked for); for mock data use data.tokenizer.type=none with "
                "model.vocab_size=<n>"
            )
        if not os.path.isfile(path):
            where = ("data.tokenizer.path" if cfg.data.tokenizer.path
                     else f"default for data.path={cfg.data.path!r}")
            raise FileNotFoundError(
                f"BPE tokenizer file not found: {path} ({where}); scripts/preprocess_data.py "
                f"--tokenizer-type bpe writes tokenizer.json next to its output; {_PREPROCESS_HINT}"
            )
        tok: Tokenizer = BPETokenizer(path)
    elif kind == "byte":
        tok = ByteTokenizer()
    elif kind == "none":
        if not cfg.model.vocab_size:
            raise ConfigError("data.tokenizer.type 'none' needs model.vocab_size to be set "
                              "(ids are used as given; EOD is vocab_size - 1)")
        if cfg.model.vocab_size < 2:
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} must be >= 2")
        tok = NullTokenizer(cfg.model.vocab_size)
    else:  # validate() already rejects this
        raise ConfigError(f"config key 'data.tokenizer.type': {kind!r} is not accepted")
    if cfg.model.vocab_size is not None and cfg.model.vocab_size < tok.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the {kind} tokenizer's "
            f"vocabulary ({tok.vocab_size}); leave it unset to take it from the tokenizer"
        )
    logger.info("tokenizer: %r", tok)
    return tok


# --------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Iteration
# --------------------------------------------------------------------------------------


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
