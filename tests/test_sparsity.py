"""The sparsity engine on its own: selection, exact masks, the invariant under AdamW, state."""

import pytest
import torch
from torch import nn

from sparselm.models import ModelShape, build_model
from sparselm.sparsity import (
    SparsityViolation, Static, erk, make_sparsifier, random_mask, select_targets, uniform,
)
from sparselm.sparsity.masks import n_zeros

SHAPE = ModelShape(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100)


def gpt():
    torch.manual_seed(0)
    return build_model(SHAPE)


def test_default_selection_is_block_linears_only():
    names = [t.name for t in select_targets(gpt())]
    assert len(names) == 4 * SHAPE.n_layer
    assert all(".h." in n and n.endswith(".weight") for n in names)
    assert not any("wte" in n or "wpe" in n or "lm_head" in n or "ln_" in n for n in names)
    # Conv1D stores (in, out): its input axis is 0; nn.Linear's is 1
    assert {t.in_axis for t in select_targets(gpt())} == {0}
    assert {t.in_axis for t in select_targets(nn.Sequential(nn.Linear(4, 8)))} == {1}


def test_glob_filters_and_clear_error():
    names = [t.name for t in select_targets(gpt(), include=["*.mlp.*"])]
    assert names and all(".mlp." in n for n in names)
    with pytest.raises(ValueError, match="no parameter matched"):
        select_targets(gpt(), include=["*.nothing.*"])


@pytest.mark.parametrize("distribution", ["uniform", "erk"])
@pytest.mark.parametrize("sparsity", [0.5, 0.75, 0.9])
def test_masks_are_exact_per_layer(distribution, sparsity):
    model = gpt()
    sp = Static(sparsity=sparsity, distribution=distribution).attach(model)
    targets = {t.name: t.param for t in sp.targets}
    per_layer = sp.layer_sparsity(sparsity)
    for name, mask in sp.masks.items():
        assert mask.dtype == torch.bool
        zeros = mask.numel() - int(mask.sum())
        assert zeros == n_zeros(mask.numel(), per_layer[name])
        assert int((targets[name][~mask] != 0).sum()) == 0
    total = sum(m.numel() for m in sp.masks.values())
    assert abs(sp.report()["measured"] - sparsity) * total <= len(sp.masks)  # rounding: < 1 weight per layer


def test_erk_keeps_global_sparsity_and_favours_small_layers():
    shapes = {"wide": (512, 512), "thin": (512, 16), "mid": (128, 128)}
    dist = erk(shapes, 0.8)
    numel = {k: a * b for k, (a, b) in shapes.items()}
    kept = sum((1 - s) * numel[k] for k, s in dist.items())
    assert kept == pytest.approx(0.2 * sum(numel.values()), rel=1e-9)
    assert dist["thin"] < dist["mid"] < dist["wide"]
    # a layer so small ERK would make it over-dense becomes dense and the rest absorbs it
    dist = erk({"big": (1000, 1000), "tiny": (2, 2)}, 0.5)
    assert dist["tiny"] == 0.0 and dist["big"] > 0.5
    assert uniform(shapes, 0.3) == {k: 0.3 for k in shapes}


def test_random_masks_are_seeded_and_differ_by_seed():
    a = Static(0.5, seed=1).attach(gpt()).masks
    b = Static(0.5, seed=1).attach(gpt()).masks
    c = Static(0.5, seed=2).attach(gpt()).masks
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    g = torch.Generator().manual_seed(0)
    assert int((~random_mask((10, 10), 0.37, g)).sum()) == 37


def test_zeros_survive_100_adamw_steps_with_weight_decay():
    model = gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sp = Static(0.75).attach(model, opt)
    before = {t.name: t.param.detach().clone() for t in sp.targets}
    for step in range(100):
        x = torch.randint(0, SHAPE.vocab_size, (4, SHAPE.block_size))
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        sp.after_backward(step)
        opt.step()
        sp.after_step(step)
        sp.check()
        opt.zero_grad()
    for t in sp.targets:
        pruned = ~sp.masks[t.name]
        assert torch.count_nonzero(t.param[pruned]) == 0
        # AdamW moments of pruned weights never moved off zero
        state = opt.state[t.param]
        assert torch.count_nonzero(state["exp_avg"][pruned]) == 0
        assert torch.count_nonzero(state["exp_avg_sq"][pruned]) == 0
        # and the kept weights did train
        assert not torch.equal(t.param[~pruned], before[t.name][~pruned])


def test_without_gradient_masking_adamw_would_break_sparsity():
    """The invariant check catches a loop that forgets after_backward/after_step."""
    model = gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sp = Static(0.5).attach(model, opt)
    x = torch.randint(0, SHAPE.vocab_size, (2, SHAPE.block_size))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    with pytest.raises(SparsityViolation, match="pruned weights"):
        sp.check()


def test_state_round_trip_and_shape_checks():
    model = gpt()
    sp = Static(0.6, seed=3).attach(model)
    saved = sp.state_dict()
    other = Static(0.6, seed=99).attach(gpt())
    other.load_state_dict(saved)
    assert all(torch.equal(other.masks[k], saved[k]) for k in saved)
    with pytest.raises(KeyError, match="masks missing"):
        other.load_state_dict({})
    bad = dict(saved)
    k = next(iter(bad))
    bad[k] = torch.ones(3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="has shape"):
        other.load_state_dict(bad)


def test_any_module_works():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    sp = make_sparsifier("static", sparsity=0.5).attach(model)
    assert len(sp.masks) == 2
    assert sp.report()["measured"] == pytest.approx(0.5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="sparsity must be"):
        Static(1.0)
    with pytest.raises(ValueError, match="unknown sparsity method"):
        make_sparsifier("nope")
    with pytest.raises(ValueError, match="unknown sparsity distribution"):
        Static(0.5, distribution="nope").attach(gpt())


# ---- topk_mask: a threshold with a tie rule, equal to the stable sort it replaced --------------------------
def stable_sort_topk_mask(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """The reference: topk_mask as it was (a stable descending sort of the whole layer)."""
    flat = scores.reshape(-1).float()
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=scores.device)
    if n_keep > 0:
        idx = torch.sort(flat, descending=True, stable=True).indices[:n_keep]
        mask[idx] = True
    return mask.view(scores.shape)


def _scores(kind: str, g: torch.Generator) -> torch.Tensor:
    shape = (37, 23)
    nan, inf, lowest = float("nan"), float("inf"), torch.finfo(torch.float32).min
    if kind == "random":
        return torch.rand(shape, generator=g)
    if kind == "small integers":  # heavy ties everywhere
        return torch.randint(0, 4, shape, generator=g).float()
    if kind == "all equal":
        return torch.full(shape, 0.5)
    if kind == "bool":
        return torch.rand(shape, generator=g) > 0.7
    if kind == "float16 ties":
        return (torch.rand(shape, generator=g) * 8).round().half()
    if kind == "float64":
        return torch.rand(shape, generator=g, dtype=torch.float64) * 1e-9 + 1  # rounds to float32 ties
    if kind == "SET fillers":  # finfo.min and -inf where a method never wants to pick, +inf, -0.0 == 0.0
        s = torch.randint(0, 3, shape, generator=g).float()
        pick = torch.rand(shape, generator=g)
        return s.masked_fill(pick < 0.3, lowest).masked_fill(pick > 0.9, -inf).masked_fill(pick.sub(0.5).abs() < 0.02, inf) \
                .masked_fill((pick - 0.6).abs() < 0.05, -0.0).masked_fill((pick - 0.7).abs() < 0.05, 0.0)
    if kind == "NaN":
        s = torch.randint(0, 3, shape, generator=g).float()
        return s.masked_fill(torch.rand(shape, generator=g) < 0.1, nan).masked_fill(torch.rand(shape, generator=g) < 0.05, inf)
    raise ValueError(kind)


KINDS = ["random", "small integers", "all equal", "bool", "float16 ties", "float64", "SET fillers", "NaN"]


@pytest.mark.parametrize("kind", KINDS)
def test_topk_mask_equals_the_stable_sort(kind):
    from sparselm.sparsity.masks import topk_mask

    g = torch.Generator().manual_seed(KINDS.index(kind))
    numel = 37 * 23
    for trial in range(4):
        scores = _scores(kind, g)
        n_nan = int(torch.isnan(scores.float()).sum())
        for n_keep in {-1, 0, 1, 2, n_nan, n_nan + 1, numel // 4, numel // 2, numel // 2 + 1, 3 * numel // 4,
                       numel - 1, numel, numel + 3, int(torch.randint(1, numel, (1,), generator=g))}:
            got, want = topk_mask(scores, n_keep), stable_sort_topk_mask(scores, n_keep)
            assert got.dtype == torch.bool and got.shape == scores.shape and got.device == scores.device
            assert torch.equal(got, want), (kind, trial, n_keep)
            assert int(got.sum()) == min(max(n_keep, 0), numel)


def test_topk_mask_tie_rule_keeps_the_lower_flat_index():
    from sparselm.sparsity.masks import topk_mask

    scores = torch.tensor([[1.0, 3.0, 2.0], [3.0, 2.0, 2.0]])
    assert topk_mask(scores, 3).tolist() == [[False, True, True], [True, False, False]]
    nan = float("nan")  # NaN ranks above +inf, NaNs by position
    assert topk_mask(torch.tensor([1.0, nan, float("inf"), nan]), 1).tolist() == [False, True, False, False]
    assert topk_mask(torch.tensor([1.0, nan, float("inf"), nan]), 3).tolist() == [False, True, True, True]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", KINDS)
def test_topk_mask_on_cuda_equals_the_cpu(kind):
    from sparselm.sparsity.masks import topk_mask

    scores = _scores(kind, torch.Generator().manual_seed(0))
    for n_keep in (0, 1, 100, 500, 851):
        got = topk_mask(scores.cuda(), n_keep)
        assert got.device.type == "cuda" and torch.equal(got.cpu(), stable_sort_topk_mask(scores, n_keep))


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_set_and_rigl_updates_give_the_masks_of_the_stable_sort(method, monkeypatch):
    """The same training twice, with topk_mask and with the stable sort: identical masks at every update."""
    from sparselm.sparsity import Schedule
    from sparselm.sparsity import masks as M

    def run():
        model = gpt()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        sp = make_sparsifier(method, sparsity=0.75, schedule=Schedule.of(12, 3, end=1.0)).attach(model, opt)
        seen, g = [], torch.Generator().manual_seed(0)
        for step in range(12):
            x = torch.randint(0, SHAPE.vocab_size, (2, 9), generator=g)
            model(input_ids=x[:, :-1], labels=x[:, 1:]).loss.backward()
            sp.after_backward(step)
            opt.step()
            sp.after_step(step)
            opt.zero_grad()
            if sp.is_update_step(step):
                seen.append({k: m.clone() for k, m in sp.masks.items()})
        return seen

    new = run()
    monkeypatch.setattr(M, "topk_mask", stable_sort_topk_mask)
    old = run()
    assert len(new) == len(old) == 3  # updates at steps 3, 6, 9 (at 11 the drop fraction is 0: no update)
    assert any(not torch.equal(new[0][k], new[-1][k]) for k in new[0])  # the masks moved
    for a, b in zip(new, old):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
