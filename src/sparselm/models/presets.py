"""Named model shapes with the training defaults that suit their size: one registry, so a preset is
one ``register_preset(name, shape, training=...)`` call (from CPU demos up to the SPDF paper's GPT-3 XL)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from types import MappingProxyType
from typing import Mapping

from ..registry import Registry
from .family import FAMILIES, get_family

_POSITIVE_INTS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "n_kv_head", "d_ff")


@dataclass(frozen=True)
class ModelShape:
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int  # context length T
    vocab_size: int
    dropout: float = 0.0
    family: str = "gpt2"  # a registered ModelFamily name
    n_kv_head: int | None = None  # grouped-query attention: key/value heads; None = n_head
    d_ff: int | None = None  # MLP hidden width; None = 4 * n_embd
    tie_embeddings: bool = True  # LM head shares the token embedding

    @property
    def n_inner(self) -> int:
        return 4 * self.n_embd if self.d_ff is None else self.d_ff

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    def to_dict(self) -> dict:
        return asdict(self)

    def widened(self, sparsity: float) -> "ModelShape":
        """Sparse-IFT's Sparse-Wide (Thangarasa et al. 2024): widths x 1/sqrt(1 - s), rounded to a
        multiple of the head count, so that the block linears at sparsity ``s`` cost the FLOPs of the
        dense ones (GPT-3 Small 768/3072 -> 1536/6144 at 75%); attention and the LM head widen too."""
        scale = (1.0 - sparsity) ** -0.5
        width = lambda x: max(self.n_head, int(round(x * scale / self.n_head)) * self.n_head)  # noqa: E731
        return replace(self, n_embd=width(self.n_embd), d_ff=width(self.n_inner) if self.d_ff is not None else None)

    def override(self, **changes) -> "ModelShape":
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown model field(s) {sorted(unknown)}; fields are {sorted(known)}")
        shape = replace(self, **changes)
        for name in _POSITIVE_INTS:
            value = getattr(shape, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if shape.family not in FAMILIES.declared:  # (a built-in family is checked without loading plugins)
            FAMILIES.lookup(shape.family)  # a plugin's family, or an error naming the registered ones
        if shape.n_embd % shape.n_head:
            raise ValueError(f"n_embd={shape.n_embd} is not divisible by n_head={shape.n_head}")
        if shape.n_head % shape.kv_heads:
            raise ValueError(f"n_head={shape.n_head} is not divisible by n_kv_head={shape.n_kv_head}")
        return shape


# Training defaults that depend on model size. Tokens per step = batch_size * grad_accum * block_size.
TRAINING_KEYS = ("max_steps", "batch_size", "grad_accum", "lr", "warmup_steps", "eval_every", "ckpt_every")
TINY_TRAINING = dict(max_steps=500, batch_size=32, grad_accum=1, lr=3e-3, warmup_steps=50, eval_every=100, ckpt_every=100)
SMALL_TRAINING = dict(max_steps=3000, batch_size=32, grad_accum=1, lr=1e-3, warmup_steps=200, eval_every=250, ckpt_every=500)
XL_TRAINING = dict(max_steps=60000, batch_size=4, grad_accum=128, lr=2e-4, warmup_steps=1000, eval_every=1000, ckpt_every=1000)


@dataclass(frozen=True)
class Preset:
    """A named shape and its training defaults (``training_from``: the preset they were borrowed from,
    when it was registered without its own)."""

    name: str
    shape: ModelShape
    training: Mapping[str, int | float]
    training_from: str | None = None


PRESETS: Registry[Preset] = Registry("preset")


def register_preset(name: str, shape: ModelShape, training: Mapping[str, int | float] | None = None,
                    replace: bool = False) -> Preset:
    """Make ``shape`` available as ``--preset name`` with its training defaults (all of ``TRAINING_KEYS``).
    Without ``training`` it takes those of the registered preset nearest in size (not a generic table):
    a 30M-parameter preset gets a small model's batch and LR, a 7B one a large model's."""
    shape.override()  # the shape's own checks (family registered, heads divide the width)
    if training is None:
        source = nearest_preset(shape)
        preset = Preset(name, shape, source.training, source.name)
    else:
        missing = [k for k in TRAINING_KEYS if k not in training]
        unknown = sorted(set(training) - set(TRAINING_KEYS))
        if missing or unknown:
            raise ValueError(f"preset {name!r}: training defaults need exactly {', '.join(TRAINING_KEYS)}"
                             + (f"; missing {', '.join(missing)}" if missing else "")
                             + (f"; unknown {', '.join(unknown)}" if unknown else ""))
        preset = Preset(name, shape, MappingProxyType(dict(training)))
    return PRESETS.register(name, preset, replace)


def block_params(shape: ModelShape) -> int:
    """Weights in the block linears: the size that sets batch, LR and budget."""
    return sum(b.n_in * b.n_out for b in get_family(shape.family).block_linears(shape))


def nearest_preset(shape: ModelShape) -> Preset:
    """The preset with its own training defaults closest to ``shape`` in block parameters (by ratio),
    the same family first on a tie, the earliest registered next."""
    size = block_params(shape)
    own = [p for p in PRESETS.values() if p.training_from is None]
    if not own:
        raise ValueError("no preset with training defaults is registered to borrow them from; pass training=...")
    return min(own, key=lambda p: (abs(math.log(block_params(p.shape) / size)), p.shape.family != shape.family))


def get_preset(name: str) -> ModelShape:
    """The shape of preset ``name``."""
    return PRESETS.lookup(name).shape


def preset_training(name: str) -> Mapping[str, int | float]:
    """The training defaults of preset ``name``."""
    return PRESETS.lookup(name).training
