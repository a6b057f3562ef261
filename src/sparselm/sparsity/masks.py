"""Mask constructors and the N:M rule. Masks are boolean (True = weight kept) and exact: a layer of
``numel`` weights at sparsity ``s`` has exactly ``round(s * numel)`` zeros."""

from __future__ import annotations

import torch

from .sharding import full


def n_zeros(numel: int, sparsity: float) -> int:
    return int(round(sparsity * numel))


def topk_mask(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Keep the ``n_keep`` highest scores, ties broken by position: among equal scores the lower flat
    (row-major) index is kept, so the mask is the same on every rank and device, and equal to the
    first ``n_keep`` of a stable descending sort (what this function did before, at several times the
    cost of a selection: ``benchmarks/mask_update.py``).

    The rule: ``thr`` is the ``n_keep``-th largest score; every score above ``thr`` is kept, and of
    those equal to ``thr`` the first ``n_keep - (number above)`` by position. Scores are compared as
    float32 (bool and float16 exactly; float64 rounded). ``-inf`` and ``finfo.min`` fillers (SET's
    "never pick these") are ordinary values: they lose to every larger score and tie by position.
    NaN ranks above +inf (as ``torch.sort`` orders it), NaNs among themselves by position: a NaN
    weight or gradient (a diverged run) is kept first, as before.
    ``n_keep <= 0`` keeps nothing; ``n_keep >= numel`` keeps everything."""
    flat = scores.reshape(-1).float()
    numel = flat.numel()
    if n_keep <= 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if n_keep >= numel:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    nan = torch.isnan(flat)
    n_nan = int(torch.count_nonzero(nan))
    if n_nan == 0:
        return _threshold_mask(flat, n_keep).view(scores.shape)
    if n_nan >= n_keep:  # the first n_keep NaNs by position
        return (nan & (nan.cumsum(0) <= n_keep)).view(scores.shape)
    mask = nan.clone()
    mask[~nan] = _threshold_mask(flat[~nan], n_keep - n_nan)  # the rest among the numbers, order kept
    return mask.view(scores.shape)


def _threshold_mask(flat: torch.Tensor, n_keep: int) -> torch.Tensor:
    """``topk_mask`` of a 1-D float tensor without NaN, for ``0 < n_keep < numel``."""
    numel = flat.numel()
    if n_keep <= numel // 2:  # select the smaller side: the n_keep largest ...
        thr = torch.topk(flat, n_keep, sorted=False).values.min()
    else:  # ... or the numel - n_keep + 1 smallest, whose largest is the n_keep-th largest
        thr = torch.topk(flat, numel - n_keep + 1, largest=False, sorted=False).values.max()
    keep = flat >= thr
    if int(torch.count_nonzero(keep)) == n_keep:  # no tie at the threshold left out: the usual case
        return keep
    tied = flat == thr
    room = n_keep - int(torch.count_nonzero(flat > thr))
    return (flat > thr) | (tied & (tied.cumsum(0) <= room))


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
