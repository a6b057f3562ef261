"""The cells of an experiment grid and where each keeps its files. The runner fills these files and
results reads them, so both take the layout and a cell's status from here.

Layout under the grid's ``out``: ``pretrain/<cell>/``, ``prune/<cell>/`` (a dense run pruned one-shot),
``finetune/<pretrain or prune cell>/<task>-<mode>/`` (with ``eval/<task>-<split>.json`` from
``evaluate``), ``failures/<kind>-<cell>.txt``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..evaluation.evaluate import eval_path
from .spec import ExperimentSpec, PruneRow


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
class PruneCell(_Status):
    """A seed's dense pre-training run pruned one-shot by a spec's prune row: a starting point for
    fine-tuning like a pre-training cell (same ``sparsity``, ``method``, ``seed``, ``dir``)."""

    name: str
    row: PruneRow
    source: PretrainCell  # the dense run it prunes
    dir: Path
    failure_file: Path

    @property
    def sparsity(self) -> float:
        return self.row.sparsity

    @property
    def method(self) -> str:
        return self.row.label

    @property
    def seed(self) -> int:
        return self.source.seed

    def done(self) -> bool:
        return (self.dir / "summary.json").exists()


@dataclass
class FinetuneCell(_Status):
    """Fine-tuning and then evaluation: done once ``evaluate`` has written ``eval_file``."""

    name: str
    pretrain: PretrainCell | PruneCell
    task: str
    mode: str
    dir: Path
    eval_file: Path
    failure_file: Path

    def done(self) -> bool:
        return self.eval_file.exists()


def _failure_file(out: Path, kind: str, name: str) -> Path:
    return out / "failures" / f"{kind}-{name.replace('/', '__')}.txt"


def plan(spec: ExperimentSpec, out: Path) -> tuple[list[PretrainCell | PruneCell], list[FinetuneCell]]:
    """Every starting point of fine-tuning, in the order they run: per seed, the pre-training cells (one
    per sparsity and method; one dense baseline), then the prune cells (one per prune row, each
    pruning that seed's dense run); and every fine-tuning cell (one per starting point, task, mode)."""
    out = Path(out)
    pre, fine = [], []

    def add_finetuning(cell, ends_sparse: bool):
        for task in spec.tasks:
            for mode in spec.modes:
                if mode == "sparse" and not ends_sparse:
                    continue  # sparse fine-tuning of a model without masks is dense fine-tuning
                fname, fdir = f"{cell.name}/{task}-{mode}", out / "finetune" / cell.name / f"{task}-{mode}"
                fine.append(FinetuneCell(fname, cell, task, mode, fdir, eval_path(fdir, task, spec.eval_split),
                                         _failure_file(out, "finetune", fname)))

    for seed in spec.seeds:
        dense = None
        for sparsity in spec.sparsities:
            for method in (["static"] if sparsity == 0 else spec.methods_at(sparsity)):
                name = f"s{round(100 * sparsity):02d}-{'dense' if sparsity == 0 else method}-seed{seed}"
                cell = PretrainCell(name, float(sparsity), method, seed, out / "pretrain" / name,
                                    _failure_file(out, "pretrain", name))
                dense = cell if sparsity == 0 else dense
                pre.append(cell)
                add_finetuning(cell, spec.ends_sparse(sparsity, method))
        for row in spec.prune_rows:  # the spec checked that a dense run exists
            name = f"{row.label}-s{round(100 * row.sparsity):02d}-seed{seed}"
            cell = PruneCell(name, row, dense, out / "prune" / name, _failure_file(out, "prune", name))
            pre.append(cell)
            add_finetuning(cell, True)
    return pre, fine
