"""Fine-tuning a (sparse) pre-trained GPT on a data-to-text task: the second half of SPDF.

Modes: ``dense`` drops the pre-training masks so the zeroed weights learn (SPDF); ``sparse`` keeps
them and enforces the invariant as in pre-training; ``lora`` freezes the (sparse) base and trains
low-rank adapters through ``peft``. Loss is on target tokens only (prompt tokens are labelled -100).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import flops
from ..data.tasks import load_task
from ..files import write_json
from ..models import shape_of
from ..models.loss import collate, encode_pairs, target_loss, validation_loss
from ..models.runs import load_run
from ..sparsity import Static
from . import distributed
from .checkpoint import find_checkpoint, load_checkpoint, save_checkpoint, truncate_metrics
from .optim import adamw, linear_lr
from .pretraining import RunExistsError

MODES = ("dense", "sparse", "lora")


@dataclass
class FinetuneConfig:
    from_run: str
    task: str = "e2e"
    mode: str = "dense"
    out: str = "runs/finetune"
    data_dir: str | None = None
    skip_bad_rows: bool = False
    epochs: float = 2.0
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 16
    lr: float = 1e-3
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    limit_train: int | None = None  # first N training pairs
    val_limit: int = 256  # validation pairs for loss/perplexity
    eval_every: int = 100
    ckpt_every: int = 200
    log_every: int = 10
    lora_r: int = 4
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    seed: int = 1337
    device: str = "auto"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown fine-tuning mode {self.mode!r}; choose one of {list(MODES)}")
        for name in ("batch_size", "eval_every", "ckpt_every", "log_every", "val_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FinetuneConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _wrap_lora(model, cfg: FinetuneConfig):
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)


def finetune(cfg: FinetuneConfig, resume: bool = False, progress: bool = True, log=print) -> dict:
    """Fine-tune, write the run directory (an HF model directory plus sparselm extras), return its summary."""
    out = Path(cfg.out)
    device = distributed.pick_device(cfg.device)
    checkpoint = find_checkpoint(out)
    if checkpoint is not None and not resume:
        raise RunExistsError(f"{out} already holds a checkpoint; pass --resume to continue it or choose another --out")
    if (out / "summary.json").exists() and not resume:
        raise RunExistsError(f"{out} already holds a finished run; choose another --out")

    model, tokenizer, masks, source = load_run(cfg.from_run)
    shape = shape_of(model.config)
    task = load_task(cfg.task, cfg.data_dir, cfg.skip_bad_rows)
    train_pairs = task.pairs("train")[: cfg.limit_train] if cfg.limit_train else task.pairs("train")
    train, long_train = encode_pairs(tokenizer, train_pairs, shape.block_size, skip_too_long=True)
    val, long_val = encode_pairs(tokenizer, task.pairs("validation")[: cfg.val_limit], shape.block_size, skip_too_long=True)
    if long_train:
        log(f"warning: {long_train} of {len(train_pairs)} training pairs have prompts too long for the "
            f"{shape.block_size}-token context and are left out (pre-train with a longer model.block_size to keep them)")
    if len(train) < 0.5 * len(train_pairs) or not val:
        raise ValueError(f"{cfg.task}: {long_train} of {len(train_pairs)} training pairs (and {long_val} validation pairs) do not fit "
                         f"the {shape.block_size}-token context of {cfg.from_run}; pre-train with a longer model.block_size")
    pad = tokenizer.eos_token_id
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total_steps = cfg.max_steps or max(1, int(round(cfg.epochs * steps_per_epoch)))
    torch.manual_seed(cfg.seed)

    model.to(device)
    sparsifier = None
    masked_weights = 0
    if cfg.mode == "sparse":
        if masks is None:
            raise ValueError(f"{cfg.from_run} has no masks.safetensors: sparse fine-tuning needs a sparse pre-trained run")
        sparsifier = Static(0.0, include=list(masks)).attach(model)
        sparsifier.load_state_dict(masks)
    elif masks is not None:
        masked_weights = sum(m.numel() - int(m.sum()) for m in masks.values())
        log(f"dense fine-tuning: dropped the pre-training masks; {masked_weights:,} weights that were zero will now learn")
    if cfg.mode == "lora":
        model = _wrap_lora(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(model, cfg.lr, cfg.weight_decay, (0.9, 0.999), device.type, params=params)
    if sparsifier is not None:
        sparsifier.optimizer = optimizer

    state = {"step": 0, "tokens_seen": 0, "finetune_flops": 0.0, "wall_time_s": 0.0, "initial_val_loss": None}
    if checkpoint is not None:
        _, state = load_checkpoint(checkpoint, model, optimizer, map_location=device)
        truncate_metrics(out / "metrics.jsonl", state["step"])
        log(f"resumed from {checkpoint} at step {state['step']}")
    elif resume:
        truncate_metrics(out / "metrics.jsonl", 0)
    out.mkdir(parents=True, exist_ok=True)
    (out / "finetune_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    if state["initial_val_loss"] is None:
        state["initial_val_loss"] = validation_loss(model, val, cfg.batch_size, pad, device)

    density = 1.0
    if masks is not None and cfg.mode != "dense":
        density = {k: float(m.float().mean()) for k, m in masks.items()}
    fwd = flops.forward_flops_per_token(shape, density)["total"]
    # LoRA: forward + activation gradients through the frozen base, no base weight gradients
    flops_per_token = 2.0 * fwd if cfg.mode == "lora" else 3.0 * fwd

    metrics = open(out / "metrics.jsonl", "a")
    bar = tqdm(total=total_steps, initial=state["step"], disable=not progress, desc=f"finetune {cfg.task} ({cfg.mode})", unit="step")
    t0, wall0 = time.time(), state["wall_time_s"]
    warmup = int(cfg.warmup_ratio * total_steps)
    val_loss = None
    step = state["step"]
    try:
        while step < total_steps:
            epoch, offset = divmod(step, steps_per_epoch)
            order = np.random.default_rng([cfg.seed, epoch]).permutation(len(train))
            idx = order[offset * cfg.batch_size : (offset + 1) * cfg.batch_size]
            ids, labels, mask = (t.to(device) for t in collate([train[i] for i in idx], pad))
            lr = linear_lr(step, cfg.lr, warmup, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = target_loss(model, ids, labels, mask)
            loss.backward()
            if sparsifier is not None:
                sparsifier.after_backward(step)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if sparsifier is not None:
                sparsifier.after_step(step)
            step += 1
            state["step"] = step
            state["tokens_seen"] += ids.numel()
            state["finetune_flops"] += flops_per_token * ids.numel()
            if step % cfg.log_every == 0 or step == total_steps:  # one host sync per log step
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"fine-tuning loss is {loss_value} at step {step}; lower --lr")
                metrics.write(json.dumps({"step": step, "epoch": round(step / steps_per_epoch, 3), "loss": round(loss_value, 5), "lr": lr}) + "\n")
                bar.set_postfix(loss=f"{loss_value:.3f}")
            if step % cfg.eval_every == 0 or step == total_steps:
                val_loss = validation_loss(model, val, cfg.batch_size, pad, device)
                metrics.write(json.dumps({"step": step, "val_loss": round(val_loss, 5), "val_ppl": round(math.exp(val_loss), 3)}) + "\n")
                bar.set_postfix(val=f"{val_loss:.3f}")
            metrics.flush()
            state["wall_time_s"] = wall0 + time.time() - t0
            if step % cfg.ckpt_every == 0 and step < total_steps:
                save_checkpoint(out, model, optimizer, sparsifier.state_dict() if sparsifier else None, dict(state))
            bar.update(1)
    except KeyboardInterrupt:
        log(f"interrupted at step {step}; saving a checkpoint (resume with --resume)")
        save_checkpoint(out, model, optimizer, sparsifier.state_dict() if sparsifier else None, dict(state))
        raise
    finally:
        bar.close()
        metrics.close()

    if val_loss is None:
        val_loss = validation_loss(model, val, cfg.batch_size, pad, device)
    if sparsifier is not None:
        sparsifier.check()
    final = model.merge_and_unload() if cfg.mode == "lora" else model
    if cfg.mode == "lora":
        model.save_pretrained(str(out / "adapter"))
    revived = 0
    if masks is not None and cfg.mode == "dense":
        named = dict(final.named_parameters())
        revived = sum(int(torch.count_nonzero(named[k].detach().cpu()[~m])) for k, m in masks.items() if k in named)
    summary = {
        "kind": "finetune",
        "task": cfg.task,
        "mode": cfg.mode,
        "source_run": str(cfg.from_run),
        "source_sparsity": source.get("sparsity", {}).get("measured", 0.0 if masks is None else None),
        "source_method": source.get("sparsity", {}).get("method", "dense"),
        "pretrain_flops": source.get("train_flops"),
        "pretrain_dense_flops": source.get("dense_train_flops"),
        "pretrain_val_loss": source.get("final_val_loss"),
        "finetune_flops": state["finetune_flops"],
        "steps": state["step"],
        "epochs": state["step"] / steps_per_epoch,
        "train_pairs": len(train),
        "tokens_seen": state["tokens_seen"],
        "initial_val_loss": state["initial_val_loss"],
        "final_val_loss": val_loss,
        "final_val_ppl": math.exp(val_loss),
        "formerly_zero_weights": masked_weights,
        "formerly_zero_weights_now_nonzero": revived,
        "skipped_rows": task.skipped,
        "pairs_left_out_too_long": {"train": long_train, "validation": long_val},
        "wall_time_s": state["wall_time_s"],
        "metrics": {},
    }
    final.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if sparsifier is not None:
        from safetensors.torch import save_file

        save_file(sparsifier.state_dict(), str(out / "masks.safetensors"))
    write_json(out / "summary.json", summary)
    return summary


__all__ = ["FinetuneConfig", "MODES", "finetune"]
