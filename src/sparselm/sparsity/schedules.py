"""When masks move and how far: one ``Schedule`` for every method (after jaxpruner's schedules).

A schedule lives on training steps. Positions are given either as fractions of training (floats in
[0, 1]: ``start=0.25``) or as steps (``start_step=125``), never as a number whose type decides its
meaning. Masks move every ``update_every`` steps after ``start`` and always at ``end``: the update
steps are ``start < step <= end`` with ``(step - start) % update_every == 0 or step == end``. At
``start`` the masks are what the method began with, so a schedule that reaches its target at ``end``
reaches it exactly there. An ``end`` of 1.0 means the last training step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    total_steps: int
    start_step: int
    end_step: int
    update_every: int = 100

    @classmethod
    def of(cls, total_steps: int, update_every: int = 100, start: float | None = None, end: float | None = None,
           start_step: int | None = None, end_step: int | None = None) -> "Schedule":
        """Resolve fractions (``start``/``end``) or steps (``start_step``/``end_step``) to steps; giving
        both forms of one position is an error."""
        total_steps, update_every = int(total_steps), int(update_every)
        if total_steps < 1:
            raise ValueError(f"a schedule needs total_steps >= 1, got {total_steps}")
        if update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {update_every}")
        first = _position("start", start, start_step, total_steps, default=0.0)
        last = _position("end", end, end_step, total_steps, default=1.0)
        sched = cls(total_steps, first, last, update_every)
        if not sched.update_steps():
            raise ValueError(f"the schedule from step {first} to step {last} (of {total_steps}) has no update step; "
                             "it must end after it starts (check start/end or start_step/end_step)")
        return sched

    def is_update_step(self, step: int) -> bool:
        return self.start_step < step <= self.end_step and (
            (step - self.start_step) % self.update_every == 0 or step == self.end_step)

    def update_steps(self) -> list[int]:
        steps = list(range(self.start_step + self.update_every, self.end_step + 1, self.update_every))
        if self.end_step > self.start_step and (not steps or steps[-1] != self.end_step):
            steps.append(self.end_step)
        return steps

    def last_update_before(self, step: int) -> int | None:
        """The last update step strictly before ``step`` (whose masks are in use during ``step``)."""
        if step <= self.start_step + 1:
            return None
        if step > self.end_step:
            return self.end_step
        k = (step - 1 - self.start_step) // self.update_every
        return self.start_step + k * self.update_every if k > 0 else None

    def progress(self, step: int) -> float:
        """0 at ``start``, 1 at ``end``, linear in between."""
        if step <= self.start_step:
            return 0.0
        if step >= self.end_step:
            return 1.0
        return (step - self.start_step) / (self.end_step - self.start_step)

    def to_dict(self) -> dict:
        return {"total_steps": self.total_steps, "start_step": self.start_step, "end_step": self.end_step,
                "update_every": self.update_every}


def _position(name: str, fraction: float | None, step: int | None, total: int, default: float) -> int:
    if fraction is not None and step is not None:
        raise ValueError(f"give {name} (a fraction of training) or {name}_step (a step), not both")
    last = total - 1  # the last step after which masks can move
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"{name}_step must be a whole step >= 0, got {step!r}")
        if step > last:
            raise ValueError(f"{name}_step={step} is after the last training step ({last} of {total})")
        return step
    fraction = default if fraction is None else fraction
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"{name} must be a fraction of training in [0, 1], got {fraction!r} (use {name}_step for steps)")
    return min(int(round(float(fraction) * total)), last)


# ---- curves: a value as a function of schedule progress in [0, 1] -------------------------------
def constant(progress: float, final: float, initial: float = 0.0) -> float:
    return final


def linear(progress: float, final: float, initial: float = 0.0) -> float:
    return initial + (final - initial) * progress


def cubic(progress: float, final: float, initial: float = 0.0) -> float:
    """Zhu & Gupta (2017) gradual magnitude pruning: s_t = s_f + (s_i - s_f)(1 - p)^3."""
    return final + (initial - final) * (1.0 - progress) ** 3


def cosine_decay(progress: float, initial: float) -> float:
    """RigL's drop-fraction curve: alpha/2 * (1 + cos(pi * p)), 0 at the end."""
    if progress >= 1.0:
        return 0.0
    return initial / 2.0 * (1.0 + math.cos(math.pi * progress))


CURVES = {"constant": constant, "linear": linear, "cubic": cubic}
