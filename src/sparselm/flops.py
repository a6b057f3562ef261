"""FLOP accounting for GPT-2-architecture models: pure arithmetic on a model shape.

Convention (Kaplan et al. 2020 / Chinchilla, as the SPDF paper uses):
- a matrix multiply of (m x k) by (k x n) costs 2*m*k*n FLOPs; per token, a linear layer with
  ``n_in x n_out`` weights costs ``2 * n_in * n_out * density`` (a sparse weight skips its zeros);
- attention per layer per token: scores ``Q K^T`` cost ``2 * T * d`` and the weighted sum of values
  ``2 * T * d``, over the full context T (no causal halving); these are activation-activation
  products and never sparse;
- the LM head costs ``2 * d * V`` and stays dense; embedding look-ups, layer norms, softmax,
  GELU and biases are left out (well under 1% at these shapes);
- a training step costs 3x the forward (backward = 2x forward). With RigL, an update step computes
  the dense weight gradient: ``2 * f_sparse + f_dense`` instead of ``3 * f_sparse`` (Evci et al. 2020).

Densities are keyed by the Hugging Face GPT-2 parameter names (``transformer.h.{i}.attn.c_attn.weight``
...); a missing key is dense. A plain float applies to every block linear.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

# (component, HF GPT-2 parameter name suffix, n_in, n_out as functions of d and d_ff)
_LINEARS = (
    ("attn.qkv", "attn.c_attn.weight", lambda d, f: (d, 3 * d)),
    ("attn.proj", "attn.c_proj.weight", lambda d, f: (d, d)),
    ("mlp.fc", "mlp.c_fc.weight", lambda d, f: (d, f)),
    ("mlp.proj", "mlp.c_proj.weight", lambda d, f: (f, d)),
)


class Shape(Protocol):
    n_layer: int
    n_embd: int
    block_size: int
    vocab_size: int

    @property
    def n_inner(self) -> int: ...


def linear_layers(shape: Shape) -> list[tuple[str, str, int, int]]:
    """(component, parameter name, n_in, n_out) for every block linear."""
    d, f = shape.n_embd, shape.n_inner
    return [
        (comp, f"transformer.h.{i}.{suffix}", *dims(d, f))
        for i in range(shape.n_layer)
        for comp, suffix, dims in _LINEARS
    ]


def forward_flops_per_token(shape: Shape, density: float | Mapping[str, float] = 1.0) -> dict[str, float]:
    """Forward FLOPs per token by component, summed over layers, plus 'total'."""
    out: dict[str, float] = {}
    for comp, name, n_in, n_out in linear_layers(shape):
        dens = density if isinstance(density, (int, float)) else density.get(name, 1.0)
        out[comp] = out.get(comp, 0.0) + 2.0 * n_in * n_out * dens
    attn = 2.0 * shape.block_size * shape.n_embd * shape.n_layer
    out["attn.scores"] = attn
    out["attn.values"] = attn
    out["lm_head"] = 2.0 * shape.n_embd * shape.vocab_size
    out["total"] = sum(out.values())
    return out


def train_flops_per_token(
    shape: Shape, density: float | Mapping[str, float] = 1.0, dense_weight_grad: bool = False
) -> float:
    """Training FLOPs per token: 3x forward, or 2x sparse forward + dense forward when the dense
    weight gradient is computed (RigL update steps)."""
    sparse = forward_flops_per_token(shape, density)["total"]
    if dense_weight_grad:
        return 2.0 * sparse + forward_flops_per_token(shape, 1.0)["total"]
    return 3.0 * sparse


def flops_table(shape: Shape, sparsity: float) -> list[tuple[str, float, float]]:
    """Rows of (component, dense forward FLOPs/token, sparse forward FLOPs/token)."""
    dense = forward_flops_per_token(shape, 1.0)
    sparse = forward_flops_per_token(shape, 1.0 - sparsity)
    return [(k, dense[k], sparse[k]) for k in dense]

