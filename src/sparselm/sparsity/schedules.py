"""Schedules: sparsity (or drop fraction) as a plain function of the training step.

``start`` and ``end`` are steps; ``fraction_to_step`` turns fractions of training into steps.
"""

from __future__ import annotations

import math


def fraction_to_step(value: float | int, total_steps: int) -> int:
    """A float in [0, 1] is a fraction of ``total_steps``; an int is already a step."""
    if isinstance(value, float) and 0.0 <= value <= 1.0:
        return int(round(value * total_steps))
    return int(value)


def constant(step: int, final: float, start: int = 0, end: int = 0, initial: float = 0.0) -> float:
    return final


def linear(step: int, final: float, start: int, end: int, initial: float = 0.0) -> float:
    return initial + (final - initial) * _progress(step, start, end)


def cubic(step: int, final: float, start: int, end: int, initial: float = 0.0) -> float:
    """Zhu & Gupta (2017) gradual magnitude pruning: s_t = s_f + (s_i - s_f)(1 - p)^3."""
    return final + (initial - final) * (1.0 - _progress(step, start, end)) ** 3


def cosine_decay(step: int, initial: float, end: int) -> float:
    """RigL's drop-fraction schedule: alpha/2 * (1 + cos(pi * t / T_end)), 0 after ``end``."""
    if step >= end:
        return 0.0
    return initial / 2.0 * (1.0 + math.cos(math.pi * step / end))


def _progress(step: int, start: int, end: int) -> float:
    if step <= start:
        return 0.0
    if step >= end:
        return 1.0
    return (step - start) / (end - start)


SCHEDULES = {"constant": constant, "linear": linear, "cubic": cubic}
