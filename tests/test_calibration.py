"""Calibration tokens: seeded windows that are real slices of the source, a .npy used exactly as given,
and clear errors for files that do not fit the model or corpora of another tokenizer."""

import json

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from sparselm.data.corpus import CorpusError
from sparselm.models.loss import encode_pairs
from sparselm.models.runs import load_tokenizer
from sparselm.pruning.calibration import CalibrationError, calibration_tokens, random_windows, run_corpus, task_stream

V, CONTEXT = 512, 128  # sparse_run's vocabulary and context


@pytest.fixture(scope="module")
def run_tok(sparse_run):
    return load_tokenizer(sparse_run)


def shard_tokens(corpus, split="train") -> np.ndarray:
    """A split's ids read straight from its shard files (not through ShardedTokens)."""
    files = sorted(corpus.dir.glob(f"{split}-*.bin"))
    return np.concatenate([np.fromfile(f, dtype=np.dtype(corpus.dtype).newbyteorder("<")) for f in files]).astype(np.int64)


def is_slice(window: np.ndarray, tokens: np.ndarray) -> bool:
    return bool((sliding_window_view(tokens, window.size) == window).all(axis=1).any())


def test_corpus_windows_are_seeded_slices_of_the_runs_train_split(sparse_run, run_tok, cache_dir):
    corpus = run_corpus(sparse_run)
    assert corpus.dir.parent.parent == cache_dir  # found where pre-training prepared it, not prepared again
    x = calibration_tokens("corpus", run_tok, V, nsamples=6, seqlen=20, context=CONTEXT, seed=3, run_dir=sparse_run)
    assert x.shape == (6, 20) and x.dtype == torch.int64
    assert torch.equal(x, calibration_tokens("corpus", run_tok, V, nsamples=6, seqlen=20, context=CONTEXT, seed=3,
                                             run_dir=sparse_run))
    assert not torch.equal(x, calibration_tokens("corpus", run_tok, V, nsamples=6, seqlen=20, context=CONTEXT, seed=4,
                                                 run_dir=sparse_run))
    train = shard_tokens(corpus)
    assert all(is_slice(w, train) for w in x.numpy())
    # the defaults: 128 windows of the model's context
    assert calibration_tokens("corpus", run_tok, V, context=CONTEXT, run_dir=sparse_run).shape == (128, CONTEXT)
    # the same corpus named by its directory gives the same windows
    assert torch.equal(x, calibration_tokens(str(corpus.dir), run_tok, V, nsamples=6, seqlen=20, context=CONTEXT, seed=3))


def test_corpus_of_a_pruned_or_finetuned_run_is_its_pretraining_runs(sparse_run, run_tok, tmp_path):
    pruned, tuned = tmp_path / "pruned", tmp_path / "tuned"
    for d, summary in ((pruned, {"kind": "pretrain", "pruned_from": str(sparse_run)}),
                       (tuned, {"kind": "finetune", "source_run": str(pruned)})):
        d.mkdir()
        (d / "summary.json").write_text(json.dumps(summary))
    args = dict(nsamples=3, seqlen=10, context=CONTEXT, seed=1)
    expected = calibration_tokens("corpus", run_tok, V, run_dir=sparse_run, **args)
    assert torch.equal(calibration_tokens("corpus", run_tok, V, run_dir=tuned, **args), expected)


def test_corpus_of_another_tokenizer_is_refused(sparse_run, tiny_run):
    gpt2 = load_tokenizer(tiny_run)
    corpus_dir = run_corpus(sparse_run).dir
    with pytest.raises(CorpusError, match="another tokenizer") as e:
        calibration_tokens(str(corpus_dir), gpt2, len(gpt2), nsamples=2, seqlen=8, context=64)
    assert str(corpus_dir) in str(e.value) and str(tiny_run) in str(e.value)
    with pytest.raises(CorpusError, match="another tokenizer"):
        calibration_tokens("corpus", gpt2, len(gpt2), nsamples=2, seqlen=8, context=64, run_dir=sparse_run)


def test_corpus_needs_a_pretraining_run(tiny_run, run_tok):
    with pytest.raises(CalibrationError, match="run_dir"):
        calibration_tokens("corpus", run_tok, V, context=CONTEXT)
    with pytest.raises(CalibrationError, match="no sparselm pre-training run"):
        calibration_tokens("corpus", run_tok, V, context=CONTEXT, run_dir=tiny_run)
    with pytest.raises(CalibrationError, match="not 'corpus'"):
        calibration_tokens("nowhere", run_tok, V, context=CONTEXT)


@pytest.fixture
def jsonl_task(tmp_path):
    rows = [{"source": f"name[Cafe {i}], area[riverside]", "target": f"Cafe {i} is by the river, number {i * i}."}
            for i in range(40)]
    for split in ("train", "validation", "test"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return tmp_path


def test_task_windows_slice_the_shuffled_training_pairs_as_finetuning_encodes_them(run_tok, jsonl_task):
    from sparselm.data.tasks import load_task

    pairs = load_task("jsonl", jsonl_task).pairs("train")
    encoded, _ = encode_pairs(run_tok, pairs, block_size=10**9)
    stream = task_stream("jsonl", run_tok, np.random.default_rng(0), jsonl_task)
    # the stream is every pair's ids (prompt + target + EOS) once, in a shuffled order
    ends = np.flatnonzero(stream == run_tok.eos_token_id) + 1
    pieces = [tuple(p) for p in np.split(stream, ends)[:-1]]
    assert sorted(pieces) == sorted(tuple(ids) for ids, _ in encoded)
    assert pieces != [tuple(ids) for ids, _ in encoded]  # shuffled

    args = dict(nsamples=5, seqlen=16, context=CONTEXT, task_dir=jsonl_task)
    x = calibration_tokens("task:jsonl", run_tok, V, seed=7, **args)
    assert x.shape == (5, 16)
    assert torch.equal(x, calibration_tokens("task:jsonl", run_tok, V, seed=7, **args))
    assert not torch.equal(x, calibration_tokens("task:jsonl", run_tok, V, seed=8, **args))
    shuffled = task_stream("jsonl", run_tok, np.random.default_rng(7), jsonl_task)  # the same rng then draws the starts
    assert all(is_slice(w, shuffled) for w in x.numpy())


def test_task_e2e_by_default_folder(run_tok):
    x = calibration_tokens("task:e2e", run_tok, V, nsamples=4, seqlen=CONTEXT, context=CONTEXT)
    assert x.shape == (4, CONTEXT) and (x == run_tok.eos_token_id).any()  # pairs end with EOS


def test_windows_need_seqlen_plus_one_tokens():
    rng = np.random.default_rng(0)
    with pytest.raises(CalibrationError, match="10 tokens, fewer than seqlen \\+ 1 = 11"):
        random_windows(np.arange(10), 2, 10, rng, "tiny")
    w = random_windows(np.arange(11), 50, 10, rng, "tiny")
    assert {int(r[0]) for r in w} == {0, 1}  # both starts, 0 and N - seqlen, are drawn
    assert all((r == np.arange(r[0], r[0] + 10)).all() for r in w)


def test_seqlen_beyond_the_context_is_refused(run_tok, sparse_run):
    with pytest.raises(CalibrationError, match="context of 128"):
        calibration_tokens("corpus", run_tok, V, seqlen=129, context=CONTEXT, run_dir=sparse_run)


def test_npy_is_used_exactly_as_given(tmp_path, run_tok):
    ids = np.random.default_rng(0).integers(0, V, size=(3, 10)).astype(np.int32)
    path = tmp_path / "calib.npy"
    np.save(path, ids)
    x = calibration_tokens(str(path), run_tok, V, context=CONTEXT, seed=99)  # the seed changes nothing
    assert x.dtype == torch.int64 and np.array_equal(x.numpy(), ids)
    assert torch.equal(x, calibration_tokens(path, run_tok, V, nsamples=3, seqlen=10, context=CONTEXT))


BAD_NPY = {
    "1-D": (np.arange(10), {}, "not 2-D"),
    "3-D": (np.zeros((2, 3, 4), dtype=np.int64), {}, "not 2-D"),
    "float": (np.zeros((2, 4), dtype=np.float32), {}, "not integer"),
    "bool": (np.zeros((2, 4), dtype=bool), {}, "not integer"),
    "empty": (np.zeros((0, 4), dtype=np.int64), {}, "empty"),
    "negative": (np.array([[1, -1]]), {}, "outside the model's vocabulary"),
    "too large": (np.array([[1, V]]), {}, "outside the model's vocabulary"),
    "longer than context": (np.zeros((2, CONTEXT + 1), dtype=np.int64), {}, "longer than the model's context"),
    "nsamples differs": (np.zeros((2, 4), dtype=np.int64), {"nsamples": 3}, "exactly as given"),
    "seqlen differs": (np.zeros((2, 4), dtype=np.int64), {"seqlen": 8}, "exactly as given"),
    "objects": (np.array([[1, "a"]], dtype=object), {}, "cannot read it"),
}


@pytest.mark.parametrize("case", sorted(BAD_NPY))
def test_bad_npy_is_one_clear_error(tmp_path, run_tok, case):
    array, kw, message = BAD_NPY[case]
    path = tmp_path / "bad.npy"
    np.save(path, array, allow_pickle=True)
    with pytest.raises(CalibrationError, match=message) as e:
        calibration_tokens(str(path), run_tok, V, context=CONTEXT, **kw)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_missing_npy_names_the_file(tmp_path, run_tok):
    with pytest.raises(CalibrationError, match="missing.npy: cannot read it"):
        calibration_tokens(str(tmp_path / "missing.npy"), run_tok, V, context=CONTEXT)
