"""Run files, written and read safely.

Written: a file is either the old one or the new one, never half of one, and a full disk is one
line naming the file instead of a library traceback. Read: damage is an error naming the file and
what to do, never a bare parser traceback or (worse) silently wrong weights.

A directory sparselm writes (a checkpoint, a finished run) ends with ``manifest.json``: sha256 and
size of each file it wrote, plus the kept-weight count of each mask. It is written last, so its
presence marks the directory complete; ``verify`` catches bytes changed or cut off afterwards.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable, Mapping

MANIFEST = "manifest.json"


class CorruptFileError(ValueError):
    """A run file cannot be parsed or does not match what was recorded when it was written."""


class NoSpaceError(OSError):
    """The disk filled up while sparselm wrote a file; partial files were removed."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


def is_no_space(e: BaseException) -> bool:
    """ENOSPC, raised as an OSError or only in a library's message (safetensors' SafetensorError)."""
    return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e)


# ---- writing -------------------------------------------------------------------------------------
def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


@contextlib.contextmanager
def cleanup_on_failure(partial: Path, shown: str | Path, intact: str):
    """Remove ``partial`` (a file or directory) if the block fails; a full disk becomes a
    ``NoSpaceError`` naming ``shown`` (the file being written) and saying what is still intact."""
    try:
        yield
    except BaseException as e:
        _remove(partial)
        if is_no_space(e):
            raise NoSpaceError(f"no space left on device while writing {shown}; {intact}") from e
        raise


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with cleanup_on_failure(tmp, path, f"{path.name} was left as it was"):
        tmp.write_text(text, encoding="utf-8")
        _fsync(tmp)
        os.replace(tmp, path)


def write_json(path: str | Path, data) -> None:
    """``write_text`` of ``data`` as indented JSON."""
    write_text(path, json.dumps(data, indent=2))


class _WriteAll:
    """A file for ``torch.save`` whose writes are complete or raise. torch ignores short writes and
    turns its writer's OSError (a full disk) into 'unexpected pos', so the error is kept here."""

    def __init__(self, raw):
        self.raw, self.error = raw, None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        try:
            while view:
                view = view[self.raw.write(view):]
        except OSError as e:
            self.error = e
            raise
        return n

    def flush(self) -> None:
        pass


def save_torch(obj, path: str | Path) -> None:
    """``torch.save`` that reports a full disk as the OSError it is."""
    import torch

    with open(path, "wb", buffering=0) as raw:
        out = _WriteAll(raw)
        try:
            torch.save(obj, out)
        except Exception:
            if out.error is not None:
                raise out.error from None
            raise


class Staging:
    """A fresh temporary directory that a set of files is written into before the caller moves it
    into place. If anything fails it is removed, and a full disk names the file being written (as
    ``shown / name``, where it was going) and what is still intact."""

    def __init__(self, tmp: Path, shown: Path, intact: str):
        self.dir, self.shown, self.intact, self.current = Path(tmp), Path(shown), intact, None

    def __enter__(self) -> Staging:
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        return self

    def write(self, name: str, writer: Callable[[Path], object]) -> None:
        """``writer(path)`` writes ``name`` (a file, or a directory of files) into the staging directory."""
        self.current = name
        writer(self.dir / name)

    def files(self) -> list[str]:
        """Every staged file (relative paths), each flushed to disk."""
        names = sorted(p.relative_to(self.dir).as_posix() for p in self.dir.rglob("*") if p.is_file())
        for name in names:
            _fsync(self.dir / name)
        return names

    def seal(self, masks: Mapping | None = None, **extra) -> None:
        """Write the manifest of every staged file: last, so that its presence marks the set complete."""
        names = self.files()
        self.write(MANIFEST, lambda path: write_manifest(self.dir, names, masks, **extra))

    def __exit__(self, kind, e, tb) -> bool:
        if e is not None:  # re-raised through the one cleanup rule
            with cleanup_on_failure(self.dir, self.shown / (self.current or ""), self.intact):
                raise e
        return False


# ---- the manifest -------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path, names: Iterable[str], masks: Mapping | None = None, **extra) -> None:
    """Record sha256 and size of ``names`` (and the kept count of each mask) in ``directory``; call it last."""
    directory = Path(directory)
    files = {n: {"sha256": sha256(directory / n), "size": (directory / n).stat().st_size} for n in names}
    kept = {k: m if isinstance(m, int) else int(m.sum()) for k, m in masks.items()} if masks else {}  # masks or counts
    write_json(directory / MANIFEST, {"files": files, "mask_kept": kept, **extra})


def verify(directory: Path, todo: str, hashes: bool = True) -> dict | None:
    """The manifest of ``directory`` after checking each file it lists (sizes only unless ``hashes``),
    or None when it has none: a directory from elsewhere or an older sparselm has nothing to verify."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.exists():
        return None
    manifest = read_json(path, todo)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CorruptFileError(f"{path} is corrupt (no 'files' table); {todo}")
    for name, record in manifest["files"].items():
        f = directory / name
        if not f.is_file():
            raise CorruptFileError(f"{f} is missing, but {path} lists it; {todo}")
        if f.stat().st_size != record.get("size"):
            mismatch = "size"
        elif hashes and sha256(f) != record.get("sha256"):
            mismatch = "sha256"
        else:
            continue
        raise CorruptFileError(f"{f} is corrupt ({mismatch} mismatch with {path}): the file was modified or "
                               f"truncated after it was written; {todo}")
    return manifest


def check_mask_counts(masks: Mapping, kept: Mapping[str, float], masks_file: Path, source: str, todo: str,
                      rel_tol: float = 0.0) -> None:
    """Each mask keeps as many weights as recorded when it was written (``kept``, by layer): masks
    that load fine but hold wrong bits would otherwise train or report a wrong sparsity silently."""
    for name, expected in kept.items():
        if name not in masks:
            raise CorruptFileError(f"{masks_file} has no mask for layer {name}, which {source} records; {todo}")
        found, total = int(masks[name].sum()), masks[name].numel()
        if abs(found - expected) > rel_tol * total + 0.5:
            raise CorruptFileError(f"{masks_file}: layer {name} keeps {found} of {total} weights, but {source} "
                                   f"records {round(expected)}: the masks were written wrong or changed afterwards; {todo}")


# ---- reading ------------------------------------------------------------------------------------
def read_json(path: str | Path, todo: str = "restore it from a copy or recreate it"):
    """Parse a JSON run file; a damaged one is an error naming the file and line."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CorruptFileError(f"{path} is corrupt ({e.msg} at line {e.lineno}, column {e.colno}); {todo}") from None
    except UnicodeDecodeError as e:
        raise CorruptFileError(f"{path} is corrupt (not UTF-8 text at byte {e.start}); {todo}") from None


@contextlib.contextmanager
def reading(path: str | Path, todo: str):
    """Name ``path`` (a file, or a description of files) in a parser's error while loading it:
    safetensors, torch.load, tokenizers and JSON name no file of their own."""
    try:
        yield
    except CorruptFileError:
        raise
    except Exception as e:
        if isinstance(e, (ValueError, OSError)) and not isinstance(e, (json.JSONDecodeError, UnicodeDecodeError)):
            raise  # sparselm's own messages, and missing files, name their file
        detail = (str(e).strip().splitlines() or [""])[0][:300]
        raise CorruptFileError(f"{path} cannot be read ({type(e).__name__}: {detail}): it is truncated, damaged or "
                               f"not written for this model; {todo}") from e
