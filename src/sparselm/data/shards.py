"""Token shards: fixed-size files of raw token ids, written append-only and read as one array.

A split (``train``, ``val``) is the files ``<split>-00000.bin``, ``<split>-00001.bin``, ... of
``shard_tokens`` little-endian ``uint16``/``uint32`` ids each (the last one shorter), a
document's ids followed by the EOS id, documents in corpus order. The token counts, dtype and
tokenizer hash are in the directory's ``manifest.json``; the files carry no header, so
``np.memmap(path, dtype)`` reads one, and ``ShardedTokens`` reads all of a split as one sequence.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .sources import CorpusError

DTYPES = ("uint16", "uint32")


def token_dtype(vocab_size: int, wanted: str = "auto") -> str:
    """The dtype for ids below ``vocab_size``: the smallest that fits, or ``wanted`` if it fits."""
    fits = [d for d in DTYPES if vocab_size <= np.iinfo(d).max + 1]
    if not fits:
        raise CorpusError(f"vocab_size={vocab_size} does not fit in uint32 token files; use a smaller vocabulary")
    if wanted == "auto":
        return fits[0]
    if wanted not in fits:
        raise CorpusError(f"a tokenizer of {vocab_size} tokens does not fit {wanted} token files "
                          f"(ids up to {np.iinfo(wanted).max}); use data.dtype={fits[0]} or auto")
    return wanted


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


class ShardWriter:
    """Appends token arrays to a split's shards, starting a new file every ``shard_tokens``.
    ``sizes`` (tokens per shard, the last one open) is the whole state: ``resume`` cuts the files
    back to it after a crash."""

    def __init__(self, folder: Path, split: str, shard_tokens: int, dtype: str, sizes: list[int] | None = None):
        self.folder, self.split, self.shard_tokens, self.dtype = Path(folder), split, shard_tokens, np.dtype(dtype)
        self.sizes: list[int] = []
        self.fh = None
        self.resume(sizes or [])

    def resume(self, sizes: list[int]) -> None:
        """Keep the first ``sizes[i]`` tokens of shard i, drop any later shard."""
        for i, n in enumerate(sizes):
            path = self.folder / shard_name(self.split, i)
            if not path.exists() or path.stat().st_size < n * self.dtype.itemsize:
                raise FileNotFoundError(f"{path} is missing or shorter than recorded; delete {self.folder} and prepare again")
            os.truncate(path, n * self.dtype.itemsize)
        i = len(sizes)
        while (self.folder / shard_name(self.split, i)).exists():
            (self.folder / shard_name(self.split, i)).unlink()
            i += 1
        self.sizes = list(sizes)

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens, dtype=self.dtype)
        while tokens.size:
            if not self.sizes or self.sizes[-1] == self.shard_tokens:
                self._next()
            elif self.fh is None:
                self.fh = open(self.folder / shard_name(self.split, len(self.sizes) - 1), "ab")
            take = tokens[: self.shard_tokens - self.sizes[-1]]
            self.fh.write(take.astype(self.dtype.newbyteorder("<"), copy=False).tobytes())
            self.sizes[-1] += take.size
            tokens = tokens[take.size:]

    def _next(self) -> None:
        self.close()
        self.sizes.append(0)
        self.fh = open(self.folder / shard_name(self.split, len(self.sizes) - 1), "wb")

    def flush(self) -> None:
        if self.fh is not None:
            self.fh.flush()

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


class ShardedTokens:
    """A split's shards as one read-only token sequence: ``len`` and slices, what the batch
    loader uses, with windows crossing shard boundaries read from both."""

    def __init__(self, paths: list[Path], sizes: list[int], dtype: str):
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.maps = [np.memmap(p, dtype=self.dtype, mode="r", shape=(n,)) for p, n in zip(paths, sizes) if n]
        self.starts = np.cumsum([0] + [m.size for m in self.maps])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, key):
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("ShardedTokens supports contiguous slices only, e.g. tokens[i:j]")
        start, stop, _ = key.indices(len(self))
        if stop <= start:
            return np.empty(0, dtype=self.dtype)
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        parts = []
        i = first
        while start < stop:
            lo = start - self.starts[i]
            hi = min(stop, self.starts[i + 1]) - self.starts[i]
            parts.append(self.maps[i][lo:hi])
            start = int(self.starts[i]) + int(hi)
            i += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def blocks(self, size: int = 1 << 22):
        """The tokens in order, ``size`` at a time, read with plain file reads: a pass over a large
        split in bounded memory (pages touched through a memmap would stay resident)."""
        for m in self.maps:
            with open(m.filename, "rb") as fh:
                for i in range(0, m.size, size):
                    yield np.fromfile(fh, dtype=self.dtype, count=min(size, m.size - i))
