"""Magnitude pruning: keep the largest |W| of each layer. No data; the baseline every other pruner must beat."""

from __future__ import annotations

from ..sparsity import masks as M
from .base import Pruned, Pruner, register_pruner


@register_pruner
class MagnitudePruner(Pruner):
    """The smallest-magnitude weights of each layer are pruned (per layer, as Wanda's
    ``prune_magnitude``; N:M: per group of M consecutive inputs). Wanda's reference keeps weights
    strictly above the ``int(s * numel)``-th smallest (ties at it pruned, so one weight more);
    sparselm prunes exactly ``round(s * numel)``, ties kept by position."""

    name = "magnitude"
    help = "smallest |W| per layer (no calibration data)"
    needs_calibration = False

    def prune(self, weight, stats, n_prune, n_m):
        score = weight.abs()
        if n_m is not None:
            return Pruned(M.nm_mask(score, n_m[0], n_m[1], in_axis=1))
        return Pruned(M.topk_mask(score, score.numel() - n_prune))
