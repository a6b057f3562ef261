"""A tokenized corpus: its folder of token shards, tokenizer and facts, as ``prepare`` wrote them.

Documents go to validation by a hash of their text, so the split is stable whatever order files
are read in and however many workers tokenize them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .shards import ShardedTokens, shard_name, token_dtype
from .sources import CorpusError, corpus_files, read_documents
from .tokenizer import load_tokenizer

__all__ = ["CorpusError", "TokenizedCorpus", "corpus_files", "default_cache_dir", "describe", "is_validation", "pad_vocab",
           "read_documents", "token_dtype", "unigram_entropy"]

MANIFEST = "manifest.json"
FORMAT = "sparselm-token-shards"
VOCAB_MULTIPLE = 64  # model vocabularies are padded to a multiple of this (faster matmuls, as nanoGPT does)


def is_validation(doc: str, val_fraction: float) -> bool:
    h = int(hashlib.sha1(doc.encode("utf-8")).hexdigest()[:8], 16)
    return h % 10_000 < val_fraction * 10_000


def default_cache_dir() -> Path:
    return Path(os.environ.get("SPARSELM_CACHE", Path.home() / ".cache" / "sparselm"))


def pad_vocab(n: int) -> int:
    return -(-n // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


@dataclass
class TokenizedCorpus:
    """Paths and facts of a tokenized corpus (the fields of its ``manifest.json``)."""

    dir: Path
    vocab_size: int  # the tokenizer's: ids are below it
    eos_id: int
    eos_token: str
    dtype: str
    train_tokens: int
    val_tokens: int
    unigram_entropy: float  # nats/token of the validation split under train-split unigram frequencies
    tokenizer_source: str  # "bpe" (trained on this corpus), "gpt2" or a path
    tokenizer_sha256: str
    shard_tokens: int
    shards: dict = field(default_factory=dict)  # split -> tokens per shard
    documents: dict = field(default_factory=dict)  # split -> documents
    bad_rows: int = 0
    fingerprint: str = ""
    prepared: dict = field(default_factory=dict)  # the last preparation run: seconds, tokens, tokens_per_s, workers

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "TokenizedCorpus":
        folder = Path(folder)
        try:
            meta = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            raise CorpusError(f"{folder / MANIFEST}: cannot read it ({e}); prepare the corpus again") from None
        if meta.pop("format", None) != FORMAT:
            raise CorpusError(f"{folder / MANIFEST} is not a sparselm token-shard manifest; prepare the corpus again")
        meta.pop("version", None)
        known = set(cls.__dataclass_fields__) - {"dir"}
        return cls(dir=folder, **{k: v for k, v in meta.items() if k in known})

    @property
    def trained_tokenizer(self) -> bool:
        return self.tokenizer_source == "bpe"

    def split(self, name: str) -> ShardedTokens:
        sizes = self.shards[name]
        return ShardedTokens([self.dir / shard_name(name, i) for i in range(len(sizes))], sizes, self.dtype)

    def train(self) -> ShardedTokens:
        return self.split("train")

    def val(self) -> ShardedTokens:
        return self.split("val")

    def tokenizer(self):
        return load_tokenizer(self.dir / "tokenizer.json")

    def check_tokenizer(self, tokenizer, model: str) -> None:
        """Refuse to feed ``model`` (a name for the message) tokens of another tokenizer: its ids would
        mean other words. ``tokenizer``: the model's (HF fast tokenizer or ``tokenizers.Tokenizer``)."""
        from .tokenizer import encoding_hash

        if encoding_hash(tokenizer) != encoding_hash(self.tokenizer()):
            raise CorpusError(f"{self.dir} was tokenized with another tokenizer ({self.tokenizer_source}, "
                              f"{self.vocab_size} tokens) than the model {model} uses; prepare the text with the "
                              f"model's tokenizer: sparselm data prepare --corpus TEXT --tokenizer {model} --out DIR")

    def check_windows(self, block_size: int) -> None:
        """Each split must hold at least one training window of ``block_size + 1`` tokens."""
        for split, n in (("train", self.train_tokens), ("val", self.val_tokens)):
            if n <= block_size + 1:
                more = " or a larger data.val_fraction" if split == "val" else ""
                raise CorpusError(f"the {split} split of the corpus has {n} tokens, fewer than one window of "
                                  f"{block_size + 1}; use more text{more}, or a smaller model.block_size")

    def model_vocab_size(self, requested: int | None = None) -> int:
        """The model's vocabulary: ``requested`` (a trained BPE's target size, or ``model.vocab_size``
        set by the user) or the tokenizer's, padded to a multiple of 64. Ids from ``vocab_size`` up
        are padding: never in the data, and left out of the loss."""
        if requested is not None and requested < self.vocab_size:
            raise CorpusError(f"model.vocab_size={requested} is smaller than the tokenizer's {self.vocab_size} tokens; "
                              "leave model.vocab_size unset to follow the tokenizer")
        return pad_vocab(requested or self.vocab_size)


def describe(corpus: TokenizedCorpus) -> str:
    """One summary line: documents, tokens, speed of the preparation, shards, bytes on disk."""
    docs, n_shards = corpus.documents, sum(len(v) for v in corpus.shards.values())
    size = sum(p.stat().st_size for p in corpus.dir.iterdir() if p.is_file())
    run = corpus.prepared
    speed = f", {run['tokens_per_s']:,.0f} tokens/s with {run['workers']} worker(s)" if run.get("tokens") else ""
    bad = f", {corpus.bad_rows} bad row(s) skipped" if corpus.bad_rows else ""
    return (f"corpus: {sum(docs.values()):,} documents ({docs['train']:,} train, {docs['val']:,} val), "
            f"{corpus.train_tokens + corpus.val_tokens:,} tokens ({corpus.train_tokens:,} train, {corpus.val_tokens:,} val), "
            f"{corpus.dtype}, tokenizer {corpus.tokenizer_source} ({corpus.vocab_size:,} tokens){speed}, "
            f"{n_shards} shard(s), {size / 1e6:,.1f} MB on disk{bad} -> {corpus.dir}")


def unigram_entropy(train_counts: np.ndarray, val_counts: np.ndarray) -> float:
    """Cross-entropy (nats/token) of the validation tokens under add-one-smoothed unigram
    frequencies of the training tokens: the loss of the best context-free model."""
    counts = train_counts.astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-(val_counts.astype(np.float64) @ logp) / val_counts.sum())
