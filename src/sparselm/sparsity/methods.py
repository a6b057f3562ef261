"""Sparse-training methods as small classes over one update API (after jaxpruner).

``Sparsifier`` owns what every method shares: the masked parameters, exact per-layer masks,
applying them, the invariant check, optimizer-state hygiene and checkpoint state. A method
overrides at most a few hooks: ``init_masks`` (the starting masks), ``update_masks(step, grads)``
(how masks move on the steps its ``Schedule`` names) and, for planning without a model,
``planned_sparsity``. Its own settings are an ``Options`` dataclass, declared once and read by the
config checks, the CLI and the experiment runner; ``register_method`` adds a method by name.

A training loop calls two methods::

    sparsifier = Static(sparsity=0.75).attach(model, optimizer)
    ...
    loss.backward(); sparsifier.after_backward(step)
    optimizer.step(); sparsifier.after_step(step)

``after_backward`` zeroes the gradients of pruned weights, so AdamW's moments for them stay
exactly zero; ``after_step`` moves masks when the method says so and re-applies them, so pruned
weights are exactly zero after every optimizer step.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .. import config
from ..registry import Registry
from . import masks as M
from . import sharding as S
from .distributions import per_layer_sparsity
from .schedules import CURVES, Schedule, cosine_decay
from .selection import DEFAULT_EXCLUDE, Target, select_targets


class SparsityViolation(RuntimeError):
    """A pruned weight is non-zero: the sparsity invariant is broken."""


class Sparsifier:
    """Shared machinery; on its own it is a fixed random mask (SPDF's static sparsity)."""

    name = "static"
    help = "fixed random mask (SPDF)"
    init = "random"  # or "magnitude"
    needs_schedule = False  # methods that move masks take a Schedule
    needs_dense_grads = False  # RigL reads the dense gradient on update steps
    default_start, default_end = 0.0, 1.0  # the schedule's span when the config gives none

    @dataclass
    class Options:
        """Method-specific settings (none for static)."""

    def __init__(
        self,
        sparsity: float = 0.75,
        distribution: str = "uniform",
        include: list[str] | tuple[str, ...] | None = None,
        exclude: list[str] | tuple[str, ...] | None = DEFAULT_EXCLUDE,
        seed: int = 0,
        n_m: tuple[int, int] | None = None,
        schedule: Schedule | None = None,
        dense_from: int | None = None,
        **options,
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
        if self.needs_schedule and schedule is None:
            raise ValueError(f"{self.name} moves masks during training and needs a schedule: "
                             f"schedule=Schedule.of(total_steps, update_every, start, end)")
        self.sparsity = float(sparsity)
        self.distribution = distribution
        self.include, self.exclude = include, exclude
        self.seed = int(seed)
        self.n_m = tuple(n_m) if n_m is not None else None
        self.schedule = schedule
        self.dense_from = dense_from  # Variable SPDF: from this step on, masks are dropped (a dense tail)
        self.options = config.from_dict(self.Options, options, source=f"{self.name} options", prefix=f"{self.name}.")
        self.targets: list[Target] = []
        self.masks: dict[str, torch.Tensor] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self._dense_grads: dict[str, torch.Tensor] | None = None

    # ---- setup -------------------------------------------------------------------------
    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> "Sparsifier":
        """Select the weights to mask, build the initial masks and zero the pruned weights."""
        self.targets = select_targets(model, self.include, self.exclude)
        self.optimizer = optimizer
        self.shapes = {t.name: tuple(t.param.shape) for t in self.targets}
        self.masks = self._on_whole_tensors(self.init_masks)
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
        for t in self.targets:
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
        """Zero the gradients of pruned weights (call after the last backward of a step). On an
        update step of a method that reads dense gradients, keep a copy for ``update_masks`` first."""
        if self.released(step):
            return
        if self.needs_dense_grads and self.is_update_step(step):
            self._dense_grads = {t.name: t.param.grad.detach().clone() if t.param.grad is not None
                                 else torch.zeros_like(t.param) for t in self.targets}
        for t in self.targets:
            if t.param.grad is not None:
                S.local(t.param.grad).mul_(S.local(self.masks[t.name]).view(torch.uint8))  # (a bool mask is cast each time)

    def use_dense_grads(self, grads: Mapping[str, torch.Tensor]) -> None:
        """The dense gradients ``update_masks`` reads on this update step, for a loop that collects them
        itself (the Trainer callback's gradient hooks) instead of through ``after_backward``."""
        self._dense_grads = dict(grads)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Move masks if this is an update step, then zero pruned weights."""
        if self.released(step):
            return
        if self.is_update_step(step):
            grads, self._dense_grads = self._dense_grads, None
            if self.needs_dense_grads and grads is None:
                raise RuntimeError(f"{self.name}: after_backward must run on update steps before after_step")
            old = self.masks
            self.masks = self._on_whole_tensors(self.update_masks, step, grads)
            self._sync_masks()
            self._reset_changed(old, self.masks)
        self.apply_masks()

    # ---- method hooks ---------------------------------------------------------------------
    def is_update_step(self, step: int) -> bool:
        return self.schedule is not None and self.schedule.is_update_step(step)

    def update_masks(self, step: int, grads: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """New masks on an update step; ``grads`` are the dense gradients when ``needs_dense_grads``."""
        return self.masks

    def dense_gradient_step(self, step: int) -> bool:
        """Whether this step computes the dense weight gradient (RigL), for FLOP accounting."""
        return self.needs_dense_grads and self.is_update_step(step) and not self.released(step)

    def planned_sparsity(self, step: int) -> float:
        """Global sparsity of the masks in use during ``step``, known without a model (dry-run FLOPs)."""
        return self.sparsity

    def released(self, step: int) -> bool:
        """Whether ``step`` is in the dense tail (Variable SPDF): no masking, every weight learns."""
        return self.dense_from is not None and step >= self.dense_from

    def sparsity_at(self, step: int) -> float:
        """The planned sparsity during ``step``, dense tail included."""
        return 0.0 if self.released(step) else self.planned_sparsity(step)

    # ---- invariant, state -----------------------------------------------------------------
    @torch.no_grad()
    def apply_masks(self) -> None:
        for t in self.targets:
            S.local(t.param).mul_(S.local(self.masks[t.name]).view(torch.uint8))

    @torch.no_grad()
    def check(self) -> None:
        """Raise ``SparsityViolation`` if any pruned weight (or its gradient) is non-zero."""
        for t in self.targets:
            pruned = ~self.masks[t.name]
            bad = S.count_nonzero(t.param.detach().ne(0) & pruned)
            if bad:
                raise SparsityViolation(f"{t.name}: {bad} pruned weights are non-zero")
            if t.param.grad is not None and S.count_nonzero(t.param.grad.ne(0) & pruned):
                raise SparsityViolation(f"{t.name}: pruned weights have non-zero gradients")

    def densities(self) -> dict[str, float]:
        """Measured density (fraction of kept weights) per masked layer."""
        return {k: S.count_nonzero(m) / m.numel() for k, m in self.masks.items()}

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
            "nonzero_masked_params": sum(S.count_nonzero(m) for m in self.masks.values()),
            "schedule": self.schedule.to_dict() if self.schedule is not None else None,
            "dense_from_step": self.dense_from,
            "options": dataclasses.asdict(self.options),
            "layers": {k: 1.0 - d for k, d in self.densities().items()},
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Boolean masks by parameter name, whole (the whole state: every RNG is derived from the
        seed). Sharded masks are gathered: every rank must call it."""
        return {k: S.full(v).detach().cpu().contiguous() for k, v in self.masks.items()}

    @torch.no_grad()
    def load_state_dict(self, masks: Mapping[str, torch.Tensor]) -> None:
        missing = set(self.masks) - set(masks)
        if missing:
            raise KeyError(f"masks missing for {sorted(missing)[:4]} (saved by a different model or selection?)")
        for t in self.targets:
            m = masks[t.name]
            if tuple(m.shape) != tuple(t.param.shape):
                raise ValueError(f"mask for {t.name} has shape {tuple(m.shape)}, weight has {tuple(t.param.shape)}")
            m = m.to(dtype=torch.bool)
            self.masks[t.name] = m if S.is_sharded(m) else S.shard_like(m, t.param)
        self.apply_masks()

    # ---- internals ------------------------------------------------------------------------
    def _on_whole_tensors(self, make_masks, *args) -> dict[str, torch.Tensor]:
        """``make_masks(*args)`` (``init_masks`` or ``update_masks``) laid out like the parameters.
        Methods see whole tensors: for sharded (FSDP2) parameters, weights, masks and gradients are
        gathered here, on init and update steps only, and each rank keeps its shard of the result."""
        if not any(S.is_sharded(t.param) for t in self.targets):
            devices = {t.name: t.param.device for t in self.targets}
            return {k: m.to(devices[k]) for k, m in make_masks(*args).items()}
        sharded, masks = self.targets, self.masks
        self.targets = [dataclasses.replace(t, param=S.full(t.param.detach())) for t in sharded]
        self.masks = {k: S.full(m) for k, m in masks.items()}
        args = tuple({k: S.full(g) for k, g in a.items()} if isinstance(a, dict) else a for a in args)
        try:
            new = make_masks(*args)
        finally:
            self.targets, self.masks = sharded, masks
        return {t.name: S.shard_like(new[t.name], t.param) for t in sharded}

    @torch.no_grad()
    def _reset_changed(self, old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]) -> None:
        """Pruned and newly grown weights are set to zero, with zeroed gradients and optimizer moments."""
        for t in self.targets:  # on each rank's shards
            changed = S.local(old[t.name]) ^ S.local(new[t.name])
            if not bool(changed.any()):
                continue
            S.local(t.param).masked_fill_(changed, 0.0)
            if t.param.grad is not None:
                S.local(t.param.grad).masked_fill_(changed, 0.0)
            state = self.optimizer.state.get(t.param, {}) if self.optimizer is not None else {}
            for value in state.values():
                if torch.is_tensor(value) and value.shape == t.param.shape:
                    S.local(value).masked_fill_(changed, 0.0)

    def _sync_masks(self) -> None:
        """Broadcast masks from rank 0 so every data-parallel rank holds the same ones (they are
        already derived identically; this makes it a guarantee)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for name, m in self.masks.items():
                if S.is_sharded(m):  # shards of masks every rank computed alike
                    continue
                buf = m.to(torch.uint8)
                dist.broadcast(buf, src=0)
                self.masks[name] = buf.bool()


Static = Sparsifier


class Magnitude(Sparsifier):
    """One-shot magnitude pruning of a (dense, trained) model, then a fixed mask:
    the "prune then fine-tune" baseline."""

    name = "magnitude"
    help = "one-shot magnitude pruning at the start, then a fixed mask"
    init = "magnitude"


class GMP(Sparsifier):
    """Gradual magnitude pruning (Zhu & Gupta 2017): dense start, sparsity rises along a curve
    from the schedule's start to its end (The Journey Matters, 2025: 25% -> 75% of training) by
    pruning the smallest-magnitude weights; masks stay fixed after the end."""

    name = "gmp"
    help = "gradual magnitude pruning from dense, along a curve between start and end"
    needs_schedule = True
    default_start, default_end = 0.25, 0.75

    @dataclass
    class Options:
        curve: str = config.option("cubic", "sparsity curve between start and end", choices=CURVES)

    def target_at(self, step: int) -> float:
        return CURVES[self.options.curve](self.schedule.progress(step), self.sparsity)

    def init_masks(self):
        return {t.name: torch.ones(t.param.shape, dtype=torch.bool) for t in self.targets}

    def update_masks(self, step, grads):
        scores = {t.name: t.param.detach().abs() * self.masks[t.name] for t in self.targets}
        return self.masks_for(self.target_at(step), scores)

    def planned_sparsity(self, step: int) -> float:
        last = self.schedule.last_update_before(step)
        return 0.0 if last is None else self.target_at(last)


class SET(Sparsifier):
    """Sparse Evolutionary Training (Mocanu et al. 2018): on each update step drop the
    smallest-magnitude fraction of each layer's active weights and regrow as many where
    ``grow_scores`` is largest (SET: at random); per-layer density never changes. The drop fraction
    decays along a cosine to 0 at the schedule's end (RigL); a step that would drop nothing is no
    update."""

    name = "set"
    help = "drop smallest weights, regrow at random (per-layer density fixed)"
    needs_schedule = True
    default_start, default_end = 0.0, 0.75

    @dataclass
    class Options:
        drop_fraction: float = config.option(0.3, "fraction of each layer's active weights dropped and regrown per update "
                                                  "(cosine-decayed to 0 at the end)", lo=0.0, hi=1.0, lo_open=True)

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        if self.n_m is not None:
            raise ValueError(f"{self.name} moves unstructured masks; N:M is supported by static, magnitude and gmp")

    def drop_fraction_at(self, step: int) -> float:
        return cosine_decay(self.schedule.progress(step), self.options.drop_fraction)

    def is_update_step(self, step: int) -> bool:
        return super().is_update_step(step) and self.drop_fraction_at(step) > 0

    def grow_scores(self, step: int, i: int, t: Target, grads) -> torch.Tensor:
        return M.random_scores(t.param.shape, self.generator(i, step)).to(t.param.device)

    def update_masks(self, step, grads):
        frac = self.drop_fraction_at(step)
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
            grow = torch.where(kept, torch.full_like(mask, neg, dtype=torch.float32), self.grow_scores(step, i, t, grads).float())
            new[t.name] = kept | M.topk_mask(grow, n_drop)
        return new


class RigL(SET):
    """RigL (Evci et al. 2020): as SET, but regrow where the dense gradient is largest."""

    name = "rigl"
    help = "as SET, but regrow where the dense gradient is largest"
    needs_dense_grads = True

    def grow_scores(self, step, i, t, grads):
        return grads[t.name].abs()


METHODS: Registry[type[Sparsifier]] = Registry("sparsity method", entry_points="sparselm.methods")


@METHODS.registrar
def register_method(cls: type[Sparsifier], replace: bool = False) -> type[Sparsifier]:
    """Make a method available by ``cls.name`` to the config, the CLI and experiment specs."""
    return METHODS.register(cls.name, cls, replace)


for _cls in (Static, Magnitude, GMP, SET, RigL):
    register_method(_cls)
get_method = METHODS.lookup


def make_sparsifier(method: str, **kwargs) -> Sparsifier:
    """Build a method by name; unknown names and options give a clear error."""
    return get_method(method)(**kwargs)


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
    return 1.0 - sum(S.count_nonzero(m) for m in masks.values()) / total if total else 0.0


__all__ = [
    "Sparsifier", "Static", "Magnitude", "GMP", "SET", "RigL", "METHODS", "get_method", "make_sparsifier",
    "register_method", "SparsityViolation", "parse_n_m", "global_sparsity",
]
