"""DSnoT (Zhang et al. 2023, "Dynamic Sparse No Training: Training-Free Fine-tuning for Sparse LLMs";
reference zyxxmu/DSnoT): refine a pruned layer's mask without training, by swapping one pruned weight
back in for one kept weight per output row and cycle, so that the row's *expected* reconstruction
error ``E[(W - Ŵ) x]`` on calibration data moves towards zero. No gradients and no new weight values:
a few gathers per cycle, at most ``max_cycles`` cycles per layer.

Per row, with ``s_j`` the calibration sum of input feature ``j`` over one sequence's tokens (the
mean over sequences), the error is ``e = Σ_j (W_ij - Ŵ_ij) s_j``. Each cycle a row

- grows the pruned weight whose ``W_ij s_j / Var(x_j)`` is largest when ``e > 0`` (smallest when
  ``e <= 0``): it cancels the most error per unit of input variance;
- prunes, among its kept weights whose ``Ŵ_ij s_j`` has the sign that also reduces the error, the
  one with the lowest Wanda score ``|Ŵ_ij| ||x_j||`` (N:M: the lowest-Wanda kept weight of the grown
  weight's group of M, so every group keeps its count);
- stops for good once ``|e| <= update_threshold`` (N:M also: once a swap would flip ``e``'s initial
  sign), or after ``max_cycles``.

It aims at the error's mean only. Where inputs have large feature means (LLMs' outlier features) most
of ``||WX - ŴX||²`` is that mean and falls with it; on near-zero-mean inputs it trades the mean for
variance and ``||WX - ŴX||²`` can rise. A sparse run's pruned weights are zeros: growing one changes
nothing, so its masks come back as they were (DSnoT needs the dense weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import config
from .base import Pruned, Refiner, register_refiner
from .wanda import InputNorms, wanda_scores


class InputMoments(InputNorms):
    """What DSnoT reads of a layer's inputs, as the reference's ``WrappedGPT``: Wanda's squared norms
    (``sq_norm``, the pruning order), each feature's sum over a sequence's tokens as a running mean over
    sequences (``token_sum``, the reference's ``sum_metric_row``: how much a weight moves the output
    summed over a sequence) and its variance over the tokens of one sequence, averaged over sequences
    (``var``: computed per sequence, so it does not depend on the calibration batch size)."""

    def __init__(self, n_in: int, device):
        super().__init__(n_in, device)
        self.token_sum = torch.zeros(n_in, dtype=torch.float32, device=device)
        self.var = torch.zeros(n_in, dtype=torch.float32, device=device)
        self.n_tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = (x.unsqueeze(0) if x.dim() == 2 else x).float()
        batch, tokens = x.shape[0], x.shape[1]
        var = torch.var(x, dim=1, unbiased=False).mean(0)
        n = batch * tokens
        self.var = var if self.n_tokens == 0 else (self.var * self.n_tokens + var * n) / (self.n_tokens + n)
        self.n_tokens += n
        self.token_sum *= self.n_samples / (self.n_samples + batch)
        super().add(x)  # counts the samples
        self.token_sum += torch.sum(x.reshape(-1, x.shape[-1]), dim=0) / self.n_samples


@register_refiner
class DSnoT(Refiner):
    """DSnoT as the reference's ``prune_DSnoT`` with its defaults (50 cycles, threshold 0.1, variance
    exponent 1; unstructured without the same-sign rule, N:M with it). Where sparselm differs:

    - A row also stops when it has no kept weight of the needed sign left to prune, or its next grow
      candidate is not a pruned weight. The reference's pointers are unbounded: it goes on pruning the
      other sign's weights (highest Wanda first, raising the error), then prunes or grows one weight
      twice (the row's count, and N:M groups, change) or fails with an index error. That needs more
      cycles than a row has weights of one sign: never at 4096 inputs and 50 cycles, often at 64.
    - N:M: the weight pruned in a group is the lowest *Wanda* score; the reference uses the initial
      pruner's own score (the same after Wanda; after magnitude, |W| there).
    - Any initial weights: the error and the pruning gains use the weights the pruner left (SparseGPT's
      corrected ones), a grown weight comes back at its dense value. The reference never applies
      SparseGPT's update: it starts from the dense weights under SparseGPT's saliency mask (the same
      when the pruner keeps the dense values: magnitude, Wanda, a sparse run).
    - A zero-variance input with no effect (``0 / 0``) sorts as 0 rather than NaN (last), so a dead
      input (ReLU) cannot stall a row.
    - Every layer it is given is refined; the reference skips the MLP linears by default
      (``--skip_layer mlp``). Its ``--pow_of_var_pruning`` is never read there and is not offered.
    The error is in the reference's units (summed over a sequence's tokens): the threshold means as
    much as there at the reference's ``seqlen`` of 2048, and relatively more at shorter sequences."""

    name = "dsnot"
    help = "training-free prune-and-grow mask refinement towards zero expected error (Zhang et al. 2023)"

    @dataclass
    class Options:
        max_cycles: int = config.option(50, "swap cycles per layer at most", lo=0)
        update_threshold: float = config.option(0.1, "a row stops once |expected error| is at most this", lo=0.0)
        var_power: float = config.option(1.0, "growing divides by Var(x)^this (0: no variance term)", lo=0.0)

    def stats(self, n_in, device):
        return InputMoments(n_in, device)

    def refine(self, dense, weight, mask, stats, n_m):
        if stats is None:
            raise ValueError("dsnot needs calibration statistics of the layer's inputs (InputMoments)")
        if n_m is not None and dense.shape[1] % n_m[1]:
            raise ValueError(f"input dimension {dense.shape[1]} is not divisible by M={n_m[1]} for {n_m[0]}:{n_m[1]}")
        initial = mask.bool()
        value = torch.where(initial, weight, dense)  # what each weight is worth when kept
        token_sum = stats.token_sum.to(dense.device).reshape(1, -1)
        effect = value * token_sum  # how much keeping (i, j) adds to row i's output, summed over a sequence
        error = torch.sum((dense - torch.where(initial, weight, 0.0)) * token_sum, dim=1)
        wanda = wanda_scores(value, stats)
        grow_order = _grow_order(effect, initial, stats.var.to(dense.device), self.options.var_power)
        prune_order = None if n_m is not None else _prune_order(effect, initial, wanda)
        kept = _swap(error, grow_order, prune_order, initial, effect, wanda, n_m, self.options)
        return Pruned(kept, value * kept)


def _grow_order(effect, initial, var, power):
    """Every input of each row by ``W_ij s_j / Var_j^power`` over its pruned weights (kept: 0), ascending
    and stable: growing reads it from the right end when the error is positive, from the left otherwise."""
    score = torch.where(initial, 0.0, effect)
    if power:
        score = torch.nan_to_num(score / torch.pow(var.reshape(1, -1), power), nan=0.0)
    return torch.sort(score, dim=1, stable=True).indices


def _prune_order(effect, initial, wanda):
    """Each row's inputs for pruning: kept weights of negative effect by rising Wanda score from the left
    end, of positive effect by rising score from the right end, zero-effect kept and then pruned weights
    in between (reaching a pruned one stops the row). Pruning reads from the left when the error is
    positive, from the right when it is negative."""
    by_wanda = torch.sort(torch.where(initial, wanda, torch.inf), dim=1, stable=True).indices
    loss, kept = effect.gather(1, by_wanda), initial.gather(1, by_wanda)
    n_in = loss.shape[1]
    group = torch.full_like(by_wanda, 2)
    group[kept & (loss < 0)], group[kept & (loss == 0)], group[kept & (loss > 0)] = 0, 1, 3
    rank = torch.arange(n_in, device=loss.device).expand_as(by_wanda)
    key = group * (n_in + 1) + torch.where(group == 3, n_in - rank, rank)
    return by_wanda.gather(1, torch.argsort(key, dim=1))


def _swap(error, grow_order, prune_order, initial, effect, wanda, n_m, options):
    """The cycles: every live row swaps one pair at a time until its stop rule holds. Per-row positions
    are ``(out, 1)`` columns read and written with ``gather``/``scatter_`` (``t[rows, idx]`` is far slower)."""
    error = error.unsqueeze(1)
    n_in = initial.shape[1]
    kept = initial.clone()
    left = torch.zeros_like(error, dtype=torch.long)
    grow_left, grow_right, prune_left, prune_right = left, left + n_in - 1, left, left + n_in - 1
    live = torch.ones_like(error, dtype=torch.bool)
    initial_sign = torch.sign(error)
    for _ in range(options.max_cycles):
        if not live.any():
            break
        positive = error > 0
        grow = grow_order.gather(1, torch.where(positive, grow_right, grow_left))
        grow_left, grow_right = grow_left + (~positive).long(), grow_right - positive.long()
        if n_m is None:
            negative = error < 0
            prune = prune_order.gather(1, torch.where(negative, prune_right, prune_left))
            prune_left, prune_right = prune_left + (~negative).long(), prune_right - negative.long()
            valid = ~kept.gather(1, grow) & kept.gather(1, prune) & initial.gather(1, prune)
        else:
            group = grow - grow % n_m[1] + torch.arange(n_m[1], device=grow.device)
            candidates = torch.where((kept & initial).gather(1, group), wanda.gather(1, group), torch.inf)
            lowest, at = candidates.min(dim=1, keepdim=True)
            prune = group.gather(1, at)
            valid = ~kept.gather(1, grow) & torch.isfinite(lowest)
        after = error + effect.gather(1, prune) - effect.gather(1, grow)
        live &= (error.abs() > options.update_threshold) & valid
        if n_m is not None:
            live &= torch.sign(after) == initial_sign
        kept.scatter_(1, grow, kept.gather(1, grow) | live)
        kept.scatter_(1, prune, kept.gather(1, prune) & ~live)
        error = torch.where(live, after, error)
    return kept
