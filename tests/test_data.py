"""Corpus reading, tokenization cache, batches, and clear errors on bad input."""

import json
import re

import numpy as np
import pytest

from sparselm.data import EOS_TOKEN, CorpusError, get_batch, prepare_corpus, read_documents, train_tokenizer
from sparselm.data.corpus import is_validation, token_dtype
from sparselm.data.loader import eval_batches


def test_prepare_corpus_tokenizes_and_caches(small_corpus, tmp_path):
    logs = []
    tc = prepare_corpus(small_corpus, 512, cache_dir=tmp_path, log=logs.append)
    assert tc.dtype == "uint16" and tc.train_tokens > 10 * tc.val_tokens > 0
    train = tc.train()[:]
    assert train.max() < 512 and (train == tc.eos_id).sum() > 10  # documents end in EOS
    text = "The jury said Friday"
    assert tc.tokenizer().decode(tc.tokenizer().encode(text).ids) == text
    # a unigram model is far better than uniform but far from zero
    assert 3.0 < tc.unigram_entropy < np.log(512)
    assert logs[-1].startswith("corpus: ") and f"-> {tc.dir}" in logs[-1]  # the summary
    logs.clear()
    again = prepare_corpus(small_corpus, 512, cache_dir=tmp_path, log=logs.append)
    assert again.dir == tc.dir and len(logs) == 1 and logs[0].startswith("corpus: ")  # second call reads the cache


def test_default_path_gives_the_tokens_of_the_in_memory_pipeline(small_corpus, tmp_path):
    """Streaming, sharding and workers change nothing for the trained-BPE default: the tokenizer and the
    tokens are those of reading every document into a list, training on the train split, encoding it in one call."""
    docs = [d.strip() for f in sorted(small_corpus.glob("*.txt")) for d in re.split(r"\n\s*\n", f.read_text()) if d.strip()]
    train_docs = [d for d in docs if not is_validation(d, 0.02)]
    tok = train_tokenizer(train_docs, 512)
    eos = tok.token_to_id(EOS_TOKEN)
    expected = np.concatenate([np.array(e.ids + [eos], dtype=np.uint16) for e in tok.encode_batch(train_docs)])
    tc = prepare_corpus(small_corpus, 512, cache_dir=tmp_path, workers=2, shard_tokens=10_000, log=lambda *_: None)
    assert tc.tokenizer().to_str() == tok.to_str() and len(tc.shards["train"]) > 10
    assert np.array_equal(tc.train()[:], expected)


def test_jsonl_corpus_and_split_is_stable(tmp_path):
    rows = [{"text": f"document number {i} says hello to the world"} for i in range(300)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    docs = list(read_documents(tmp_path))
    assert len(docs) == 300
    a = prepare_corpus(tmp_path, 300, cache_dir=tmp_path / "c1", log=lambda *_: None)
    b = prepare_corpus(tmp_path, 300, cache_dir=tmp_path / "c2", log=lambda *_: None)
    assert np.array_equal(a.val()[:], b.val()[:])


@pytest.mark.parametrize(
    "setup,match",
    [
        (lambda d: None, "does not exist"),
        (lambda d: d.mkdir(), "no corpus files under"),
        (lambda d: (d.mkdir(), (d / "a.txt").write_text("\n\n  \n")), "holds no text"),
        (lambda d: (d.mkdir(), (d / "a.txt").write_bytes(b"abc\x00\x01\x02")), r"a\.txt: looks like a binary file"),
        (lambda d: (d.mkdir(), (d / "a.txt").write_bytes(b"caf\xe9 latin-1")), r"a\.txt: not valid UTF-8"),
        (lambda d: (d.mkdir(), (d / "a.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')), r"a\.jsonl:2: no field 'text' \(the row has: body\)"),
        (lambda d: (d.mkdir(), (d / "a.jsonl").write_text("{oops\n")), r"a\.jsonl:1: invalid JSON"),
    ],
)
def test_bad_corpus_gives_clear_error(tmp_path, setup, match):
    d = tmp_path / "corpus"
    setup(d)
    with pytest.raises(CorpusError, match=match):
        prepare_corpus(d, 512, cache_dir=tmp_path / "cache", log=lambda *_: None)


def test_vocab_larger_than_dtype():
    assert token_dtype(65536) == "uint16" and token_dtype(65537) == "uint32"
    with pytest.raises(CorpusError, match="does not fit"):
        token_dtype(2**33)


def test_batches_are_seeded_by_step():
    tokens = np.arange(10_000, dtype=np.uint16)
    x1, y1 = get_batch(tokens, 4, 16, seed=1, index=5)
    x2, _ = get_batch(tokens, 4, 16, seed=1, index=5)
    x3, _ = get_batch(tokens, 4, 16, seed=1, index=6)
    assert x1.shape == (4, 16) and x1.dtype.is_floating_point is False
    assert (x1 == x2).all() and not (x1 == x3).all()
    assert (y1[:, :-1] == x1[:, 1:]).all()  # targets are inputs shifted by one
    with pytest.raises(ValueError, match="fewer than one window"):
        get_batch(tokens[:10], 1, 16, 0, 0)
    batches = list(eval_batches(tokens, 4, 16, 3))
    assert len(batches) == 3 and all(x.shape == (4, 16) for x, _ in batches)
