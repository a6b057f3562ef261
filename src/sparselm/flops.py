"""FLOP accounting for decoder-only transformers: pure arithmetic on a model shape.

The shape's model family lists the block linears (the weights that get masked: names and sizes), so
any registered architecture is counted without parameter names hard-coded here.

Convention (Kaplan et al. 2020 / Chinchilla, as the SPDF paper uses):
- a matrix multiply of (m x k) by (k x n) costs 2*m*k*n FLOPs; per token, a linear layer with
  ``n_in x n_out`` weights costs ``2 * n_in * n_out * density`` (a sparse weight skips its zeros);
- attention per layer per token: scores ``Q K^T`` cost ``2 * T * n_head * head_dim`` (= 2*T*d) and the
  weighted sum of values as much, over the full context T (no causal halving); these are
  activation-activation products and never sparse. Grouped-query attention shares K/V heads but every
  query head still attends, so GQA shrinks only the k/v projections;
- the LM head costs ``2 * d * V`` and stays dense; embedding look-ups, norms, softmax, activations,
  RoPE and biases are left out (well under 1% at these shapes);
- a training step costs 3x the forward (backward = 2x forward). With RigL, an update step computes
  the dense weight gradient: ``2 * f_sparse + f_dense`` instead of ``3 * f_sparse`` (Evci et al. 2020).

Densities are keyed by the Hugging Face parameter names of the block linears (GPT-2:
``transformer.h.{i}.attn.c_attn.weight``, Llama: ``model.layers.{i}.self_attn.q_proj.weight`` ...); a
missing key is dense, a key that is not a block linear of the family raises (its FLOPs would otherwise
be silently misreported). A plain float applies to every block linear.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from .models.family import get_family


class Shape(Protocol):
    family: str
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    vocab_size: int

    @property
    def head_dim(self) -> int: ...


def linear_layers(shape: Shape) -> list[tuple[str, str, int, int]]:
    """(component, parameter name, n_in, n_out) for every block linear."""
    return [(b.component, b.param_name, b.n_in, b.n_out) for b in get_family(shape.family).block_linears(shape)]


def forward_flops_per_token(shape: Shape, density: float | Mapping[str, float] = 1.0) -> dict[str, float]:
    """Forward FLOPs per token by component, summed over layers, plus 'total'."""
    layers = linear_layers(shape)
    if not isinstance(density, (int, float)):
        unknown = sorted(set(density) - {name for _, name, _, _ in layers})
        if unknown:
            examples = ", ".join(name for _, name, _, _ in layers[: len(layers) // shape.n_layer])
            raise ValueError(f"cannot account for masked parameter {unknown[0]} in family {shape.family!r}; "
                             f"its block linears are {examples} ... (for each of the {shape.n_layer} layers)")
    out: dict[str, float] = {}
    for comp, name, n_in, n_out in layers:
        dens = density if isinstance(density, (int, float)) else density.get(name, 1.0)
        out[comp] = out.get(comp, 0.0) + 2.0 * n_in * n_out * dens
    attn = 2.0 * shape.block_size * shape.n_head * shape.head_dim * shape.n_layer
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


# ---- model FLOPs utilisation ----------------------------------------------------------------------
# Dense peak tensor-core FLOP/s in bf16/fp16 (without the 2:4-sparsity doubling), by a substring of
# the name CUDA reports; the first match wins, so the more specific names come first. TF32 (fp32
# matmuls with TF32 on) runs at half these rates on these GPUs.
PEAK_BF16_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
}


def compared(dense_flops: float, run_flops: float) -> str:
    """"1.69x fewer" or "1.45x more": a run's FLOPs against the dense base model's (Sparse-Wide costs more)."""
    if not run_flops or not dense_flops:
        return "n/a"
    ratio = dense_flops / run_flops
    return f"{ratio:.2f}x fewer" if ratio >= 1 else f"{1 / ratio:.2f}x more"


def peak_flops(device_name: str, dtype: str) -> float | None:
    """The peak FLOP/s of a known GPU for ``dtype`` ('bfloat16', 'float16' or 'float32'), else None."""
    for key, peak in PEAK_BF16_FLOPS.items():
        if key.lower() in device_name.lower():
            return peak if dtype in ("bfloat16", "float16") else peak / 2
    return None


def mfu(flops_per_token: float, tokens_per_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: FLOPs per token x tokens/s over the device's peak (None without a peak).
    sparselm passes the *dense* training FLOPs per token: what masked-dense kernels execute."""
    return flops_per_token * tokens_per_s / peak if peak else None
