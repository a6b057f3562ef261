"""The cells of an experiment grid and where each keeps its files. The runner fills these files and
results reads them, so both take the layout and a cell's status from here.

Layout under the grid's ``out``: ``pretrain/<cell>/``, ``finetune/<pretrain cell>/<task>-<mode>/``
(with ``eval/<task>-<split>.json`` from ``evaluate``), ``failures/<kind>-<cell>.txt``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..evaluation.evaluate import eval_path
from .spec import ExperimentSpec


class _Status:
    """A cell's state, read from its files: ``done()`` per kind of cell, failures alike."""

    def status(self) -> str:
        """'done', 'failed' (its last attempt raised) or 'missing' (not run yet, or interrupted)."""
        return "done" if self.done() else "failed" if self.failure_file.exists() else "missing"


@dataclass
class PretrainCell(_Status):
    name: str
    sparsity: float
    method: str
    seed: int
    dir: Path
    failure_file: Path  # the traceback of its last failed attempt

    def done(self) -> bool:
        return (self.dir / "summary.json").exists()


@dataclass
class FinetuneCell(_Status):
    """Fine-tuning and then evaluation: done once ``evaluate`` has written ``eval_file``."""

    name: str
    pretrain: PretrainCell
    task: str
    mode: str
    dir: Path
    eval_file: Path
    failure_file: Path

    def done(self) -> bool:
        return self.eval_file.exists()


def _failure_file(out: Path, kind: str, name: str) -> Path:
    return out / "failures" / f"{kind}-{name.replace('/', '__')}.txt"


def plan(spec: ExperimentSpec, out: Path) -> tuple[list[PretrainCell], list[FinetuneCell]]:
    """Every pre-training cell (one per seed, sparsity, method; one dense baseline per seed) and every
    fine-tuning cell (one per pre-training cell, task, mode)."""
    out = Path(out)
    pre, fine = [], []
    for seed in spec.seeds:
        for sparsity in spec.sparsities:
            for method in (["static"] if sparsity == 0 else spec.methods_at(sparsity)):
                name = f"s{round(100 * sparsity):02d}-{'dense' if sparsity == 0 else method}-seed{seed}"
                cell = PretrainCell(name, float(sparsity), method, seed, out / "pretrain" / name,
                                    _failure_file(out, "pretrain", name))
                pre.append(cell)
                for task in spec.tasks:
                    for mode in spec.modes:
                        if mode == "sparse" and not spec.ends_sparse(sparsity, method):
                            continue  # sparse fine-tuning of a model without masks is dense fine-tuning
                        fname, fdir = f"{name}/{task}-{mode}", out / "finetune" / name / f"{task}-{mode}"
                        fine.append(FinetuneCell(fname, cell, task, mode, fdir, eval_path(fdir, task, spec.eval_split),
                                                 _failure_file(out, "finetune", fname)))
    return pre, fine
