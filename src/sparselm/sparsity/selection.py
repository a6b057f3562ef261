"""Which parameters get a mask.

Default, as in the SPDF paper and the Cerebras configs: every weight of a linear layer inside the
model (attention qkv/out, MLP in/out); embeddings, the LM head, norms and biases stay dense.
Works for any ``nn.Module``: ``nn.Linear`` and Hugging Face's GPT-2 ``Conv1D`` alike. These name globs
are the fallback for modules nobody described: sparselm's commands pass the model family's block
linears as ``include`` (an LM head named ``output`` stays dense there without a glob for it).
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatch

from torch import nn

DEFAULT_EXCLUDE = ("*lm_head*", "*wte*", "*wpe*", "*embed*", "*score*", "*classifier*")


@dataclass(frozen=True)
class Target:
    """A sparsifiable weight and the axis that holds its inputs (fan-in)."""

    name: str
    param: nn.Parameter
    in_axis: int  # nn.Linear stores (out, in) -> 1; GPT-2 Conv1D stores (in, out) -> 0


def _linear_weights(model: nn.Module):
    for mod_name, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, nn.Linear) or kind == "Conv1D":
            weight = getattr(module, "weight", None)
            if weight is not None and weight.dim() == 2:
                name = f"{mod_name}.weight" if mod_name else "weight"
                yield name, weight, (0 if kind == "Conv1D" else 1)


def select_targets(
    model: nn.Module,
    include: tuple[str, ...] | list[str] | None = None,
    exclude: tuple[str, ...] | list[str] | None = DEFAULT_EXCLUDE,
) -> list[Target]:
    """Linear weights whose names match a glob in ``include`` (all when None) and none in ``exclude``."""
    exclude = tuple(exclude or ())
    targets = []
    for name, weight, in_axis in _linear_weights(model):
        if include is not None and not any(fnmatch(name, pat) for pat in include):
            continue
        if any(fnmatch(name, pat) for pat in exclude):
            continue
        targets.append(Target(name, weight, in_axis))
    if not targets:
        names = [n for n, _, _ in _linear_weights(model)][:8]
        raise ValueError(
            f"no parameter matched include={include} exclude={exclude}; "
            f"linear weights in this model look like {names}"
        )
    # Tied weights (same tensor under two names) are masked once.
    seen, unique = set(), []
    for t in targets:
        if id(t.param) not in seen:
            seen.add(id(t.param))
            unique.append(t)
    return unique
