"""Corpus preparation: every input format, streaming in bounded memory, workers, kill and resume,
token shards and the loader across them, pretrained tokenizers, and the promised errors."""

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import psutil
import pytest
import torch

from sparselm.cli.main import main
from sparselm.data import CorpusError, ShardedTokens, TokenizerError, get_batch, prepare_corpus, read_documents
from sparselm.data import prepare as prepare_module
from sparselm.data import sources
from sparselm.data.corpus import TokenizedCorpus
from sparselm.data.loader import eval_batches
from sparselm.data.tokenizer import load_pretrained
from sparselm.data.paths import data_root

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard")
datasets = pytest.importorskip("datasets")

QUIET = dict(log=lambda *_: None)
# GPT2TokenizerFast(vocab.json, merges.txt) -- the official GPT-2 BPE -- on SENTENCE
SENTENCE = "Hello world, this is GPT-2. Sparse pre-training costs 2.5x fewer FLOPs:  naïve café — 東京 🙂!"
SENTENCE_IDS = [15496, 995, 11, 428, 318, 402, 11571, 12, 17, 13, 1338, 17208, 662, 12, 34409, 3484, 362, 13, 20, 87,
                7380, 9977, 3185, 82, 25, 220, 41492, 40304, 851, 10545, 251, 109, 12859, 105, 32485, 0]


@pytest.fixture(scope="module")
def docs(small_corpus):
    """400 real English documents of three lines each."""
    lines = [line.strip() for f in sorted(small_corpus.iterdir()) for line in f.read_text().splitlines() if line.strip()]
    return ["\n".join(lines[i : i + 3]) for i in range(0, 1200, 3)]


def prep(corpus, tmp_path, name="cache", **kw):
    kw.setdefault("tokenizer", "gpt2")
    kw.setdefault("workers", 1)
    return prepare_corpus(corpus, 512, cache_dir=tmp_path / name, **{**QUIET, **kw})


def tokens(corpus: TokenizedCorpus, split="train") -> np.ndarray:
    return np.asarray(corpus.split(split)[:])


def write(folder, name, data: bytes):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    return folder


def jsonl(docs, field="text") -> bytes:
    return "".join(json.dumps({"id": i, field: d}) + "\n" for i, d in enumerate(docs)).encode()


# ---- input formats -----------------------------------------------------------------------------
def make_formats(root, docs):
    half = len(docs) // 2
    out = {
        "txt": write(root / "txt", "a.txt", "\n\n".join(docs).encode()),
        "txt.gz": write(root / "txtgz", "a.txt.gz", gzip.compress("\n\n".join(docs).encode())),
        "jsonl": write(root / "jsonl", "a.jsonl", jsonl(docs)),
        "jsonl.gz": write(root / "gz", "a.jsonl.gz", gzip.compress(jsonl(docs))),
        "jsonl.zst": write(root / "zst", "a.jsonl.zst", zstandard.ZstdCompressor().compress(jsonl(docs))),
    }
    # two files: read in sorted order
    write(root / "two", "1.jsonl", jsonl(docs[:half]))
    out["two files"] = write(root / "two", "2.txt", "\n\n".join(docs[half:]).encode())
    (root / "parquet").mkdir()
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), root / "parquet" / "a.parquet", row_group_size=50)
    out["parquet"] = root / "parquet"
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(root / "hf"), num_shards=3)
    out["datasets save_to_disk"] = root / "hf"
    return out


def test_every_input_format_gives_the_same_documents_and_tokens(tmp_path, docs):
    formats = make_formats(tmp_path / "in", docs)
    for name, folder in formats.items():
        assert list(read_documents(folder)) == docs, name
    a = prep(formats["txt"], tmp_path, "c1")
    b = prep(formats["parquet"], tmp_path, "c2")
    c = prep(formats["jsonl.zst"] / "a.jsonl.zst", tmp_path, "c3")  # a single file
    assert np.array_equal(tokens(a), tokens(b)) and np.array_equal(tokens(a, "val"), tokens(b, "val"))
    assert np.array_equal(tokens(a), tokens(c))
    assert a.documents == {"train": 388, "val": 12} and a.dtype == "uint16"
    # a DatasetDict saved to disk: every split's files, and a custom text column
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": docs[:300]}),
                               "test": datasets.Dataset.from_dict({"body": docs[300:]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert sorted(read_documents(tmp_path / "dd", text_field="body")) == sorted(docs)


def test_txt_documents_match_the_old_whole_file_split(tmp_path, shared_data, monkeypatch):
    """Reading block by block splits .txt files exactly as re.split(r"\\n\\s*\\n") on the whole text did,
    wherever the blocks end (inside a separator, a document, a multi-byte character)."""
    old = re.compile(r"\n\s*\n")
    tricky = "  lead\n\nA\r\nB\r\n\r\nC \n \t \n\nD\u2028E\n\u3000\nF caf\u00e9 \U0001f642\n \n\n\n  \n\nG\n\n\n"
    (tmp_path / "t.txt").write_text(tricky, encoding="utf-8", newline="")
    expected = [d.strip() for d in old.split(tricky) if d.strip()]
    for block in (1, 2, 3, 5, 7, 64):
        monkeypatch.setattr(sources, "BLOCK_BYTES", block)
        assert list(read_documents(tmp_path / "t.txt")) == expected, block
    monkeypatch.setattr(sources, "BLOCK_BYTES", 4099)
    for f in sorted((shared_data / "corpus").glob("*.txt")):
        text = f.read_bytes().decode("utf-8")
        assert list(read_documents(f)) == [d.strip() for d in old.split(text) if d.strip()], f


# ---- streaming, workers, resume ------------------------------------------------------------------
def test_streaming_memory_is_bounded_by_the_chunk_not_the_corpus(tmp_path, docs, monkeypatch):
    """A corpus 100x the chunk size: Python memory during preparation stays a small multiple of a chunk."""
    monkeypatch.setattr(prepare_module, "CHUNK_BYTES", 16_000)
    monkeypatch.setattr(sources, "BLOCK_BYTES", 16_000)  # .txt read size
    text = "\n\n".join(docs).encode()
    corpus = tmp_path / "big"
    corpus.mkdir()
    for i in range(12):  # 12 files of ~150 KB ...
        (corpus / f"{i}.txt").write_bytes(text)
    (corpus / "rows.jsonl.gz").write_bytes(gzip.compress(jsonl(docs * 8)))  # ... and 1.3 MB of rows, gzipped
    size = sum(f.stat().st_size for f in corpus.iterdir())
    chunks_seen = []
    real_chunks = prepare_module.chunks
    monkeypatch.setattr(prepare_module, "chunks", lambda d, n: (chunks_seen.append(len(c)) or c for c in real_chunks(d, n)))
    warm = write(tmp_path / "warm", "a.txt", "\n\n".join(docs[:100]).encode())
    prep(warm, tmp_path, "warm", tokenizer="bpe")  # imports and first-call allocations outside the measurement
    chunks_seen.clear()
    tracemalloc.start()
    tc = prep(corpus, tmp_path, tokenizer="bpe", shard_tokens=4096)  # both passes: training the BPE, tokenizing
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    text_size = 12 * len(text) + len(jsonl(docs * 8))
    assert len(chunks_seen) > 100 and text_size > 3_000_000
    assert tc.train_tokens + tc.val_tokens > 500_000
    assert peak < 1_000_000, f"peak Python memory {peak / 1e6:.1f} MB for {text_size / 1e6:.1f} MB of text ({size / 1e6:.1f} MB on disk)"


def test_one_and_two_workers_write_the_same_shards(tmp_path, small_corpus, monkeypatch):
    monkeypatch.setattr(prepare_module, "CHUNK_BYTES", 20_000)  # many chunks, so the pool really interleaves
    one = prep(small_corpus, tmp_path, "w1", workers=1, shard_tokens=5000)
    two = prep(small_corpus, tmp_path, "w2", workers=2, shard_tokens=5000)
    assert one.shards == two.shards and len(one.shards["train"]) > 5
    for split in ("train", "val"):
        for i in range(len(one.shards[split])):
            name = f"{split}-{i:05d}.bin"
            assert (one.dir / name).read_bytes() == (two.dir / name).read_bytes(), name
    assert one.unigram_entropy == two.unigram_entropy and two.prepared["workers"] == 2


def test_a_crashed_preparation_resumes_from_its_shards(tmp_path, small_corpus, monkeypatch):
    monkeypatch.setattr(prepare_module, "CHUNK_BYTES", 20_000)
    full = prep(small_corpus, tmp_path, "full", shard_tokens=3000)
    real_save, saves = prepare_module._save_progress, []

    def crash_on_fifth(folder, state):
        real_save(folder, state)
        saves.append(state["documents"])
        if len(saves) == 5:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(prepare_module, "_save_progress", crash_on_fifth)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prep(small_corpus, tmp_path, "crashed", shard_tokens=3000)
    monkeypatch.setattr(prepare_module, "_save_progress", real_save)
    folder = next((tmp_path / "crashed" / "corpus").iterdir())
    assert not (folder / "manifest.json").exists() and (folder / "progress.json").exists()
    with open(next(folder.glob("train-*.bin")), "ab") as fh:  # bytes written after the last checkpoint
        fh.write(b"\x01\x02\x03")
    logs = []
    resumed = prep(small_corpus, tmp_path, "crashed", shard_tokens=3000, log=logs.append)
    assert any(f"after {saves[-1]:,} documents" in line for line in logs)
    assert resumed.shards == full.shards and resumed.documents == full.documents
    assert np.array_equal(tokens(resumed), tokens(full)) and np.array_equal(tokens(resumed, "val"), tokens(full, "val"))


@pytest.mark.slow
def test_kill_9_then_rerun_gives_the_uninterrupted_tokens(tmp_path, docs):
    """A real SIGKILL of `sparselm data prepare` (2 workers) mid-way; the rerun resumes and matches."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"{i}.jsonl.gz").write_bytes(gzip.compress(jsonl(docs[i::6] * 5)))
    args = ["--corpus", str(corpus), "--tokenizer", "gpt2", "--workers", "2", "--shard-tokens", "20000", "--no-progress"]
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "sparselm", "data", "prepare", *args, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            progress = out / "progress.json"
            if progress.exists() and json.loads(progress.read_text())["documents"] >= 300:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "finished before it could be killed"
        workers = psutil.Process(proc.pid).children()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    assert not (out / "manifest.json").exists()
    gone, alive = psutil.wait_procs(workers, timeout=10)  # orphaned workers notice and exit
    assert not alive
    assert main(["data", "prepare", *args, "--out", str(out)]) == 0
    assert main(["data", "prepare", *args, "--out", str(tmp_path / "fresh")]) == 0
    a, b = TokenizedCorpus.load(out), TokenizedCorpus.load(tmp_path / "fresh")
    assert a.shards == b.shards and np.array_equal(tokens(a), tokens(b)) and np.array_equal(tokens(a, "val"), tokens(b, "val"))


# ---- shards and the loader -------------------------------------------------------------------------
def test_sharded_tokens_read_as_one_sequence(tmp_path):
    data = np.arange(10_000, dtype=np.uint16)
    sizes = [3000, 3000, 3000, 1000]
    paths = []
    for i, n in enumerate(sizes):
        paths.append(tmp_path / f"train-{i:05d}.bin")
        data[sum(sizes[:i]) : sum(sizes[:i]) + n].tofile(paths[-1])
    sharded = ShardedTokens(paths, sizes, "uint16")
    assert len(sharded) == 10_000
    for a, b in [(0, 10), (2990, 3010), (2999, 9001), (5999, 6000), (9990, 10_000), (0, 10_000)]:
        assert np.array_equal(sharded[a:b], data[a:b])
    for seed, step in [(1, 0), (1, 5), (7, 123)]:
        for x, y in zip(get_batch(sharded, 8, 64, seed, step), get_batch(data, 8, 64, seed, step)):
            assert torch.equal(x, y)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(eval_batches(sharded, 4, 64, 3), eval_batches(data, 4, 64, 3)))


def test_pretraining_batches_do_not_depend_on_shard_size(micro_config, tmp_path):
    """Same (seed, step) -> same windows whether the corpus is one shard or dozens: identical training."""
    from sparselm.training import pretrain

    losses = {}
    for shard_tokens in (100_000_000, 2048):
        run = tmp_path / f"run-{shard_tokens}"
        cfg = micro_config(out=str(run), max_steps=6, eval_every=6, ckpt_every=6, data={"shard_tokens": shard_tokens})
        pretrain(cfg, progress=False, log=lambda *_: None)
        losses[shard_tokens] = [json.loads(line).get("loss") for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses[100_000_000] == losses[2048]


# ---- tokenizers -------------------------------------------------------------------------------------
def test_gpt2_tokenizer_gives_the_official_ids(tmp_path):
    tok, eos = load_pretrained("gpt2", data_root)
    assert tok.encode(SENTENCE).ids == SENTENCE_IDS and eos == "<|endoftext|>" and tok.token_to_id(eos) == 50256
    # built from vocab.json + merges.txt alone (no tokenizer.json): the same ids
    gpt2 = data_root() / "tokenizers" / "gpt2"
    (tmp_path / "tokenizers" / "gpt2").mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / "tokenizers" / "gpt2" / name).write_bytes((gpt2 / name).read_bytes())
    tok2, _ = load_pretrained("gpt2", lambda: tmp_path)
    assert tok2.encode(SENTENCE).ids == SENTENCE_IDS


def llama_style_tokenizer(path, texts):
    """A small SentencePiece-like BPE as Llama's tokenizer.json sets it up: metaspace, byte fallback,
    <unk>/<s>/</s>, and a template that starts every text with <s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                       show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def test_pretrained_tokenizer_json_and_hf_folder(tmp_path, docs):
    path = llama_style_tokenizer(tmp_path / "tokenizer.json", docs)
    corpus = write(tmp_path / "c", "a.txt", "\n\n".join(docs).encode())
    tc = prep(corpus, tmp_path, tokenizer=str(path))
    assert tc.eos_token == "</s>" and tc.vocab_size == 300 and tc.model_vocab_size() == 320
    train = tokens(tc)
    bos, eos = 1, 2
    assert train[0] == bos and (train == eos).sum() == tc.documents["train"] and train.max() < 300
    # an HF tokenizer folder: its tokenizer_config.json names the EOS token
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<s>").save_pretrained(tmp_path / "hf")
    assert prep(corpus, tmp_path, "c2", tokenizer=str(tmp_path / "hf")).eos_token == "<s>"
    assert prep(corpus, tmp_path, "c3", tokenizer=str(path), eos_token="<unk>").eos_id == 0


def test_trained_bpe_sample_is_bounded(tmp_path, small_corpus):
    logs = []
    tc = prepare_corpus(small_corpus, 300, cache_dir=tmp_path, tokenizer_sample_mb=0.05, workers=1, log=logs.append)
    assert any("sample of about 0.05 MB" in line for line in logs)
    trained = next(line for line in logs if line.startswith("tokenizer trained on"))
    n_docs = int(re.search(r"trained on ([\d,]+) documents", trained).group(1).replace(",", ""))
    assert n_docs < tc.documents["train"] / 3 and tc.trained_tokenizer and tc.vocab_size <= 300


# ---- errors -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "setup,match",
    [
        (lambda d: write(d, "notes.md", b"x"), r"unknown corpus file type: .*notes\.md; supported: \.txt"),
        (lambda d: write(d, "a.csv", b"x") / "a.csv", r"a\.csv: unsupported corpus file type '\.csv'"),
        (lambda d: (d.mkdir(), (d / "a.txt").symlink_to(d / "gone.txt")), r"a\.txt: cannot read it \(not a regular file"),
        (lambda d: write(d, "a.jsonl.gz", b"not gzip at all"), r"a\.jsonl\.gz: cannot read it \(BadGzipFile"),
        (lambda d: write(d, "a.jsonl.zst", b"not zstd"), r"a\.jsonl\.zst: cannot read it \(ZstdError"),
        (lambda d: write(d, "a.parquet", b"PAR1 nope"), r"a\.parquet: not a readable parquet file"),
        (lambda d: write(d, "a.jsonl", b'{"text": "fine"}\n{"body": "x"}\n'),
         r"a\.jsonl:2: no field 'text' \(the row has: body\); fix the row, pass --text-field NAME .* --skip-bad-rows"),
        (lambda d: write(d, "a.jsonl.gz", gzip.compress(b'{"text": "ok"}\n{"text": 3}\n')),
         r"a\.jsonl\.gz:2: field 'text' is int, not a string"),
        (lambda d: write(d, "a.jsonl", b'{"text": "ok"}\n{oops\n'), r"a\.jsonl:2: invalid JSON"),
        (lambda d: (d.mkdir(), pq.write_table(pa.table({"text": ["a", None, "b"]}), d / "a.parquet")),
         r"a\.parquet: row 1: field 'text' is empty \(null\); fix the row"),
        (lambda d: (d.mkdir(), pq.write_table(pa.table({"body": ["a"]}), d / "a.parquet")),
         r"a\.parquet: no column 'text' \(columns: body\); pass --text-field NAME"),
        (lambda d: write(d, "a.txt", b"one lonely document"), r"1 documents, too few to split into train and validation"),
    ],
)
def test_bad_input_gives_a_clear_error(tmp_path, setup, match):
    d = tmp_path / "corpus"
    target = setup(d)
    with pytest.raises(CorpusError, match=match):
        prep(target if isinstance(target, os.PathLike) and target.is_file() else d, tmp_path)


def test_skip_bad_rows_counts_and_reports(tmp_path, docs):
    rows = [{"text": d} for d in docs[:100]] + [{"body": "no text"}, {"text": None}] + [{"text": d} for d in docs[100:200]]
    corpus = write(tmp_path / "c", "a.jsonl", ("\n".join(json.dumps(r) for r in rows) + "\n{broken\n").encode())
    logs = []
    tc = prep(corpus, tmp_path, skip_bad_rows=True, log=logs.append)
    assert tc.bad_rows == 3 and sum(tc.documents.values()) == 200
    assert any("skipped 3 malformed row(s), e.g. " in line and "a.jsonl:101: no field 'text'" in line for line in logs)
    assert "3 bad row(s) skipped" in logs[-1]


def test_missing_package_names_the_extra(tmp_path, monkeypatch):
    write(tmp_path / "c", "a.parquet", b"")
    monkeypatch.setattr(sources, "_importable", lambda name: False)
    with pytest.raises(CorpusError, match=r"a\.parquet: reading \.parquet files needs the 'pyarrow' package; "
                                          r"pip install 'sparselm\[data\]'"):
        prep(tmp_path / "c", tmp_path)


def test_tokenizer_errors(tmp_path, docs):
    from tokenizers import Tokenizer, models, pre_tokenizers

    corpus = write(tmp_path / "c", "a.txt", "\n\n".join(docs[:50]).encode())
    with pytest.raises(TokenizerError, match=r"--tokenizer nope: no such file or directory; use 'bpe'"):
        prep(corpus, tmp_path, tokenizer="nope")
    big = Tokenizer(models.WordLevel({f"w{i}": i for i in range(70_000)} | {"</s>": 70_000}, unk_token="w0"))
    big.pre_tokenizer = pre_tokenizers.Whitespace()
    big.save(str(tmp_path / "big.json"))
    with pytest.raises(CorpusError, match=r"tokenizer of 70001 tokens does not fit uint16 token files"):
        prep(corpus, tmp_path, tokenizer=str(tmp_path / "big.json"), dtype="uint16")
    assert prep(corpus, tmp_path, tokenizer=str(tmp_path / "big.json")).dtype == "uint32"
    no_eos = Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a"))
    no_eos.save(str(tmp_path / "no_eos.json"))
    with pytest.raises(TokenizerError, match=r"no end-of-text token .* set data.eos_token \(--eos-token\)"):
        prep(corpus, tmp_path, tokenizer=str(tmp_path / "no_eos.json"))
    prepared = prep(corpus, tmp_path, out=tmp_path / "shards").dir
    with pytest.raises(CorpusError, match=r"shards was prepared with tokenizer 'gpt2', not 'bpe'"):
        prep(prepared, tmp_path, tokenizer="bpe")
    with pytest.raises(CorpusError, match=r"tokenizer of 70000 tokens does not fit uint16 token files"):
        prepare_corpus(corpus, 70_000, cache_dir=tmp_path, dtype="uint16", **QUIET)
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(TokenizerError, match=r"junk\.json: not a Hugging Face tokenizers file"):
        prep(corpus, tmp_path, tokenizer=str(tmp_path / "junk.json"))


def test_model_vocab_is_padded_and_padding_rows_are_not_predicted():
    from sparselm.training.pretraining import next_token_loss

    class Fixed(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, input_ids, **hf_kwargs):  # (use_cache=False, as HF models take)
            return type("Out", (), {"logits": self.logits})

    logits = torch.randn(2, 5, 128)
    logits[..., 100:] = 50.0  # padding rows with huge logits: they must not count
    y = torch.randint(0, 100, (2, 5))
    loss = next_token_loss(Fixed(logits), (None, y), vocab_size=100)
    expected = torch.nn.functional.cross_entropy(logits[..., :100].reshape(-1, 100), y.reshape(-1))
    assert torch.allclose(loss, expected) and loss < 20
    tc = TokenizedCorpus(dir=None, vocab_size=50257, eos_id=50256, eos_token="<|endoftext|>", dtype="uint16", train_tokens=0,
                         val_tokens=0, unigram_entropy=0.0, tokenizer_source="gpt2", tokenizer_sha256="", shard_tokens=1)
    assert tc.model_vocab_size() == 50304 and tc.model_vocab_size(4096 * 16) == 65536
    with pytest.raises(CorpusError, match="smaller than the tokenizer's 50257 tokens"):
        tc.model_vocab_size(4096)
    tc.train_tokens, tc.val_tokens = 10_000, 100
    with pytest.raises(CorpusError, match="val split of the corpus has 100 tokens, fewer than one window of 129; "
                                          "use more text or a larger data.val_fraction"):
        tc.check_windows(128)


# ---- end to end: the CLI ------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_prepare_then_pretrain_with_gpt2_and_llama_tokenizers(tmp_path, small_corpus, docs, capsys, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("SPARSELM_CACHE", str(tmp_path / "cache"))
    short = ["--max-steps", "3", "--batch-size", "2", "--no-progress", "--set", "run.eval_every=3", "--set", "optim.warmup_steps=1",
             "--set", "run.eval_batches=1", "--set", "model.n_layer=1", "--set", "data.val_fraction=0.1"]
    # data prepare, then pretrain on the prepared folder
    assert main(["data", "prepare", "--corpus", str(small_corpus), "--tokenizer", "gpt2", "--workers", "2",
                 "--val-fraction", "0.1", "--out", str(tmp_path / "shards")]) == 0
    out = capsys.readouterr().out
    assert "corpus: " in out and "tokenizer gpt2 (50,257 tokens)" in out and "tokens/s with 2 worker(s)" in out
    run = tmp_path / "gpt2-run"
    assert main(["pretrain", "--preset", "tiny", "--corpus", str(tmp_path / "shards"), "--out", str(run), *short]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model"]["vocab_size"] == 50304
    tok = AutoTokenizer.from_pretrained(run)
    assert tok(SENTENCE).input_ids == SENTENCE_IDS and tok.eos_token_id == 50256
    # pretrain straight from the raw corpus with --tokenizer gpt2: the same cache key as data prepare
    assert main(["pretrain", "--preset", "tiny", "--corpus", str(small_corpus), "--tokenizer", "gpt2", "--workers", "1",
                 "--out", str(tmp_path / "gpt2-raw"), *short]) == 0
    # a Llama-style tokenizer.json on the Llama preset
    path = llama_style_tokenizer(tmp_path / "llama" / "tokenizer.json", docs)
    run = tmp_path / "llama-run"
    assert main(["pretrain", "--preset", "llama-tiny", "--corpus", str(small_corpus), "--tokenizer", str(path),
                 "--out", str(run), *short]) == 0
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(run)
    tok = AutoTokenizer.from_pretrained(run)
    assert model.config.vocab_size == 320 and tok.eos_token == "</s>" and tok.bos_token == "<s>"
    assert model.config.eos_token_id == tok.eos_token_id == 2
    assert tok.decode(tok("the jury said").input_ids, skip_special_tokens=True) == "the jury said"
    capsys.readouterr()
    assert main(["data", "prepare", "--corpus", str(tmp_path / "nothing-here")]) == 2
    assert "does not exist" in capsys.readouterr().err
