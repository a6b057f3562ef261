"""The one training loop, for pre-training and fine-tuning alike, read top to bottom.

A phase (``pretraining.py``, ``finetuning.py``) supplies what differs: its batches, its loss, its
learning-rate curve, its validation loss and its FLOP cost per token (``engine.run_phase`` builds
the rest around the loop in one order; ``rundir.py`` holds the run-directory and resume policy).
Everything else is here, once: the step (batch -> forward under autocast -> backward -> sparsity
hook -> clip -> optimizer step -> sparsity hook; fp16 scales the loss), the log / eval / checkpoint
cadence, DDP and ``torch.compile``, and signals. SIGINT, SIGTERM (what clusters send before
pre-emption) and SIGUSR1 (Slurm's ``--signal``) only set a flag; the loop checks it at the step
boundary, saves a checkpoint that holds exactly the steps it is labelled with, and stops.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from . import distributed
from .. import flops
from .checkpoint import save_checkpoint, save_sharded_checkpoint
from .config import RunConfig
from .reporting import Reporters, parse_report_to

logger = logging.getLogger(__name__)

STOP_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s is not None)


class TrainingInterrupted(KeyboardInterrupt):
    """A stop signal arrived; a consistent checkpoint was saved at the step boundary."""

    def __init__(self, signum: int, step: int, run_dir: Path):
        self.signum, self.step, self.run_dir = signum, step, run_dir
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved in "
                         f"{run_dir}/checkpoint (resume with --resume)")


@dataclass
class StepCost:
    """Training FLOPs per token at this step (as run, and if dense) and non-zero parameters."""

    flops_per_token: float
    dense_flops_per_token: float
    nonzero_params: float


@dataclass
class Phase:
    """What a training phase supplies to the loop."""

    name: str
    total_steps: int
    batch: Callable[[int, int], tuple]  # (step, micro) -> tensors on the device, first = input ids
    loss: Callable[[torch.nn.Module, tuple], torch.Tensor]  # (model, batch) -> mean loss
    lr: Callable[[int], float]
    evaluate: Callable[[torch.nn.Module], float]  # validation loss of the (unwrapped) model
    cost: Callable[[int], StepCost]
    grad_accum: int = 1
    grad_clip: float = 1.0
    log_fields: Callable[[int], dict] = lambda step: {}  # extra columns for training-loss rows


@dataclass
class Trainer:
    """The pieces a loop runs on: built by the phase, driven by ``train``."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    sparsifier: object | None  # a sparselm.sparsity.Sparsifier, or None
    device: torch.device
    dist: distributed.Dist
    run: RunConfig
    out: Path
    autocast: contextlib.AbstractContextManager = field(default_factory=contextlib.nullcontext)
    train_model: torch.nn.Module | None = None  # compiled and/or DDP-wrapped model for the forward
    peak_flops: float | None = None  # the device's peak FLOP/s, for MFU
    sharded: bool = field(init=False)  # FSDP2 holds the parameters (checked once, not per step)
    scaler: torch.amp.GradScaler | None = field(init=False)  # loss scaling, for fp16 only

    def __post_init__(self):
        self.sharded = distributed.is_sharded(self.model)
        self.scaler = grad_scaler_for(self.device, self.run, self.sharded)
        if self.train_model is None:
            self.train_model = wrap_model(self.model, self.run, self.device, self.dist)
        if self.peak_flops is None:
            self.peak_flops = device_peak_flops(self.device, self.run)


# ---- setup ---------------------------------------------------------------------------------------
def autocast_for(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA by default, fp32 on CPU unless asked; a fresh context per use."""
    amp = {"auto": torch.bfloat16 if device.type == "cuda" else None, "float32": None,
           "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    return torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()


def grad_scaler_for(device: torch.device, run: RunConfig, sharded: bool = False) -> torch.amp.GradScaler | None:
    """fp16's narrow exponent range underflows small gradients: fp16 training scales the loss up and
    the gradients back down (``torch.amp.GradScaler``: a step whose gradients overflowed is skipped and
    the scale halved). bf16 and fp32 need none. Not with FSDP2: ranks would each find overflows in
    their own shards and disagree on skipping (use bf16 there, the default on GPUs)."""
    if run.dtype != "float16":
        return None
    if sharded:
        raise ValueError("run.dtype=float16 is not supported with run.parallel=fsdp (its loss scaling would need "
                         "every rank to agree on overflows); use --dtype bfloat16 (the default on GPUs)")
    return torch.amp.GradScaler(device.type)


def prepare_model(model: torch.nn.Module, run: RunConfig, device: torch.device, dist: distributed.Dist) -> torch.nn.Module:
    """What changes the model's own parameters or modules, before the optimizer and the sparsifier
    see them: activation checkpointing per block, then FSDP2 sharding (``run.parallel=fsdp`` under
    torchrun; the parameters become DTensors)."""
    if run.activation_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if dist.enabled and run.parallel == "fsdp":
        distributed.shard_model(model, device, run.dtype, dist)
    return model


def wrap_model(model: torch.nn.Module, run: RunConfig, device: torch.device, dist: distributed.Dist) -> torch.nn.Module:
    """``torch.compile`` (any device), then DDP under torchrun unless FSDP already shards the model:
    PyTorch's own engines."""
    train_model = torch.compile(model) if run.compile else model
    if dist.enabled and not distributed.is_sharded(model):
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)
    return train_model


def device_peak_flops(device: torch.device, run: RunConfig) -> float | None:
    """Peak FLOP/s for MFU: ``run.peak_tflops``, else the table in ``sparselm.flops`` for known GPUs."""
    if run.peak_tflops:
        return run.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    dtype = {"auto": "bfloat16"}.get(run.dtype, run.dtype)
    return flops.peak_flops(torch.cuda.get_device_name(device), dtype)


def device_warnings(run: RunConfig, device: torch.device, dist: distributed.Dist) -> list[str]:
    """Options that do nothing on this device or launch, said once instead of ignored silently."""
    out = []
    if run.parallel == "fsdp" and not dist.enabled:
        out.append("run.parallel=fsdp has no effect in a single process (launch with torchrun --nproc_per_node N)")
    if run.kernel == "semi-structured" and device.type != "cuda":
        out.append(f"run.kernel=semi-structured needs a CUDA GPU; on {device.type} the masked linears run dense kernels")
    if run.dtype == "float16" and device.type == "cpu":
        out.append("run.dtype=float16 on the CPU is slow; use bfloat16")
    return out


def new_state(**extra) -> dict:
    return {"step": 0, "tokens_seen": 0, "train_flops": 0.0, "dense_train_flops": 0.0, "param_steps": 0.0,
            "wall_time_s": 0.0, "skipped_steps": 0, **extra}


# ---- the step -------------------------------------------------------------------------------------
def train_step(phase: Phase, trainer: Trainer, step: int) -> tuple[torch.Tensor, int, bool]:
    """One optimizer step; returns (mean loss as a device tensor, tokens in this rank's batches,
    whether the optimizer stepped: fp16 loss scaling skips steps whose gradients overflowed)."""
    model, optimizer, sparsifier, scaler = trainer.train_model, trainer.optimizer, trainer.sparsifier, trainer.scaler
    lr = phase.lr(step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=trainer.device)
    tokens = 0
    for micro in range(phase.grad_accum):
        batch = phase.batch(step, micro)
        last = micro == phase.grad_accum - 1
        # DDP all-reduces once, after the last micro-batch; FSDP reduce-scatters every micro-batch's
        # gradients into the shards (torchtitan does the same: unsharded gradients are what FSDP saves)
        deferred = trainer.dist.enabled and not last and not trainer.sharded
        sync = model.no_sync() if deferred else contextlib.nullcontext()
        with sync:
            with trainer.autocast:
                loss = phase.loss(model, batch)
            micro_loss = loss / phase.grad_accum
            (scaler.scale(micro_loss) if scaler is not None else micro_loss).backward()
        loss_sum += loss.detach()
        tokens += batch[0].numel()
    if scaler is not None:
        scaler.unscale_(optimizer)  # true gradients before masking, RigL's dense copy and clipping
    if sparsifier is not None:
        sparsifier.after_backward(step)
    if phase.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in trainer.model.parameters() if p.requires_grad], phase.grad_clip)
    stepped = True
    if scaler is None:
        optimizer.step()
    else:  # (fp16 only: GradScaler syncs with the host here, to decide whether to step)
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        stepped = scaler.get_scale() >= scale  # an overflow skipped the step and backed the scale off
    optimizer.zero_grad(set_to_none=True)
    if sparsifier is not None and stepped:  # a skipped step moves no mask (the weights did not move either)
        sparsifier.after_step(step)
    return loss_sum / phase.grad_accum, tokens, stepped


# ---- the loop -------------------------------------------------------------------------------------
def train(phase: Phase, trainer: Trainer, state: dict, log=logger.info) -> float:
    """Run ``phase`` from ``state['step']`` to ``phase.total_steps``; return the final validation loss.
    ``state`` is updated in place (step, tokens, FLOPs, average parameters, wall time)."""
    run, dist, out = trainer.run, trainer.dist, trainer.out
    metrics = None
    if dist.is_main:
        config = json.loads((out / "train_config.json").read_text()) if (out / "train_config.json").exists() else {}
        metrics = Reporters(parse_report_to(run.report_to), out, phase.name, config)

    def log_row(row: dict) -> None:
        if metrics is not None:
            metrics.log(row)

    def save() -> None:
        saved_state = dict(state, world_size=dist.world_size)
        if trainer.scaler is not None:
            saved_state["grad_scaler"] = trainer.scaler.state_dict()
        masks = trainer.sparsifier.masks if trainer.sparsifier is not None else None
        if trainer.sharded:  # every rank writes its shards
            save_sharded_checkpoint(out, trainer.model, trainer.optimizer, masks, saved_state)
        elif dist.is_main:
            masks = trainer.sparsifier.state_dict() if masks is not None else None
            save_checkpoint(out, trainer.model, trainer.optimizer, masks, saved_state)

    bar = tqdm(total=phase.total_steps, initial=state["step"], disable=not (run.progress and dist.is_main),
               desc=phase.name, unit="step")
    t0, wall0 = time.time(), state["wall_time_s"]
    t_last, tok_last = t0, state["tokens_seen"]
    val_loss, step = None, state["step"]
    stop = _StopFlag()
    try:
        with stop:
            while step < phase.total_steps:
                cost = phase.cost(step)  # the masks in use during this step
                loss, tokens, stepped = train_step(phase, trainer, step)
                tokens *= dist.world_size
                step += 1
                state.update(step=step, tokens_seen=state["tokens_seen"] + tokens, skipped_steps=state["skipped_steps"] + (not stepped),
                             train_flops=state["train_flops"] + cost.flops_per_token * tokens,
                             dense_train_flops=state["dense_train_flops"] + cost.dense_flops_per_token * tokens,
                             param_steps=state["param_steps"] + cost.nonzero_params)
                log_step = step % run.log_every == 0 or step == phase.total_steps
                ckpt_step = step % run.ckpt_every == 0 or step == phase.total_steps
                if log_step:  # the one host sync of a step (besides fp16's loss scaler): every log_every steps
                    train_loss = distributed.all_reduce_mean(loss.item(), dist, trainer.device)
                    if not math.isfinite(train_loss):
                        raise FloatingPointError(f"{phase.name}: training loss is {train_loss} at step {step}; "
                                                 "lower the learning rate (--lr) or check the data")
                    now = time.time()
                    tps = (state["tokens_seen"] - tok_last) / max(now - t_last, 1e-9)
                    t_last, tok_last = now, state["tokens_seen"]
                    mfu = flops.mfu(cost.dense_flops_per_token, tps / dist.world_size, trainer.peak_flops)
                    log_row({"step": step, "loss": round(train_loss, 5), "lr": phase.lr(step - 1),
                             **({"skipped_steps": state["skipped_steps"]} if trainer.scaler is not None else {}),
                             "tokens": state["tokens_seen"], "tokens_per_s": round(tps, 1),
                             **({"mfu": round(mfu, 4)} if mfu is not None else {}),
                             "train_flops": state["train_flops"], **phase.log_fields(step)})
                    bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tps:,.0f}",
                                    **({"mfu": f"{mfu:.1%}"} if mfu is not None else {}))
                if step % run.eval_every == 0 or step == phase.total_steps:
                    val_loss = phase.evaluate(trainer.model)
                    log_row({"step": step, "val_loss": round(val_loss, 5), "val_ppl": round(math.exp(val_loss), 3)})
                    bar.set_postfix(val=f"{val_loss:.3f}")
                state["wall_time_s"] = wall0 + time.time() - t0
                signum = stop.received(dist, trainer.device, agree=log_step or ckpt_step)
                if ckpt_step or signum:
                    save()
                bar.update(1)
                if signum:
                    raise TrainingInterrupted(signum, step, out)
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    if val_loss is None:  # nothing left to train (resumed at the end)
        val_loss = phase.evaluate(trainer.model)
    return val_loss


class _StopFlag:
    """Stop signals set a flag instead of raising inside a step; a second Ctrl-C stops at once."""

    def __init__(self):
        self.signum = 0
        self._previous: dict = {}

    def __enter__(self):
        with contextlib.suppress(ValueError):  # signal handlers can only be set in the main thread
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt  # impatient second Ctrl-C: the last checkpoint stays intact
        self.signum = signum

    def received(self, dist: distributed.Dist, device, agree: bool) -> int:
        """The signal to stop for. One process: at once. Under torchrun every rank must stop at the
        same step, which takes a collective: ranks agree only when ``agree`` (log and checkpoint
        steps), so a signal waits at most ``run.log_every`` steps and other steps sync nothing."""
        if not dist.enabled:
            return self.signum
        if not agree:
            return 0
        return int(round(distributed.all_reduce_max(float(self.signum), dist, device)))
