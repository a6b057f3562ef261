"""One-shot pruning of trained models: pruners (magnitude, Wanda, SparseGPT), mask refinement (DSnoT) and the
block-sequential driver that feeds them calibration data. A pruner is one module and a
``register_pruner``; it knows nothing about models beyond one ``(out, in)`` weight."""

from . import dsnot, magnitude, sparsegpt, wanda  # noqa: F401  (they register themselves)
from .base import PRUNERS, REFINERS, Pruned, Pruner, Refiner, register_pruner, register_refiner, spread
from .sequential import PruneResult, prune_model

__all__ = ["PRUNERS", "REFINERS", "Pruned", "Pruner", "Refiner", "PruneResult", "prune_model", "register_pruner",
           "register_refiner", "spread"]
