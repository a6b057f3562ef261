"""The loop's hot path and fp16 loss scaling, on a model small enough to count every host sync.

A host sync (``.item()``, ``bool(tensor)``, a collective) stalls a GPU's queue. The loop promises one
per log step (the logged loss; under torchrun also the stop-signal agreement), none on other steps
of a fixed-mask run; fp16's ``GradScaler`` adds its own. The counting here patches every Python-level
way of reading a tensor on the host, and the collectives, and records the step each happened in.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from sparselm.sparsity import RigL, Schedule, Static
from sparselm.training import distributed
from sparselm.training.config import RunConfig
from sparselm.training.loop import Phase, StepCost, Trainer, new_state, train

HOST_READS = ("item", "__bool__", "tolist", "__float__", "__int__", "__index__", "numpy", "cpu")


def tiny_setup(tmp_path, device="cpu", dtype="float32", sparsifier=None, world_size=1, log_every=10, steps=20,
               ckpt_every=1000, seed=0):
    tmp_path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    if sparsifier is not None:
        sparsifier.attach(model, optimizer)
    g = torch.Generator().manual_seed(seed + 1)
    data = [(torch.randn(4, 16, generator=g).to(device), torch.randn(4, 8, generator=g).to(device)) for _ in range(steps)]
    run = RunConfig(out=str(tmp_path), dtype=dtype, log_every=log_every, eval_every=steps, ckpt_every=ckpt_every,
                    progress=False)
    dist = distributed.Dist(rank=0, world_size=world_size)
    # (train_model given: a fake multi-rank Dist must not wrap the model in DDP)
    trainer = Trainer(model, optimizer, sparsifier, torch.device(device), dist, run, tmp_path, train_model=model)
    cost = StepCost(1.0, 1.0, 1.0)
    phase = Phase(name="test", total_steps=steps, batch=lambda step, micro: data[step],
                  loss=lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]), lr=lambda step: 1e-2,
                  evaluate=lambda m: 0.0, cost=lambda step: cost)
    return phase, trainer


@contextlib.contextmanager
def count_host_syncs(phase, monkeypatch):
    """Yields the list of (0-based step, what) of every host read and collective inside ``train``."""
    seen, current = [], {"step": None}
    batch = phase.batch

    def batch_and_mark(step, micro):
        current["step"] = step
        return batch(step, micro)

    phase.batch = batch_and_mark
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def reading(self, *a, _original=original, _name=name, **k):
            if current["step"] is not None:
                seen.append((current["step"], _name))
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, reading)
    for name in ("all_reduce_mean", "all_reduce_max"):
        def collective(value, d, device, _name=name):
            if d.enabled:  # (one process: the helpers return the value, no collective)
                seen.append((current["step"], _name))
            return value

        monkeypatch.setattr(distributed, name, collective)
    yield seen


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_fixed_mask_step_syncs_with_the_host_only_on_log_steps(tmp_path, monkeypatch, world_size):
    phase, trainer = tiny_setup(tmp_path, sparsifier=Static(0.5), world_size=world_size, log_every=10, steps=20)
    with count_host_syncs(phase, monkeypatch) as syncs:
        train(phase, trainer, new_state(), log=lambda *a: None)
    steps = {step for step, _ in syncs}
    assert steps == {9, 19}, syncs  # the steps that end at 10 and 20: log steps
    per_log_step = sorted(what for step, what in syncs if step == 9)
    # the logged loss (reduced over ranks under torchrun) and, under torchrun, the agreed stop signal
    expected = ["all_reduce_max", "all_reduce_mean", "item"] if world_size > 1 else ["item"]
    assert per_log_step == expected


def test_a_dynamic_method_syncs_only_on_its_update_steps_too(tmp_path, monkeypatch):
    sparsifier = RigL(0.5, schedule=Schedule.of(20, update_every=7, end=0.75))
    phase, trainer = tiny_setup(tmp_path, sparsifier=sparsifier, log_every=10, steps=20)
    with count_host_syncs(phase, monkeypatch) as syncs:
        train(phase, trainer, new_state(), log=lambda *a: None)
    updates = set(sparsifier.schedule.update_steps())
    assert updates and {step for step, _ in syncs} <= {9, 19} | updates


def test_fp16_loss_scaling_unscales_before_clipping_and_masking(tmp_path):
    # With compute in fp32, scaling by a power of two and back is exact: the fp16 path (scaler on) must
    # follow the unscaled trajectory bit for bit, masks and clipping included.
    runs = []
    for dtype in ("float32", "float16"):
        phase, trainer = tiny_setup(tmp_path / dtype, dtype=dtype, sparsifier=Static(0.5), steps=8)
        trainer.autocast = contextlib.nullcontext()  # the scaler alone, without fp16 arithmetic
        phase.grad_clip = 0.05  # small enough to clip every step: clipping must see the true gradients
        assert (trainer.scaler is not None) == (dtype == "float16")
        state = new_state()
        train(phase, trainer, state, log=lambda *a: None)
        runs.append((trainer.model.state_dict(), state))
    (fp32, _), (scaled, state) = runs
    assert state["skipped_steps"] == 0
    for key in fp32:
        assert torch.equal(fp32[key], scaled[key]), key


class CountingStatic(Static):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.stepped = []

    def after_step(self, step):
        self.stepped.append(step)
        super().after_step(step)


def test_an_overflowing_fp16_step_is_skipped_counted_and_moves_no_mask(tmp_path):
    sparsifier = CountingStatic(0.5)
    phase, trainer = tiny_setup(tmp_path, dtype="float16", sparsifier=sparsifier, steps=6, log_every=1)
    trainer.autocast = contextlib.nullcontext()
    overflow = {"at": 3}
    loss = phase.loss

    def loss_with_an_overflowing_gradient(model, batch):
        out = loss(model, batch)
        if batch is phase_data[overflow["at"]]:
            out = out * torch.tensor(float("inf"))  # (an inf gradient; the logged loss is checked below)
        return out

    phase_data = [phase.batch(i, 0) for i in range(6)]
    weights = {}

    def record(step, micro):
        weights[step] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        return phase_data[step]

    phase.batch, phase.loss = record, loss_with_an_overflowing_gradient
    scale0 = trainer.scaler.get_scale()
    state = new_state()
    with pytest.raises(FloatingPointError, match="training loss is inf at step 4"):
        train(phase, trainer, state, log=lambda *a: None)  # an inf *loss* is still an error at a log step
    assert state["skipped_steps"] == 1 and sparsifier.stepped == [0, 1, 2]  # step 3 skipped: no mask move
    assert trainer.scaler.get_scale() == scale0 / 2

    # an overflow in the gradient alone (finite loss): skipped, the run goes on, scale backed off once
    sparsifier = CountingStatic(0.5)
    phase, trainer = tiny_setup(tmp_path / "b", dtype="float16", sparsifier=sparsifier, steps=6, log_every=1)
    trainer.autocast = contextlib.nullcontext()
    first = trainer.model[0].weight
    hook = first.register_hook(lambda g: g * math.inf if hooked["on"] else g)
    hooked = {"on": False}
    batch = phase.batch

    def batch_overflowing_at_3(step, micro):
        hooked["on"] = step == 3
        weights[step] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        return batch(step, micro)

    phase.batch = batch_overflowing_at_3
    state = new_state()
    train(phase, trainer, state, log=lambda *a: None)
    hook.remove()
    assert state["skipped_steps"] == 1 and sparsifier.stepped == [0, 1, 2, 4, 5]
    assert all(torch.equal(weights[3][k], weights[4][k]) for k in weights[3])  # the skipped step moved nothing
    assert not torch.equal(weights[4]["0.weight"], weights[5]["0.weight"])  # the next one did
    assert trainer.scaler.get_scale() == scale0 / 2
    sparsifier.check()


def test_the_loss_scale_is_saved_with_the_checkpoint_and_resumed(tmp_path):
    from sparselm.files import read_json
    from sparselm.training.checkpoint import find_checkpoint
    from sparselm.training.engine import restore

    phase, trainer = tiny_setup(tmp_path, dtype="float16", steps=4, ckpt_every=2)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)  # grows every step
    train(phase, trainer, new_state(), log=lambda *a: None)
    saved = read_json(find_checkpoint(tmp_path) / "trainer_state.json")["grad_scaler"]
    assert saved["scale"] == 1024.0 * 2 ** 4

    _, resumed = tiny_setup(tmp_path, dtype="float16", steps=4)
    state = restore(resumed, find_checkpoint(tmp_path), True, new_state(), log=lambda *a: None)
    assert resumed.scaler.get_scale() == saved["scale"] and "grad_scaler" not in state


def test_fp16_is_refused_with_fsdp_and_not_scaled_in_bf16():
    from sparselm.training.loop import grad_scaler_for

    with pytest.raises(ValueError, match="float16 is not supported with run.parallel=fsdp.*bfloat16"):
        grad_scaler_for(torch.device("cpu"), RunConfig(dtype="float16"), sharded=True)
    assert grad_scaler_for(torch.device("cpu"), RunConfig(dtype="bfloat16")) is None
    assert grad_scaler_for(torch.device("cpu"), RunConfig(dtype="auto")) is None


@pytest.mark.cuda
def test_fp16_on_cuda_scales_and_a_step_makes_no_host_sync_outside_log_steps(tmp_path, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    phase, trainer = tiny_setup(tmp_path, device="cuda", dtype="bfloat16", sparsifier=Static(0.5), steps=20)
    with count_host_syncs(phase, monkeypatch) as syncs:
        train(phase, trainer, new_state(), log=lambda *a: None)
    assert {step for step, _ in syncs} == {9, 19}
    phase, trainer = tiny_setup(tmp_path / "fp16", device="cuda", dtype="float16", sparsifier=Static(0.5), steps=20)
    assert isinstance(trainer.scaler, torch.amp.GradScaler) and trainer.scaler.is_enabled()
    state = new_state()
    train(phase, trainer, state, log=lambda *a: None)
    assert state["skipped_steps"] <= 2  # the first steps may back the initial 2**16 scale off
    trainer.sparsifier.check()
