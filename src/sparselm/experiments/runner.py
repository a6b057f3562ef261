"""Run an experiment grid: pre-train once per (sparsity, method, seed), prune each seed's dense run
once per prune row, fine-tune and evaluate each of these per (task, mode). Experiments orchestrate;
the training and evaluation packages compute.

Resumable: a finished cell (its ``summary.json``; for fine-tuning, its evaluation result) is skipped, an
interrupted one resumes from its checkpoint (pruning, which has none, starts again). A failing cell is
recorded in ``failures/`` and the grid goes on; cells that depend on it are marked blocked.
"""

from __future__ import annotations

import logging
import math
import time
import traceback
from pathlib import Path

import yaml

from .. import flops
from ..evaluation.evaluate import evaluate
from ..evaluation.generate import DecodingConfig
from ..training import finetune, pretrain
from ..training.distributed import pick_device
from ..training.prune import prune_run
from .grid import FinetuneCell, PretrainCell, PruneCell, plan
from .results import collect, write_results
from .spec import ExperimentSpec, SpecError

logger = logging.getLogger(__name__)

# Throughputs used for --dry-run ETAs (dense-equivalent training FLOP/s: sparsity is simulated with
# dense kernels, so wall time follows dense FLOPs). CPU: measured, tiny preset on 2 cores (9.7e10);
# CUDA: an assumption of ~30% of an H100's bf16 peak, to be replaced by a measurement.
FLOPS_PER_S = {"cpu": 9.7e10, "cuda": 3.0e14}
SECONDS_PER_GENERATED_INPUT = {"cpu": 0.12, "cuda": 0.01}  # beam 10, tiny preset on CPU (measured)
FT_TOKENS_PER_PAIR = 64  # padded tokens per fine-tuning pair, for estimates
CALIBRATION_SAMPLES = 128  # calibration sequences when a prune row sets no nsamples (PruneConfig's documented default)


def planned_pretrain_flops(cfg) -> float:
    """Training FLOPs the configured method will spend, step by step, from its own plan (GMP's
    dense start and schedule, RigL's dense-gradient steps), with no model built."""
    shape = cfg.planned_shape()
    sparsifier = cfg.sparsity.build(cfg.optim.max_steps, cfg.run.seed)
    if sparsifier is None:
        return cfg.optim.max_steps * cfg.tokens_per_step * flops.train_flops_per_token(shape, 1.0)
    return cfg.tokens_per_step * sum(
        flops.train_flops_per_token(shape, 1.0 - sparsifier.sparsity_at(step),
                                    dense_weight_grad=sparsifier.dense_gradient_step(step))
        for step in range(cfg.optim.max_steps))


def dry_run(spec: ExperimentSpec, out: Path, device: str = "auto") -> str:
    """The plan with FLOPs and an ETA, without running anything."""
    kind = "cuda" if device.startswith("cuda") else pick_device(device).type
    pre, fine = plan(spec, out)
    pruned = [c for c in pre if isinstance(c, PruneCell)]
    lines = [f"spec {spec.name}: preset {spec.preset}, {len(pre) - len(pruned)} pre-training runs"
             + (f", {len(pruned)} prune runs" if pruned else "") + f", {len(fine)} fine-tuning runs, device {kind}"]
    total_s = 0.0
    lines.append(f"{'cell':<34}{'tokens':>10}{'sparse FLOPs':>14}{'dense FLOPs':>14}{'ETA':>9}  status")
    for cell in pre:
        if isinstance(cell, PruneCell):
            tokens, fwd = _calibration_plan(spec, cell)
            eta = fwd / FLOPS_PER_S[kind]
            total_s += 0 if cell.done() else eta
            lines.append(f"{cell.name:<34}{tokens:>10.3g}{'':>14}{fwd:>14.3e}{duration(eta):>9}  "
                         f"{'done' if cell.done() else 'todo'} ({'calibration forward passes only' if tokens else 'no calibration'})")
            continue
        cfg = spec.pretrain_config(cell.sparsity, cell.method, cell.seed, str(cell.dir))
        shape = cfg.planned_shape()
        tokens = cfg.optim.max_steps * cfg.tokens_per_step
        dense = tokens * flops.train_flops_per_token(shape, 1.0)
        sparse = planned_pretrain_flops(cfg)
        eta = dense / FLOPS_PER_S[kind]
        total_s += 0 if cell.done() else eta
        lines.append(f"{cell.name:<34}{tokens:>10.3g}{sparse:>14.3e}{dense:>14.3e}{duration(eta):>9}  {'done' if cell.done() else 'todo'}")
    from ..data.tasks import load_task

    shape = spec.pretrain_config(0.0, "static", spec.seeds[0], "x").planned_shape()
    for task in spec.tasks:
        data = load_task(task, spec.data_dir)
        ft = spec.finetune_config("x", task, "dense", 0, "x")
        pairs = len(data.pairs("train")[: ft.data.limit_train] if ft.data.limit_train else data.pairs("train"))
        steps = ft.optim.max_steps or max(1, round(ft.optim.epochs * math.ceil(pairs / ft.optim.batch_size)))
        tokens = steps * ft.optim.batch_size * FT_TOKENS_PER_PAIR
        n_eval = min(spec.eval_limit or 10**9, len(data.splits[spec.eval_split]))
        cells = [c for c in fine if c.task == task]
        eta = tokens * flops.train_flops_per_token(shape, 1.0) / FLOPS_PER_S[kind] + n_eval * SECONDS_PER_GENERATED_INPUT[kind]
        todo = [c for c in cells if not c.done()]
        total_s += eta * len(todo)
        lines.append(f"{'finetune+eval ' + task:<34}{tokens:>10.3g}{'':>14}{tokens * flops.train_flops_per_token(shape, 1.0):>14.3e}"
                     f"{duration(eta):>9}  x{len(cells)} cells, {len(todo)} todo")
    lines.append(f"estimated time left: {duration(total_s)} (at {FLOPS_PER_S[kind]:.1e} dense-equivalent FLOP/s on {kind}; "
                 f"{'measured' if kind == 'cpu' else 'assumed'})")
    return "\n".join(lines)


def _calibration_plan(spec: ExperimentSpec, cell: PruneCell) -> tuple[int, float]:
    """Calibration tokens of a prune cell and the dense forward FLOPs they cost (0 for magnitude;
    SparseGPT's per-layer solves are not counted)."""
    from ..pruning import PRUNERS

    cfg = spec.prune_config(cell.row, cell.seed, str(cell.source.dir), str(cell.dir))
    calibrated = PRUNERS[cfg.method].needs_calibration or bool(cfg.refine)
    if not calibrated:
        return 0, 0.0
    shape = spec.pretrain_config(0.0, "static", cell.seed, "x").planned_shape()
    tokens = (cfg.nsamples or CALIBRATION_SAMPLES) * (cfg.seqlen or shape.block_size)
    return tokens, tokens * flops.train_flops_per_token(shape, 1.0) / 3


def duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:,.1f} days"


def _record_failure(cell: PretrainCell | PruneCell | FinetuneCell, error: BaseException, log) -> None:
    path = cell.failure_file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(traceback.format_exception(error)))
    log(f"FAILED {cell.name}: {type(error).__name__}: {error} (traceback in {path})")


def _check_spec_file(spec: ExperimentSpec, out: Path) -> None:
    path = out / "spec.yaml"
    current = spec.to_dict()
    if path.exists():
        # a field added to specs after the grid started (``prune``) reads as its default there
        saved = {**{k: v for k, v in ExperimentSpec.defaults().items() if k in current}, **yaml.safe_load(path.read_text())}
        if saved != current:
            diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
            raise SpecError(f"{out} holds results of a different spec (fields {diff} differ); use another --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(current, sort_keys=False))


def run(spec: ExperimentSpec, out: str | Path, device: str = "auto", progress: bool = True, log=logger.info) -> dict:
    """Run (or finish) the grid, then collect results. Returns the results dict."""
    out = Path(out)
    _check_spec_file(spec, out)
    pre, fine = plan(spec, out)
    failed: set[str] = set()
    decoding = DecodingConfig(**spec.decoding)
    t_start = time.time()
    for i, cell in enumerate(pre, 1):
        kind = "prune" if isinstance(cell, PruneCell) else "pretrain"
        if cell.done():
            log(f"[{i}/{len(pre)}] {kind} {cell.name}: done, skipped")
            continue
        if kind == "prune" and cell.source.name in failed:
            failed.add(cell.name)
            log(f"[{i}/{len(pre)}] prune {cell.name}: blocked (pre-training failed)")
            continue
        log(f"[{i}/{len(pre)}] {kind} {cell.name}")
        cell.failure_file.unlink(missing_ok=True)
        if kind == "prune":
            cfg = spec.prune_config(cell.row, cell.seed, str(cell.source.dir), str(cell.dir))
            cfg.device, cfg.progress = device, progress
            try:
                summary = prune_run(cfg)
                log(f"  pruned {cell.source.name} to sparsity {summary['sparsity']['measured']:.4f} "
                    f"in {summary['pruning']['seconds']:.1f}s")
            except Exception as e:  # noqa: BLE001
                failed.add(cell.name)
                _record_failure(cell, e, log)
            continue
        cfg = spec.pretrain_config(cell.sparsity, cell.method, cell.seed, str(cell.dir))
        cfg.run.device, cfg.run.progress = device, progress
        try:
            pretrain(cfg, resume=True, log=log)
        except Exception as e:  # noqa: BLE001 - one cell's failure must not lose the grid
            failed.add(cell.name)
            _record_failure(cell, e, log)
    for i, cell in enumerate(fine, 1):
        tag = f"[{i}/{len(fine)}] finetune {cell.name}"
        if cell.pretrain.name in failed:
            log(f"{tag}: blocked ({'pruning' if isinstance(cell.pretrain, PruneCell) else 'pre-training'} failed)")
            continue
        if cell.done():
            log(f"{tag}: done, skipped")
            continue
        log(tag)
        cell.failure_file.unlink(missing_ok=True)
        try:
            if not (cell.dir / "summary.json").exists():
                cfg = spec.finetune_config(str(cell.pretrain.dir), cell.task, cell.mode, cell.pretrain.seed, str(cell.dir))
                cfg.run.device, cfg.run.progress = device, progress
                finetune(cfg, resume=True, log=log)
            result = evaluate(cell.dir, cell.task, spec.eval_split, spec.eval_limit, decoding,
                              spec.data_dir, pick_device(device), progress=progress)
            log(f"  {cell.task} {spec.eval_split}: " + ", ".join(f"{k} {v:.2f}" for k, v in result["metrics"].items()))
        except Exception as e:  # noqa: BLE001
            _record_failure(cell, e, log)
    results = collect(spec, out)
    write_results(results, out)
    n_failed = len(list((out / "failures").glob("*.txt"))) if (out / "failures").exists() else 0
    log(f"grid finished in {time.time() - t_start:.0f}s this session; {n_failed} failed cell(s)")
    return results
