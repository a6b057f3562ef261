"""Prepare a corpus for pre-training: documents -> tokenizer -> token shards, in parallel and resumable.

One pass streams the documents (``sources``) in chunks of about ``CHUNK_BYTES`` to worker processes
that split them into train/validation by hash and tokenize them; results come back in chunk
order, so the shards hold the same tokens for any number of workers. After every chunk the shard
sizes and the count of documents done are saved (``progress.json``): a killed preparation cuts the
shards back to that point and goes on from the next document. ``manifest.json`` is written last
and marks the folder complete. Memory stays bounded: at most two chunks per worker are in flight.

A trained tokenizer (the default) is a byte-level BPE trained first, on the training documents or,
for a corpus over ``tokenizer_sample_mb``, on a hash-chosen sample of about that much text.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from .corpus import FORMAT, MANIFEST, TokenizedCorpus, default_cache_dir, describe, is_validation, unigram_entropy
from .paths import data_root
from .shards import ShardWriter, token_dtype
from .sources import CorpusError, DocumentStream, corpus_files
from .tokenizer import (
    EOS_TOKEN, TRAINED, encode_batch, find_eos, load_pretrained, load_tokenizer, tokenizer_hash, train_tokenizer,
    vocab_size_of,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
PROGRESS = "progress.json"
CHUNK_BYTES = 256 * 1024  # text per unit of work sent to a worker
DEFAULT_SHARD_TOKENS = 100_000_000  # as llm.c's fineweb shards: 200 MB of uint16
DEFAULT_SAMPLE_MB = 512.0
SHARD_FILE = re.compile(r"(train|val)-\d{5,}\.bin")


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def is_prepared(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder that ``prepare_corpus`` finished (holds a token-shard manifest)."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def prepare_corpus(
    path: str | os.PathLike,
    vocab_size: int,
    val_fraction: float = 0.02,
    cache_dir: str | os.PathLike | None = None,
    log=logger.info,
    *,
    tokenizer: str | None = None,
    text_field: str = "text",
    workers: int | None = None,
    skip_bad_rows: bool = False,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    dtype: str = "auto",
    eos_token: str | None = None,
    tokenizer_sample_mb: float = DEFAULT_SAMPLE_MB,
    out: str | os.PathLike | None = None,
    progress: bool = False,
) -> TokenizedCorpus:
    """Tokenize the corpus at ``path`` into shards (under ``cache_dir``, or in ``out``), or reuse
    the finished result for the same input and settings. ``path`` may also be a prepared folder.
    ``tokenizer``: None or ``"bpe"`` trains a ``vocab_size`` byte-level BPE; ``"gpt2"``, a
    ``tokenizer.json`` or an HF tokenizer folder is used as it is."""
    if is_prepared(path):
        corpus = TokenizedCorpus.load(path)
        if tokenizer not in (None, corpus.tokenizer_source):
            raise CorpusError(f"{path} was prepared with tokenizer {corpus.tokenizer_source!r}, not {tokenizer!r}; "
                              "leave --tokenizer unset to train on it, or prepare the raw corpus with this tokenizer")
        log(describe(corpus))
        return corpus
    if not 0.0 < val_fraction < 0.5:
        raise CorpusError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
    files = corpus_files(path)
    spec = tokenizer or TRAINED
    if spec == TRAINED:
        if eos_token not in (None, EOS_TOKEN):
            raise CorpusError(f"data.eos_token={eos_token!r}: a trained BPE ends documents with {EOS_TOKEN}; leave it unset")
        tok, eos, key = None, EOS_TOKEN, f"bpe:{vocab_size}:{tokenizer_sample_mb}"
    else:
        tok, declared = load_pretrained(spec, data_root)
        eos = find_eos(tok, eos_token, declared)
        key = f"{tokenizer_hash(tok)}:{eos}"
    token_dtype(vocab_size if tok is None else vocab_size_of(tok), dtype)  # does not fit: an error before any work
    fp = fingerprint(files, key, val_fraction, text_field, skip_bad_rows, shard_tokens, dtype)
    folder = Path(out) if out else Path(cache_dir or default_cache_dir()) / "corpus" / fp
    with _folder_lock(folder, log):
        if (folder / MANIFEST).is_file():
            corpus = TokenizedCorpus.load(folder)
            if corpus.fingerprint != fp:
                raise CorpusError(f"{folder} holds a corpus prepared from other input or settings; "
                                  "choose another output folder or delete it")
            log(describe(corpus))
            return corpus
        state = _read_progress(folder, fp)
        if state is None:
            _check_fresh(folder)
            if tok is None:
                tok = _train_bpe(path, files, vocab_size, val_fraction, tokenizer_sample_mb, text_field, skip_bad_rows, log)
            tok.save(str(folder / "tokenizer.json"))
            state = {"fingerprint": fp, "documents": 0, "splits": {s: {"shards": [], "documents": 0} for s in ("train", "val")}}
            _save_progress(folder, state)  # from here a restart reuses the tokenizer
        else:
            tok = load_tokenizer(folder / "tokenizer.json")
            log(f"resuming the preparation in {folder} after {state['documents']:,} documents")
        vocab = vocab_size_of(tok)
        meta = {"vocab_size": vocab, "eos_token": eos, "eos_id": tok.token_to_id(eos), "dtype": token_dtype(vocab, dtype),
                "tokenizer_source": spec, "tokenizer_sha256": tokenizer_hash(tok), "shard_tokens": shard_tokens,
                "fingerprint": fp}
        stats = _tokenize(files, folder, tok, meta, state, val_fraction, text_field, skip_bad_rows,
                          workers or default_workers(), progress, log)
        return _finish(folder, path, meta, state, stats, val_fraction, log)


def fingerprint(files: list[Path], tokenizer_key: str, val_fraction: float, text_field: str, skip_bad_rows: bool,
                shard_tokens: int, dtype: str) -> str:
    """Of everything the tokens depend on (not of the worker count: it changes nothing)."""
    h = hashlib.sha1(f"v{FORMAT_VERSION}:{tokenizer_key}:{val_fraction}:{text_field}:{skip_bad_rows}:"
                     f"{shard_tokens}:{dtype}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _folder_lock(folder: Path, log):
    """One preparer per folder; others (data-parallel ranks, a second run) wait, then reuse its result."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process preparing {folder} ...")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_progress(folder: Path, fp: str) -> dict | None:
    path = folder / PROGRESS
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except ValueError:
        return None  # cut off mid-write cannot happen (it is replaced atomically), but start over if it did
    if state.get("fingerprint") != fp:
        raise CorpusError(f"{folder} holds an unfinished preparation of other input or settings; "
                          "choose another output folder or delete it")
    return state


def _check_fresh(folder: Path) -> None:
    """A folder to start in holds nothing but leftovers of our own (an interrupted start)."""
    ours = {".lock", "tokenizer.json", PROGRESS}
    other = [p.name for p in folder.iterdir() if p.name not in ours and not SHARD_FILE.fullmatch(p.name)]
    if other:
        raise CorpusError(f"{folder} is not empty ({', '.join(sorted(other)[:5])}); choose an empty or new output folder")
    for p in folder.iterdir():
        if SHARD_FILE.fullmatch(p.name):
            p.unlink()


def _save_progress(folder: Path, state: dict) -> None:
    tmp = folder / (PROGRESS + ".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, folder / PROGRESS)


# ---- the tokenizer -------------------------------------------------------------------------------
def _sample_hash(doc: str) -> float:
    """A number in [0, 1) from the document, independent of the validation split's hash digits."""
    return int(hashlib.sha1(doc.encode("utf-8")).hexdigest()[-8:], 16) / 2**32


def _train_bpe(path, files, vocab_size, val_fraction, sample_mb, text_field, skip_bad_rows, log):
    stream = DocumentStream(files, text_field, skip_bad_rows)
    budget = int(sample_mb * 1e6)
    rate = min(1.0, budget / max(1, stream.total_bytes))
    seen = {"docs": 0, "train": 0, "chars": 0}

    def sample() -> Iterator[str]:
        for doc in stream:
            seen["docs"] += 1
            if is_validation(doc, val_fraction) or (rate < 1.0 and _sample_hash(doc) >= rate):
                continue
            seen["train"] += 1
            seen["chars"] += len(doc)
            yield doc
            if seen["chars"] >= budget:
                return

    what = "the training documents" if rate == 1.0 else f"a sample of about {sample_mb:g} MB of the training documents"
    log(f"training a {vocab_size}-token byte-level BPE tokenizer on {what} ...")
    tok = train_tokenizer(sample(), vocab_size)
    if seen["docs"] == 0:
        raise CorpusError(f"corpus {path} holds no text; add documents to its files")
    if seen["train"] == 0:
        raise CorpusError(f"corpus {path} has {seen['docs']} documents, too few to split into train and validation; "
                          "add text (blank lines separate documents)")
    log(f"tokenizer trained on {seen['train']:,} documents ({seen['chars'] / 1e6:.1f} M characters)")
    if vocab_size_of(tok) > vocab_size:
        raise CorpusError(f"tokenizer came out with {vocab_size_of(tok)} tokens, over vocab_size={vocab_size}")
    return tok


# ---- tokenizing: workers ----------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker(tok, eos_id: int, dtype: str, val_fraction: float, parent: int | None = None) -> None:
    """Set up a worker process (``parent``: the pool's owner) or, with no pool, this process."""
    _WORKER.update(tok=tok, eos=eos_id, dtype=dtype, val_fraction=val_fraction)
    if parent is not None:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the workers are the parallelism
        threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent: int) -> None:
    """A worker whose parent was killed (kill -9) exits: the pool's queues would keep it waiting forever."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _flatten(seqs: list[list[int]], eos: int, dtype: str) -> np.ndarray:
    """Each document's ids followed by EOS, concatenated."""
    out = np.empty(sum(map(len, seqs)) + len(seqs), dtype=dtype)
    pos = 0
    for ids in seqs:
        out[pos : pos + len(ids)] = ids
        pos += len(ids)
        out[pos] = eos
        pos += 1
    return out


def encode_chunk(docs: list[str]) -> dict:
    """A chunk of documents -> {split: (tokens, documents)}."""
    w = _WORKER
    ids = encode_batch(w["tok"], docs)
    val = [is_validation(d, w["val_fraction"]) for d in docs]
    result = {}
    for split, want in (("train", False), ("val", True)):
        seqs = [s for s, v in zip(ids, val) if v == want]
        result[split] = (_flatten(seqs, w["eos"], w["dtype"]), len(seqs))
    return result


def chunks(docs: Iterable[str], size: int) -> Iterator[list[str]]:
    """Consecutive documents, about ``size`` characters per list."""
    chunk, n = [], 0
    for doc in docs:
        chunk.append(doc)
        n += len(doc)
        if n >= size:
            yield chunk
            chunk, n = [], 0
    if chunk:
        yield chunk


def encode_chunks(parts: Iterable[list[str]], init_args: tuple, workers: int) -> Iterator[tuple[int, dict]]:
    """(documents, result) of each chunk, in order; ``workers`` processes, at most two chunks each in flight."""
    if workers <= 1:
        _init_worker(*init_args)
        for part in parts:
            yield len(part), encode_chunk(part)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn: safe under torch's threads and the same on every OS; the workers import only numpy and tokenizers
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(*init_args, os.getpid()))
    pending: deque = deque()
    try:
        for part in parts:
            pending.append((len(part), pool.submit(encode_chunk, part)))
            if len(pending) >= 2 * workers:
                n, fut = pending.popleft()
                yield n, fut.result()
        while pending:
            n, fut = pending.popleft()
            yield n, fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _tokenize(files, folder, tok, meta, state, val_fraction, text_field, skip_bad_rows, workers, progress, log) -> dict:
    from tqdm.auto import tqdm

    stream = DocumentStream(files, text_field, skip_bad_rows)
    writers = {s: ShardWriter(folder, s, meta["shard_tokens"], meta["dtype"], state["splits"][s]["shards"])
               for s in ("train", "val")}
    docs = itertools.islice(iter(stream), state["documents"], None)  # resumed: skip what is in the shards
    init_args = (tok, meta["eos_id"], meta["dtype"], val_fraction)  # a Tokenizer pickles as its JSON
    log(f"tokenizing {len(files)} file(s) ({stream.total_bytes / 1e6:,.1f} MB) with {workers} worker(s) -> {folder}")
    bar = tqdm(total=stream.total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not progress,
               mininterval=0.5, dynamic_ncols=True)
    t0, tokens, new_docs = time.perf_counter(), 0, 0
    try:
        for n, result in encode_chunks(chunks(docs, CHUNK_BYTES), init_args, workers):
            for split, (arr, n_docs) in result.items():
                writers[split].write(arr)
                state["splits"][split]["documents"] += n_docs
                tokens += arr.size
            state["documents"] += n
            new_docs += n
            for w in writers.values():
                w.flush()
                state["splits"][w.split]["shards"] = list(w.sizes)
            _save_progress(folder, state)
            bar.update(stream.bytes_done - bar.n)
            rate = tokens / max(1e-9, time.perf_counter() - t0)
            bar.set_postfix_str(f"{state['documents']:,} docs, {tokens / 1e6:,.1f}M tokens, {rate / 1e3:,.0f}k tok/s", refresh=False)
    finally:
        bar.close()
        for w in writers.values():
            w.close()
    seconds = time.perf_counter() - t0
    if stream.bad_rows:
        log(f"skipped {stream.bad_rows} malformed row(s), e.g. " + "; ".join(stream.bad_examples[:3]))
    return {"seconds": seconds, "tokens": tokens, "documents": new_docs, "workers": workers,
            "tokens_per_s": tokens / max(seconds, 1e-9), "bad_rows": stream.bad_rows}


def _finish(folder: Path, path, meta: dict, state: dict, stats: dict, val_fraction: float, log) -> TokenizedCorpus:
    splits = state["splits"]
    n_docs = state["documents"]
    if n_docs == 0:
        raise CorpusError(f"corpus {path} holds no text; add documents to its files")
    if not splits["train"]["documents"] or not splits["val"]["documents"]:
        raise CorpusError(f"corpus {path} has {n_docs} documents, too few to split into train and validation "
                          f"(val_fraction={val_fraction}); add text (blank lines separate documents)")
    corpus = TokenizedCorpus(dir=folder, train_tokens=sum(splits["train"]["shards"]), val_tokens=sum(splits["val"]["shards"]),
                             unigram_entropy=0.0, shards={s: splits[s]["shards"] for s in splits},
                             documents={s: splits[s]["documents"] for s in splits}, bad_rows=stats["bad_rows"],
                             prepared={k: stats[k] for k in ("seconds", "tokens", "tokens_per_s", "workers")}, **meta)
    counts = {s: _counts(corpus.split(s), meta["vocab_size"]) for s in ("train", "val")}
    corpus.unigram_entropy = unigram_entropy(counts["train"], counts["val"])
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, **{k: v for k, v in vars(corpus).items() if k != "dir"}}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, folder / MANIFEST)  # last: marks the folder complete
    (folder / PROGRESS).unlink(missing_ok=True)
    log(describe(corpus))
    return corpus


def _counts(tokens, vocab_size: int) -> np.ndarray:
    total = np.zeros(vocab_size, dtype=np.int64)
    for block in tokens.blocks():
        total += np.bincount(block, minlength=vocab_size)
    return total
