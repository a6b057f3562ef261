"""The sparsity engine: masks, distributions, schedules and sparse-training methods for any
``nn.Module``. Knows nothing about trainers or GPT."""

from .distributions import erk, per_layer_sparsity, uniform
from .masks import nm_mask, random_mask, topk_mask
from .methods import (
    GMP, METHODS, SET, Magnitude, RigL, Sparsifier, SparsityViolation, Static,
    get_method, global_sparsity, make_sparsifier, parse_n_m, register_method,
)
from .schedules import Schedule
from .selection import DEFAULT_EXCLUDE, Target, select_targets

__all__ = [
    "GMP", "METHODS", "SET", "Magnitude", "RigL", "Schedule", "Sparsifier", "SparsityViolation", "Static",
    "DEFAULT_EXCLUDE", "Target", "erk", "get_method", "global_sparsity", "make_sparsifier",
    "nm_mask", "parse_n_m", "per_layer_sparsity", "random_mask", "register_method", "select_targets", "topk_mask", "uniform",
]
