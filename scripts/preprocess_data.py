#!/usr/bin/env python3
"""Tokenize text into a Megatron indexed dataset (``.bin`` + ``.idx``).

Input: JSON-lines files (one document per line, text under ``--json-key``) or plain-text
files (one document per blank-line-separated paragraph, or per line with ``--split-lines``).

Output, for ``--output-prefix DIR/NAME`` and json key ``text``:

* ``DIR/NAME_text_document.bin/.idx`` -- one sequence per document, each ending with the EOD
  token ``<|endoftext|>``. This is ``data.path`` for GPT.
* with ``--split-sentences`` also ``DIR/NAME_text_sentence.bin/.idx`` -- one sequence per
  sentence, grouped into documents (no EOD; document boundaries live in the index). This is the
  layout megatron's BERT dataset needs (its sentence-order head pairs sentences of a
  document); use it as ``data.path`` for ``model.type: bert``.
* ``DIR/tokenizer.json`` -- for ``--tokenizer-type bpe``: a byte-level BPE trained on the input
  with the ``tokenizers`` package (special tokens ``<pad>`` ``<|endoftext|>`` ``<mask>``
  ``<cls>`` ``<sep>`` get ids 0..4), or a copy of ``--tokenizer-path``. Training builds look for
  it next to ``data.path``.

Example::

    python scripts/build_demo_corpus.py --out data/demo/corpus.jsonl
    python scripts/preprocess_data.py --input data/demo/corpus.jsonl \\
        --output-prefix data/demo/corpus --tokenizer-type bpe --vocab-size 4096
"""

from __future__ import annotations

import argparse
import logging
import warnings
from typing import Optional

from megatron_moe_ext.cli import parse_options
from megatron_moe_ext.dataprep.preprocess import PreprocessOptions, preprocess

D = PreprocessOptions  # option defaults are the library's


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Tokenize jsonl or plain-text files into a Megatron indexed dataset "
        "<output-prefix>_<json-key>_document.bin/.idx (EOD after every document), optionally "
        "also a sentence-split <output-prefix>_<json-key>_sentence.bin/.idx for BERT.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    io = p.add_argument_group("input / output")
    io.add_argument("--input", nargs="+", required=True,
                    help="input files: .jsonl/.json (one JSON object per line) or plain text")
    io.add_argument("--input-format", choices=["auto", "jsonl", "text"],
                    default=D.input_format,
                    help="auto: .jsonl/.json/.ndjson are JSON lines, anything else plain text")
    io.add_argument("--json-key", default=D.json_key,
                    help="JSON field holding the document text")
    io.add_argument("--split-lines", action="store_true",
                    help="plain text: one document per line (default: per blank-line-separated "
                    "paragraph)")
    io.add_argument("--output-prefix", required=True,
                    help="output path prefix; files <prefix>_<json-key>_document.bin/.idx are "
                    "written, and tokenizer.json goes to its directory")
    io.add_argument("--split-sentences", action="store_true",
                    help="also write <prefix>_<json-key>_sentence.bin/.idx: one sequence per "
                    "sentence, grouped by document (needed by BERT's sentence-order head)")
    io.add_argument("--max-sentence-tokens", type=int, default=D.max_sentence_tokens,
                    help="with --split-sentences, cut longer sentences into pieces of this many "
                    "tokens (megatron's BERT sampler drops documents with a sentence > 512)")
    tk = p.add_argument_group("tokenizer")
    tk.add_argument("--tokenizer-type", choices=["bpe", "byte"], default=D.tokenizer_type,
                    help="bpe: byte-level BPE (trained here unless --tokenizer-path); "
                    "byte: UTF-8 bytes + 5 special tokens (vocab 261)")
    tk.add_argument("--vocab-size", type=int, default=D.vocab_size,
                    help="BPE vocabulary size to train")
    tk.add_argument("--min-frequency", type=int, default=D.min_frequency,
                    help="BPE: minimum pair frequency for a merge")
    tk.add_argument("--tokenizer-path", default=None,
                    help="reuse this tokenizer.json instead of training one (copied next to the "
                    "output)")
    rt = p.add_argument_group("runtime")
    rt.add_argument("--workers", type=int, default=None,
                    help="threads for BPE training and encoding (default: all cores)")
    rt.add_argument("--log-interval", type=int, default=D.log_interval,
                    help="log progress every this many documents")
    rt.add_argument("--log-level", default=D.log_level,
                    choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def main(argv: Optional[list[str]] = None) -> dict:
    opts = parse_options(build_parser(), PreprocessOptions, argv)
    logging.basicConfig(level=opts.log_level, format="%(asctime)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    logging.getLogger("megatron").setLevel(max(logging.WARNING, logging.getLogger().level))
    return preprocess(opts)


if __name__ == "__main__":
    main()
