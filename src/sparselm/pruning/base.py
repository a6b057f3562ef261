"""The one-shot pruning contract: a pruner is one module plus ``register_pruner``.

A ``Pruner`` sees one linear layer at a time, as the reference implementations do: its weight as
an ``(out, in)`` float32 matrix (GPT-2's ``Conv1D`` transposed for it), the number of weights to
prune, and, when it declares ``needs_calibration``, the statistics it asked for (``stats``) of the
layer's inputs on calibration data. It returns the mask and, if it corrects the kept weights
(SparseGPT), the new weight. Everything else (which layers, per-layer targets, calibration data,
block-sequential propagation, devices, progress) is the driver's (``sequential.prune_model``), so
a new pruner never re-implements it.

A ``Refiner`` (DSnoT) changes the mask a pruner chose (or a sparse run trained), with the same
kind of statistics, and never the number of kept weights.

Counts are exact: a layer of ``numel`` weights at sparsity ``s`` loses exactly ``round(s * numel)``.
Pruners that prune per row or per column block (Wanda, SparseGPT) spread that count over the rows or
blocks by cumulative rounding (``spread``); where ``s * row`` is an integer this is the references'
own per-row count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from .. import config
from ..registry import Registry


class InputStats(Protocol):
    """A running statistic of one layer's inputs, fed every calibration batch."""

    def add(self, x: torch.Tensor) -> None:
        """``x``: the layer's input, ``[samples, tokens, in]`` (or ``[tokens, in]``: one sample)."""


@dataclass
class Pruned:
    mask: torch.Tensor  # (out, in) bool, True = kept
    weight: torch.Tensor | None = None  # (out, in) float32 when the pruner corrects the kept weights


class _Configurable:
    name: ClassVar[str]
    help: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = True

    @dataclass
    class Options:
        """Method-specific settings (none by default)."""

    def __init__(self, **options):
        self.options = config.from_dict(self.Options, options, source=f"{self.name} options", prefix=f"{self.name}.")

    def stats(self, n_in: int, device: torch.device | str) -> InputStats | None:
        """A fresh accumulator for a layer with ``n_in`` inputs (None: no calibration needed)."""
        return None


class Pruner(_Configurable):
    """Chooses a layer's mask (and maybe corrects its kept weights) from its weight and input statistics."""

    supports_n_m: ClassVar[bool] = True

    def prune(self, weight: torch.Tensor, stats: InputStats | None, n_prune: int,
              n_m: tuple[int, int] | None) -> Pruned:
        """``weight`` is ``(out, in)`` float32 (a copy the pruner may change); prune exactly ``n_prune``
        weights, or keep ``n`` of every ``m`` consecutive inputs of each row when ``n_m`` is given."""
        raise NotImplementedError


class Refiner(_Configurable):
    """Changes a mask without changing how many weights it keeps (training-free mask refinement)."""

    def refine(self, dense: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, stats: InputStats | None,
               n_m: tuple[int, int] | None) -> Pruned:
        """``dense``: the layer's weight before pruning; ``weight``/``mask``: after it, all ``(out, in)``.
        Return the refined mask (same kept count per row) and the weight to use."""
        raise NotImplementedError


def spread(total: int, parts: int) -> list[int]:
    """``total`` split over ``parts`` by cumulative rounding: part i gets
    ``round(total * (i+1) / parts) - round(total * i / parts)``, so the parts sum to ``total`` exactly and
    each is ``total / parts`` when that is an integer."""
    edges = [round(total * i / parts) for i in range(parts + 1)]
    return [b - a for a, b in zip(edges, edges[1:])]


PRUNERS: Registry[type[Pruner]] = Registry("pruning method", entry_points="sparselm.pruners")
REFINERS: Registry[type[Refiner]] = Registry("mask refinement", entry_points="sparselm.refiners")


@PRUNERS.registrar
def register_pruner(cls: type[Pruner], replace: bool = False) -> type[Pruner]:
    """Make a pruner available by ``cls.name`` to ``sparselm prune --method`` and experiment specs."""
    return PRUNERS.register(cls.name, cls, replace)


@REFINERS.registrar
def register_refiner(cls: type[Refiner], replace: bool = False) -> type[Refiner]:
    """Make a refinement available by ``cls.name`` to ``sparselm prune --refine``."""
    return REFINERS.register(cls.name, cls, replace)
