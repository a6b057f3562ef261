"""Run-directory and resume policy: what a phase may do with the folder it writes.

A new run needs an empty (or absent) folder; ``--resume`` continues the checkpoint there, with the
same config (only ``RESUMABLE_CHANGES`` may differ, and the micro-batch split where the global batch
stays the same); a finished run resumed with the same budget is left as it is.
"""

from __future__ import annotations

from pathlib import Path

from ..files import MANIFEST, read_json
from .checkpoint import find_checkpoint
from .config import RESUMABLE_CHANGES


class RunExistsError(FileExistsError):
    """The output directory already holds a run."""


def check_run_dir(out: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from; refuse to overwrite a run unless resuming it."""
    checkpoint = find_checkpoint(out)
    if checkpoint is not None and not resume:
        raise RunExistsError(f"{out} already holds a checkpoint; pass --resume to continue it or choose another --out")
    if (out / "summary.json").exists() and not resume:
        raise RunExistsError(f"{out} already holds a finished run; choose another --out")
    return checkpoint


def open_run_dir(out: Path, config: dict, resume: bool, log, world_size: int = 1) -> tuple[Path | None, dict | None]:
    """(checkpoint to resume from, or None; the summary of a finished run when there is nothing to
    do). A resumed run must have the same config; a finished one resumed with the same step budget
    is left as it is."""
    checkpoint = check_run_dir(out, resume)
    finished = out / "summary.json"
    if checkpoint is None and not (resume and finished.exists()):
        return None, None
    saved_world = read_json(checkpoint / "trainer_state.json" if checkpoint is not None else finished).get("world_size")
    saved = check_resume_config(out / "train_config.json", config, log, (saved_world, world_size))
    if resume and finished.exists():
        budget = lambda c: (_flat(c).get("optim.max_steps"), _flat(c).get("optim.epochs"))  # noqa: E731
        if checkpoint is None and budget(saved) != budget(config):
            raise ValueError(f"{out} is finished and its checkpoint was removed, so it cannot be trained further; "
                             "start a new run (or keep checkpoints with --keep-checkpoint)")
        if budget(saved) == budget(config):
            log(f"{out} is already finished; nothing to do (raise optim.max_steps to train it further)")
            return checkpoint, read_json(finished)
        (out / MANIFEST).unlink(missing_ok=True)  # trained further: the finished run's files will change
    return checkpoint, None


def check_resume_config(saved_path: Path, current: dict, log, world_sizes: tuple[int | None, int] = (1, 1)) -> dict:
    """A resumed run must continue the same trajectory: only RESUMABLE_CHANGES may differ, and
    ``optim.grad_accum`` when it keeps the global batch (grad_accum x ranks; ``world_sizes`` is
    (saved, now; saved None for checkpoints older than that record)): a run saved on 2 ranks resumes
    on 1 with twice the micro-batches and reads the same data (pre-training numbers micro-batches
    globally)."""
    try:
        saved = read_json(saved_path, "cannot resume this run: restore it from a copy or start a new run")
    except FileNotFoundError:
        raise RunExistsError(f"{saved_path} is missing: cannot check that the resumed run has the same config") from None
    accum = [_flat(c).get("optim.grad_accum") for c in (saved, current)]
    known = None not in accum and world_sizes[0] is not None
    same_batch = known and accum[0] * world_sizes[0] == accum[1] * world_sizes[1]
    # a warm-up derived from the step budget (training.config.fit_budget_defaults) follows a new budget
    new_budget = _flat(saved).get("optim.max_steps") != _flat(current).get("optim.max_steps")
    diffs = [k for k in sorted(set(_flat(saved)) | set(_flat(current)))
             if k not in RESUMABLE_CHANGES and _flat(saved).get(k) != _flat(current).get(k)
             and not (k == "optim.grad_accum" and same_batch) and not (k == "optim.warmup_steps" and new_budget)]
    if diffs:
        k = diffs[0]
        raise ValueError(f"cannot resume: the config differs from the run's {saved_path.name} in {diffs} "
                         f"(e.g. {k}: saved {_flat(saved).get(k)!r}, now {_flat(current).get(k)!r}); "
                         "resume with the same settings or use a new --out")
    for k in ("optim.max_steps", "optim.epochs"):
        if _flat(saved).get(k) != _flat(current).get(k):
            log(f"note: {k} changed {_flat(saved).get(k)} -> {_flat(current).get(k)}; the LR schedule follows the new value")
    if known and not same_batch:
        log(f"note: saved on {world_sizes[0]} rank(s) x grad_accum {accum[0]}, resumed on {world_sizes[1]} x "
            f"{accum[1]}: the global batch changes (keep grad_accum x ranks = {accum[0] * world_sizes[0]} to continue "
            "the same trajectory)")
    return saved


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "options":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out
