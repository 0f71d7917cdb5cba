"""Tokenizers: the object megatron-core's dataset configs take as ``tokenizer``.

* :func:`build_tokenizer` -- ``bpe`` (a ``tokenizer.json`` trained by
  ``scripts/preprocess_data.py``), ``byte`` (UTF-8 bytes) or ``none`` (ids as given, mock data).

Token id layout (bpe and byte): the special tokens come first, ``<pad>`` = 0,
``<|endoftext|>`` = 1 (EOD), ``<mask>`` = 2, ``<cls>`` = 3, ``<sep>`` = 4. ``pad`` must be 0 for
megatron's BERT dataset, which writes the pad id itself into ``padding_mask`` (and into
``types``) at padded positions, so only pad = 0 yields a 1/0 padding mask.

Every name here is also importable from :mod:`megatron_moe_ext.training.data`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from typing import Optional, Sequence

import numpy as np

from megatron_moe_ext.config import Config, ConfigError

logger = logging.getLogger(__name__)

#: Special tokens, in id order (ids 0..4) for the bpe and byte tokenizers.
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<|endoftext|>", "<mask>", "<cls>", "<sep>")
PAD, EOD, MASK, CLS, SEP = SPECIAL_TOKENS

_PREPROCESS_HINT = (
    "make one with: python scripts/preprocess_data.py --input <corpus.jsonl> "
    "--output-prefix <dir>/<name> (see scripts/preprocess_data.py --help)"
)



_CACHE_KEY_MODULE = "megatron_moe_ext.training.data"
"""Module path written into megatron's dataset cache key (``unique_identifiers``) for the
tokenizers defined here: their public import path, where they lived before this module was split
off, so that dataset index caches built before the split stay valid."""


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
        module = type(self).__module__
        module = _CACHE_KEY_MODULE if module == __name__ else module
        return OrderedDict(
            [("class", f"{module}.{type(self).__qualname__}"),
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
