"""Downstream data-to-text tasks: E2E NLG, WebNLG 2017, DART, and any JSONL of source/target rows.

Every task becomes a list of ``Example(id, source, refs)`` per split: ``source`` is the linearised
input, ``refs`` all human references for it (training uses one row per reference; evaluation scores
against all). Splits follow ``shared/data/README.md``: E2E trains on ``devset.csv`` minus the MRs
whose SHA-1 ends in 0/1 (validation) and tests on ``testset_w_refs.csv`` (with ``trainset.csv``
present, the official train/dev/test are used); WebNLG hashes the entry id, DART its tripleset (as
``subject | property | object`` lines; repeated triplesets become one input with all their
references): last hex digit 0-3 -> test, 4 -> validation, else train. No input is in two splits.

A malformed row raises ``TaskDataError`` naming file, line/entry and field; with
``skip_bad_rows=True`` it is skipped, counted and warned about instead. Nothing is dropped silently.

Each task is a ``Task`` in ``TASKS``: adding one takes a loader and one ``register_task`` call, from
any module; training, evaluation, scoring and experiment specs then know it by name.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from ..registry import Registry
from .paths import data_root

log = logging.getLogger(__name__)
SPLITS = ("train", "validation", "test")
SEPARATOR = " ||"  # between the linearised input and the text, as in the LoRA/SPDF NLG setups


class TaskDataError(ValueError):
    """A malformed task file; the message names file, row and field."""


@dataclass
class Example:
    id: str
    source: str
    refs: list[str] = field(default_factory=list)

    @property
    def prompt(self) -> str:
        return self.source + SEPARATOR


@dataclass
class TaskData:
    name: str
    splits: dict[str, list[Example]]
    skipped: int = 0

    def pairs(self, split: str) -> list[tuple[str, str]]:
        """(prompt, target) training pairs: one per reference."""
        return [(ex.prompt, " " + ref) for ex in self.splits[split] for ref in ex.refs]


class _Rows:
    """Collects examples; raises or counts malformed rows."""

    def __init__(self, skip_bad_rows: bool):
        self.skip = skip_bad_rows
        self.skipped = 0

    def bad(self, where: str, field_name: str, problem: str) -> None:
        msg = f"{where}: field '{field_name}' {problem}"
        if not self.skip:
            raise TaskDataError(msg + " (fix the row, or pass --skip-bad-rows to skip such rows)")
        self.skipped += 1
        log.warning("skipping malformed row: %s", msg)


def _hex_tail(key: str) -> str:
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[-1]


def _split_of(key: str) -> str:
    tail = _hex_tail(key)
    return "test" if tail in "0123" else "validation" if tail == "4" else "train"


def _clean(text: str) -> str:
    return " ".join(str(text).replace("_", " ").strip().strip('"').split())


def _linearise(triples) -> str:
    """'subject : property : object | ...', underscores as spaces (the LoRA NLG preprocessing)."""
    return " | ".join(f"{_clean(s)} : {_clean(p)} : {_clean(o)}" for s, p, o in triples)


def _texts(items, key: str) -> list[str]:
    """Non-empty ``key`` strings of a list of reference objects."""
    return [t for t in ((x.get(key) or "").strip() for x in items or [] if isinstance(x, dict)) if t]


# ---- E2E ---------------------------------------------------------------------------------------
def _read_e2e_csv(path: Path, rows: _Rows) -> "OrderedDict[str, list[str]]":
    if not path.is_file():
        raise FileNotFoundError(f"E2E file {path} not found; pass --data-dir pointing at a folder with devset.csv")
    grouped: OrderedDict[str, list[str]] = OrderedDict()
    reader = csv.DictReader(io.StringIO(_read_utf8(path), newline=""))
    missing = {"mr", "ref"} - set(reader.fieldnames or [])
    if missing:
        raise TaskDataError(f"{path}: missing column(s) {sorted(missing)}; an E2E CSV has header 'mr,ref'")
    for i, row in enumerate(reader, start=2):  # line 1 is the header
        where = f"{path}:{i}"
        mr, ref = row.get("mr"), row.get("ref")
        if not mr or not mr.strip():
            rows.bad(where, "mr", "is empty")
            continue
        if not ref or not ref.strip():
            rows.bad(where, "ref", "is empty")
            continue
        grouped.setdefault(mr.strip(), []).append(ref.strip())
    return grouped


def _read_utf8(path: Path) -> str:
    """A whole task file as text; a byte that is not UTF-8 is an error naming its line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise TaskDataError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x}); re-encode the file as UTF-8") from None


def load_e2e(folder: Path, skip_bad_rows: bool = False, cleaned: bool = False) -> TaskData:
    rows = _Rows(skip_bad_rows)
    if cleaned:
        train_file, test_file = folder / "devel-fixed.no-ol.csv", folder / "test-fixed.csv"
    else:
        train_file, test_file = folder / "devset.csv", folder / "testset_w_refs.csv"

    def examples(grouped):
        return [Example(id=mr, source=mr, refs=refs) for mr, refs in grouped.items()]

    official_train = folder / ("train-fixed.no-ol.csv" if cleaned else "trainset.csv")
    if official_train.is_file():
        splits = {"train": examples(_read_e2e_csv(official_train, rows)),
                  "validation": examples(_read_e2e_csv(train_file, rows))}
    else:
        dev = examples(_read_e2e_csv(train_file, rows))
        splits = {"train": [e for e in dev if _hex_tail(e.id) not in "01"],
                  "validation": [e for e in dev if _hex_tail(e.id) in "01"]}
    splits["test"] = examples(_read_e2e_csv(test_file, rows))
    return TaskData("e2e-cleaned" if cleaned else "e2e", splits, rows.skipped)


# ---- WebNLG 2017 -------------------------------------------------------------------------------
def load_webnlg(folder: Path, skip_bad_rows: bool = False) -> TaskData:
    path = folder / "dev.json"
    data = _load_json(path)
    rows = _Rows(skip_bad_rows)
    entries = data.get("entries") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise TaskDataError(f"{path}: expected {{\"entries\": [...]}} as in the WebNLG 2017 JSON release")
    splits = {s: [] for s in SPLITS}
    for i, wrapper in enumerate(entries):
        if not isinstance(wrapper, dict) or len(wrapper) != 1:
            rows.bad(f"{path}: entry {i}", "entries[i]", "must be an object {\"<id>\": {...}}")
            continue
        (eid, entry), = wrapper.items()
        where = f"{path}: entry {i} (id {eid})"
        triples = entry.get("modifiedtripleset")
        if not isinstance(triples, list) or not triples or not all(
            isinstance(t, dict) and {"subject", "property", "object"} <= set(t) for t in triples
        ):
            rows.bad(where, "modifiedtripleset", "must be a non-empty list of {subject, property, object}")
            continue
        refs = _texts(entry.get("lexicalisations"), "lex")
        if not refs:
            rows.bad(where, "lexicalisations", "has no non-empty 'lex'")
            continue
        source = _linearise((t["subject"], t["property"], t["object"]) for t in triples)
        splits[_split_of(str(eid))].append(Example(id=str(eid), source=source, refs=refs))
    return TaskData("webnlg", splits, rows.skipped)


# ---- DART --------------------------------------------------------------------------------------
def load_dart(folder: Path, skip_bad_rows: bool = False) -> TaskData:
    path = folder / "dart-v1.1.1-full-dev.json"
    data = _load_json(path)
    if not isinstance(data, list):
        raise TaskDataError(f"{path}: expected a JSON list of {{tripleset, annotations}} as in DART v1.1.1")
    rows = _Rows(skip_bad_rows)
    grouped: OrderedDict[str, Example] = OrderedDict()  # the dev file repeats some triplesets
    for i, ex in enumerate(data):
        where = f"{path}: example {i}"
        triples = ex.get("tripleset") if isinstance(ex, dict) else None
        if not isinstance(triples, list) or not triples or not all(isinstance(t, list) and len(t) == 3 for t in triples):
            rows.bad(where, "tripleset", "must be a non-empty list of [subject, property, object]")
            continue
        refs = _texts(ex.get("annotations"), "text")
        if not refs:
            rows.bad(where, "annotations", "has no non-empty 'text'")
            continue
        key = "\n".join(" | ".join(str(x) for x in t) for t in triples)
        example = grouped.setdefault(key, Example(id=str(i), source=_linearise(triples)))
        example.refs += [r for r in refs if r not in example.refs]
    splits = {s: [] for s in SPLITS}
    for key, example in grouped.items():  # keyed by the tripleset: a repeated input never crosses splits
        splits[_split_of(key)].append(example)
    return TaskData("dart", splits, rows.skipped)


# ---- generic JSONL -----------------------------------------------------------------------------
def load_jsonl(folder: Path, skip_bad_rows: bool = False) -> TaskData:
    """``train.jsonl``, ``validation.jsonl`` (or ``val.jsonl``), ``test.jsonl`` with rows
    ``{"source": ..., "target": ...}``; rows sharing a source are one example with several refs."""
    rows = _Rows(skip_bad_rows)
    splits = {}
    for split in SPLITS:
        names = [f"{split}.jsonl"] + (["val.jsonl", "dev.jsonl"] if split == "validation" else [])
        path = next((folder / n for n in names if (folder / n).is_file()), None)
        if path is None:
            raise FileNotFoundError(f"{folder}: no {names[0]}; a JSONL task needs train.jsonl, validation.jsonl and test.jsonl")
        grouped: OrderedDict[str, list[str]] = OrderedDict()
        for lineno, raw in enumerate(path.read_bytes().splitlines(), 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                rows.bad(where, "(line)", f"is not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}; "
                                          "re-encode the file as UTF-8)")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                rows.bad(where, "(line)", f"is not valid JSON ({e.msg})")
                continue
            ok = True
            for key in ("source", "target"):
                if not isinstance(row, dict) or not isinstance(row.get(key), str) or not row[key].strip():
                    rows.bad(where, key, "is missing or not a non-empty string")
                    ok = False
                    break
            if ok:
                grouped.setdefault(row["source"].strip(), []).append(row["target"].strip())
        splits[split] = [Example(id=f"{split}-{i}", source=s, refs=r) for i, (s, r) in enumerate(grouped.items())]
    return TaskData("jsonl", splits, rows.skipped)


def _load_json(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass --data-dir pointing at the task's folder")
    try:
        return json.loads(_read_utf8(path))
    except json.JSONDecodeError as e:
        raise TaskDataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


@dataclass(frozen=True)
class Task:
    """A downstream task, declared once: how to read it and how it is scored.

    ``folder``: its default folder under the shared data root (None: it needs ``--data-dir``).
    ``metrics``: the names of the metrics it is scored with, in display order.
    ``scorers``: metric name -> implementation name, where the task's official scorer is not the
    metric's default implementation (E2E's BLEU is mteval's, not sacrebleu's).
    """

    name: str
    loader: Callable[[Path, bool], TaskData]
    folder: str | None
    metrics: tuple[str, ...]
    scorers: Mapping[str, str] = field(default_factory=dict)


TASKS: Registry[Task] = Registry("task", entry_points="sparselm.tasks")


@TASKS.registrar
def register_task(task: Task, replace: bool = False) -> Task:
    """Make ``task`` loadable and scorable by name; a second task of the same name is an error
    unless ``replace``."""
    return TASKS.register(task.name, task, replace)


get_task = TASKS.lookup


_E2E_METRICS = ("bleu", "nist", "meteor", "rouge_l", "cider")
_E2E_SCORERS = {"bleu": "mteval"}  # the E2E scorer's BLEU comes from mteval-v13a, with NIST
register_task(Task("e2e", load_e2e, "e2e", _E2E_METRICS, _E2E_SCORERS))
register_task(Task("e2e-cleaned", partial(load_e2e, cleaned=True), "e2e-cleaned", _E2E_METRICS, _E2E_SCORERS))
register_task(Task("webnlg", load_webnlg, "webnlg2017", ("bleu", "meteor", "ter")))
register_task(Task("dart", load_dart, "dart", ("bleu", "meteor", "ter")))
register_task(Task("jsonl", load_jsonl, None, ("bleu", "meteor", "rouge_l", "ter")))


def load_task(name: str, data_dir: str | os.PathLike | None = None, skip_bad_rows: bool = False) -> TaskData:
    """Load a task's splits from ``data_dir`` (default: its folder in the shared data)."""
    task = get_task(name)
    if data_dir is None:
        if task.folder is None:
            raise ValueError(f"task {name!r} has no folder in the shared data: it needs --data-dir")
        data_dir = data_root() / task.folder
    data = task.loader(Path(data_dir), skip_bad_rows)
    if data.skipped:
        log.warning("%s: skipped %d malformed rows", name, data.skipped)
    for split, examples in data.splits.items():
        if not examples:
            raise TaskDataError(f"task {name}: split {split!r} is empty in {data_dir}")
    return data
