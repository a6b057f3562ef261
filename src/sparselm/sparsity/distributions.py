"""Sparsity distributions: plain functions from layer shapes to per-layer sparsity.

Both keep the same global sparsity (fraction of zeros over all masked weights).
"""

from __future__ import annotations

import math
from collections.abc import Mapping


def uniform(shapes: Mapping[str, tuple[int, ...]], sparsity: float) -> dict[str, float]:
    """Every layer gets the same sparsity."""
    _check(sparsity)
    return {name: float(sparsity) for name in shapes}


def erk(shapes: Mapping[str, tuple[int, ...]], sparsity: float, power: float = 1.0) -> dict[str, float]:
    """Erdos-Renyi-Kernel (Evci et al. 2020, RigL): density of a layer is proportional to
    ``sum(shape) / prod(shape)``, scaled so the global sparsity matches. Layers whose density
    would exceed 1 are made dense and the rest rescaled (the RigL reference algorithm)."""
    _check(sparsity)
    numel = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: (sum(s) / math.prod(s)) ** power for n, s in shapes.items()}
    dense: set[str] = set()
    while True:
        budget = (1.0 - sparsity) * sum(numel.values()) - sum(numel[n] for n in dense)
        weighted = sum(raw[n] * numel[n] for n in shapes if n not in dense)
        eps = budget / weighted if weighted > 0 else 0.0
        over = [n for n in shapes if n not in dense and eps * raw[n] > 1.0]
        if not over:
            break
        dense.update(over)
    return {n: 0.0 if n in dense else 1.0 - eps * raw[n] for n in shapes}


DISTRIBUTIONS = {"uniform": uniform, "random": uniform, "erk": erk}


def per_layer_sparsity(name: str, shapes: Mapping[str, tuple[int, ...]], sparsity: float) -> dict[str, float]:
    try:
        fn = DISTRIBUTIONS[name]
    except KeyError:
        raise ValueError(f"unknown sparsity distribution {name!r}; choose one of {sorted(DISTRIBUTIONS)}") from None
    return fn(shapes, sparsity)


def _check(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
