"""Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models";
reference locuslab/wanda): a weight's score is ``|W_ij| * ||X_j||_2``, its magnitude times the norm of
its input feature over the calibration tokens; each output row keeps its highest scores. No weight
update: one forward pass of calibration data per block."""

from __future__ import annotations

import torch

from ..sparsity import masks as M
from .base import Pruned, Pruner, register_pruner, spread


class InputNorms:
    """Squared L2 norm of each input feature, as the reference's ``WrappedGPT.scaler_row``: a running
    mean over calibration samples (each sample's sum over its tokens), accumulated in float32."""

    def __init__(self, n_in: int, device):
        self.sq_norm = torch.zeros(n_in, dtype=torch.float32, device=device)
        self.n_samples = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.unsqueeze(0) if x.dim() == 2 else x
        batch = x.shape[0]
        x = x.reshape(-1, x.shape[-1]).float()
        self.sq_norm *= self.n_samples / (self.n_samples + batch)
        self.n_samples += batch
        self.sq_norm += torch.linalg.vector_norm(x, ord=2, dim=0) ** 2 / self.n_samples


def wanda_scores(weight: torch.Tensor, stats: InputNorms) -> torch.Tensor:
    """``|W| * sqrt(scaler_row)`` broadcast over output rows (``weight`` is ``(out, in)``)."""
    return weight.abs() * torch.sqrt(stats.sq_norm.to(weight.device)).reshape(1, -1)


def prune_rows(score: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Per output row, prune the lowest scores (a stable ascending sort: among ties the lower input
    index goes first, as the reference); ``n_prune`` is spread over the rows (``spread``)."""
    order = torch.sort(score, dim=1, stable=True).indices
    per_row = torch.tensor(spread(n_prune, score.shape[0]), device=score.device)
    pruned = torch.arange(score.shape[1], device=score.device).unsqueeze(0) < per_row.unsqueeze(1)
    mask = torch.ones_like(score, dtype=torch.bool)
    mask.scatter_(1, order, ~pruned)
    return mask


@register_pruner
class Wanda(Pruner):
    """Wanda as the reference: per-output-row comparison group, N:M per group of M consecutive inputs.
    Where the reference prunes ``int(s * in)`` weights per row, sparselm prunes ``round(s * numel)`` per
    layer spread over the rows (the same count whenever ``s * in`` is an integer, as at 50% and 2:4).
    The reference's "variant" (a per-row threshold search) is not built."""

    name = "wanda"
    help = "|W| x input-feature norm, per output row (Sun et al. 2023)"

    def stats(self, n_in, device):
        return InputNorms(n_in, device)

    def prune(self, weight, stats, n_prune, n_m):
        score = wanda_scores(weight, stats)
        if n_m is not None:
            return Pruned(M.nm_mask(score, n_m[0], n_m[1], in_axis=1))
        return Pruned(prune_rows(score, n_prune))
