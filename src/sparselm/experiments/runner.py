"""Run an experiment grid: pre-train once per (sparsity, method, seed), fine-tune and evaluate each
checkpoint per (task, mode). Experiments orchestrate; the training and evaluation packages compute.

Resumable: a finished cell (its ``summary.json``, and for fine-tuning its evaluation) is skipped, an
interrupted one resumes from its checkpoint. A failing cell is recorded in ``failures/`` and the
grid goes on; cells that depend on it are marked blocked.
"""

from __future__ import annotations

import json
import math
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import yaml

from .. import flops
from ..evaluation.evaluate import evaluate
from ..evaluation.generate import DecodingConfig
from ..training import finetune, pretrain
from ..training.distributed import pick_device
from .spec import ExperimentSpec, SpecError

# Throughputs used for --dry-run ETAs (dense-equivalent training FLOP/s: sparsity is simulated with
# dense kernels, so wall time follows dense FLOPs). CPU: measured, tiny preset on 2 cores (9.7e10);
# CUDA: an assumption of ~30% of an H100's bf16 peak, to be replaced by a measurement.
FLOPS_PER_S = {"cpu": 9.7e10, "cuda": 3.0e14}
SECONDS_PER_GENERATED_INPUT = {"cpu": 0.12, "cuda": 0.01}  # beam 10, tiny preset on CPU (measured)
FT_TOKENS_PER_PAIR = 64  # padded tokens per fine-tuning pair, for estimates


@dataclass
class PretrainCell:
    name: str
    sparsity: float
    method: str
    seed: int
    dir: Path


@dataclass
class FinetuneCell:
    name: str
    pretrain: PretrainCell
    task: str
    mode: str
    dir: Path


def plan(spec: ExperimentSpec, out: Path) -> tuple[list[PretrainCell], list[FinetuneCell]]:
    pre, fine = [], []
    for seed in spec.seeds:
        for sparsity in spec.sparsities:
            for method in (["static"] if sparsity == 0 else spec.methods):  # one dense baseline per seed
                label = "dense" if sparsity == 0 else method
                name = f"s{round(100 * sparsity):02d}-{label}-seed{seed}"
                cell = PretrainCell(name, float(sparsity), method, seed, out / "pretrain" / name)
                pre.append(cell)
                for task in spec.tasks:
                    for mode in spec.modes:
                        if sparsity == 0 and mode == "sparse":
                            continue  # sparse fine-tuning of a dense model is dense fine-tuning
                        fine.append(FinetuneCell(f"{name}/{task}-{mode}", cell, task, mode, out / "finetune" / name / f"{task}-{mode}"))
    return pre, fine


def _done(cell) -> bool:
    if isinstance(cell, PretrainCell):
        return (cell.dir / "summary.json").exists()
    summary = cell.dir / "summary.json"
    return summary.exists() and bool(json.loads(summary.read_text()).get("metrics"))


def _planned_train_flops_per_token(cfg, shape, step: int) -> float:
    """Training FLOPs per token the method will spend at ``step`` (uniform per-layer sparsity):
    GMP follows its schedule from a dense start, RigL adds its dense-gradient update steps."""
    from ..sparsity.schedules import SCHEDULES, fraction_to_step

    sparsity = cfg.sparsity
    if cfg.method == "gmp":
        start, end = (fraction_to_step(x, cfg.max_steps) for x in (cfg.sparsity_start, cfg.sparsity_end))
        updates = [t for t in range(start, min(step, end + 1)) if (t - start) % cfg.update_every == 0 or t == end]
        sparsity = SCHEDULES[cfg.schedule](updates[-1], cfg.sparsity, start, end) if updates else 0.0
    rigl_update = (cfg.method == "rigl" and cfg.sparsity > 0 and 0 < step < fraction_to_step(cfg.sparsity_end, cfg.max_steps)
                   and step % cfg.update_every == 0)
    return flops.train_flops_per_token(shape, 1.0 - sparsity, dense_weight_grad=rigl_update)


def dry_run(spec: ExperimentSpec, out: Path, device: str = "auto") -> str:
    """The plan with FLOPs and an ETA, without running anything."""
    kind = "cuda" if device.startswith("cuda") else pick_device(device).type
    pre, fine = plan(spec, out)
    lines = [f"spec {spec.name}: preset {spec.preset}, {len(pre)} pre-training runs, {len(fine)} fine-tuning runs, device {kind}"]
    total_s = 0.0
    lines.append(f"{'cell':<34}{'tokens':>10}{'sparse FLOPs':>14}{'dense FLOPs':>14}{'ETA':>9}  status")
    for cell in pre:
        cfg = spec.pretrain_config(cell.sparsity, cell.method, cell.seed, str(cell.dir))
        shape = cfg.shape()
        tokens = cfg.max_steps * cfg.tokens_per_step
        dense = tokens * flops.train_flops_per_token(shape, 1.0)
        sparse = cfg.tokens_per_step * sum(_planned_train_flops_per_token(cfg, shape, step) for step in range(cfg.max_steps))
        eta = dense / FLOPS_PER_S[kind]
        total_s += 0 if _done(cell) else eta
        lines.append(f"{cell.name:<34}{tokens:>10.3g}{sparse:>14.3e}{dense:>14.3e}{duration(eta):>9}  {'done' if _done(cell) else 'todo'}")
    from ..data.tasks import load_task

    shape = spec.pretrain_config(0.0, "static", spec.seeds[0], "x").shape()
    for task in spec.tasks:
        data = load_task(task, spec.finetune.get("data_dir"))
        ft = spec.finetune_config("x", task, "dense", 0, "x")
        pairs = len(data.pairs("train")[: ft.limit_train] if ft.limit_train else data.pairs("train"))
        steps = ft.max_steps or max(1, round(ft.epochs * math.ceil(pairs / ft.batch_size)))
        tokens = steps * ft.batch_size * FT_TOKENS_PER_PAIR
        n_eval = min(spec.eval_limit or 10**9, len(data.splits[spec.eval_split]))
        cells = [c for c in fine if c.task == task]
        eta = tokens * flops.train_flops_per_token(shape, 1.0) / FLOPS_PER_S[kind] + n_eval * SECONDS_PER_GENERATED_INPUT[kind]
        todo = [c for c in cells if not _done(c)]
        total_s += eta * len(todo)
        lines.append(f"{'finetune+eval ' + task:<34}{tokens:>10.3g}{'':>14}{tokens * flops.train_flops_per_token(shape, 1.0):>14.3e}"
                     f"{duration(eta):>9}  x{len(cells)} cells, {len(todo)} todo")
    lines.append(f"estimated time left: {duration(total_s)} (at {FLOPS_PER_S[kind]:.1e} dense-equivalent FLOP/s on {kind}; "
                 f"{'measured' if kind == 'cpu' else 'assumed'})")
    return "\n".join(lines)


def duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:,.1f} days"


def _record_failure(out: Path, name: str, error: BaseException, log) -> None:
    path = out / "failures" / (name.replace("/", "__") + ".txt")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(traceback.format_exception(error)))
    log(f"FAILED {name}: {type(error).__name__}: {error} (traceback in {path})")


def _clear_failure(out: Path, name: str) -> None:
    (out / "failures" / (name.replace("/", "__") + ".txt")).unlink(missing_ok=True)


def _check_spec_file(spec: ExperimentSpec, out: Path) -> None:
    path = out / "spec.yaml"
    current = spec.to_dict()
    if path.exists():
        saved = yaml.safe_load(path.read_text())
        if saved != current:
            diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
            raise SpecError(f"{out} holds results of a different spec (fields {diff} differ); use another --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(current, sort_keys=False))


def run(spec: ExperimentSpec, out: str | Path, device: str = "auto", progress: bool = True, log=print) -> dict:
    """Run (or finish) the grid, then collect results. Returns the results dict."""
    from .results import collect, write_results

    out = Path(out)
    _check_spec_file(spec, out)
    pre, fine = plan(spec, out)
    failed: set[str] = set()
    decoding = DecodingConfig(**spec.decoding)
    t_start = time.time()
    for i, cell in enumerate(pre, 1):
        if _done(cell):
            log(f"[{i}/{len(pre)}] pretrain {cell.name}: done, skipped")
            continue
        log(f"[{i}/{len(pre)}] pretrain {cell.name}")
        _clear_failure(out, f"pretrain-{cell.name}")
        cfg = spec.pretrain_config(cell.sparsity, cell.method, cell.seed, str(cell.dir))
        cfg.device = device
        try:
            pretrain(cfg, resume=True, progress=progress, log=log)
        except Exception as e:  # noqa: BLE001 - one cell's failure must not lose the grid
            failed.add(cell.name)
            _record_failure(out, f"pretrain-{cell.name}", e, log)
    for i, cell in enumerate(fine, 1):
        tag = f"[{i}/{len(fine)}] finetune {cell.name}"
        if cell.pretrain.name in failed:
            log(f"{tag}: blocked (pre-training failed)")
            continue
        if _done(cell):
            log(f"{tag}: done, skipped")
            continue
        log(tag)
        _clear_failure(out, f"finetune-{cell.name}")
        try:
            if not (cell.dir / "summary.json").exists():
                cfg = spec.finetune_config(str(cell.pretrain.dir), cell.task, cell.mode, cell.pretrain.seed, str(cell.dir))
                cfg.device = device
                finetune(cfg, resume=True, progress=progress, log=log)
            result = evaluate(cell.dir, cell.task, spec.eval_split, spec.eval_limit, decoding,
                              spec.finetune.get("data_dir"), pick_device(device), progress=progress)
            log(f"  {cell.task} {spec.eval_split}: " + ", ".join(f"{k} {v:.2f}" for k, v in result["metrics"].items()))
        except Exception as e:  # noqa: BLE001
            _record_failure(out, f"finetune-{cell.name}", e, log)
    results = collect(spec, out)
    write_results(results, out)
    n_failed = len(list((out / "failures").glob("*.txt"))) if (out / "failures").exists() else 0
    log(f"grid finished in {time.time() - t_start:.0f}s this session; {n_failed} failed cell(s)")
    return results
