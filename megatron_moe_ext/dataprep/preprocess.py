"""Tokenize text into a Megatron indexed dataset (``.bin`` + ``.idx``); front end:
scripts/preprocess_data.py (its docstring describes inputs and outputs).

:func:`preprocess` runs it for a :class:`PreprocessOptions` (one field per command-line
option, same names and defaults) and returns its statistics.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

logger = logging.getLogger("preprocess_data")

BATCH_DOCS = 512


@dataclass
class PreprocessOptions:
    """What to tokenize and how (the options of scripts/preprocess_data.py)."""

    input: list[str]
    """Input files: .jsonl/.json (one JSON object per line) or plain text."""
    output_prefix: str
    """Output path prefix; <prefix>_<json_key>_document.bin/.idx, tokenizer.json beside it."""
    input_format: str = "auto"
    """auto | jsonl | text (auto: .jsonl/.json/.ndjson are JSON lines, else plain text)."""
    json_key: str = "text"
    """JSON field holding the document text."""
    split_lines: bool = False
    """Plain text: one document per line (default: per blank-line-separated paragraph)."""
    split_sentences: bool = False
    """Also write <prefix>_<json_key>_sentence.bin/.idx (one sequence per sentence)."""
    max_sentence_tokens: int = 256
    """With split_sentences, cut longer sentences into pieces of this many tokens."""
    tokenizer_type: str = "bpe"
    """bpe (byte-level BPE, trained unless tokenizer_path) | byte (UTF-8 bytes + 5 specials)."""
    vocab_size: int = 4096
    """BPE vocabulary size to train."""
    min_frequency: int = 2
    """BPE: minimum pair frequency for a merge."""
    tokenizer_path: Optional[str] = None
    """Reuse this tokenizer.json instead of training one (copied next to the output)."""
    workers: Optional[int] = None
    """Threads for BPE training and encoding (default: all cores)."""
    log_interval: int = 2000
    """Log progress every this many documents."""
    log_level: str = "INFO"
    """Log level of the front end."""

    def __post_init__(self) -> None:
        if self.input_format not in ("auto", "jsonl", "text"):
            raise ValueError(f"input_format must be auto, jsonl or text, got {self.input_format!r}")
        if self.tokenizer_type not in ("bpe", "byte"):
            raise ValueError(f"tokenizer_type must be bpe or byte, got {self.tokenizer_type!r}")
        if self.vocab_size <= 261 and self.tokenizer_type == "bpe" and not self.tokenizer_path:
            raise ValueError("--vocab-size must be > 261 (256 byte symbols + 5 special tokens "
                             "+ merges)")
        if self.max_sentence_tokens < 1 or self.log_interval < 1:
            raise ValueError("--max-sentence-tokens and --log-interval must be >= 1")
        if self.workers is not None and self.workers < 1:
            raise ValueError("--workers must be >= 1")


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def input_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    name = path.name.lower()
    return "jsonl" if name.endswith((".jsonl", ".json", ".ndjson")) else "text"


def iter_documents(paths: list[Path], fmt: str, json_key: str, split_lines: bool) -> Iterator[str]:
    """Non-empty documents of all inputs, in order."""
    for path in paths:
        kind = input_format(path, fmt)
        with path.open("r", encoding="utf-8") as f:
            if kind == "jsonl":
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise SystemExit(f"error: {path}:{lineno}: not valid JSON ({exc})") from None
                    if not isinstance(record, dict) or json_key not in record:
                        raise SystemExit(f"error: {path}:{lineno}: no key {json_key!r} "
                                         "(set it with --json-key)")
                    text = record[json_key]
                    if not isinstance(text, str):
                        raise SystemExit(f"error: {path}:{lineno}: {json_key!r} is not a string")
                    if text.strip():
                        yield text
            elif split_lines:
                for line in f:
                    line = line.rstrip("\n")
                    if line.strip():
                        yield line
            else:
                para: list[str] = []
                for line in f:
                    if line.strip():
                        para.append(line)
                    elif para:
                        yield "".join(para).rstrip("\n")
                        para = []
                if para:
                    yield "".join(para).rstrip("\n")


# Sentence ends: ., ! or ? (plus closing quotes/brackets) followed by whitespace and then not a
# lower-case letter; or the start of a blank-line run (paragraph break). Whitespace stays with
# the following sentence, so the sentences concatenate back to the exact document text.
_SENT_END = re.compile(r"[.!?]+[\"')\]]*(?=\s+[^\sa-z])|(?=\n[ \t]*\n)")
_ABBREV = re.compile(r"(?:\b(?:e\.g|i\.e|etc|vs|cf|Mr|Mrs|Dr|St|No)|\b[A-Za-z])\.$")


def split_sentences(text: str) -> list[str]:
    """Heuristic sentence splitter (no model download); "".join(result) == text."""
    cuts = [0]
    for m in _SENT_END.finditer(text):
        end = m.end()
        if m.group(0) and _ABBREV.search(text[max(0, end - 6):end]):
            continue
        if end > cuts[-1]:
            cuts.append(end)
    cuts.append(len(text))
    pieces = [text[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]
    out: list[str] = []
    for p in pieces:
        if out and not any(c.isalnum() for c in p):
            out[-1] += p  # punctuation/whitespace-only piece: keep with the previous sentence
        else:
            out.append(p)
    if len(out) > 1 and not any(c.isalnum() for c in out[0]):
        out[1] = out[0] + out[1]
        out.pop(0)
    return out


# --------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int, out_path: Path):
    """Train a byte-level BPE (specials first: <pad>=0, <|endoftext|>=1, ...) and save it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from megatron_moe_ext.training.data import SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_path))
    return tok


class _Encoder:
    """Batch encoder over the bpe (tokenizers, multi-threaded) or byte tokenizer."""

    def __init__(self, kind: str, tokenizer_json: Optional[Path]) -> None:
        from megatron_moe_ext.training import data as data_mod

        if kind == "bpe":
            self.tok = data_mod.BPETokenizer(str(tokenizer_json))
            raw = self.tok._tok

            def encode_batch(texts: list[str]) -> list[list[int]]:
                return [e.ids for e in raw.encode_batch(texts, add_special_tokens=False)]

            self.encode_batch = encode_batch
        else:
            self.tok = data_mod.ByteTokenizer()
            self.encode_batch = lambda texts: [self.tok.tokenize(t) for t in texts]
        self.vocab_size = self.tok.vocab_size
        self.eod = self.tok.eod


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


class _Writer:
    """IndexedDatasetBuilder writing to temporary names, renamed into place on success."""

    def __init__(self, prefix: str, vocab_size: int) -> None:
        import numpy as np
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

        self.prefix = prefix
        self.tmp = prefix + ".tmp"
        self.dtype = DType.optimal_dtype(vocab_size)
        self.np = np
        self.builder = IndexedDatasetBuilder(self.tmp + ".bin", dtype=self.dtype)
        self.tokens = 0
        self.sequences = 0

    def add_document(self, sequences: list[list[int]]) -> None:
        lengths = [len(s) for s in sequences]
        flat = self.np.fromiter((t for s in sequences for t in s), dtype=self.np.int64,
                                count=sum(lengths))
        self.builder.add_document(flat, lengths)
        self.tokens += int(flat.size)
        self.sequences += len(lengths)

    def finalize(self) -> None:
        self.builder.finalize(self.tmp + ".idx")
        os.replace(self.tmp + ".bin", self.prefix + ".bin")
        os.replace(self.tmp + ".idx", self.prefix + ".idx")


def _chunks(seq: list[int], n: int) -> list[list[int]]:
    return [seq[i:i + n] for i in range(0, len(seq), n)] if seq else []


def _batched(it: Iterable[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def preprocess(opts: PreprocessOptions) -> dict:
    """Tokenize ``opts.input`` into the indexed dataset(s); returns the statistics."""
    if opts.workers is not None:
        # tokenizers' Rust thread pool reads these when it first starts.
        os.environ["RAYON_NUM_THREADS"] = str(opts.workers)
        os.environ["RAYON_RS_NUM_CPUS"] = str(opts.workers)
    paths = [Path(p) for p in opts.input]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"error: input file(s) not found: {', '.join(missing)}")
    out_prefix = Path(opts.output_prefix)
    out_dir = out_prefix.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    docs = lambda: iter_documents(paths, opts.input_format, opts.json_key, opts.split_lines)
    t0 = time.time()

    tokenizer_json: Optional[Path] = None
    if opts.tokenizer_type == "bpe":
        tokenizer_json = out_dir / "tokenizer.json"
        if opts.tokenizer_path:
            src = Path(opts.tokenizer_path)
            if not src.is_file():
                raise SystemExit(f"error: --tokenizer-path not found: {src}")
            if src.resolve() != tokenizer_json.resolve():
                shutil.copyfile(src, tokenizer_json)
                logger.info("copied tokenizer %s -> %s", src, tokenizer_json)
        else:
            if tokenizer_json.exists():
                logger.warning("overwriting %s with a newly trained tokenizer", tokenizer_json)
            logger.info("training byte-level BPE (vocab %d) on %s", opts.vocab_size,
                        ", ".join(map(str, paths)))
            n = 0

            def counted() -> Iterator[str]:
                nonlocal n
                for d in docs():
                    n += 1
                    yield d

            train_bpe(counted(), opts.vocab_size, opts.min_frequency, tokenizer_json)
            logger.info("trained tokenizer on %d documents in %.1f s -> %s", n,
                        time.time() - t0, tokenizer_json)
    t_tok = time.time() - t0

    enc = _Encoder(opts.tokenizer_type, tokenizer_json)
    key = opts.json_key
    doc_prefix = f"{out_prefix}_{key}_document"
    sent_prefix = f"{out_prefix}_{key}_sentence"
    doc_writer = _Writer(doc_prefix, enc.vocab_size)
    sent_writer = _Writer(sent_prefix, enc.vocab_size) if opts.split_sentences else None

    n_docs = 0
    next_log = opts.log_interval
    t1 = time.time()
    for batch in _batched(docs(), BATCH_DOCS):
        # Documents are always tokenized whole, so _document is the same with or without
        # --split-sentences (sentence-wise tokens differ in rare whitespace cases).
        for ids in enc.encode_batch(batch):
            doc_writer.add_document([ids + [enc.eod]])
        if sent_writer is not None:
            split = [split_sentences(d) for d in batch]
            flat = enc.encode_batch([s for sents in split for s in sents])
            pos = 0
            for sents in split:
                ids = flat[pos:pos + len(sents)]
                pos += len(sents)
                sentences = [c for s in ids for c in _chunks(s, opts.max_sentence_tokens)]
                if sentences:
                    sent_writer.add_document(sentences)
        n_docs += len(batch)
        if n_docs >= next_log:
            dt = time.time() - t1
            logger.info("%d documents, %.2f M tokens, %.0f docs/s, %.1f s", n_docs,
                        doc_writer.tokens / 1e6, n_docs / max(dt, 1e-9), dt)
            next_log += opts.log_interval
    if n_docs == 0:
        raise SystemExit(f"error: no non-empty documents in {', '.join(map(str, paths))}")
    doc_writer.finalize()
    if sent_writer is not None:
        sent_writer.finalize()
    total = time.time() - t0
    stats = {
        "documents": n_docs,
        "tokens": doc_writer.tokens,
        "vocab_size": enc.vocab_size,
        "document_prefix": doc_prefix,
        "bin_bytes": os.path.getsize(doc_prefix + ".bin"),
        "tokenizer_seconds": round(t_tok, 2),
        "seconds": round(total, 2),
    }
    if sent_writer is not None:
        stats["sentence_prefix"] = sent_prefix
        stats["sentences"] = sent_writer.sequences
    logger.info(
        "done in %.1f s (tokenizer %.1f s): %d documents, %d tokens (%.2f tokens/document), "
        "vocab %d, %s.bin %.2f MB%s", total, t_tok, n_docs, doc_writer.tokens,
        doc_writer.tokens / n_docs, enc.vocab_size, doc_prefix, stats["bin_bytes"] / 1e6,
        f"; {sent_writer.sequences} sentences in {sent_prefix}.bin/.idx" if sent_writer else "",
    )
    logger.info("use data.path=%s%s", doc_prefix,
                f" (GPT) or data.path={sent_prefix} (BERT)" if sent_writer else "")
    return stats
