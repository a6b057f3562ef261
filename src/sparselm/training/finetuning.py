"""Fine-tuning a (sparse) pre-trained model on a data-to-text task: the second half of SPDF.

Modes: ``dense`` drops the pre-training masks so the zeroed weights learn (SPDF); ``sparse`` keeps
them and enforces the invariant as in pre-training; ``lora`` freezes the (sparse) base and trains
low-rank adapters through ``peft``. Loss is on target tokens only (prompt tokens are labelled -100).
What it supplies to the one training loop (``loop.py``): shuffled pair batches per epoch (each
data-parallel rank takes its share), the target-only loss, a linear LR and the FLOPs per token.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from .. import flops
from .._optional import require
from ..data.tasks import SEPARATOR, load_task
from ..models import lora_config_kwargs, shape_of
from ..models.decoding import DecodingConfig
from ..models.loss import collate, encode_pairs, target_loss, validation_loss
from ..models.runs import load_run
from ..sparsity import Static
from .config import FINETUNE_MODES as MODES
from .config import FinetuneConfig
from .engine import PhaseSetup, run_phase, start_run
from .loop import Phase, StepCost
from .lock import writes_run
from .optim import adamw, linear_lr

logger = logging.getLogger(__name__)

__all__ = ["FinetuneConfig", "MODES", "finetune"]


def _peft():
    return require("peft", "lora", "LoRA fine-tuning")  # "LoRA fine-tuning needs peft: pip install 'sparselm[lora]'"


def _wrap_lora(model, cfg: FinetuneConfig):
    peft = _peft()
    LoraConfig, get_peft_model = peft.LoraConfig, peft.get_peft_model
    lcfg = LoraConfig(r=cfg.tuning.lora_r, lora_alpha=cfg.tuning.lora_alpha, lora_dropout=cfg.tuning.lora_dropout,
                      task_type="CAUSAL_LM", **lora_config_kwargs(model))
    return get_peft_model(model, lcfg)


@writes_run
def finetune(cfg: FinetuneConfig, resume: bool = False, progress: bool | None = None, log=logger.info) -> dict:
    """Fine-tune, write the run directory (an HF model directory plus sparselm extras), return its summary."""
    if cfg.tuning.mode == "lora":
        _peft()  # before anything is loaded or written
    start = start_run(cfg, resume, progress, log)
    if start.finished is not None:
        return start.finished
    device, dist, log = start.device, start.dist, start.log

    mode, from_run = cfg.tuning.mode, cfg.model.from_run
    model, tokenizer, masks, source = load_run(from_run)
    shape = shape_of(model.config)
    task = load_task(cfg.data.task, cfg.data.data_dir, cfg.data.skip_bad_rows)
    train_pairs = task.pairs("train")[: cfg.data.limit_train] if cfg.data.limit_train else task.pairs("train")
    train_set, long_train = encode_pairs(tokenizer, train_pairs, shape.block_size, skip_too_long=True)
    val_set, long_val = encode_pairs(tokenizer, task.pairs("validation")[: cfg.data.val_limit], shape.block_size, skip_too_long=True)
    if long_train:
        log(f"warning: {long_train} of {len(train_pairs)} training pairs have prompts too long for the "
            f"{shape.block_size}-token context and are left out (pre-train with a longer model.block_size to keep them)")
    if len(train_set) < 0.5 * len(train_pairs) or not val_set:
        raise ValueError(f"{cfg.data.task}: {long_train} of {len(train_pairs)} training pairs (and {long_val} validation pairs) "
                         f"do not fit the {shape.block_size}-token context of {from_run}; pre-train with a longer model.block_size")
    pad = tokenizer.eos_token_id
    steps_per_epoch = math.ceil(len(train_set) / cfg.optim.batch_size)
    total_steps = cfg.optim.max_steps or max(1, int(round(cfg.optim.epochs * steps_per_epoch)))
    torch.manual_seed(cfg.run.seed)

    model.to(device)
    if mode == "lora" and dist.enabled and cfg.run.parallel == "fsdp":
        raise ValueError("LoRA fine-tuning runs with --parallel ddp (its adapters are small; FSDP would only shard the frozen base)")
    if mode == "sparse" and masks is None:
        raise ValueError(f"{from_run} has no masks.safetensors: sparse fine-tuning needs a sparse pre-trained run")
    masked_weights = 0
    if mode != "sparse" and masks is not None:
        masked_weights = sum(m.numel() - int(m.sum()) for m in masks.values())
        log(f"{mode} fine-tuning: dropped the pre-training masks; {masked_weights:,} weights that were zero "
            f"{'will now learn' if mode == 'dense' else 'stay frozen under the adapters'}")

    def keep_masks(model, optimizer):  # sparse mode: the pre-training masks, enforced as in pre-training
        if mode != "sparse":
            return None
        sparsifier = Static(0.0, include=list(masks), exclude=()).attach(model, optimizer)  # exactly the run's masked weights
        sparsifier.load_state_dict(masks)
        return sparsifier

    def finish(final):
        final = final.merge_and_unload() if mode == "lora" else final
        final.generation_config = DecodingConfig().generation_config(tokenizer.eos_token_id)
        return final

    setup = PhaseSetup(
        model=model,
        optimizer=lambda m: adamw(m, cfg.optim.lr, cfg.optim.weight_decay, (0.9, 0.999), device.type,
                                  params=[p for p in m.parameters() if p.requires_grad]),
        sparsifier=keep_masks,
        adapt=(lambda m: _wrap_lora(m, cfg)) if mode == "lora" else None,
        finish=finish,
        save_files=lambda d: tokenizer.save_pretrained(str(d)),
        state={"initial_val_loss": None},
        saves_adapter=mode == "lora",
    )

    density = 1.0 if masks is None or mode == "dense" else {k: float(m.float().mean()) for k, m in masks.items()}
    fwd = flops.forward_flops_per_token(shape, density)["total"]
    dense_fwd = flops.forward_flops_per_token(shape, 1.0)["total"]
    # LoRA: forward + activation gradients through the frozen base, no base weight gradients
    passes = 2.0 if mode == "lora" else 3.0

    def batch(step: int, micro: int):
        epoch, offset = divmod(step, steps_per_epoch)
        order = np.random.default_rng([cfg.run.seed, epoch]).permutation(len(train_set))
        idx = order[offset * cfg.optim.batch_size: (offset + 1) * cfg.optim.batch_size][dist.rank::dist.world_size]
        return tuple(t.to(device) for t in collate([train_set[i] for i in idx], pad))

    def make_phase(trainer, state) -> Phase:
        def evaluate(m) -> float:
            with trainer.autocast:
                return validation_loss(m, val_set, cfg.optim.batch_size, pad, device, chunk=cfg.run.loss_chunk)

        if state["initial_val_loss"] is None:
            state["initial_val_loss"] = evaluate(trainer.model)
        step_cost = StepCost(passes * fwd, passes * dense_fwd, float(sum(p.numel() for p in trainer.model.parameters())))
        warmup = int(cfg.optim.warmup_ratio * total_steps)
        return Phase(
            name=f"finetune {cfg.data.task} ({mode})",
            total_steps=total_steps,
            batch=batch,
            loss=lambda m, b: target_loss(m, *b, chunk=cfg.run.loss_chunk),
            lr=lambda step: linear_lr(step, cfg.optim.lr, warmup, total_steps),
            evaluate=evaluate,
            cost=lambda step: step_cost,
            grad_clip=cfg.optim.grad_clip,
            log_fields=lambda step: {"epoch": round(step / steps_per_epoch, 3)},
        )

    def summarize(trainer, state, val_loss, final) -> dict:
        revived = 0
        if masks is not None and mode == "dense" and final is not None:
            named = dict(final.named_parameters())
            revived = sum(int(torch.count_nonzero(named[k].detach().cpu()[~m])) for k, m in masks.items() if k in named)
        return {
            "kind": "finetune",
            "task": cfg.data.task,
            "mode": mode,
            "source_run": str(from_run),
            "source_sparsity": source.get("sparsity", {}).get("measured", 0.0 if masks is None else None),
            "source_method": source.get("sparsity", {}).get("method", "dense"),
            "pretrain_flops": source.get("train_flops"),
            "pretrain_dense_flops": source.get("dense_train_flops"),
            "pretrain_val_loss": source.get("final_val_loss"),
            "finetune_flops": state["train_flops"],
            "epochs": state["step"] / steps_per_epoch,
            "train_pairs": len(train_set),
            "initial_val_loss": state["initial_val_loss"],
            "final_val_loss": val_loss,
            "final_val_ppl": math.exp(val_loss),
            "formerly_zero_weights": masked_weights,
            "formerly_zero_weights_now_nonzero": revived,
            "skipped_rows": task.skipped,
            "pairs_left_out_too_long": {"train": long_train, "validation": long_val},
            "prompt_format": {"prompt": "{input}" + SEPARATOR, "target": " {text}" + (tokenizer.eos_token or ""),
                              "example": train_pairs[0][0] if train_pairs else ""},
        }

    return run_phase(cfg, start, setup, make_phase, summarize)
