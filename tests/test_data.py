"""Data pipeline: demo corpus -> preprocess (bpe, byte) -> megatron datasets -> iterators."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_moe_ext.config import ConfigError, load_config
from megatron_moe_ext.dataprep.demo_corpus import build as build_corpus
from megatron_moe_ext.dataprep.preprocess import PreprocessOptions, preprocess
from megatron_moe_ext.training import data as D

REPO = Path(__file__).resolve().parents[1]
N_DOCS = 300


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Demo corpus (CLI) + bpe preprocessing with sentences (CLI) + byte preprocessing."""
    root = tmp_path_factory.mktemp("data")
    jsonl = root / "bpe" / "corpus.jsonl"
    subprocess.run(
        [sys.executable, "scripts/build_demo_corpus.py", "--out", str(jsonl),
         "--max-docs", str(N_DOCS), "--min-chars", "100"],
        cwd=REPO, check=True, capture_output=True, text=True,
    )
    subprocess.run(
        [sys.executable, "scripts/preprocess_data.py", "--input", str(jsonl),
         "--output-prefix", str(root / "bpe" / "corpus"), "--tokenizer-type", "bpe",
         "--vocab-size", "512", "--split-sentences", "--workers", "2"],
        cwd=REPO, check=True, capture_output=True, text=True,
    )
    preprocess(PreprocessOptions([str(jsonl)], str(root / "byte" / "corpus"),
                                 tokenizer_type="byte"))
    texts = [json.loads(line)["text"] for line in jsonl.read_text().splitlines()]
    return {"root": root, "jsonl": jsonl, "texts": texts, "blob": "\x00".join(texts)}


def _cfg(corpus, kind="bpe", *extra):
    return load_config(None, [f"data.path={corpus['root'] / kind / 'corpus_text_document'}",
                              f"data.tokenizer.type={kind}", "model.seq_length=64",
                              "train.seed=1234", *extra])


def _clean(piece: str) -> str:
    # A byte-level sample can start/end inside a multi-byte character.
    return piece.strip("\ufffd")


# ------------------------------------------------------------------------ corpus / preprocess


def test_demo_corpus_is_deterministic_and_filtered(corpus, tmp_path):
    assert len(corpus["texts"]) == N_DOCS
    assert all(len(t) >= 100 and t == t.strip() for t in corpus["texts"])
    assert len(set(corpus["texts"])) == N_DOCS
    build_corpus(tmp_path / "a.jsonl", 40, 100)
    build_corpus(tmp_path / "b.jsonl", 40, 100)
    a = (tmp_path / "a.jsonl").read_bytes()
    assert a == (tmp_path / "b.jsonl").read_bytes()
    assert a.splitlines() == corpus["jsonl"].read_bytes().splitlines()[:40]


def test_preprocess_bpe_roundtrip(corpus):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    d = corpus["root"] / "bpe"
    assert (d / "tokenizer.json").is_file()
    tok = D.BPETokenizer(str(d / "tokenizer.json"))
    assert tok.vocab_size == 512
    assert (tok.pad, tok.eod, tok.mask, tok.cls, tok.sep) == (0, 1, 2, 3, 4)
    docs = IndexedDataset(str(d / "corpus_text_document"))
    assert len(docs) == N_DOCS
    for i in (0, 1, N_DOCS // 2, N_DOCS - 1):
        ids = docs[i].tolist()
        assert ids[-1] == tok.eod and tok.eod not in ids[:-1]
        assert max(ids) < tok.vocab_size and min(ids) >= 0
        assert tok.detokenize(ids[:-1]) == corpus["texts"][i]
    sents = IndexedDataset(str(d / "corpus_text_sentence"))
    doc_idx = sents.document_indices
    assert len(doc_idx) - 1 == N_DOCS
    assert np.mean(np.diff(doc_idx) >= 2) > 0.5  # most docstrings have several sentences
    for i in (0, 7, N_DOCS - 1):
        pieces = [sents[j].tolist() for j in range(doc_idx[i], doc_idx[i + 1])]
        assert tok.detokenize([t for p in pieces for t in p]) == corpus["texts"][i]
        assert tok.eod not in [t for p in pieces for t in p]


def test_preprocess_byte_roundtrip(corpus):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tok = D.ByteTokenizer()
    assert tok.vocab_size == 261 and (tok.pad, tok.eod) == (0, 1)
    assert not (corpus["root"] / "byte" / "tokenizer.json").exists()
    docs = IndexedDataset(str(corpus["root"] / "byte" / "corpus_text_document"))
    assert len(docs) == N_DOCS
    ids = docs[3].tolist()
    assert ids[-1] == tok.eod
    assert tok.detokenize(ids[:-1]) == corpus["texts"][3]
    assert tok.detokenize(tok.tokenize("héllo\n")) == "héllo\n"


def test_preprocess_errors(tmp_path):
    with pytest.raises(SystemExit, match="not found: .*missing.jsonl"):
        preprocess(PreprocessOptions([str(tmp_path / "missing.jsonl")], str(tmp_path / "x")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "abc"}\n')
    with pytest.raises(SystemExit, match="no key 'text'"):
        preprocess(PreprocessOptions([str(bad)], str(tmp_path / "x")))
    with pytest.raises(ValueError, match="--vocab-size must be > 261"):
        PreprocessOptions([str(bad)], str(tmp_path / "x"), vocab_size=100)
    # the front end turns the same check into a usage error
    proc = subprocess.run([sys.executable, "scripts/preprocess_data.py", "--input", str(bad),
                           "--output-prefix", str(tmp_path / "x"), "--vocab-size", "100"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "--vocab-size must be > 261" in proc.stderr


def test_plain_text_input_and_tokenizer_reuse(corpus, tmp_path):
    txt = tmp_path / "t.txt"
    txt.write_text("First paragraph. It has two sentences.\n\nSecond one\nspans two lines.\n")
    preprocess(PreprocessOptions(
        [str(txt)], str(tmp_path / "out" / "t"),
        tokenizer_path=str(corpus["root"] / "bpe" / "tokenizer.json")))
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tok = D.BPETokenizer(str(tmp_path / "out" / "tokenizer.json"))
    ds = IndexedDataset(str(tmp_path / "out" / "t_text_document"))
    assert [tok.detokenize(ds[i].tolist()[:-1]) for i in range(len(ds))] == [
        "First paragraph. It has two sentences.", "Second one\nspans two lines."]


# ------------------------------------------------------------------------ GPT datasets


@pytest.mark.parametrize("kind", ["bpe", "byte"])
def test_gpt_datasets(corpus, kind):
    cfg = _cfg(corpus, kind)
    tok = D.build_tokenizer(cfg)
    train, valid, test = D.build_datasets(cfg, tok, 200, 16, 0)
    assert test is None
    assert len(train) >= 200 and len(valid) >= 16
    it = D.build_data_iterator(train, 4, 0, 1, 0, cfg.train.seed)
    for _ in range(3):
        b = D.get_batch(cfg, it)
        assert b["tokens"].shape == b["labels"].shape == b["position_ids"].shape == (4, 64)
        assert b["tokens"].dtype == torch.long and b["loss_mask"].dtype == torch.float
        assert b["attention_mask"] is None
        assert 0 <= int(b["tokens"].min()) and int(b["tokens"].max()) < tok.vocab_size
        assert torch.equal(b["labels"][:, :-1], b["tokens"][:, 1:])
        assert torch.equal(b["position_ids"], torch.arange(64).expand(4, 64))
        assert torch.all(b["loss_mask"] == 1)
        for row in b["tokens"].tolist():
            text = tok.detokenize(row)
            pieces = [_clean(p) for p in text.split(D.EOD)]
            assert any(len(p) > 10 for p in pieces)
            for p in pieces:
                assert p in corpus["blob"], (kind, p)
    # The output prefix of preprocess_data.py is accepted as data.path too.
    cfg2 = load_config(None, [f"data.path={corpus['root'] / kind / 'corpus'}",
                              f"data.tokenizer.type={kind}", "model.seq_length=64"])
    t2, _, _ = D.build_datasets(cfg2, tok, 200, 16, 0)
    assert torch.equal(t2[5]["tokens"], train[5]["tokens"])


def test_mock_gpt_with_none_tokenizer():
    cfg = load_config(None, ["data.mock=true", "data.tokenizer.type=none",
                             "model.vocab_size=128", "model.seq_length=32"])
    tok = D.build_tokenizer(cfg)
    assert tok.vocab_size == 128 and tok.eod == 127
    train, valid, _ = D.build_datasets(cfg, tok, 64, 8, 0)
    b = D.get_batch(cfg, D.build_data_iterator(train, 2, 0, 1, 0, 0))
    assert b["tokens"].shape == (2, 32) and int(b["tokens"].max()) < 128
    with pytest.raises(ConfigError, match="model.vocab_size"):
        D.build_tokenizer(load_config(None, ["data.mock=true", "data.tokenizer.type=none"]))
    with pytest.raises(ConfigError, match="data.tokenizer.type=none"):
        D.build_tokenizer(load_config(None, ["data.mock=true"]))


# ------------------------------------------------------------------------ BERT datasets


def test_bert_dataset(corpus):
    cfg = load_config(None, [f"data.path={corpus['root'] / 'bpe' / 'corpus_text_sentence'}",
                             "model.type=bert", "model.seq_length=64", "data.mask_prob=0.15"])
    tok = D.build_tokenizer(cfg)
    train, valid, _ = D.build_datasets(cfg, tok, 100, 8, 0)
    assert len(train) >= 100
    it = D.build_data_iterator(train, 8, 0, 1, 0, 0)
    b = D.get_batch(cfg, it)
    assert set(b) == {"text", "types", "labels", "is_random", "loss_mask", "padding_mask",
                      "truncated"}
    text, labels, lm = b["text"], b["labels"], b["loss_mask"]
    assert text.shape == labels.shape == b["types"].shape == b["padding_mask"].shape == (8, 64)
    assert b["is_random"].shape == (8,) and set(b["is_random"].tolist()) <= {0, 1}
    assert lm.dtype == torch.float and lm.sum() > 0
    assert torch.all(text[:, 0] == tok.cls)
    assert torch.all((text == tok.sep).sum(1) == 2)  # sentence A <sep> sentence B <sep>
    assert set(b["padding_mask"].unique().tolist()) <= {0, 1}
    assert torch.all(text[b["padding_mask"] == 0] == 0)
    assert torch.all(labels[lm == 0] == -1)
    assert int(labels[lm == 1].min()) >= 0 and int(labels[lm == 1].max()) < tok.vocab_size
    assert 0 <= int(text.min()) and int(text.max()) < tok.vocab_size
    # Un-mask: each segment is a contiguous piece of one corpus document.
    orig = torch.where(lm == 1, labels, text)
    for row, pad in zip(orig.tolist(), b["padding_mask"].tolist()):
        row = [t for t, p in zip(row, pad) if p]
        seps = [i for i, t in enumerate(row) if t == tok.sep]
        for seg in (row[1:seps[0]], row[seps[0] + 1:seps[1]]):
            assert seg and _clean(tok.detokenize(seg)) in corpus["blob"]


def test_bert_needs_sentence_split(corpus):
    cfg = load_config(None, [f"data.path={corpus['root'] / 'bpe' / 'corpus_text_document'}",
                             "model.type=bert", "model.seq_length=64"])
    with pytest.raises(ConfigError, match="--split-sentences"):
        D.build_datasets(cfg, D.build_tokenizer(cfg), 32, 0, 0)
    # Without the sentence-order head, one "sentence" per document is fine.
    cfg = load_config(None, [f"data.path={corpus['root'] / 'bpe' / 'corpus_text_document'}",
                             "model.type=bert", "model.seq_length=64", "model.bert_binary_head=false"])
    train, _, _ = D.build_datasets(cfg, D.build_tokenizer(cfg), 32, 0, 0)
    assert len(train) >= 32 and torch.all(torch.as_tensor(train[0]["types"]) == 0)


# ------------------------------------------------------------------------ iterators


def test_iterator_skip_matches_uninterrupted_run(corpus):
    cfg = _cfg(corpus)
    train, _, _ = D.build_datasets(cfg, D.build_tokenizer(cfg), 200, 0, 0)
    full = D.build_data_iterator(train, 2, 0, 1, 0, 0)
    seq = [D.get_batch(cfg, full)["tokens"] for _ in range(8)]
    resumed = D.build_data_iterator(train, 2, 0, 1, 6, 0)  # 6 samples = 3 micro-batches
    for k in range(3, 8):
        assert torch.equal(D.get_batch(cfg, resumed)["tokens"], seq[k])


def test_iterator_data_parallel_slices():
    total, mbs, dp = 50, 3, 4
    seen = []
    for r in range(dp):
        s = iter(D.DataParallelSequentialBatchSampler(total, mbs, r, dp, consumed_samples=6))
        seen.append([next(s) for _ in range(3)])
    for step in range(3):
        glob = [i for r in range(dp) for i in seen[r][step]]
        assert glob == [(6 + step * mbs * dp + j) % total for j in range(mbs * dp)]
        assert len(set(glob)) == mbs * dp  # disjoint across ranks
    # Resuming after two global batches gives rank r its third micro-batch of the full run.
    for r in range(dp):
        s = iter(D.DataParallelSequentialBatchSampler(total, mbs, r, dp, 6 + 2 * mbs * dp))
        assert next(s) == seen[r][2]


def test_dp_ranks_get_disjoint_real_batches(corpus):
    cfg = _cfg(corpus)
    train, _, _ = D.build_datasets(cfg, D.build_tokenizer(cfg), 200, 0, 0)
    single = D.build_data_iterator(train, 4, 0, 1, 0, 0)
    glob = torch.cat([D.get_batch(cfg, single)["tokens"] for _ in range(2)])
    r0 = D.build_data_iterator(train, 2, 0, 2, 0, 0)
    r1 = D.build_data_iterator(train, 2, 1, 2, 0, 0)
    got = []
    for _ in range(2):
        got += [D.get_batch(cfg, r0)["tokens"], D.get_batch(cfg, r1)["tokens"]]
    assert torch.equal(torch.cat(got), glob)


# ------------------------------------------------------------------------ errors


def test_missing_data_path_errors(corpus, tmp_path):
    cfg = load_config(None, [f"data.path={tmp_path / 'nope' / 'corpus_text_document'}",
                             "data.tokenizer.type=byte"])
    with pytest.raises(FileNotFoundError, match=r"data.path=.*nope.*preprocess_data.py"):
        D.build_datasets(cfg, D.build_tokenizer(cfg), 10, 0, 0)
    cfg = load_config(None, [f"data.path={tmp_path / 'nope' / 'corpus_text_document'}"])
    with pytest.raises(FileNotFoundError, match="tokenizer.json.*preprocess_data.py"):
        D.build_tokenizer(cfg)


def test_empty_split_is_a_clear_error(corpus):
    cfg = _cfg(corpus, "bpe", "data.split=999,1,0")  # 300 docs: valid gets none
    tok = D.build_tokenizer(cfg)
    with pytest.raises(ConfigError, match="valid split .* empty"):
        D.build_datasets(cfg, tok, 10, 10, 0)
    train, valid, test = D.build_datasets(cfg, tok, 10, 0, 0)  # not requested: not built
    assert len(train) >= 10 and valid is None and test is None
