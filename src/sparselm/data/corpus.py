"""Read a text corpus and tokenize it once into memory-mapped token files.

Input: a directory of ``.txt`` files (documents separated by blank lines) and/or ``.jsonl`` files
(one JSON object per line with a ``text`` field), or one such file. Output (cached by content
fingerprint): ``tokenizer.json``, ``train.bin``, ``val.bin`` (uint16, or uint32 for vocabularies
over 65,536) and ``meta.json``. Documents go to validation by a hash of their text, so the split is
stable whatever order files are read in.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .tokenizer import EOS_TOKEN, load_tokenizer, train_tokenizer

FORMAT_VERSION = 1
_BLANK_LINES = re.compile(r"\n\s*\n")


class CorpusError(ValueError):
    """The corpus cannot be read; the message names the file and the fix."""


def corpus_files(path: str | os.PathLike) -> list[Path]:
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"corpus path {path} does not exist; pass --corpus DIR (a folder of .txt/.jsonl files)")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
    if not files:
        raise CorpusError(f"no .txt or .jsonl files under {path}; add text files or point --corpus elsewhere")
    for f in files:
        if f.suffix not in (".txt", ".jsonl"):
            raise CorpusError(f"{f}: unsupported corpus file type {f.suffix!r}; use .txt or .jsonl")
    return files


def read_documents(path: str | os.PathLike) -> Iterator[str]:
    """Every non-empty document of the corpus, file by file."""
    n = 0
    for f in corpus_files(path):
        raw = f.read_bytes()
        if b"\x00" in raw[:65536]:
            raise CorpusError(f"{f}: looks like a binary file (NUL bytes); remove it from the corpus folder")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CorpusError(f"{f}: not valid UTF-8 at byte {e.start}; re-encode it as UTF-8 or remove it") from None
        if f.suffix == ".jsonl":
            for lineno, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{f}:{lineno}: invalid JSON ({e.msg}); each line must be an object with a 'text' field") from None
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise CorpusError(f"{f}:{lineno}: missing string field 'text'; each line must look like {{\"text\": \"...\"}}")
                if row["text"].strip():
                    n += 1
                    yield row["text"].strip()
        else:
            for doc in _BLANK_LINES.split(text):
                if doc.strip():
                    n += 1
                    yield doc.strip()
    if n == 0:
        raise CorpusError(f"corpus {path} holds no text; add documents to its .txt/.jsonl files")


def is_validation(doc: str, val_fraction: float) -> bool:
    h = int(hashlib.sha1(doc.encode("utf-8")).hexdigest()[:8], 16)
    return h % 10_000 < val_fraction * 10_000


def fingerprint(path: str | os.PathLike, vocab_size: int, val_fraction: float) -> str:
    h = hashlib.sha1(f"v{FORMAT_VERSION}:{vocab_size}:{val_fraction}".encode())
    for f in corpus_files(path):
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(os.environ.get("SPARSELM_CACHE", Path.home() / ".cache" / "sparselm"))


@dataclass
class TokenizedCorpus:
    """Paths and facts of a tokenized corpus."""

    dir: Path
    vocab_size: int
    eos_id: int
    dtype: str
    train_tokens: int
    val_tokens: int
    unigram_entropy: float  # nats/token of the validation split under train-split unigram frequencies

    def train(self) -> np.memmap:
        return np.memmap(self.dir / "train.bin", dtype=self.dtype, mode="r")

    def val(self) -> np.memmap:
        return np.memmap(self.dir / "val.bin", dtype=self.dtype, mode="r")

    def tokenizer(self):
        return load_tokenizer(self.dir / "tokenizer.json")


def token_dtype(vocab_size: int) -> str:
    if vocab_size <= 2**16:
        return "uint16"
    if vocab_size <= 2**32:
        return "uint32"
    raise CorpusError(f"vocab_size={vocab_size} does not fit in uint32 token files; use a smaller vocabulary")


def prepare_corpus(
    path: str | os.PathLike,
    vocab_size: int,
    val_fraction: float = 0.02,
    cache_dir: str | os.PathLike | None = None,
    log=print,
) -> TokenizedCorpus:
    """Train a tokenizer and tokenize the corpus, or reuse the cached result for the same input."""
    if not 0.0 < val_fraction < 0.5:
        raise CorpusError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
    dtype = token_dtype(vocab_size)
    out = Path(cache_dir or default_cache_dir()) / "corpus" / fingerprint(path, vocab_size, val_fraction)
    meta_path = out / "meta.json"
    if meta_path.exists():
        return TokenizedCorpus(dir=out, **json.loads(meta_path.read_text()))

    docs = list(read_documents(path))
    train_docs = [d for d in docs if not is_validation(d, val_fraction)]
    val_docs = [d for d in docs if is_validation(d, val_fraction)]
    if not val_docs or not train_docs:
        raise CorpusError(f"corpus {path} has {len(docs)} documents, too few to split; add text (blank lines separate documents)")
    log(f"training a {vocab_size}-token byte-level BPE tokenizer on {len(train_docs)} documents ...")
    tok = train_tokenizer(train_docs, vocab_size)
    if tok.get_vocab_size() > vocab_size:
        raise CorpusError(f"tokenizer came out with {tok.get_vocab_size()} tokens, over vocab_size={vocab_size}")
    eos = tok.token_to_id(EOS_TOKEN)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".tmp-{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    tok.save(str(tmp / "tokenizer.json"))
    counts = {}
    for split, split_docs in (("train", train_docs), ("val", val_docs)):
        log(f"tokenizing {len(split_docs)} {split} documents ...")
        arr = np.concatenate([np.array(e.ids + [eos], dtype=dtype) for e in tok.encode_batch(split_docs)])
        arr.tofile(tmp / f"{split}.bin")
        counts[split] = arr
    meta = {
        "vocab_size": vocab_size,
        "eos_id": eos,
        "dtype": dtype,
        "train_tokens": int(counts["train"].size),
        "val_tokens": int(counts["val"].size),
        "unigram_entropy": unigram_entropy(counts["train"], counts["val"], vocab_size),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    for name in ("tokenizer.json", "train.bin", "val.bin", "meta.json"):  # meta last: it marks completion
        os.replace(tmp / name, out / name)
    tmp.rmdir()
    return TokenizedCorpus(dir=out, **meta)


def unigram_entropy(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the validation tokens under add-one-smoothed unigram
    frequencies of the training tokens: the loss of the best context-free model."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val].mean())
