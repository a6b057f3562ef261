"""2:4 semi-structured kernels: the checks and the dense fallback (CPU), the kernels themselves (CUDA).

The ``cuda`` tests need a GPU with 2:4 sparse tensor cores and run in ``benchmarks/gpu_suite.py``
(``pytest -m cuda``); elsewhere they are skipped. On the CPU the kernel op runs its dense reference,
which checks everything around the kernel: the Conv1D transposition, dtypes, autograd, torch.compile.
"""

from __future__ import annotations

import pytest
import torch

from torch import nn

from sparselm import flops
from sparselm.models import build_model, get_preset
from sparselm.models.export import decode_2_4, encode_2_4, not_2_4
from sparselm.sparsity import GMP, Schedule, Static, nm_mask
from sparselm.sparsity import semi_structured as S
from sparselm.sparsity.masks import is_n_m, nm_problem
from sparselm.training.config import RunConfig
from sparselm.training.distributed import Dist
from sparselm.training.loop import Phase, StepCost, Trainer, train_step
from sparselm.training.optim import adamw
from sparselm.training.pretraining import next_token_loss

HAS_CUDA = torch.cuda.is_available()
# every block linear a multiple of 64 on both axes (the documented 2:4 shape constraint)
GPT2_SMALLEST = get_preset("tiny").override(n_layer=2, block_size=64, vocab_size=512)
LLAMA_SMALLEST = get_preset("llama-tiny").override(n_layer=2, block_size=64, vocab_size=512, d_ff=384)


def _model(shape=GPT2_SMALLEST):
    torch.manual_seed(0)
    return build_model(shape)


# ---- the fallback: refused with one warning naming the reason, nothing changed --------------------------
@pytest.mark.skipif(HAS_CUDA, reason="checks the fallback of a machine without CUDA")
def test_without_cuda_nothing_switches_and_one_warning_names_cuda():
    model = _model()
    sp = Static(n_m=(2, 4)).attach(model)
    said = []
    assert S.use_semi_structured(model, sp, "auto", log=said.append) == []
    assert len(said) == 1 and "CUDA" in said[0] and "dense" in said[0]
    assert S.switched(model) == [] and all("forward" not in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("make, words", [
    (lambda: Static(0.75), ["n_m=2:4", "unstructured 75%"]),
    (lambda: Static(n_m=(2, 8)), ["at most 2 of every 4", "n_m=2:4 or 1:4", "2:8"]),
    (lambda: Static(n_m=(3, 4)), ["at most 2 of every 4", "3:4"]),
    (lambda: GMP(n_m=(2, 4), schedule=Schedule.of(100, 10, 0.0, 0.5)), ["'gmp' moves masks", "fixed 2:4"]),
    (lambda: Static(n_m=(2, 4), dense_from=50), ["dense tail", "dense_from=50"]),
    (lambda: None, ["dense"]),
])
def test_masks_that_are_not_fixed_2_4_are_refused_with_the_reason(make, words):
    model = _model()
    sp = make()
    if sp is not None:
        sp.attach(model)
    said = []
    assert S.use_semi_structured(model, sp, "bfloat16", log=said.append) == []
    assert len(said) == 1, said
    for w in words:
        assert w in said[0], said[0]
    assert S.switched(model) == []


def test_float32_compute_is_refused():
    model = _model()
    sp = Static(n_m=(2, 4)).attach(model)
    said = []
    assert S.use_semi_structured(model, sp, "float32", log=said.append) == []
    assert "float16/bfloat16" in said[0]


# ---- the checks, as pure logic ---------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["tiny", "gpt2-small", "gpt3-xl", "llama-1b"])
@pytest.mark.parametrize("backend", ["cusparselt", "cutlass"])
def test_shape_check_accepts_the_presets_linears(preset, backend):
    for _, name, n_in, n_out in flops.linear_layers(get_preset(preset)):
        assert S.shape_problem(n_out, n_in, torch.bfloat16, backend) is None, name
        assert S.shape_problem(n_out, n_in, torch.float16, backend) is None, name


@pytest.mark.parametrize("out_f, in_f, why", [
    (768, 344, "in_features 344"),  # llama-tiny's d_ff
    (100, 768, "out_features 100"),
    (32, 32, "out_features 32 and in_features 32"),
    (768, 0, "in_features 0"),
])
def test_shape_check_rejects_what_the_kernels_do_not_take(out_f, in_f, why):
    for backend in ("cusparselt", "cutlass"):
        problem = S.shape_problem(out_f, in_f, torch.bfloat16, backend)
        assert problem is not None and why in problem and "multiple of (64, 64)" in problem


def test_shape_check_rejects_float32_and_reads_the_backend_constraints():
    assert "float16/bfloat16" in S.shape_problem(768, 768, torch.float32)
    # PyTorch's own _DTYPE_SHAPE_CONSTRAINTS divide the documented 64 x 64
    for backend in ("cusparselt", "cutlass"):
        rows, cols = S.min_shape(torch.bfloat16, backend)
        assert (rows, cols) == (64, 64)
    with pytest.raises(ValueError, match="unknown backend"):
        S.shape_problem(64, 64, torch.bfloat16, "cublas")


def test_mask_check_follows_the_input_axis():
    g = torch.Generator().manual_seed(0)
    linear = nm_mask(torch.rand(64, 128, generator=g), 2, 4, in_axis=1)  # nn.Linear: (out, in)
    conv1d = nm_mask(torch.rand(128, 64, generator=g), 2, 4, in_axis=0)  # Conv1D: (in, out)
    assert nm_problem(linear, 2, 4, 1) is None and nm_problem(conv1d, 2, 4, 0) is None
    assert "not 2:4" in nm_problem(linear.t().contiguous(), 2, 4, 1)  # 2:4 along the wrong axis
    unstructured = torch.rand(64, 128, generator=g) > 0.5
    assert "not 2:4" in nm_problem(unstructured, 2, 4, 1)
    assert "not divisible by 4" in nm_problem(torch.ones(8, 6, dtype=torch.bool), 2, 4, 1)
    assert is_n_m(nm_mask(torch.rand(64, 128, generator=g), 1, 4, 1), 2, 4, 1)  # 1:4 fits 2:4 hardware
    assert not is_n_m(torch.ones(8, 8, dtype=torch.bool), 2, 4, 1)


def _case_mask(case: str) -> torch.Tensor:
    """A 2:4 mask of a (64, 128) nn.Linear weight with output 5's inputs 8-11 changed to ``case``."""
    mask = nm_mask(torch.rand(64, 128, generator=torch.Generator().manual_seed(0)), 2, 4, 1)
    mask[5, 8:12] = torch.tensor({"2:4": [1, 0, 1, 0], "1:4 group": [0, 0, 0, 1], "0:4 group": [0, 0, 0, 0],
                                  "3:4 group": [1, 1, 0, 1]}[case], dtype=torch.bool)
    return mask


@pytest.mark.parametrize("case", ["2:4", "1:4 group", "0:4 group", "3:4 group"])
def test_kernels_and_export_share_the_2_4_rule(case, monkeypatch):
    """One rule (masks.nm_problem: at most 2 kept of every 4 along the input axis), the same answer
    through the kernel path (use_semi_structured's per-layer check), the export path (not_2_4 and the
    packed layout) and PyTorch's CUTLASS 2:4 compression, which stores exactly what the rule admits."""
    from torch.sparse._semi_structured_conversions import (
        sparse_semi_structured_from_dense_cutlass, sparse_semi_structured_to_dense_cutlass)

    mask, fits = _case_mask(case), case != "3:4 group"
    # the kernel path, on the CPU with the device check passed (the op runs its dense reference)
    model = nn.Sequential(nn.Linear(128, 64, bias=False))
    sp = Static(n_m=(2, 4)).attach(model)
    sp.load_state_dict({"0.weight": mask})
    monkeypatch.setattr(S, "device_problem", lambda device, dtype: ("cusparselt", None))
    said = []
    assert S.use_semi_structured(model, sp, "bfloat16", log=said.append) == (["0.weight"] if fits else [])
    # the export path
    why = not_2_4(mask, in_axis=1)
    assert (why is None) == fits == (nm_problem(mask, 2, 4, 1) is None)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16) * mask
    if fits:
        assert said == []
        values, indices = encode_2_4(w, mask, in_axis=1)
        assert values.shape == (64, 64) and torch.equal(decode_2_4("w", values, indices, (64, 128), 1), w)
    else:
        assert why == "output 5, inputs 8-11 keep 3 of 4, more than 2 (the mask is not 2:4)"
        assert len(said) == 1 and why in said[0]
    # the kernel's compression (CUTLASS layout, computed on the CPU) is exact iff the rule admits the mask
    sparse, meta = sparse_semi_structured_from_dense_cutlass(w)
    assert torch.equal(sparse_semi_structured_to_dense_cutlass(sparse, meta), w) == fits


def test_a_misaligned_input_dimension_is_refused_by_both():
    mask = torch.zeros(64, 126, dtype=torch.bool)  # 126 inputs: not groups of 4
    assert not_2_4(mask, 1) == nm_problem(mask, 2, 4, 1) == "input dimension 126 is not divisible by 4"
    assert "in_features 126" in S.shape_problem(64, 126)  # the kernels need a multiple of 64 inputs, a fortiori 4


def test_a_1_4_sparsifier_passes_the_kernels_config_check():
    sp = Static(n_m=(1, 4)).attach(_model())
    assert S.config_problem(sp, "bfloat16") is None
    assert all(is_n_m(sp.masks[t.name], 2, 4, t.in_axis) for t in sp.targets)


def test_masks_of_a_2_4_sparsifier_pass_for_gpt2_and_llama():
    for shape in (GPT2_SMALLEST, LLAMA_SMALLEST):
        sp = Static(n_m=(2, 4)).attach(_model(shape))
        assert all(nm_problem(sp.masks[t.name], 2, 4, t.in_axis) is None for t in sp.targets)


def test_backend_choice_by_compute_capability():
    assert S.backend_for((7, 5), True)[0] is None and "8.0" in S.backend_for((7, 5), True)[1]
    assert S.backend_for((8, 0), True)[0] == "cusparselt"
    assert S.backend_for((9, 0), True)[0] == "cusparselt"
    assert S.backend_for((8, 6), False)[0] == "cutlass"  # no cuSPARSELt: CUTLASS runs on 8.x only
    backend, why = S.backend_for((9, 0), False)
    assert backend is None and "8.x" in why and "cuSPARSELt" in why
    assert S.backend_for((9, 0), True, force_cutlass=True)[0] is None
    assert S.backend_for((8, 0), True, force_cutlass=True)[0] == "cutlass"


# ---- the wiring around the kernel (the op's dense reference on the CPU) ----------------------------------
def numerical_check(in_features: int = 768, out_features: int = 3072, tokens: int = 1024, dtype=torch.bfloat16,
                    conv1d: bool = False, device: str | torch.device = "cuda", backend: str | None = None,
                    seed: int = 0, keep: int = 2) -> dict:
    """One masked ``keep``:4 linear (``nn.Linear``, or GPT-2's ``Conv1D`` when ``conv1d``) forward and
    backward under ``dtype`` autocast, through the 2:4 kernel and through the dense-masked path.
    Returns the max errors relative to the largest dense value of the output, the input gradient and
    the weight gradient, the tolerance, and ``ok``. ``backend``: default, what ``device_problem`` picks
    (on the CPU the op's dense reference: a check of the wiring, not of a kernel)."""
    device = torch.device(device)
    if backend is None:
        if device.type == "cuda":
            backend, why = S.device_problem(device, dtype)
            if backend is None:
                raise RuntimeError(f"no 2:4 kernels here: {why}")
        else:
            backend = "cusparselt"
    g = torch.Generator().manual_seed(seed)
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        layer, in_axis = Conv1D(out_features, in_features), 0
    else:
        layer, in_axis = nn.Linear(in_features, out_features), 1
    with torch.no_grad():
        mask = nm_mask(torch.rand(layer.weight.shape, generator=g), keep, 4, in_axis)
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.05 * mask)
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=g) * 0.05)
    layer.to(device)
    x0 = torch.randn(2, tokens // 2, in_features, generator=g).to(device)
    gy = torch.randn(2, tokens // 2, out_features, generator=g).to(device)

    def run():
        layer.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        with torch.autocast(device.type, dtype=dtype):
            y = layer(x)
        (y.float() * gy).sum().backward()
        return y.detach().float(), x.grad.detach().float(), layer.weight.grad.detach().float()

    dense = run()
    S._install(layer, in_axis, backend)
    try:
        kernel = run()
    finally:
        del layer.forward, layer._sparselm_2to4
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))  # noqa: E731
    errors = {k: rel(a, b) for k, a, b in zip(("y", "grad_x", "grad_w"), kernel, dense)}
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-2
    return {**errors, "tol": tol, "ok": all(e <= tol for e in errors.values()), "backend": backend,
            "device": str(device), "dtype": str(dtype).replace("torch.", ""), "layout": "Conv1D" if conv1d else "Linear"}


@pytest.mark.parametrize("conv1d", [False, True], ids=["Linear", "Conv1D"])
def test_op_wiring_matches_the_dense_masked_path_on_cpu(conv1d):
    r = numerical_check(128, 192, 64, torch.bfloat16, conv1d=conv1d, device="cpu")
    assert r["ok"], r
    assert r["grad_x"] == 0.0 and r["grad_w"] == 0.0  # the backward is the dense-masked one
    assert r["y"] <= 1e-2  # (the bias is added after the bf16 product: one more rounding)


def _train(shape, device, kernel: str, steps: int = 4, batch: int = 4, compile_backend: str | None = None):
    """``steps`` training steps through the loop's own step; (losses, sparsifier, switched names)."""
    model = _model(shape).to(device)
    opt = adamw(model, 3e-3, 0.1, device_type=device.type)
    sp = Static(n_m=(2, 4)).attach(model, opt)
    names = []
    if kernel == "semi-structured":
        if device.type == "cuda":
            names = S.use_semi_structured(model, sp, "bfloat16")
        else:  # use_semi_structured refuses the CPU: install the op's dense reference directly
            for t in sp.targets:
                S._install(S._owner(model, t), t.in_axis, "cusparselt")
            names = S.switched(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, shape.vocab_size, (batch, shape.block_size + 1), generator=g).to(device)
    phase = Phase(name="t", total_steps=steps, batch=lambda s, m: (x[:, :-1], x[:, 1:]), loss=next_token_loss,
                  lr=lambda s: 3e-3, evaluate=lambda m: 0.0, cost=lambda s: StepCost(0.0, 0.0, 0.0))
    train_model = torch.compile(model, backend=compile_backend) if compile_backend else None
    trainer = Trainer(model=model, optimizer=opt, sparsifier=sp, device=device, dist=Dist(), run=RunConfig(out="unused"),
                      out=None, autocast=torch.autocast(device.type, dtype=torch.bfloat16), train_model=train_model)
    losses = []
    for step in range(steps):
        losses.append(float(train_step(phase, trainer, step)[0]))
        sp.check()  # pruned weights exactly zero after every step
    return losses, sp, names, model


def test_training_through_the_op_keeps_masks_exact_and_matches_dense_on_cpu():
    cpu, shape = torch.device("cpu"), GPT2_SMALLEST.override(n_layer=1)  # Conv1D: the transposed layout
    dense, _, _, _ = _train(shape, cpu, "dense", steps=3, batch=2)
    kernel, sp, names, model = _train(shape, cpu, "semi-structured", steps=3, batch=2)
    assert len(names) == len(sp.targets)
    assert kernel == pytest.approx(dense, rel=2e-2)
    assert S.use_dense(model) == names and S.switched(model) == []
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_the_op_compiles_without_graph_breaks():
    model = _model()
    sp = Static(n_m=(2, 4)).attach(model)
    for t in sp.targets:
        S._install(S._owner(model, t), t.in_axis, "cusparselt")
    x = torch.randint(0, 512, (2, 64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(model)(input_ids=x)
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, explained.break_reasons


# ---- CUDA: the kernels themselves ---------------------------------------------------------------------------
def _kernels_or_skip(dtype=torch.bfloat16) -> str:
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    backend, why = S.device_problem(torch.device("cuda"), dtype)
    if backend is None:
        pytest.skip(f"no 2:4 kernels on this GPU: {why}")
    return backend


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("conv1d", [False, True], ids=["Linear", "Conv1D"])
@pytest.mark.parametrize("size", [(768, 3072), (3072, 768), (2048, 256)], ids=str)
def test_kernel_matches_the_dense_masked_path_cuda(dtype, conv1d, size):
    _kernels_or_skip(dtype)
    r = numerical_check(size[0], size[1], 1000, dtype, conv1d=conv1d, device="cuda")  # 1000: padded by PyTorch
    assert r["ok"], r


@pytest.mark.cuda
@pytest.mark.parametrize("conv1d", [False, True], ids=["Linear", "Conv1D"])
def test_kernel_runs_a_1_4_mask_exactly_cuda(conv1d):
    """The 2:4 rule admits groups that keep fewer than 2 (masks.nm_problem): the kernels store them."""
    _kernels_or_skip()
    r = numerical_check(768, 3072, 1000, torch.bfloat16, conv1d=conv1d, device="cuda", keep=1)
    assert r["ok"], r


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [GPT2_SMALLEST, LLAMA_SMALLEST], ids=["gpt2", "llama"])
def test_training_steps_on_the_kernels_keep_masks_exact_cuda(shape):
    _kernels_or_skip()
    cuda = torch.device("cuda")
    dense, _, _, _ = _train(shape, cuda, "dense", steps=6)
    kernel, sp, names, _ = _train(shape, cuda, "semi-structured", steps=6)
    assert sorted(names) == sorted(t.name for t in sp.targets)  # every masked linear on the kernels
    assert kernel == pytest.approx(dense, rel=2e-2, abs=2e-2)


@pytest.mark.cuda
def test_kernels_under_torch_compile_cuda():
    _kernels_or_skip()
    cuda = torch.device("cuda")
    dense, _, _, _ = _train(GPT2_SMALLEST, cuda, "dense", steps=3)
    compiled, _, names, _ = _train(GPT2_SMALLEST, cuda, "semi-structured", steps=3, compile_backend="inductor")
    assert names and compiled == pytest.approx(dense, rel=2e-2, abs=2e-2)
