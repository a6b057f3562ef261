"""AdamW with decoupled weight decay on matrices only, and warmup + cosine / linear LR schedules."""

from __future__ import annotations

import math

import torch


def adamw(model: torch.nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95), device_type="cpu", params=None):
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused on CPU too: about 3x faster there, and it does not slow down on the pruned weights' zero second
    # moments as the for-each kernel's sqrt does (benchmarks/cpu_reference.py)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type in ("cuda", "cpu"))


def cosine_lr(step: int, max_lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warmup to ``max_lr``, then cosine decay to ``min_ratio * max_lr`` at ``total``."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return max_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def linear_lr(step: int, max_lr: float, warmup: int, total: int) -> float:
    """Linear warmup, then linear decay to zero (the usual fine-tuning schedule)."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    return max_lr * max(0.0, (total - step) / max(1, total - warmup))
