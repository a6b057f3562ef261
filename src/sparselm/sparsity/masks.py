"""Mask constructors and the N:M rule. Masks are boolean (True = weight kept) and exact: a layer of
``numel`` weights at sparsity ``s`` has exactly ``round(s * numel)`` zeros."""

from __future__ import annotations

import torch

from .sharding import full


def n_zeros(numel: int, sparsity: float) -> int:
    return int(round(sparsity * numel))


def topk_mask(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Keep the ``n_keep`` highest scores; ties broken by position (deterministic)."""
    flat = scores.reshape(-1).float()
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=scores.device)
    if n_keep > 0:
        # stable sort: equal scores keep the lower index, identical on every rank
        idx = torch.sort(flat, descending=True, stable=True).indices[:n_keep]
        mask[idx] = True
    return mask.view(scores.shape)


def random_scores(shape, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=generator)


def random_mask(shape, sparsity: float, generator: torch.Generator) -> torch.Tensor:
    """Uniformly random mask with exactly ``round(sparsity * numel)`` zeros."""
    numel = int(torch.Size(shape).numel())
    return topk_mask(random_scores(shape, generator), numel - n_zeros(numel, sparsity))


def nm_mask(scores: torch.Tensor, n: int, m: int, in_axis: int) -> torch.Tensor:
    """N:M mask: in every group of ``m`` consecutive weights along the input axis keep the ``n``
    highest scores (2:4 is what sparse tensor cores run)."""
    if not 0 < n <= m:
        raise ValueError(f"N:M needs 0 < N <= M, got {n}:{m}")
    s = scores.float().movedim(in_axis, -1)
    if s.shape[-1] % m:
        raise ValueError(f"input dimension {s.shape[-1]} is not divisible by M={m} for an N:M mask")
    groups = s.reshape(-1, m)
    keep = torch.topk(groups, n, dim=-1, sorted=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(s.shape).movedim(-1, in_axis).contiguous()


def nm_problem(mask: torch.Tensor, n: int, m: int, in_axis: int) -> str | None:
    """Why ``mask`` is not N:M along its input axis, or None when it is.

    The rule: the input dimension is a multiple of ``m`` and every group of ``m`` consecutive weights
    along it keeps *at most* ``n``. A group that keeps fewer (1:4 under 2:4) is allowed: it is what
    both consumers can store. The 2:4 sparse kernels compress the dense weight, where a pruned weight
    is an exact zero, so a group with one non-zero is a 2:4 group with a zero; and the 2:4 export
    (``sparselm.models.export``) pads such a group with zero values at unused positions. Only more
    than ``n`` kept cannot be stored. A sharded (FSDP2) mask is checked whole."""
    if not 0 < n <= m:
        raise ValueError(f"N:M needs 0 < N <= M, got {n}:{m}")
    g = full(mask).movedim(in_axis, -1)
    if g.shape[-1] % m:
        return f"input dimension {g.shape[-1]} is not divisible by {m}"
    if g.numel() == 0:
        return None
    counts = g.reshape(-1, g.shape[-1] // m, m).sum(-1)  # (outputs, groups)
    over = (counts > n).nonzero()
    if not len(over):
        return None
    out, group = (int(i) for i in over[0])
    return (f"output {out}, inputs {group * m}-{group * m + m - 1} keep {int(counts[out, group])} of {m}, more than {n} "
            f"(the mask is not {n}:{m})")


def is_n_m(mask: torch.Tensor, n: int, m: int, in_axis: int) -> bool:
    """Whether ``mask`` keeps at most ``n`` in every group of ``m`` along ``in_axis`` (``nm_problem``)."""
    return nm_problem(mask, n, m, in_axis) is None
