"""Sparse-training methods as small classes over one update API (after jaxpruner).

``Sparsifier`` owns what every method shares: the masked parameters, exact per-layer masks,
applying them, the invariant check, optimizer-state hygiene and checkpoint state. A method
overrides at most three hooks: ``init_masks`` (the starting masks), ``is_update_step`` and
``update_masks`` (how masks move). A training loop calls two methods::

    sparsifier = Static(sparsity=0.75).attach(model, optimizer)
    ...
    loss.backward(); sparsifier.after_backward(step)
    optimizer.step(); sparsifier.after_step(step)

``after_backward`` zeroes the gradients of pruned weights, so AdamW's moments for them stay
exactly zero; ``after_step`` moves masks when the method says so and re-applies them, so pruned
weights are exactly zero after every optimizer step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch import nn

from . import masks as M
from .distributions import per_layer_sparsity
from .schedules import SCHEDULES, cosine_decay, fraction_to_step
from .selection import DEFAULT_EXCLUDE, Target, select_targets


class SparsityViolation(RuntimeError):
    """A pruned weight is non-zero: the sparsity invariant is broken."""


class Sparsifier:
    """Shared machinery; on its own it is a fixed random mask (SPDF's static sparsity)."""

    name = "static"
    init = "random"  # or "magnitude"

    def __init__(
        self,
        sparsity: float = 0.75,
        distribution: str = "uniform",
        include: list[str] | tuple[str, ...] | None = None,
        exclude: list[str] | tuple[str, ...] | None = DEFAULT_EXCLUDE,
        seed: int = 0,
        n_m: tuple[int, int] | None = None,
        total_steps: int | None = None,
    ):
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        if n_m is not None:
            n, m = n_m
            if not 0 < n <= m:
                raise ValueError(f"N:M needs 0 < N <= M, got {n}:{m}")
            if distribution not in ("uniform", "random"):
                raise ValueError("an N:M mask fixes every layer at 1 - N/M; use distribution='uniform'")
            sparsity = 1.0 - n / m
        self.sparsity = float(sparsity)
        self.distribution = distribution
        self.include, self.exclude = include, exclude
        self.seed = int(seed)
        self.n_m = tuple(n_m) if n_m is not None else None
        self.total_steps = total_steps
        self.targets: list[Target] = []
        self.masks: dict[str, torch.Tensor] = {}
        self.optimizer: torch.optim.Optimizer | None = None

    # ---- setup -------------------------------------------------------------------------
    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> "Sparsifier":
        """Select the weights to mask, build the initial masks and zero the pruned weights."""
        self.targets = select_targets(model, self.include, self.exclude)
        self.optimizer = optimizer
        self.shapes = {t.name: tuple(t.param.shape) for t in self.targets}
        self.masks = {k: v.to(self._param(k).device) for k, v in self.init_masks().items()}
        self._sync_masks()
        self.apply_masks()
        return self

    def layer_sparsity(self, sparsity: float) -> dict[str, float]:
        """Per-layer sparsity for a global target, by the configured distribution."""
        return per_layer_sparsity(self.distribution, self.shapes, sparsity)

    def generator(self, *salt: int) -> torch.Generator:
        """A CPU generator seeded from (seed, *salt): identical on every data-parallel rank and
        after a resume, with no RNG state to carry."""
        g = torch.Generator()
        g.manual_seed(int(hashlib.sha256(repr((self.seed, *salt)).encode()).hexdigest()[:15], 16))
        return g

    def masks_for(self, sparsity: float, scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Top-k (or N:M) masks over per-layer scores at a global sparsity."""
        out = {}
        per_layer = self.layer_sparsity(sparsity)
        for i, t in enumerate(self.targets):
            s = scores[t.name]
            if self.n_m is not None:
                n, m = self.n_m
                # gradual N:M: keep M..N per group as the schedule moves 0 -> final sparsity
                frac = sparsity / self.sparsity if self.sparsity > 0 else 1.0
                keep = m - int(round((m - n) * frac))
                out[t.name] = M.nm_mask(s, keep, m, t.in_axis)
            else:
                out[t.name] = M.topk_mask(s, s.numel() - M.n_zeros(s.numel(), per_layer[t.name]))
        return out

    def init_masks(self) -> dict[str, torch.Tensor]:
        if self.init == "magnitude":
            scores = {t.name: t.param.detach().abs().cpu() for t in self.targets}
        else:
            scores = {t.name: M.random_scores(t.param.shape, self.generator(i)) for i, t in enumerate(self.targets)}
        return self.masks_for(self.sparsity, scores)

    # ---- the two calls a training loop makes --------------------------------------------
    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        """Zero the gradients of pruned weights (call after the last backward of a step)."""
        for t in self.targets:
            if t.param.grad is not None:
                t.param.grad.mul_(self.masks[t.name])

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Move masks if this is an update step, then zero pruned weights."""
        if self.is_update_step(step):
            old = self.masks
            self.masks = self.update_masks(step)
            self._sync_masks()
            self._reset_changed(old, self.masks)
        self.apply_masks()

    # ---- method hooks ---------------------------------------------------------------------
    def is_update_step(self, step: int) -> bool:
        return False

    def update_masks(self, step: int) -> dict[str, torch.Tensor]:
        return self.masks

    def dense_gradient_step(self, step: int) -> bool:
        """Whether this step needs the dense weight gradient (RigL), for FLOP accounting."""
        return False

    # ---- invariant, state -----------------------------------------------------------------
    @torch.no_grad()
    def apply_masks(self) -> None:
        for t in self.targets:
            t.param.mul_(self.masks[t.name])

    @torch.no_grad()
    def check(self) -> None:
        """Raise ``SparsityViolation`` if any pruned weight (or its gradient) is non-zero."""
        for t in self.targets:
            pruned = ~self.masks[t.name]
            bad = int(torch.count_nonzero(t.param[pruned]))
            if bad:
                raise SparsityViolation(f"{t.name}: {bad} pruned weights are non-zero")
            if t.param.grad is not None and torch.count_nonzero(t.param.grad[pruned]):
                raise SparsityViolation(f"{t.name}: pruned weights have non-zero gradients")

    def densities(self) -> dict[str, float]:
        """Measured density (fraction of kept weights) per masked layer."""
        return {k: float(m.float().mean()) for k, m in self.masks.items()}

    def report(self) -> dict:
        """Target and measured sparsity, per layer and overall (over the masked weights)."""
        total = sum(m.numel() for m in self.masks.values())
        return {
            "method": self.name,
            "distribution": self.distribution,
            "n_m": list(self.n_m) if self.n_m else None,
            "target": self.sparsity,
            "measured": global_sparsity(self.masks),
            "masked_params": total,
            "nonzero_masked_params": sum(int(m.sum()) for m in self.masks.values()),
            "layers": {k: 1.0 - d for k, d in self.densities().items()},
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Boolean masks by parameter name (the whole state: every RNG is derived from the seed)."""
        return {k: v.detach().cpu().contiguous() for k, v in self.masks.items()}

    @torch.no_grad()
    def load_state_dict(self, masks: Mapping[str, torch.Tensor]) -> None:
        missing = set(self.masks) - set(masks)
        if missing:
            raise KeyError(f"masks missing for {sorted(missing)[:4]} (saved by a different model or selection?)")
        for t in self.targets:
            m = masks[t.name]
            if tuple(m.shape) != tuple(t.param.shape):
                raise ValueError(f"mask for {t.name} has shape {tuple(m.shape)}, weight has {tuple(t.param.shape)}")
            self.masks[t.name] = m.to(device=t.param.device, dtype=torch.bool)
        self.apply_masks()

    # ---- internals ------------------------------------------------------------------------
    def _param(self, name: str) -> nn.Parameter:
        return next(t.param for t in self.targets if t.name == name)

    @torch.no_grad()
    def _reset_changed(self, old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]) -> None:
        """Pruned and newly grown weights are set to zero, with zeroed gradients and optimizer moments."""
        for t in self.targets:
            changed = old[t.name] ^ new[t.name]
            if not bool(changed.any()):
                continue
            t.param.masked_fill_(changed, 0.0)
            if t.param.grad is not None:
                t.param.grad.masked_fill_(changed, 0.0)
            state = self.optimizer.state.get(t.param, {}) if self.optimizer is not None else {}
            for value in state.values():
                if torch.is_tensor(value) and value.shape == t.param.shape:
                    value.masked_fill_(changed, 0.0)

    def _sync_masks(self) -> None:
        """Broadcast masks from rank 0 so every data-parallel rank holds the same ones (they are
        already derived identically; this makes it a guarantee)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for name, m in self.masks.items():
                buf = m.to(torch.uint8)
                dist.broadcast(buf, src=0)
                self.masks[name] = buf.bool()


Static = Sparsifier


class Magnitude(Sparsifier):
    """One-shot magnitude pruning of a (dense, trained) model, then a fixed mask:
    the "prune then fine-tune" baseline."""

    name = "magnitude"
    init = "magnitude"


class _Scheduled(Sparsifier):
    """Shared by methods that move masks every ``update_every`` steps between ``start`` and ``end``
    (steps, or fractions of ``total_steps``)."""

    def __init__(self, *args, update_every: int = 100, start: float | int = 0.25, end: float | int = 0.75, **kw):
        super().__init__(*args, **kw)
        if self.total_steps is None:
            raise ValueError(f"{self.name} needs total_steps to place its schedule")
        self.update_every = int(update_every)
        if self.update_every < 1:
            raise ValueError("update_every must be >= 1")
        self.start = fraction_to_step(start, self.total_steps)
        self.end = fraction_to_step(end, self.total_steps)
        if not 0 <= self.start <= self.end:
            raise ValueError(f"schedule needs 0 <= start <= end, got start={self.start} end={self.end} steps")


class GMP(_Scheduled):
    """Gradual magnitude pruning (Zhu & Gupta 2017): dense start, sparsity rises along the
    schedule from ``start`` to ``end`` (The Journey Matters, 2025: 25% -> 75% of training) by
    pruning the smallest-magnitude weights; masks stay fixed after ``end``."""

    name = "gmp"

    def __init__(self, *args, schedule: str = "cubic", **kw):
        super().__init__(*args, **kw)
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; choose one of {sorted(SCHEDULES)}")
        self.schedule = schedule

    def target_at(self, step: int) -> float:
        return SCHEDULES[self.schedule](step, self.sparsity, self.start, self.end)

    def init_masks(self):
        return {t.name: torch.ones(t.param.shape, dtype=torch.bool) for t in self.targets}

    def is_update_step(self, step: int) -> bool:
        return self.start <= step <= self.end and ((step - self.start) % self.update_every == 0 or step == self.end)

    def update_masks(self, step):
        scores = {t.name: t.param.detach().abs() * self.masks[t.name] for t in self.targets}
        return self.masks_for(self.target_at(step), scores)


class SET(_Scheduled):
    """Sparse Evolutionary Training (Mocanu et al. 2018): every ``update_every`` steps until ``end``,
    drop the smallest-magnitude fraction of each layer's active weights and regrow as many at
    random; per-layer density never changes. The drop fraction decays by cosine (RigL)."""

    name = "set"

    def __init__(self, *args, drop_fraction: float = 0.3, start: float | int = 0, end: float | int = 0.75, **kw):
        super().__init__(*args, start=start, end=end, **kw)
        if self.n_m is not None:
            raise ValueError(f"{self.name} moves unstructured masks; N:M is supported by static and gmp")
        self.drop_fraction = float(drop_fraction)

    def is_update_step(self, step: int) -> bool:
        return self.start < step < self.end and step % self.update_every == 0

    def grow_scores(self, step: int, i: int, t: Target) -> torch.Tensor:
        return M.random_scores(t.param.shape, self.generator(i, step)).to(t.param.device)

    def update_masks(self, step):
        frac = cosine_decay(step, self.drop_fraction, self.end)
        new = {}
        for i, t in enumerate(self.targets):
            mask = self.masks[t.name]
            n_active = int(mask.sum())
            n_drop = int(round(frac * n_active))
            if n_drop == 0:
                new[t.name] = mask
                continue
            neg = torch.finfo(torch.float32).min
            drop_scores = torch.where(mask, t.param.detach().abs().float(), torch.full_like(mask, neg, dtype=torch.float32))
            kept = M.topk_mask(drop_scores, n_active - n_drop)
            grow = torch.where(kept, torch.full_like(mask, neg, dtype=torch.float32), self.grow_scores(step, i, t).float())
            new[t.name] = kept | M.topk_mask(grow, n_drop)
        return new


class RigL(SET):
    """RigL (Evci et al. 2020): as SET, but regrow where the dense gradient is largest. The dense
    gradient is read only on update steps, before it is masked; it costs no extra memory beyond
    one gradient-sized score per layer held for the update (FLOPs: see ``dense_gradient_step``)."""

    name = "rigl"

    def after_backward(self, step: int) -> None:
        if self.is_update_step(step):
            self._grad_scores = {
                t.name: t.param.grad.detach().abs().clone() if t.param.grad is not None else torch.zeros_like(t.param)
                for t in self.targets
            }
        super().after_backward(step)

    def grow_scores(self, step, i, t):
        scores = getattr(self, "_grad_scores", None)
        if scores is None:
            raise RuntimeError("RigL.after_backward must run on update steps before after_step")
        return scores[t.name]

    def update_masks(self, step):
        new = super().update_masks(step)
        self._grad_scores = None
        return new

    def dense_gradient_step(self, step: int) -> bool:
        return self.is_update_step(step)


METHODS: dict[str, type[Sparsifier]] = {
    "static": Static,
    "magnitude": Magnitude,
    "gmp": GMP,
    "set": SET,
    "rigl": RigL,
}


def make_sparsifier(method: str, **kwargs) -> Sparsifier:
    """Build a method by name; unknown names and options give a clear error."""
    try:
        cls = METHODS[method]
    except KeyError:
        raise ValueError(f"unknown sparsity method {method!r}; choose one of {sorted(METHODS)}") from None
    return cls(**kwargs)


def parse_n_m(text: str | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4)."""
    if not text:
        return None
    try:
        n, m = (int(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"N:M must look like '2:4', got {text!r}") from None
    return n, m


def global_sparsity(masks: Mapping[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return 1.0 - sum(int(m.sum()) for m in masks.values()) / total if total else 0.0


__all__ = [
    "Sparsifier", "Static", "Magnitude", "GMP", "SET", "RigL", "METHODS", "make_sparsifier",
    "SparsityViolation", "parse_n_m", "global_sparsity",
]
