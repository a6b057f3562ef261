"""Collect a grid's run directories into one results table (``results.json`` / ``results.csv``)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from ..evaluation.uncertainty import bootstrap_ci, paired_bootstrap
from ..files import write_json
from .grid import PruneCell, plan
from .stats import CELL_KEYS, aggregate
from .report import write_report
from .spec import ExperimentSpec


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _curve(run_dir: Path) -> list[dict]:
    """Validation points and (every 10th) training-loss points of a pre-training run."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    flops_at, tokens_at, out = {}, {}, []
    for r in rows:
        if "loss" in r:
            flops_at[r["step"]], tokens_at[r["step"]] = r.get("train_flops"), r.get("tokens")
            out.append({"step": r["step"], "tokens": r.get("tokens"), "train_flops": r.get("train_flops"), "loss": r["loss"]})
        if "val_loss" in r:
            out.append({"step": r["step"], "tokens": tokens_at.get(r["step"]), "train_flops": flops_at.get(r["step"]), "val_loss": r["val_loss"]})
    return out


def _start_summary(cell) -> dict:
    """The summary of a fine-tuning starting point. A pruned run's summary is its dense source's (so its
    pre-training FLOPs are the dense run's) with ``pruning`` added: its wall time gains the pruning's,
    and the source's validation loss, measured before pruning, is not the pruned model's."""
    s = _read_json(cell.dir / "summary.json")
    if isinstance(cell, PruneCell) and s:
        s = dict(s, final_val_loss=None,
                 wall_time_s=(s.get("wall_time_s") or 0) + (s.get("pruning", {}).get("seconds") or 0))
    return s


def _pruning(cell) -> dict:
    """How a prune cell was made, for the tables: method, refinement, N:M, calibration source."""
    if not isinstance(cell, PruneCell):
        return {}
    s = cell.row.settings
    return {"pruning": {"method": s["method"], "refine": s.get("refine"), "n_m": s.get("n_m"),
                        "calibration": s.get("calibration", "corpus"), "from": cell.source.name},
            "label": cell.row.display}


def collect(spec: ExperimentSpec, out: Path) -> dict:
    """One row per cell, whatever its status, from the files the grid's cells left; BLEU intervals
    and paired tests from the evaluations' per-input statistics."""
    pre, fine = plan(spec, out)
    segments: dict = {}
    pretrain_rows = []
    for cell in pre:
        s = _start_summary(cell)
        pretrain_rows.append({
            "cell": cell.name, "sparsity": cell.sparsity, "method": cell.method if cell.sparsity else "dense", "seed": cell.seed,
            "status": cell.status(), **_pruning(cell),
            "val_loss": s.get("final_val_loss"), "train_flops": s.get("train_flops"), "dense_train_flops": s.get("dense_train_flops"),
            "average_param_count": s.get("average_param_count"), "final_param_count": s.get("final_param_count"),
            "tokens": s.get("tokens_seen"), "wall_time_s": s.get("wall_time_s"), "curve": _curve(cell.dir),
        })
    rows = []
    for cell in fine:
        s = _read_json(cell.dir / "summary.json")
        ev = _read_json(cell.eval_file)
        p = _start_summary(cell.pretrain)
        row = {
            "cell": cell.name, "sparsity": cell.pretrain.sparsity, "method": cell.pretrain.method if cell.pretrain.sparsity else "dense",
            "seed": cell.pretrain.seed, "task": cell.task, "mode": cell.mode,
            "status": cell.status(), **{k: v for k, v in _pruning(cell.pretrain).items() if k == "label"},
            "pretrain_flops": p.get("train_flops"), "pretrain_dense_flops": p.get("dense_train_flops"),
            "pretrain_val_loss": p.get("final_val_loss"), "finetune_flops": s.get("finetune_flops"),
            "finetune_val_loss": s.get("final_val_loss"),
            "wall_time_s": sum(x or 0 for x in (p.get("wall_time_s"), s.get("wall_time_s"), ev.get("generation_time_s"))),
        }
        row.update(ev.get("metrics", {}))
        if "confidence" in ev:
            row["bleu_ci"] = ev["confidence"]["bleu"]
        row["ft_curve"] = [c for c in _curve(cell.dir) if "val_loss" in c]
        rows.append(row)
        segments[(cell.task, cell.mode, cell.pretrain.sparsity, row["method"], cell.pretrain.seed)] = ev.get("bleu_segments")
    pruned = {c.method for c in pre if isinstance(c, PruneCell)}
    return {"spec": spec.to_dict(), "eval_split": spec.eval_split, "pretrain": pretrain_rows, "rows": rows,
            "pooled_bleu_ci": pooled_intervals(segments), "comparisons": comparisons(segments, pruned)}


def _stack(segments: dict, task: str, mode: str, sparsity: float, method: str, seeds) -> np.ndarray | None:
    """Per-input BLEU statistics of a cell, all given seeds stacked (rows paired by seed and input)."""
    parts = [segments.get((task, mode, sparsity, method, seed)) for seed in seeds]
    return None if not parts or any(p is None for p in parts) else np.concatenate([np.asarray(p, dtype=np.float64) for p in parts])


def pooled_intervals(segments: dict) -> list[dict]:
    """A 95% bootstrap CI of BLEU per cell over its test inputs, every seed's outputs pooled."""
    out = []
    for task, mode, sparsity, method in sorted({k[:4] for k in segments}):
        seeds = sorted(k[4] for k in segments if k[:4] == (task, mode, sparsity, method))
        stacked = _stack(segments, task, mode, sparsity, method, seeds)
        if stacked is not None:
            out.append({"task": task, "mode": mode, "sparsity": sparsity, "method": method, "n_seeds": len(seeds),
                        "ci": list(bootstrap_ci(task, stacked))})
    return out


def comparisons(segments: dict, pruned: set = frozenset()) -> list[dict]:
    """SPDF's two questions, by paired bootstrap over test inputs (seeds pooled, paired by seed):
    does sparse pre-training + dense fine-tuning lose BLEU against dense pre-training, and does dense
    fine-tuning beat sparse fine-tuning of the same sparse model? For ``pruned`` methods (prune rows) the
    same two, and whether SPDF at their sparsity beats them, both dense fine-tuned."""
    out = []
    levels = sorted({(k[0], k[2], k[3]) for k in segments if k[2] > 0})
    for task, sparsity, method in levels:
        pairs = [("pruned_vs_dense" if method in pruned else "spdf_vs_dense", ("dense", sparsity, method), ("dense", 0.0, "dense")),
                 ("dense_ft_vs_sparse_ft", ("dense", sparsity, method), ("sparse", sparsity, method))]
        if method in pruned:
            pairs += [("spdf_vs_pruned", ("dense", sparsity, spdf), ("dense", sparsity, method))
                      for t, s, spdf in levels if (t, s) == (task, sparsity) and spdf not in pruned]
        for what, a, b in pairs:
            seeds = sorted({k[4] for k in segments if k[:4] == (task, *a)} & {k[4] for k in segments if k[:4] == (task, *b)})
            sa, sb = _stack(segments, task, *a, seeds), _stack(segments, task, *b, seeds)
            if sa is None or sb is None:
                continue
            test = paired_bootstrap(task, sa, sb)
            out.append({"task": task, "what": what, "a": list(a), "b": list(b), "n_seeds": len(seeds), **test})
    return out


def write_results(results: dict, out: Path) -> None:
    out = Path(out)
    write_json(out / "results.json", results)
    cells = list(aggregate(results["rows"]).values())
    pooled = {tuple(c[k] for k in CELL_KEYS): c["ci"] for c in results.get("pooled_bleu_ci", [])}
    for c in cells:
        lo_hi = pooled.get(tuple(c[k] for k in CELL_KEYS))
        c["bleu_ci_lo"], c["bleu_ci_hi"] = lo_hi if lo_hi else (None, None)
    _write_csv(out / "results.csv", cells)  # one row per cell: mean, std and n over seeds, 95% CI over inputs
    _write_csv(out / "results_per_seed.csv", results["rows"])
    write_report(results, out)


def _write_csv(path: Path, rows: list[dict]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k, v in r.items() if k not in keys and not isinstance(v, (list, dict))]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
