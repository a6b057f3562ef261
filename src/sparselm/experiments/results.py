"""Collect a grid's run directories into one results table (``results.json`` / ``results.csv``)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ..files import write_json
from .grid import plan
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


def collect(spec: ExperimentSpec, out: Path) -> dict:
    """One row per cell, whatever its status, from the files the grid's cells left."""
    pre, fine = plan(spec, out)
    pretrain_rows = []
    for cell in pre:
        s = _read_json(cell.dir / "summary.json")
        pretrain_rows.append({
            "cell": cell.name, "sparsity": cell.sparsity, "method": cell.method if cell.sparsity else "dense", "seed": cell.seed,
            "status": cell.status(),
            "val_loss": s.get("final_val_loss"), "train_flops": s.get("train_flops"), "dense_train_flops": s.get("dense_train_flops"),
            "average_param_count": s.get("average_param_count"), "final_param_count": s.get("final_param_count"),
            "tokens": s.get("tokens_seen"), "wall_time_s": s.get("wall_time_s"), "curve": _curve(cell.dir),
        })
    rows = []
    for cell in fine:
        s = _read_json(cell.dir / "summary.json")
        ev = _read_json(cell.eval_file)
        p = _read_json(cell.pretrain.dir / "summary.json")
        row = {
            "cell": cell.name, "sparsity": cell.pretrain.sparsity, "method": cell.pretrain.method if cell.pretrain.sparsity else "dense",
            "seed": cell.pretrain.seed, "task": cell.task, "mode": cell.mode,
            "status": cell.status(),
            "pretrain_flops": p.get("train_flops"), "pretrain_dense_flops": p.get("dense_train_flops"),
            "pretrain_val_loss": p.get("final_val_loss"), "finetune_flops": s.get("finetune_flops"),
            "finetune_val_loss": s.get("final_val_loss"),
            "wall_time_s": sum(x or 0 for x in (p.get("wall_time_s"), s.get("wall_time_s"), ev.get("generation_time_s"))),
        }
        row.update(ev.get("metrics", {}))
        rows.append(row)
    return {"spec": spec.to_dict(), "eval_split": spec.eval_split, "pretrain": pretrain_rows, "rows": rows}


def write_results(results: dict, out: Path) -> None:
    out = Path(out)
    write_json(out / "results.json", results)
    keys: list[str] = []
    for r in results["rows"]:
        keys += [k for k in r if k not in keys]
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(results["rows"])
    write_report(results, out)
