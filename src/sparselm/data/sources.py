"""Corpus files -> a stream of documents, one file at a time, in bounded memory.

Formats (by file name): ``.txt`` (documents separated by blank lines), ``.jsonl`` (one JSON object
per line), both also ``.gz`` or ``.zst`` compressed, ``.parquet`` and ``.arrow`` (Hugging Face
``datasets`` files: a dataset saved with ``save_to_disk`` is a folder of them). Rows take their
text from ``text_field``. Files are read in sorted path order, so the stream is the same on every
run; a row without text is an error naming file, row and field, or with ``skip_bad_rows`` is
counted and reported instead.
"""

from __future__ import annotations

import codecs
import contextlib
import gzip
import io
import json
import os
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

EXTRA = "pip install 'sparselm[data]'"
# suffix -> (kind, compression, the module it needs beyond the standard library)
FORMATS = {
    ".txt": ("txt", None, None), ".txt.gz": ("txt", "gz", None), ".txt.zst": ("txt", "zst", "zstandard"),
    ".jsonl": ("jsonl", None, None), ".jsonl.gz": ("jsonl", "gz", None), ".jsonl.zst": ("jsonl", "zst", "zstandard"),
    ".parquet": ("parquet", None, "pyarrow"), ".arrow": ("arrow", None, "pyarrow"),
}
# written by datasets' save_to_disk beside its .arrow files; not documents
HF_METADATA = {"state.json", "dataset_info.json", "dataset_dict.json"}
BINARY_CHECK_BYTES = 65536
BATCH_ROWS = 1024  # parquet/arrow rows read at a time
BLOCK_BYTES = 1 << 20  # .txt read size
_SEPARATOR = re.compile(r"\n\s*\n")  # between .txt documents


class CorpusError(ValueError):
    """The corpus cannot be read; the message names the file (and row) and the fix."""


def format_of(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in sorted(FORMATS, key=len, reverse=True) if name.endswith(s)), None)


def _supported() -> str:
    return ", ".join(FORMATS)


def corpus_files(path: str | os.PathLike) -> list[Path]:
    """The corpus files under ``path`` (a file or a folder, searched recursively), sorted; an
    unknown file type or a format whose package is missing is an error now, before any work."""
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"corpus path {path} does not exist; pass --corpus DIR (a folder of {_supported()} files)")
    if path.is_file():
        files = [path]
    else:
        files, unknown = [], []
        for p in _walk(path):
            if p.name.startswith(".") or p.name in HF_METADATA:
                continue
            (files if format_of(p) else unknown).append(p)
        if unknown:
            shown = ", ".join(str(p) for p in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            raise CorpusError(f"unknown corpus file type: {shown}; supported: {_supported()}; "
                              "move other files out of the corpus folder")
        if not files:
            raise CorpusError(f"no corpus files under {path} ({_supported()}); add text files or point --corpus elsewhere")
    for f in files:
        fmt = format_of(f)
        if fmt is None:
            raise CorpusError(f"{f}: unsupported corpus file type {''.join(f.suffixes) or '(none)'!r}; use one of {_supported()}")
        if not f.is_file():  # a dangling link, a socket ...
            raise CorpusError(f"{f}: cannot read it (not a regular file or a broken link); fix or remove it")
        if not os.access(f, os.R_OK):
            raise CorpusError(f"{f}: cannot read it (permission denied); fix its permissions or remove it")
        need = FORMATS[fmt][2]
        if need and not _importable(need):
            raise CorpusError(f"{f}: reading {fmt} files needs the '{need}' package; {EXTRA}")
    return files


def _walk(folder: Path) -> list[Path]:
    """Every file under ``folder``, sorted, leaving out hidden folders and token-shard folders
    (sparselm's own output, e.g. a cache kept inside the corpus folder)."""
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".") and not _is_shard_folder(Path(root) / d)]
        found += [Path(root) / n for n in names]
    return sorted(found)


def _is_shard_folder(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() and ((folder / "manifest.json").is_file() or (folder / "progress.json").is_file())


def _importable(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


class DocumentStream:
    """The documents of a list of corpus files, with the bytes read so far (for progress bars)
    and the malformed rows skipped."""

    def __init__(self, files: list[Path], text_field: str = "text", skip_bad_rows: bool = False):
        self.files, self.text_field, self.skip_bad_rows = files, text_field, skip_bad_rows
        self.total_bytes = sum(f.stat().st_size for f in files)
        self.bytes_done = 0  # on disk (compressed bytes for compressed files)
        self.bad_rows = 0
        self.bad_examples: list[str] = []

    def __iter__(self) -> Iterator[str]:
        """Every non-empty document (stripped), file by file."""
        self.bytes_done, self.bad_rows, self.bad_examples = 0, 0, []
        done = 0
        for f in self.files:
            kind = FORMATS[format_of(f)][0]
            reader = {"txt": self._txt, "jsonl": self._jsonl, "parquet": self._parquet, "arrow": self._arrow}[kind]
            try:
                yield from reader(f, lambda pos: setattr(self, "bytes_done", done + pos))
            except CorpusError:
                raise
            except _read_errors() as e:  # corrupt archives, truncated files, I/O errors
                raise CorpusError(f"{f}: cannot read it ({type(e).__name__}: {e}); fix or remove the file") from None
            done += f.stat().st_size
            self.bytes_done = done

    def bad(self, where: str, problem: str) -> None:
        """A malformed row: an error, or counted and skipped with ``skip_bad_rows``."""
        msg = f"{where}: {problem}"
        if not self.skip_bad_rows:
            raise CorpusError(f"{msg}; fix the row, pass --text-field NAME if the text is in another field, "
                              "or pass --skip-bad-rows to skip such rows")
        self.bad_rows += 1
        if len(self.bad_examples) < 5:
            self.bad_examples.append(msg)

    # ---- text formats ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _open(self, f: Path):
        """(raw file, decompressed binary stream) of a text file; ``raw.tell()`` is the on-disk position."""
        compression = FORMATS[format_of(f)][1]
        with open(f, "rb") as raw:
            if compression == "gz":
                yield raw, gzip.GzipFile(fileobj=raw)
            elif compression == "zst":
                import zstandard

                yield raw, io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))
            else:
                yield raw, raw

    def _lines(self, f: Path, at):
        """(line number, raw line) of a text file, decompressed; ``at(pos)`` reports the on-disk position."""
        with self._open(f) as (raw, fh):
            offset = 0
            for lineno, line in enumerate(fh, 1):
                if offset < BINARY_CHECK_BYTES and b"\x00" in line:
                    raise CorpusError(f"{f}: looks like a binary file (NUL bytes); remove it from the corpus folder")
                yield lineno, line
                offset += len(line)
                if lineno % 4096 == 0:
                    at(raw.tell())

    def _txt(self, f: Path, at) -> Iterator[str]:
        """Documents are separated by lines of only whitespace, each stripped: ``re.split(r"\\n\\s*\\n")``
        on the whole text, done block by block (the unfinished end of a block waits for the next)."""
        decoder = codecs.getincrementaldecoder("utf-8")()
        with self._open(f) as (raw, fh):
            offset, carry = 0, ""
            while True:
                block = fh.read(BLOCK_BYTES)
                if offset < BINARY_CHECK_BYTES and b"\x00" in block[: BINARY_CHECK_BYTES - offset]:
                    raise CorpusError(f"{f}: looks like a binary file (NUL bytes); remove it from the corpus folder")
                pending = len(decoder.getstate()[0])
                try:
                    text = decoder.decode(block, final=not block)
                except UnicodeDecodeError as e:
                    raise CorpusError(f"{f}: not valid UTF-8 at byte {offset - pending + e.start}; "
                                      "re-encode it as UTF-8 or remove it") from None
                offset += len(block)
                buf, pos = carry + text, 0
                # a separator ending in the new text starts in the carry's trailing whitespace, not before
                for m in _SEPARATOR.finditer(buf, len(carry.rstrip())):
                    yield from _nonempty(buf[pos : m.start()])
                    pos = m.end()
                carry = buf[pos:]
                at(raw.tell())
                if not block:
                    break
            yield from _nonempty(carry)

    def _jsonl(self, f: Path, at) -> Iterator[str]:
        for lineno, raw in self._lines(f, at):
            where = f"{f}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                self.bad(where, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                self.bad(where, f"invalid JSON ({e.msg}); each line must be an object like {{\"{self.text_field}\": \"...\"}}")
                continue
            text = self._text_of(row, where)
            if text is not None:
                yield from _nonempty(text)

    def _text_of(self, row, where: str) -> str | None:
        field = self.text_field
        if not isinstance(row, dict) or field not in row:
            keys = ", ".join(map(str, list(row)[:8])) if isinstance(row, dict) else type(row).__name__
            self.bad(where, f"no field '{field}' (the row has: {keys or 'no fields'})")
            return None
        if not isinstance(row[field], str):
            self.bad(where, f"field '{field}' is {type(row[field]).__name__}, not a string")
            return None
        return row[field]

    # ---- columnar formats ------------------------------------------------------------------------
    def _columns(self, f: Path, names: list[str]) -> None:
        if self.text_field not in names:
            raise CorpusError(f"{f}: no column '{self.text_field}' (columns: {', '.join(names)}); "
                              "pass --text-field NAME for the column that holds the text")

    def _rows(self, f: Path, batches, first_row: int = 0) -> Iterator[str]:
        row = first_row
        for batch in batches:
            for text in batch.column(self.text_field).to_pylist():
                if isinstance(text, str):
                    yield from _nonempty(text)
                else:
                    what = "empty (null)" if text is None else f"{type(text).__name__}, not a string"
                    self.bad(f"{f}: row {row}", f"field '{self.text_field}' is {what}")
                row += 1

    def _parquet(self, f: Path, at) -> Iterator[str]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(f, pre_buffer=False)  # pre-buffered column chunks stay resident: memory grew with the file
        except pa.ArrowException as e:
            raise CorpusError(f"{f}: not a readable parquet file ({e}); fix or remove it") from None
        self._columns(f, pf.schema_arrow.names)
        size, total = f.stat().st_size, max(1, pf.metadata.num_rows)
        row = 0
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=[self.text_field]):
            yield from self._rows(f, [batch], row)
            row += batch.num_rows
            at(size * row // total)

    def _arrow(self, f: Path, at) -> Iterator[str]:
        import pyarrow as pa

        with pa.OSFile(str(f)) as fh:
            try:
                reader = pa.ipc.open_stream(fh)  # what datasets writes
            except pa.ArrowInvalid:
                fh.seek(0)
                try:
                    reader = pa.ipc.open_file(fh)
                except pa.ArrowInvalid as e:
                    raise CorpusError(f"{f}: not an Arrow file ({e}); fix or remove it") from None
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            else:
                batches = iter(reader)
            self._columns(f, reader.schema.names)
            row = 0
            for batch in batches:
                yield from self._rows(f, [batch], row)
                row += batch.num_rows
                at(fh.tell())


def _read_errors() -> tuple:
    errors = (OSError, EOFError, zlib.error, ValueError)
    try:
        import zstandard

        return errors + (zstandard.ZstdError,)
    except ImportError:
        return errors


def _nonempty(text: str) -> Iterator[str]:
    text = text.strip()
    if text:
        yield text


def read_documents(path: str | os.PathLike, text_field: str = "text", skip_bad_rows: bool = False) -> Iterator[str]:
    """Every non-empty document of the corpus at ``path``, file by file."""
    n = 0
    for doc in DocumentStream(corpus_files(path), text_field, skip_bad_rows):
        n += 1
        yield doc
    if n == 0:
        raise CorpusError(f"corpus {path} holds no text; add documents to its files")
