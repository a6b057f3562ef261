"""2:4 semi-structured sparse kernels for the masked linears (opt-in, CUDA only).

With an N:M 2:4 mask every group of 4 consecutive weights along a linear's input axis keeps at most
2, which is the pattern NVIDIA's sparse tensor cores run (Ampere, compute capability 8.0, and later);
``masks.nm_problem`` is the rule, shared with the 2:4 export. A group that keeps fewer (a 1:4 mask)
is a 2:4 group with zeros: the compression stores a pruned zero like any value (PyTorch's CUTLASS
conversion documents the encoding of groups with fewer than two non-zeros).
``use_semi_structured(model, sparsifier)`` switches the forward matmul of each masked linear to
PyTorch's core semi-structured ops (``torch.sparse.SparseSemiStructuredTensor``, the class behind
``torch.sparse.to_sparse_semi_structured``; no torchao): every call compresses the current weight,
cast to the autocast dtype, and multiplies through cuSPARSELt (or CUTLASS). The backward is exactly
the dense-masked path's: ``grad_x = grad_y @ W`` with the dense masked weight and the dense weight
gradient ``grad_W = grad_y^T x``, which the sparsifier's ``after_backward`` then masks as always.
(``grad_x`` cannot use the sparse kernel: it needs ``W^T`` to be 2:4 along W's *output* axis, which
an N:M mask does not give; torchao's old ``SemiSparseLinear`` pruned 4x4 tiles to be 2:4 both ways for
that, which would change the weights a fixed mask keeps.) So one of a linear's three matmuls runs at
the sparse rate; the rest of the step is unchanged.

The weights are not copied: the modules keep their parameters (names, optimizer state, checkpoints
and masks are untouched); only their ``forward`` is replaced, and ``use_dense`` puts it back. The
kernel reads the weight as it is at call time, so it relies on the sparsifier's invariant that pruned
weights are exactly zero after every optimizer step (a compression of a weight with 3 non-zeros in a
group of 4 would silently drop one).

Where it cannot run, nothing changes and one warning says why: no CUDA device, compute capability
below 8.0, no usable backend (cuSPARSELt missing and CUTLASS, which PyTorch builds for compute
capability 8.x only, not applicable), masks that are not 2:4 or that move during training (GMP, a
dense tail), a dtype other than float16/bfloat16, or weight shapes the kernels do not take. A forward
outside fp16/bf16 autocast (e.g. an fp32 evaluation) runs the module's own dense forward.

Knows nothing about trainers or GPT: it works on a ``Sparsifier``'s targets and the modules that own
them (``nn.Linear`` and Hugging Face's ``Conv1D``, whose weight is stored (in, out)).
"""

from __future__ import annotations

import logging
import types
import warnings
from collections.abc import Callable

import torch
from torch import nn

from . import masks as M

logger = logging.getLogger(__name__)

HALF_DTYPES = (torch.float16, torch.bfloat16)

# torch/sparse/semi_structured.py (SparseSemiStructuredTensor._validate_device_dim_dtype_shape): a
# compressed operand of shape (r, c) needs r and c to be positive multiples of the backend's
# _DTYPE_SHAPE_CONSTRAINTS[dtype].(sparse_min_rows, sparse_min_cols). These are the values of
# PyTorch 2.4-2.13 for fp16/bf16, used when the classes cannot be read; the live ones win.
BACKEND_MIN_SHAPE = {"cusparselt": (16, 16), "cutlass": (32, 64)}
# docs/source/sparse.rst ("Constructing Sparse Semi-Structured Tensors"): torch.float16 and
# torch.bfloat16 tensors "must be 2D and (r, c) must both be a positive multiple of 64".
DOCUMENTED_MULTIPLE = 64
# docs/source/sparse.rst and the tutorial "Accelerating BERT with semi-structured (2:4) sparsity":
# "A NVIDIA GPU with semi-structured sparsity support (Compute Capability 8.0+)".
MIN_CAPABILITY = (8, 0)

_PROBE_ERRORS: dict[tuple, str | None] = {}  # (device index, backend, dtype) -> why the probe failed
_warned_dense_call = False


# ---- checks (pure logic, CPU-testable) ----------------------------------------------------------------
def backend_for(capability: tuple[int, int], cusparselt: bool, force_cutlass: bool = False) -> tuple[str | None, str]:
    """(backend, why) for a device of ``capability``: 'cusparselt' or 'cutlass', or None and the reason.

    ``to_sparse_semi_structured`` uses cuSPARSELt unless ``SparseSemiStructuredTensor._FORCE_CUTLASS``
    (torch/sparse/semi_structured.py); PyTorch's CUTLASS 2:4 GEMM refuses any device but compute
    capability 8.x (aten/src/ATen/native/sparse/cuda/SparseSemiStructuredOps.cu: "Supported only on
    GPUs with compute capability 8.x"), so where cuSPARSELt is missing an sm90+ GPU has no backend."""
    if tuple(capability) < MIN_CAPABILITY:
        return None, (f"compute capability {capability[0]}.{capability[1]} < {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}: "
                      "2:4 sparse tensor cores need Ampere (sm80) or later")
    if cusparselt and not force_cutlass:
        return "cusparselt", "cuSPARSELt"
    if capability[0] == 8:
        return "cutlass", ("CUTLASS (SparseSemiStructuredTensor._FORCE_CUTLASS is set)" if force_cutlass
                           else "CUTLASS (this PyTorch build has no cuSPARSELt)")
    why = "SparseSemiStructuredTensor._FORCE_CUTLASS is set" if force_cutlass else "this PyTorch build has no cuSPARSELt"
    return None, (f"{why}, and PyTorch's CUTLASS 2:4 kernels run only on compute capability 8.x, "
                  f"not {capability[0]}.{capability[1]}")


def min_shape(dtype: torch.dtype, backend: str) -> tuple[int, int]:
    """The sparse operand's (rows, cols) granularity: the backend's ``_DTYPE_SHAPE_CONSTRAINTS``
    combined with the documented multiple of 64."""
    rows, cols = BACKEND_MIN_SHAPE[backend]
    cls = _backend_class(backend)
    constraints = getattr(cls, "_DTYPE_SHAPE_CONSTRAINTS", {}) if cls is not None else {}
    if dtype in constraints:
        rows, cols = constraints[dtype].sparse_min_rows, constraints[dtype].sparse_min_cols
    lcm = lambda a, b: a * b // _gcd(a, b)  # noqa: E731
    return lcm(rows, DOCUMENTED_MULTIPLE), lcm(cols, DOCUMENTED_MULTIPLE)


def shape_problem(out_features: int, in_features: int, dtype: torch.dtype = torch.bfloat16,
                  backend: str = "cusparselt") -> str | None:
    """Why a weight of ``out_features x in_features`` (compressed as (out, in), 2:4 along ``in``)
    cannot run the ``backend``'s 2:4 kernels in ``dtype``, or None when it can."""
    if dtype not in HALF_DTYPES:
        return (f"dtype {dtype} is not float16/bfloat16 (PyTorch's 2:4 kernels take fp16/bf16; float32 is "
                "only 1:2)")
    if backend not in BACKEND_MIN_SHAPE:
        raise ValueError(f"unknown backend {backend!r}; choose one of {sorted(BACKEND_MIN_SHAPE)}")
    rows, cols = min_shape(dtype, backend)
    bad = [f"{what} {n}" for what, n, k in (("out_features", out_features, rows), ("in_features", in_features, cols))
           if n < k or n % k]
    if bad:
        return (f"{' and '.join(bad)} not a positive multiple of ({rows}, {cols}) "
                f"(shape constraints of {backend} {str(dtype).replace('torch.', '')})")
    return None


def config_problem(sparsifier, dtype) -> str | None:
    """Why the sparsifier's masks or the compute dtype rule out the 2:4 kernels (no device needed)."""
    if sparsifier is None:
        return "the run is dense (no sparsity): there are no 2:4 masks"
    n_m = getattr(sparsifier, "n_m", None)
    if not n_m or n_m[1] != 4 or n_m[0] > 2:  # at most 2 kept of every 4: 2:4 or 1:4 (masks.nm_problem)
        got = f"{n_m[0]}:{n_m[1]}" if n_m else f"unstructured {getattr(sparsifier, 'sparsity', 0):.0%}"
        return (f"2:4 sparse kernels need N:M masks that keep at most 2 of every 4 (sparsity.n_m=2:4 or 1:4), "
                f"this run's masks are {got}")
    if type(sparsifier).update_masks is not _base_update_masks():
        return (f"method {sparsifier.name!r} moves masks during training (they are 2:4 only at the end); the kernels "
                "need fixed 2:4 masks (static or magnitude)")
    if getattr(sparsifier, "dense_from", None) is not None:
        return (f"a dense tail (dense_from={sparsifier.dense_from}) drops the masks mid-run; the kernels would then "
                "be wrong (call use_dense at that step, or train with dense kernels)")
    dt = resolve_dtype(dtype)
    if dt not in HALF_DTYPES:
        return (f"the compute dtype is {str(dt).replace('torch.', '')}, not float16/bfloat16 autocast "
                "(PyTorch's 2:4 kernels take fp16/bf16)")
    return None


def resolve_dtype(dtype) -> torch.dtype | None:
    """A torch dtype from a dtype or a run config's name ('auto' = bfloat16: CUDA's default autocast)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    return {"auto": torch.bfloat16, "bfloat16": torch.bfloat16, "float16": torch.float16,
            "float32": torch.float32}[str(dtype)]


def device_problem(device: torch.device, dtype: torch.dtype) -> tuple[str | None, str | None]:
    """(backend, None) when ``device`` can run the 2:4 kernels in ``dtype``, else (None, why)."""
    if not torch.cuda.is_available():
        return None, "no CUDA device (PyTorch's semi-structured sparse tensors are CUDA-only)"
    if device.type != "cuda":
        return None, f"the masked weights are on {device}, not a CUDA device: move the model to the GPU first"
    if torch.version.hip:
        return None, "ROCm (hipSPARSELt) is not supported here"
    capability = torch.cuda.get_device_capability(device)
    cusparselt = bool(getattr(getattr(torch.backends, "cusparselt", None), "is_available", lambda: False)())
    force = bool(getattr(_base_class(), "_FORCE_CUTLASS", False))
    backend, why = backend_for(capability, cusparselt, force)
    if backend is None:
        return None, f"{torch.cuda.get_device_name(device)}: {why}"
    probe = _probe(device, backend, dtype)
    if probe:
        return None, f"PyTorch's 2:4 kernels ({why}) failed a probe on {torch.cuda.get_device_name(device)}: {probe}"
    return backend, None


# ---- switching modules ---------------------------------------------------------------------------------
def use_semi_structured(model: nn.Module, sparsifier, dtype="auto",
                        log: Callable[[str], None] = logger.warning) -> list[str]:
    """Run the forward matmul of ``sparsifier``'s masked linears in ``model`` through PyTorch's 2:4
    semi-structured kernels. Returns the names of the weights switched (empty, with one warning through
    ``log`` naming the reason, when it cannot run here; a layer whose shape the kernels do not take
    stays dense, also said in one warning). ``dtype``: the autocast dtype of the run (a torch dtype or
    'auto' / 'bfloat16' / 'float16' / 'float32'). Call it after ``sparsifier.attach`` (and FSDP
    sharding), before ``torch.compile`` / DDP wrap the model."""
    why = config_problem(sparsifier, dtype)
    backend = None
    if why is None:
        backend, why = device_problem(torch.device(sparsifier.targets[0].param.device), resolve_dtype(dtype))
    if why is not None:
        log(f"semi-structured kernels: {why}; the masked linears run dense kernels (masked dense weights)")
        return []
    dt = resolve_dtype(dtype)
    names, skipped = [], {}
    for t in sparsifier.targets:
        module = _owner(model, t)
        if module is None:
            skipped[t.name] = "not the weight of an nn.Linear or Conv1D"
            continue
        out_f, in_f = (t.param.shape[1], t.param.shape[0]) if t.in_axis == 0 else tuple(t.param.shape)
        problem = shape_problem(out_f, in_f, dt, backend) or M.nm_problem(sparsifier.masks[t.name], 2, 4, t.in_axis)
        if problem:
            skipped[t.name] = problem
            continue
        _install(module, t.in_axis, backend)
        names.append(t.name)
    if skipped:
        first = next(iter(skipped))
        log(f"semi-structured kernels: {len(skipped)} of {len(sparsifier.targets)} masked linears stay on dense "
            f"kernels (e.g. {first}: {skipped[first]})" + ("" if names else "; none switched"))
    if names:
        logger.info("semi-structured kernels (%s): %d masked linears switched", backend, len(names))
    return names


def use_dense(model: nn.Module, names=None) -> list[str]:
    """Put back the dense forward of the modules ``use_semi_structured`` switched (all, or the weights
    ``names``); returns the weights switched back."""
    out = []
    for mod_name, module in model.named_modules():
        if "_sparselm_2to4" not in module.__dict__:
            continue
        name = f"{mod_name}.weight" if mod_name else "weight"
        if names is None or name in names:
            del module.forward, module._sparselm_2to4
            out.append(name)
    return out


def switched(model: nn.Module) -> list[str]:
    """Names of the weights whose modules run the 2:4 kernels."""
    return [f"{n}.weight" if n else "weight" for n, m in model.named_modules() if "_sparselm_2to4" in m.__dict__]


def _owner(model: nn.Module, target) -> nn.Module | None:
    mod_name = target.name.rsplit(".", 1)[0] if "." in target.name else ""
    try:
        module = model.get_submodule(mod_name)
    except AttributeError:
        return None
    ok = isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
    return module if ok and getattr(module, "weight", None) is target.param else None


def _install(module: nn.Module, in_axis: int, backend: str) -> None:
    """Replace ``module.forward`` (an nn.Linear, or a Conv1D when ``in_axis`` is 0) by the 2:4 one."""
    module._sparselm_2to4 = (in_axis, backend)
    module.forward = types.MethodType(_semi_sparse_forward, module)


def _semi_sparse_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    weight, bias = self.weight, self.bias  # read at every call: FSDP2 swaps in the unsharded weight
    in_axis, backend = self._sparselm_2to4
    dtype = _compute_dtype(x, weight)
    if dtype is None:
        _warn_dense_call(x, weight)
        return type(self).forward(self, x)
    # (out, in) contiguous in the compute dtype: one copy, as autocast's own weight cast
    w = weight.t() if in_axis == 0 else weight
    w = w.to(dtype=dtype, memory_format=torch.contiguous_format)
    x2 = x.reshape(-1, x.shape[-1]).to(dtype).contiguous()
    y = torch.ops.sparselm.semi_sparse_linear(x2, w, backend)
    y = y.view(*x.shape[:-1], y.shape[-1])
    return y + bias.to(dtype) if bias is not None else y


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
    else:
        dt = weight.dtype if x.dtype == weight.dtype else None
    return dt if dt in HALF_DTYPES else None


def _warn_dense_call(x, weight) -> None:
    global _warned_dense_call
    if not _warned_dense_call:
        _warned_dense_call = True
        logger.warning("semi-structured kernels: a forward ran outside fp16/bf16 autocast (input %s, weight %s); "
                       "dense kernels used for it", x.dtype, weight.dtype)


# ---- the op: opaque to torch.compile, with the dense-masked backward ------------------------------------
@torch.library.custom_op("sparselm::semi_sparse_linear", mutates_args=())
def semi_sparse_linear(x: torch.Tensor, weight: torch.Tensor, backend: str) -> torch.Tensor:
    """``x @ weight.T`` for ``x`` (N, in) and a 2:4 ``weight`` (out, in), both fp16/bf16 and contiguous:
    the weight is compressed (``SparseSemiStructuredTensor.from_dense`` of the backend, what
    ``torch.sparse.to_sparse_semi_structured`` calls) and multiplied by the sparse kernel. Off CUDA
    (only the CPU tests get there) the same product runs dense."""
    if weight.device.type != "cuda":
        return x @ weight.t()
    with torch.autocast("cuda", enabled=False):
        sparse = _compress(weight, backend)
        return torch.nn.functional.linear(x, sparse).contiguous()


@semi_sparse_linear.register_fake
def _(x, weight, backend):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _setup_context(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight)


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_x = grad @ weight if ctx.needs_input_grad[0] else None  # dense: W^T is not 2:4 along W's out axis
    grad_w = grad.t() @ x if ctx.needs_input_grad[1] else None  # dense, as the masked-dense path (masked later)
    return grad_x, grad_w, None


torch.library.register_autograd("sparselm::semi_sparse_linear", _backward, setup_context=_setup_context)


def _compress(weight: torch.Tensor, backend: str):
    with warnings.catch_warnings():  # PyTorch's one-time "prototype stage" notice
        warnings.filterwarnings("ignore", message=".*SparseSemiStructuredTensor is in prototype stage.*")
        return _backend_class(backend).from_dense(weight)


def _base_class():
    return getattr(torch.sparse, "SparseSemiStructuredTensor", None)


def _backend_class(backend: str):
    name = {"cusparselt": "SparseSemiStructuredTensorCUSPARSELT", "cutlass": "SparseSemiStructuredTensorCUTLASS"}[backend]
    return getattr(torch.sparse, name, None)


def _base_update_masks():
    from .methods import Sparsifier

    return Sparsifier.update_masks


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def _probe(device: torch.device, backend: str, dtype: torch.dtype) -> str | None:
    """Compress one small 2:4 matrix and multiply: the kernels exist and agree with dense (cached)."""
    key = (device.index, backend, dtype)
    if key not in _PROBE_ERRORS:
        try:
            g = torch.Generator().manual_seed(0)
            rows, cols = min_shape(dtype, backend)
            mask = M.nm_mask(torch.rand(rows, cols, generator=g), 2, 4, 1)
            w = (torch.randn(rows, cols, generator=g) * mask).to(device=device, dtype=dtype)
            x = torch.randn(32, cols, generator=g).to(device=device, dtype=dtype)
            got = semi_sparse_linear(x, w, backend).float()
            want = (x.float() @ w.float().t())
            err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-6))
            _PROBE_ERRORS[key] = None if err < 2e-2 else f"result differs from dense by {err:.3g} (relative)"
        except Exception as e:  # noqa: BLE001 - any failure means: use dense kernels
            _PROBE_ERRORS[key] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return _PROBE_ERRORS[key]


__all__ = ["use_semi_structured", "use_dense", "switched", "shape_problem", "config_problem", "device_problem",
           "backend_for", "min_shape"]
