"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot"; reference IST-DASLab/sparsegpt): prune column block by column block and correct the kept
weights of later columns for each pruned one with the inverse Hessian of the layer's reconstruction
loss (an approximate OBS update), so the layer's output on calibration data changes little."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import config
from ..sparsity import masks as M
from .base import Pruned, Pruner, register_pruner, spread


class Hessian:
    """``H = 2 X Xᵀ / n`` over calibration samples, a running mean in float32 as the reference's ``add_batch``."""

    def __init__(self, n_in: int, device):
        self.H = torch.zeros(n_in, n_in, dtype=torch.float32, device=device)
        self.n_samples = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.unsqueeze(0) if x.dim() == 2 else x
        batch = x.shape[0]
        x = x.reshape(-1, x.shape[-1]).t().float()
        self.H *= self.n_samples / (self.n_samples + batch)
        self.n_samples += batch
        x = math.sqrt(2 / self.n_samples) * x
        self.H += x @ x.t()


def inverse_hessian_factor(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor of (H + damp * mean(diag H) I)⁻¹, the dead inputs), as the reference:
    inputs that were always zero get ``H_jj = 1`` (their weights are zeroed by the caller)."""
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    L, info = torch.linalg.cholesky_ex(H)
    if info:
        raise torch.linalg.LinAlgError(f"the damped Hessian is not positive definite (minor {int(info)}); raise "
                                       "sparsegpt.damp (default 0.01) or use more calibration samples")
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    return Hinv, dead


@register_pruner
class SparseGPT(Pruner):
    """SparseGPT as the reference's ``fasterprune``: damping 0.01 x mean(diag H), blocks of 128 columns,
    the mask of a block chosen by ``w² / [H⁻¹]_jj²`` before its columns are processed (N:M: per group of
    M columns when the group is reached, from the weights as updated so far), fp32 maths.

    Differs from the reference in the count only: its threshold ``sort(score)[int(s * block numel)]``
    with ``score <= thresh`` prunes one weight more per block (plus ties); sparselm prunes
    ``round(s * numel)`` per layer, spread over the blocks, ties kept by position."""

    name = "sparsegpt"
    help = "OBS-style pruning with weight reconstruction (Frantar & Alistarh 2023)"

    @dataclass
    class Options:
        damp: float = config.option(0.01, "Hessian damping, a fraction of its mean diagonal", lo=0.0, lo_open=True)
        blocksize: int = config.option(128, "columns pruned and corrected together", lo=1)

    def stats(self, n_in, device):
        return Hessian(n_in, device)

    def prune(self, weight, stats, n_prune, n_m):
        W = weight.float().clone()
        rows, cols = W.shape
        Hinv, dead = inverse_hessian_factor(stats.H.to(W.device), self.options.damp)
        W[:, dead] = 0
        bs = self.options.blocksize
        if n_m is not None and bs % n_m[1]:
            raise ValueError(f"sparsegpt.blocksize={bs} must be a multiple of M={n_m[1]} for {n_m[0]}:{n_m[1]}")
        starts = list(range(0, cols, bs))
        shares = spread(n_prune, cols) if n_m is None else None  # per column, summed per block below
        pruned = torch.zeros_like(W, dtype=torch.bool)
        for i1 in starts:
            i2 = min(i1 + bs, cols)
            W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
            d = torch.diag(Hinv1)
            Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
            if n_m is None:
                score = W1 ** 2 / d.reshape(1, -1) ** 2
                prune1 = ~M.topk_mask(score, score.numel() - sum(shares[i1:i2]))
            else:
                prune1 = torch.zeros_like(W1, dtype=torch.bool)
            for i in range(i2 - i1):
                if n_m is not None and i % n_m[1] == 0:
                    n, m = n_m
                    score = W1[:, i:i + m] ** 2 / d[i:i + m].reshape(1, -1) ** 2
                    prune1[:, i:i + m] = ~M.nm_mask(score, n, m, in_axis=1)
                w = W1[:, i]
                q = w.masked_fill(prune1[:, i], 0.0)
                Q1[:, i] = q
                err = (w - q) / Hinv1[i, i]
                W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
                Err1[:, i] = err
            W[:, i1:i2] = Q1
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
            pruned[:, i1:i2] = prune1
        return Pruned(~pruned, W)
