"""Mask constructors. Masks are boolean (True = weight kept) and exact: a layer of ``numel``
weights at sparsity ``s`` has exactly ``round(s * numel)`` zeros."""

from __future__ import annotations

import torch


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
