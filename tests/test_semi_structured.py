"""2:4 semi-structured kernels: the checks and the dense fallback (CPU), the kernels themselves (CUDA).

The ``cuda`` tests need a GPU with 2:4 sparse tensor cores and run in ``benchmarks/gpu_suite.py``
(``pytest -m cuda``); elsewhere they are skipped. On the CPU the kernel op runs its dense reference,
which checks everything around the kernel: the Conv1D transposition, dtypes, autograd, torch.compile.
"""

from __future__ import annotations

import pytest
import torch

from sparselm import flops
from sparselm.models import build_model, get_preset
from sparselm.sparsity import GMP, Schedule, Static, nm_mask
from sparselm.sparsity import semi_structured as S
from sparselm.training.config import RunConfig
from sparselm.training.distributed import Dist
from sparselm.training.loop import Phase, StepCost, Trainer, autocast_for, train_step
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
    (lambda: Static(n_m=(1, 4)), ["n_m=2:4", "1:4"]),
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
    assert S.mask_problem(linear, 1) is None and S.mask_problem(conv1d, 0) is None
    assert "not 2:4" in S.mask_problem(linear.t().contiguous(), 1)  # 2:4 along the wrong axis
    unstructured = torch.rand(64, 128, generator=g) > 0.5
    assert "not 2:4" in S.mask_problem(unstructured, 1)
    assert "not divisible by 4" in S.mask_problem(torch.ones(8, 6, dtype=torch.bool), 1)
    assert S.mask_problem(nm_mask(torch.rand(64, 128, generator=g), 1, 4, 1), 1) is None  # 1:4 fits 2:4 hardware


def test_masks_of_a_2_4_sparsifier_pass_for_gpt2_and_llama():
    for shape in (GPT2_SMALLEST, LLAMA_SMALLEST):
        sp = Static(n_m=(2, 4)).attach(_model(shape))
        assert all(S.mask_problem(sp.masks[t.name], t.in_axis) is None for t in sp.targets)


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
@pytest.mark.parametrize("conv1d", [False, True], ids=["Linear", "Conv1D"])
def test_op_wiring_matches_the_dense_masked_path_on_cpu(conv1d):
    r = S.numerical_check(128, 192, 64, torch.bfloat16, conv1d=conv1d, device="cpu")
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
    r = S.numerical_check(size[0], size[1], 1000, dtype, conv1d=conv1d, device="cuda")  # 1000: padded by PyTorch
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
