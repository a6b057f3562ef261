"""Perplexity over non-overlapping windows: equal to a direct computation, tail dropped, batch-size
independent; text files tokenized in pieces give the whole file's ids; the CLI writes the JSON and card row."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sparselm.cli.main import main
from sparselm.data.corpus import CorpusError
from sparselm.data.paths import data_root
from sparselm.evaluation import perplexity as ppl_module
from sparselm.evaluation.perplexity import eval_tokens, perplexity, text_pieces
from sparselm.models.runs import load_run, load_tokenizer
from sparselm.pruning.calibration import run_corpus


@pytest.fixture
def tiny_model(tiny_run):
    torch.manual_seed(0)
    model, tok, _, _ = load_run(tiny_run)
    return model, tok


def direct_nll(model, tokens, seqlen):
    """Summed NLL and count over full windows, one window at a time, with plain cross_entropy."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(tokens.numel() // seqlen):
            w = tokens[i * seqlen: (i + 1) * seqlen]
            logits = model(input_ids=w[None]).logits[0]
            total += F.cross_entropy(logits[:-1].double(), w[1:], reduction="sum").item()
            count += seqlen - 1
    return total, count


def test_perplexity_is_the_direct_computation_tail_dropped_any_batch(tiny_model):
    model, tok = tiny_model
    tokens = torch.randint(0, len(tok), (200,), generator=torch.Generator().manual_seed(1))
    r = perplexity(model, tokens, 32, batch_size=4)
    total, count = direct_nll(model, tokens, 32)
    assert (r["n_windows"], r["n_tokens_scored"], r["seqlen"], r["n_tokens_dropped"]) == (6, count, 32, 200 - 6 * 32)
    assert r["nll"] == pytest.approx(total / count, rel=1e-6)
    assert r["ppl"] == math.exp(r["nll"])  # (exp turns the fp32 sum's ~1e-7 relative error into ~1e-6)
    # the tail shorter than a window is never read
    other_tail = tokens.clone()
    other_tail[6 * 32:] = (other_tail[6 * 32:] + 1) % len(tok)
    assert perplexity(model, other_tail, 32)["nll"] == pytest.approx(r["nll"], rel=1e-6)
    assert perplexity(model, tokens[: 6 * 32], 32)["n_tokens_dropped"] == 0
    for batch in (1, 4, 32):
        assert perplexity(model, tokens, 32, batch_size=batch)["ppl"] == pytest.approx(r["ppl"], rel=1e-5)


def test_perplexity_restores_training_mode_and_checks_seqlen(tiny_model):
    model, tok = tiny_model
    model.train()
    tokens = torch.arange(100) % len(tok)
    perplexity(model, tokens, 10)
    assert model.training
    with pytest.raises(ValueError, match="context of 256"):
        perplexity(model, tokens, 257)
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, tokens[:9], 10)


def test_vocab_size_leaves_padding_columns_out(tiny_model):
    model, tok = tiny_model
    tokens = torch.randint(0, 100, (200,), generator=torch.Generator().manual_seed(2))
    full, cut = perplexity(model, tokens, 50), perplexity(model, tokens, 50, vocab_size=100)
    with torch.no_grad():
        logits = model(input_ids=tokens.view(4, 50)).logits[:, :-1, :100]
    direct = F.cross_entropy(logits.reshape(-1, 100).double(), tokens.view(4, 50)[:, 1:].reshape(-1)).item()
    assert cut["nll"] == pytest.approx(direct, rel=1e-6) and cut["nll"] < full["nll"]


def held_out(tmp_path, chars: int):
    text = (data_root() / "corpus" / "brown.txt").read_text(encoding="utf-8")[:chars]
    path = tmp_path / "held-out.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def text_file(tmp_path):
    """About 700 GPT-2 tokens: the CLI tests' model has a 50k vocabulary."""
    return held_out(tmp_path, 3_000)


@pytest.mark.parametrize("which", ["gpt2", "trained bpe"])
def test_text_in_pieces_gives_the_whole_files_ids(tmp_path, monkeypatch, tiny_run, sparse_run, which):
    tok = load_tokenizer(tiny_run if which == "gpt2" else sparse_run)
    text_file = held_out(tmp_path, 20_000)
    monkeypatch.setattr(ppl_module, "CHUNK_CHARS", 500)
    assert len(list(text_pieces(text_file, 500))) > 10
    assert "".join(text_pieces(text_file, 500)) == text_file.read_text(encoding="utf-8")
    ids = eval_tokens(text_file, tok, cache_dir=tmp_path / "cache")
    assert ids.dtype == torch.int64 and ids.dim() == 1
    assert ids.tolist() == tok(text_file.read_text(encoding="utf-8")).input_ids
    cached = list((tmp_path / "cache" / "eval-tokens").glob("*.npy"))
    assert len(cached) == 1
    np.save(cached[0], np.zeros(3, dtype=np.uint32))  # the second call reads the cache
    assert eval_tokens(text_file, tok, cache_dir=tmp_path / "cache").tolist() == [0, 0, 0]


def test_a_tokenizer_that_prefixes_each_text_gets_the_whole_file(tmp_path, monkeypatch):
    """SentencePiece-style ("▁" before each call's text): pieces would change the ids, so none are cut."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text_file = held_out(tmp_path, 8_000)
    text = text_file.read_text(encoding="utf-8")
    sp = Tokenizer(models.BPE(unk_token="<unk>"))
    sp.pre_tokenizer, sp.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    sp.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"], show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=sp, eos_token="</s>", unk_token="<unk>")
    monkeypatch.setattr(ppl_module, "CHUNK_CHARS", 500)
    in_pieces = [i for piece in text_pieces(text_file, 500) for i in tok(piece).input_ids]
    assert in_pieces != tok(text).input_ids  # what cutting would do to this tokenizer
    assert eval_tokens(text_file, tok, cache_dir=tmp_path / "cache").tolist() == tok(text).input_ids


def test_prepared_dir_gives_its_validation_split(sparse_run, tiny_run):
    corpus = run_corpus(sparse_run)
    ids = eval_tokens(corpus.dir, load_tokenizer(sparse_run))
    files = sorted(corpus.dir.glob("val-*.bin"))
    assert ids.tolist() == np.concatenate([np.fromfile(f, dtype=corpus.dtype) for f in files]).tolist()
    with pytest.raises(CorpusError, match="another tokenizer"):
        eval_tokens(corpus.dir, load_tokenizer(tiny_run))
    with pytest.raises(ValueError, match="not a prepared corpus"):
        eval_tokens(sparse_run, load_tokenizer(sparse_run))


def test_cli_writes_the_json_and_the_card_row(tiny_run, text_file, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSELM_CACHE", str(tmp_path / "cache"))
    assert main(["evaluate", "--from", str(tiny_run), "--task", "perplexity", "--data", str(text_file),
                 "--seqlen", "32", "--no-progress"]) == 0
    path = tiny_run / "eval" / "perplexity-held-out-32.json"
    assert str(path) in capsys.readouterr().out
    result = json.loads(path.read_text())
    model, tok, _, _ = load_run(tiny_run)
    expected = perplexity(model, torch.tensor(tok(text_file.read_text()).input_ids), 32)
    assert result["task"] == "perplexity" and result["ppl"] == pytest.approx(expected["ppl"], rel=1e-5)
    card = (tiny_run / "README.md").read_text()
    assert "## Evaluation" in card and f"| `held-out.txt` | 32 | {expected['n_windows']} |" in card
    assert f"{result['ppl']:.3f} |" in card
    # the default window: the model's context (256)
    assert main(["evaluate", "--from", str(tiny_run), "--task", "perplexity", "--data", str(text_file), "--no-progress"]) == 0
    assert (tiny_run / "eval" / "perplexity-held-out-256.json").is_file()


@pytest.mark.parametrize("args, message", [
    (["--task", "perplexity"], "data: required with task perplexity"),
    (["--data", "x.txt"], "data: only for --task perplexity"),
    (["--seqlen", "8"], "seqlen: only for --task perplexity"),
    (["--task", "perplexity", "--data", "nowhere.txt"], "nowhere.txt: no such file"),
    (["--task", "perplexity", "--data", "TEXT", "--seqlen", "1000"], "context of 256"),
])
def test_cli_errors(tiny_run, text_file, capsys, monkeypatch, tmp_path, args, message):
    monkeypatch.setenv("SPARSELM_CACHE", str(tmp_path / "cache"))
    args = [str(text_file) if a == "TEXT" else a for a in args]
    assert main(["evaluate", "--from", str(tiny_run), *args, "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_cli_never_writes_into_a_foreign_model_dir(tiny_run, text_file, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSELM_CACHE", str(tmp_path / "cache"))
    (tiny_run / "summary.json").unlink()  # now an HF directory from elsewhere
    assert main(["evaluate", "--from", str(tiny_run), "--task", "perplexity", "--data", str(text_file),
                 "--seqlen", "16", "--no-progress"]) == 2
    assert "--out" in capsys.readouterr().err
    out = tmp_path / "evals"
    assert main(["evaluate", "--from", str(tiny_run), "--task", "perplexity", "--data", str(text_file),
                 "--seqlen", "16", "--out", str(out), "--no-progress"]) == 0
    assert (out / "perplexity-held-out-16.json").is_file() and not (tiny_run / "eval").exists()
