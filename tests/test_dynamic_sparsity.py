"""Schedules and dynamic methods: GMP, SET, RigL, N:M, optimizer-state hygiene."""

import pytest
import torch
from torch import nn

from sparselm.sparsity import GMP, SET, Magnitude, RigL, Static, nm_mask
from sparselm.sparsity.schedules import cosine_decay, cubic, fraction_to_step, linear


def test_schedule_values_at_known_steps():
    assert linear(0, 0.8, 10, 20) == 0.0 and linear(15, 0.8, 10, 20) == pytest.approx(0.4) and linear(99, 0.8, 10, 20) == 0.8
    # cubic: s_f + (s_i - s_f)(1 - p)^3 ; at p = 0.5: 0.8 - 0.8/8
    assert cubic(10, 0.8, 10, 20) == 0.0
    assert cubic(15, 0.8, 10, 20) == pytest.approx(0.8 - 0.8 * 0.125)
    assert cubic(20, 0.8, 10, 20) == pytest.approx(0.8)
    assert cosine_decay(0, 0.3, 100) == pytest.approx(0.3)
    assert cosine_decay(50, 0.3, 100) == pytest.approx(0.15)
    assert cosine_decay(100, 0.3, 100) == 0.0
    assert fraction_to_step(0.25, 400) == 100 and fraction_to_step(120, 400) == 120


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
    sp = GMP(0.8, total_steps=100, start=0.25, end=0.75, update_every=5).attach(model, opt)
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
    sp = cls(0.75, total_steps=100, update_every=10, end=0.75).attach(model, opt)
    first = {k: v.clone() for k, v in sp.masks.items()}
    kept = {k: int(v.sum()) for k, v in sp.masks.items()}
    for step in train(model, sp, opt, 100):
        assert {k: int(v.sum()) for k, v in sp.masks.items()} == kept
    assert any(not torch.equal(first[k], sp.masks[k]) for k in first)


def test_rigl_regrows_where_the_gradient_is_largest():
    layer = nn.Linear(4, 4, bias=False)
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)
    sp = RigL(0.5, total_steps=100, update_every=10, drop_fraction=0.5, end=1.0).attach(layer, opt)
    # a hand-made mask keeping rows 2-3, and weights 1..16 on the kept positions
    mask = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    sp.load_state_dict({"weight": mask})
    with torch.no_grad():
        layer.weight.copy_(torch.arange(1.0, 17.0).view(4, 4) * mask)
    grad = torch.zeros(4, 4)
    grad[0, 0], grad[1, 3] = 5.0, -7.0  # the two largest dense-gradient entries, both pruned
    layer.weight.grad = grad.clone()
    step = 10
    frac = cosine_decay(step, 0.5, 100)
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
    sp = GMP(0.5, total_steps=40, start=0, end=20, update_every=10).attach(model, opt)
    for step in train(model, sp, opt, 40):
        for t in sp.targets:
            pruned = ~sp.masks[t.name]
            st = opt.state[t.param]
            assert torch.count_nonzero(st["exp_avg"][pruned]) == 0
            assert torch.count_nonzero(st["exp_avg_sq"][pruned]) == 0
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sp = SET(0.5, total_steps=40, update_every=5, end=1.0).attach(model, opt)
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
    sp = GMP(n_m=(2, 4), total_steps=40, start=0, end=20, update_every=10).attach(model, opt)
    counts = []
    for step in train(model, sp, opt, 40):
        g = sp.masks[sp.targets[0].name].reshape(-1, 4).sum(-1)
        assert (g == g[0]).all()  # every group has the same count at all times
        counts.append(int(g[0]))
    assert counts[0] == 4 and counts[-1] == 2 and sorted(counts, reverse=True) == counts
    with pytest.raises(ValueError, match="N:M"):
        SET(n_m=(2, 4), total_steps=10)


def test_magnitude_one_shot_keeps_the_largest():
    layer = nn.Linear(8, 8, bias=False)
    original = layer.weight.detach().abs().clone()
    sp = Magnitude(0.75).attach(layer)
    keep = sp.masks["weight"]
    assert int(keep.sum()) == 16
    assert original[keep].min() > original[~keep].max()


def test_schedules_need_total_steps():
    with pytest.raises(ValueError, match="total_steps"):
        GMP(0.5)
    with pytest.raises(ValueError, match="start <= end"):
        GMP(0.5, total_steps=100, start=0.8, end=0.2)
    Static(0.5)  # static needs none
