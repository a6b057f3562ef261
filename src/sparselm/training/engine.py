"""One phase skeleton for pre-training and fine-tuning, read top to bottom:

start (device, ranks, run directory) -> the phase's model -> prepare (activation checkpointing,
FSDP2) -> the phase's adapters (LoRA) -> AdamW -> the phase's sparsifier -> ``Trainer`` -> restore
the checkpoint -> save the config -> ``loop.train`` -> check the masks -> gather the model ->
summary -> ``save_run``.

A phase (``pretraining.py``, ``finetuning.py``) supplies a ``PhaseSetup`` (what it builds before
training), its ``loop.Phase`` (batches, loss, LR, validation, FLOPs) and its summary; the order,
the resume and the files are the engine's, the same for every phase.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..models.card import invocation
from . import distributed
from .checkpoint import load_checkpoint, save_run, truncate_metrics
from .loop import Phase, Trainer, autocast_for, device_warnings, grad_scaler_for, new_state, prepare_model, train
from .rundir import open_run_dir

logger = logging.getLogger(__name__)


@dataclass
class RunStart:
    """Where a phase starts: its directory, device and ranks, and what is already there."""

    out: Path
    device: torch.device
    dist: distributed.Dist
    log: Callable
    checkpoint: Path | None  # to resume from
    finished: dict | None  # the summary of a finished run that needs nothing more
    resume: bool = False


def start_run(cfg, resume: bool, progress: bool | None, log) -> RunStart:
    """Device, process group and run directory for a training config (``cfg.run`` and ``to_dict``)."""
    if progress is not None:
        cfg.run.progress = progress
    device = distributed.pick_device(cfg.run.device)
    dist = distributed.setup(device)
    log = log if dist.is_main else (lambda *a, **k: None)
    if device.type == "cuda" and cfg.run.dtype != "float32":  # TF32 for fp32 matmuls left outside autocast
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    grad_scaler_for(device, cfg.run, sharded=dist.enabled and cfg.run.parallel == "fsdp")  # refused now, not after loading
    for warning in device_warnings(cfg.run, device, dist):
        if dist.is_main:
            logger.warning(f"warning: {warning}")
    for note in getattr(cfg, "notes", ()):  # defaults the config adjusted (training.config.fit_budget_defaults)
        log(note)
    out = Path(cfg.run.out)
    checkpoint, finished = open_run_dir(out, cfg.to_dict(), resume, log, dist.world_size)
    return RunStart(out, device, dist, log, checkpoint, finished, resume)


def restore(trainer: Trainer, checkpoint: Path | None, resume: bool, state: dict, log) -> dict:
    """Load the checkpoint into model, optimizer, masks and loss scaler; drop metric rows logged after it."""
    metrics = trainer.out / "metrics.jsonl"
    if checkpoint is not None:
        masks, state = load_checkpoint(checkpoint, trainer.model, trainer.optimizer, map_location=trainer.device)
        if trainer.sparsifier is not None and not trainer.sparsifier.released(state["step"]):
            trainer.sparsifier.load_state_dict(masks)  # (in a dense tail the weights are no longer masked)
        if trainer.dist.is_main:
            truncate_metrics(metrics, state["step"])
        scaler_state = state.pop("grad_scaler", None)
        if trainer.scaler is not None and scaler_state is not None:
            trainer.scaler.load_state_dict(scaler_state)
        log(f"resumed from {checkpoint} at step {state['step']}")
    elif resume and metrics.exists() and trainer.dist.is_main:
        truncate_metrics(metrics, 0)  # rows of an attempt killed before its first checkpoint
        log(f"no checkpoint in {trainer.out}; starting the run again")
    return state


def _nothing(*args) -> None:
    return None


@dataclass
class PhaseSetup:
    """What a phase builds before training; the engine runs everything after it in one order."""

    model: torch.nn.Module  # on the device, not yet prepared (activation checkpointing, FSDP2)
    optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer]  # AdamW over the prepared model's trainable weights
    sparsifier: Callable[[torch.nn.Module, torch.optim.Optimizer], object | None] = _nothing  # built and attached
    adapt: Callable[[torch.nn.Module], torch.nn.Module] | None = None  # after preparation: adapters (LoRA)
    finish: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m  # the whole trained model as saved (LoRA merged)
    save_files: Callable[[Path], None] = _nothing  # the phase's files in a run folder (its tokenizer)
    state: dict = field(default_factory=dict)  # the phase's own entries of the checkpointed state
    saves_adapter: bool = False  # also write the trained adapters (adapter/)


def run_phase(cfg, start: RunStart, setup: PhaseSetup, make_phase: Callable[[Trainer, dict], Phase],
              summarize: Callable[[Trainer, dict, float, torch.nn.Module | None], dict]) -> dict:
    """Train ``setup`` from ``start`` and write the run directory; return its summary. ``make_phase``
    gets the restored state (the phase may fill its entries, e.g. the initial validation loss);
    ``summarize(trainer, state, val_loss, final)`` gives the phase's summary fields (``final``: the
    gathered model on rank 0, None elsewhere)."""
    out, device, dist, log = start.out, start.device, start.dist, start.log
    model = prepare_model(setup.model, cfg.run, device, dist)  # (FSDP shards it: optimizer and masks come after)
    if setup.adapt is not None:
        model = setup.adapt(model)
    optimizer = setup.optimizer(model)
    sparsifier = setup.sparsifier(model, optimizer)
    trainer = Trainer(model, optimizer, sparsifier, device, dist, cfg.run, out, autocast_for(device, cfg.run.dtype))
    state = restore(trainer, start.checkpoint, start.resume, new_state(**setup.state), log)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "train_config.json")
        setup.save_files(out)

    phase = make_phase(trainer, state)
    val_loss = train(phase, trainer, state, log)

    sparse_at_end = sparsifier is not None and not sparsifier.released(phase.total_steps - 1)  # (Variable SPDF ends dense)
    if sparse_at_end:
        sparsifier.check()
    masks = sparsifier.state_dict() if sparse_at_end else None  # (gathers shards: every rank)
    final = distributed.full_model(model) if trainer.sharded else model  # (every rank; None but on rank 0)
    if final is not None:
        final = setup.finish(final)
    summary = {**summarize(trainer, state, val_loss, final),
               "steps": state["step"], "tokens_seen": state["tokens_seen"], "skipped_steps": state["skipped_steps"],
               "wall_time_s": state["wall_time_s"], "device": str(device), "world_size": dist.world_size,
               "command": invocation()}
    if dist.is_main:
        save_run(out, final, setup.save_files, masks, summary, adapter=model if setup.saves_adapter else None,
                 keep_checkpoint=cfg.run.keep_checkpoint)
    return summary
