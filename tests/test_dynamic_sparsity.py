"""Schedules and dynamic methods: GMP, SET, RigL, N:M, optimizer-state hygiene."""

import pytest
import torch
from torch import nn

from sparselm.sparsity import GMP, SET, Magnitude, RigL, Schedule, Static, nm_mask
from sparselm.sparsity.schedules import cosine_decay, cubic, linear


def test_curve_values_at_known_progress():
    assert linear(0.0, 0.8) == 0.0 and linear(0.5, 0.8) == pytest.approx(0.4) and linear(1.0, 0.8) == 0.8
    # cubic: s_f + (s_i - s_f)(1 - p)^3 ; at p = 0.5: 0.8 - 0.8/8
    assert cubic(0.0, 0.8) == 0.0
    assert cubic(0.5, 0.8) == pytest.approx(0.8 - 0.8 * 0.125)
    assert cubic(1.0, 0.8) == pytest.approx(0.8)
    assert cosine_decay(0.0, 0.3) == pytest.approx(0.3)
    assert cosine_decay(0.5, 0.3) == pytest.approx(0.15)
    assert cosine_decay(1.0, 0.3) == 0.0


def test_one_schedule_convention_for_every_method():
    s = Schedule.of(400, update_every=30, start=0.25, end=0.75)
    assert (s.start_step, s.end_step) == (100, 300)
    # every update_every steps after start, and always at end
    assert s.update_steps() == [130, 160, 190, 220, 250, 280, 300]
    assert [t for t in range(400) if s.is_update_step(t)] == s.update_steps()
    assert s.progress(100) == 0.0 and s.progress(200) == 0.5 and s.progress(350) == 1.0
    assert s.last_update_before(131) == 130 and s.last_update_before(130) is None and s.last_update_before(399) == 300
    # steps and fractions are different fields; an end of 1.0 is the last step, so it still runs
    assert Schedule.of(400, 100, start_step=10, end_step=120).update_steps() == [110, 120]
    assert Schedule.of(400, 100, end=1.0).update_steps() == [100, 200, 300, 399]
    with pytest.raises(ValueError, match="not both"):
        Schedule.of(400, 100, start=0.1, start_step=10)
    with pytest.raises(ValueError, match="fraction of training in"):
        Schedule.of(400, 100, end=3)  # a step count in a fraction field
    with pytest.raises(ValueError, match="after the last training step"):
        Schedule.of(400, 100, end_step=400)
    with pytest.raises(ValueError, match="no update step"):
        Schedule.of(400, 100, start=0.5, end=0.5)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))


def train(model, sp, opt, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = torch.randn(16, 32, generator=g)
        loss = (model(x) - x.flip(-1)).pow(2).mean()
        loss.backward()
        sp.after_backward(step)
        opt.step()
        sp.after_step(step)
        sp.check()
        opt.zero_grad()
        yield step


def test_gmp_starts_dense_reaches_target_exactly_at_end():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sp = GMP(0.8, schedule=Schedule.of(100, 5, start=0.25, end=0.75)).attach(model, opt)
    seen = {}
    for step in train(model, sp, opt, 100):
        seen[step] = sp.report()["measured"]
    assert all(seen[s] == 0.0 for s in range(25))  # not before start
    assert 0 < seen[50] < 0.8 and seen[60] > seen[50]
    assert all(seen[s] < 0.8 for s in range(75))  # strictly below target until the end step
    assert seen[75] == pytest.approx(0.8, abs=1e-3) and seen[99] == seen[75]
    # exact per layer at the end
    for name, m in sp.masks.items():
        assert m.numel() - int(m.sum()) == round(0.8 * m.numel())


@pytest.mark.parametrize("cls", [SET, RigL])
def test_set_rigl_keep_per_layer_density_and_move_the_mask(cls):
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sp = cls(0.75, schedule=Schedule.of(100, 10, end=0.75)).attach(model, opt)
    first = {k: v.clone() for k, v in sp.masks.items()}
    kept = {k: int(v.sum()) for k, v in sp.masks.items()}
    for step in train(model, sp, opt, 100):
        assert {k: int(v.sum()) for k, v in sp.masks.items()} == kept
    assert any(not torch.equal(first[k], sp.masks[k]) for k in first)


def test_rigl_regrows_where_the_gradient_is_largest():
    layer = nn.Linear(4, 4, bias=False)
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)
    sp = RigL(0.5, schedule=Schedule.of(100, 10, end=1.0), drop_fraction=0.5).attach(layer, opt)
    # a hand-made mask keeping rows 2-3, and weights 1..16 on the kept positions
    mask = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    sp.load_state_dict({"weight": mask})
    with torch.no_grad():
        layer.weight.copy_(torch.arange(1.0, 17.0).view(4, 4) * mask)
    grad = torch.zeros(4, 4)
    grad[0, 0], grad[1, 3] = 5.0, -7.0  # the two largest dense-gradient entries, both pruned
    layer.weight.grad = grad.clone()
    step = 10
    frac = cosine_decay(step / 99, 0.5)  # end=1.0 is the last step, 99
    n_drop = round(frac * 8)
    assert n_drop == 4
    sp.after_backward(step)
    assert layer.weight.grad[0, 0] == 0  # the gradient the optimizer sees is masked ...
    opt.step()
    sp.after_step(step)  # ... but RigL regrew from the dense one
    m = sp.masks["weight"]
    assert bool(m[0, 0]) and bool(m[1, 3])
    assert int(m.sum()) == 8
    # drop removed the smallest active magnitudes (row 2: 9..12), kept the largest (row 3)
    assert bool(m[3].all()) and int(m[2].sum()) == 0
    # regrown weights start at zero
    assert layer.weight[0, 0] == 0 and layer.weight[1, 3] == 0


def test_optimizer_moments_of_pruned_and_regrown_weights_are_zero():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sp = GMP(0.5, schedule=Schedule.of(40, 10, start_step=0, end_step=20)).attach(model, opt)
    for step in train(model, sp, opt, 40):
        for t in sp.targets:
            pruned = ~sp.masks[t.name]
            st = opt.state[t.param]
            assert torch.count_nonzero(st["exp_avg"][pruned]) == 0
            assert torch.count_nonzero(st["exp_avg_sq"][pruned]) == 0
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sp = SET(0.5, schedule=Schedule.of(40, 5, end=1.0)).attach(model, opt)
    prev = {k: v.clone() for k, v in sp.masks.items()}
    for step in train(model, sp, opt, 40):
        if sp.is_update_step(step):
            for t in sp.targets:
                grown = sp.masks[t.name] & ~prev[t.name]
                assert grown.any()
                st = opt.state[t.param]
                assert torch.count_nonzero(st["exp_avg"][grown]) == 0 and torch.count_nonzero(t.param[grown]) == 0
        prev = {k: v.clone() for k, v in sp.masks.items()}


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 8)])
def test_nm_masks_have_exactly_n_per_group(n, m):
    scores = torch.randn(16, 32)
    for in_axis in (0, 1):
        mask = nm_mask(scores, n, m, in_axis)
        groups = mask.movedim(in_axis, -1).reshape(-1, m)
        assert (groups.sum(-1) == n).all()
    with pytest.raises(ValueError, match="not divisible"):
        nm_mask(torch.randn(4, 6), 2, 4, 1)


def test_static_and_gmp_nm_by_magnitude_within_groups():
    model = mlp()
    sp = Magnitude(n_m=(2, 4)).attach(model)
    for t in sp.targets:
        groups = sp.masks[t.name].reshape(-1, 4)  # nn.Linear: input axis is the last
        assert (groups.sum(-1) == 2).all()
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sp = GMP(n_m=(2, 4), schedule=Schedule.of(40, 10, start_step=0, end_step=20)).attach(model, opt)
    counts = []
    for step in train(model, sp, opt, 40):
        g = sp.masks[sp.targets[0].name].reshape(-1, 4).sum(-1)
        assert (g == g[0]).all()  # every group has the same count at all times
        counts.append(int(g[0]))
    assert counts[0] == 4 and counts[-1] == 2 and sorted(counts, reverse=True) == counts
    with pytest.raises(ValueError, match="N:M"):
        SET(n_m=(2, 4), schedule=Schedule.of(10, 2))


def test_magnitude_one_shot_keeps_the_largest():
    layer = nn.Linear(8, 8, bias=False)
    original = layer.weight.detach().abs().clone()
    sp = Magnitude(0.75).attach(layer)
    keep = sp.masks["weight"]
    assert int(keep.sum()) == 16
    assert original[keep].min() > original[~keep].max()


def test_dynamic_methods_need_a_schedule_and_check_their_options():
    with pytest.raises(ValueError, match="needs a schedule"):
        GMP(0.5)
    with pytest.raises(ValueError, match="no update step"):
        GMP(0.5, schedule=Schedule.of(100, 10, start=0.8, end=0.2))
    with pytest.raises(ValueError, match=r"drop_fraction: -0.5 is out of range; allowed \(0.0, 1.0\]"):
        SET(0.5, schedule=Schedule.of(100, 10), drop_fraction=-0.5)
    with pytest.raises(ValueError, match="curve: 'square' is not one of"):
        GMP(0.5, schedule=Schedule.of(100, 10), curve="square")
    with pytest.raises(ValueError, match="unknown key"):
        Static(0.5, drop_fraction=0.3)  # an option of another method
    Static(0.5)  # static needs no schedule


def test_gmp_reaches_its_target_when_the_schedule_ends_with_training():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sp = GMP(0.5, schedule=Schedule.of(40, 7, start=0.0, end=1.0)).attach(model, opt)
    for _ in train(model, sp, opt, 40):
        pass
    assert sp.report()["measured"] == pytest.approx(0.5, abs=1e-3)
