"""DSnoT mask refinement: hand-checked rows (the same masks as the reference code gives on them), its
input statistics against a direct computation, and on a model trained here through ``prune_model``:
kept counts and N:M groups never change, the expected reconstruction error (DSnoT's objective) falls
in every layer, given masks refine as a pruner's do, a sparse run's masks keep their sparsity exactly."""

from __future__ import annotations

import pytest
import torch

from conftest import MICRO_MODEL, make_config
from sparselm.models.runs import load_run
from sparselm.pruning import PRUNERS, REFINERS, prune_model
from sparselm.pruning.dsnot import DSnoT, InputMoments
from sparselm.pruning.wanda import prune_rows, wanda_scores
from sparselm.sparsity import masks as M

SEQLEN = 32


def moments(token_sum, var=None) -> InputMoments:
    """Statistics set by hand: unit input norms (Wanda score = |W|), the given sums and variances."""
    stats = InputMoments(len(token_sum), "cpu")
    stats.sq_norm = torch.ones(len(token_sum))
    stats.token_sum = torch.tensor(token_sum)
    stats.var = torch.ones(len(token_sum)) if var is None else torch.tensor(var)
    return stats


def refine_row(w, stats, n_m=None, **options):
    w = torch.tensor([w])
    mask = M.nm_mask(w.abs(), *n_m, in_axis=1) if n_m else prune_rows(w.abs(), w.numel() // 2)
    return mask[0].tolist(), DSnoT(**options).refine(w, w * mask, mask, stats, n_m).mask[0].tolist()


def test_unstructured_row_by_hand():
    # kept {3, 4, 5}; error = 0.5 - 0.2 + 0.3 = 0.6. Cycle 1: grow the largest positive (0: 0.5), prune the
    # lowest-|W| negative kept (4: -0.8) -> -0.7 (no same-sign rule unstructured, as the reference).
    # Cycle 2: grow the most negative (1: -0.2), prune the lowest positive kept (5: 0.55) -> 0.05 <= 0.1: stop.
    initial, refined = refine_row([0.5, -0.2, 0.3, 0.9, -0.8, 0.55], moments([1.0] * 6))
    assert initial == [False, False, False, True, True, True]
    assert refined == [True, True, False, True, False, False]


def test_variance_picks_what_grows_and_a_row_stops_when_its_sign_runs_out():
    # Var(x_2) = 0.1 makes 2 the first grown (0.3 / 0.1 > 0.5); -0.5, then 0.25 after pruning 4 and 5. Cycle
    # 3 would prune a negative kept weight and none is left: the row stops (the reference would prune 3, the
    # highest-Wanda positive one, and then fail with an index error past the end of its list).
    stats = moments([1.0] * 6, var=[1, 1, 0.1, 1, 1, 1])
    assert refine_row([0.5, -0.2, 0.3, 0.9, -0.8, 0.55], stats)[1] == [False, True, True, True, False, False]


def test_n_m_row_by_hand():
    # 2:4, kept {2, 3 | 6, 7}; error = 0.3 + 0.2 + 0.5 + 0.45 = 1.45. Cycle 1: grow 4 (0.5), prune the lowest-|W|
    # kept weight of its group (7: -0.7) -> 0.25. Cycle 2: grow 5 (0.45), prune 6 (0.8) -> 0.6: larger, but of the
    # same sign, which is all N:M asks (as the reference). Cycle 3: grow 0 (0.3), prune 2 (-0.4) -> -0.1: the
    # sign would flip, so the row stops there.
    initial, refined = refine_row([0.3, 0.2, -0.4, 1.0, 0.5, 0.45, 0.8, -0.7], moments([1.0] * 8), n_m=(2, 4))
    assert initial == [False, False, True, True, False, False, True, True]
    assert refined == [False, False, True, True, True, True, False, False]


def test_no_cycles_or_a_loose_threshold_keep_the_mask():
    w = [0.5, -0.2, 0.3, 0.9, -0.8, 0.55]
    for options in ({"max_cycles": 0}, {"update_threshold": 1.0}):
        initial, refined = refine_row(w, moments([1.0] * 6), **options)
        assert refined == initial


def test_corrected_weights_are_kept_and_regrown_ones_come_back_dense():
    dense = torch.tensor([[0.5, -0.2, 0.3, 0.9, -0.8, 0.55]])
    mask = torch.tensor([[False, False, False, True, True, True]])
    corrected = torch.tensor([[0.0, 0.0, 0.0, 1.1, -0.7, 0.6]])  # a SparseGPT-like update of the kept weights
    out = DSnoT().refine(dense, corrected, mask, moments([1.0] * 6), None)
    assert out.mask.sum() == mask.sum()
    expected = torch.where(mask, corrected, dense) * out.mask
    assert torch.equal(out.weight, expected)


def test_input_moments_equal_a_direct_computation_whatever_the_batches():
    x = torch.randn(6, 10, 5) * torch.rand(5) + torch.randn(5)
    whole, one_by_one = InputMoments(5, "cpu"), InputMoments(5, "cpu")
    whole.add(x)
    for sample in x:
        one_by_one.add(sample)  # [tokens, in]: one sequence
    for stats in (whole, one_by_one):
        torch.testing.assert_close(stats.token_sum, x.sum(1).mean(0))
        torch.testing.assert_close(stats.var, x.var(1, unbiased=False).mean(0))
        torch.testing.assert_close(stats.sq_norm, (x ** 2).sum(1).mean(0))


def test_registered_with_the_reference_defaults():
    refiner = REFINERS["dsnot"]()
    assert (refiner.options.max_cycles, refiner.options.update_threshold, refiner.options.var_power) == (50, 0.1, 1.0)
    with pytest.raises(ValueError, match="max_cycles"):
        DSnoT(max_cycles=-1)


# ---- on a model trained here, through the block-sequential driver ----------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_corpus, cache_dir):
    """A dense micro GPT (2 layers, d=32) trained for 100 steps, and 16 calibration windows of real text."""
    from sparselm.training import PretrainConfig, pretrain

    out = tmp_path_factory.mktemp("dsnot") / "run"
    cfg = make_config(PretrainConfig, preset="tiny", model=dict(MICRO_MODEL), corpus=str(small_corpus),
                      cache_dir=str(cache_dir), out=str(out), max_steps=100, batch_size=8, warmup_steps=5,
                      eval_every=100, ckpt_every=100, eval_batches=2, lr=3e-3)
    pretrain(cfg, progress=False, log=lambda *_: None)
    tok = load_run(out)[1]
    text = (small_corpus / "webtext.txt").read_text(encoding="utf-8")[:20_000]
    ids = torch.tensor(tok(text).input_ids)
    starts = torch.randint(0, len(ids) - SEQLEN, (16,), generator=torch.Generator().manual_seed(0))
    return out, torch.stack([ids[s:s + SEQLEN] for s in starts])


class _Recorded(InputMoments):
    """Also keeps the inputs the driver fed, to measure the layer's reconstruction error."""

    def __init__(self, n_in, device):
        super().__init__(n_in, device)
        self.inputs = []

    def add(self, x):
        super().add(x)
        self.inputs.append(x.reshape(-1, x.shape[-1]).float())


class _Measuring(DSnoT):
    """DSnoT that records, per layer, its masks and the error of the weights before and after it."""

    def __init__(self, **options):
        super().__init__(**options)
        self.layers = []

    def stats(self, n_in, device):
        return _Recorded(n_in, device)

    def refine(self, dense, weight, mask, stats, n_m):
        out = super().refine(dense, weight, mask, stats, n_m)
        x = torch.cat(stats.inputs).t()  # (in, tokens)
        before, after = (dense - weight * mask) @ x, (dense - out.weight) @ x
        self.layers.append(dict(mask=mask, refined=out.mask, weight=out.weight,
                                mean_error=(before.sum(1).square().sum(), after.sum(1).square().sum())))
        return out


def refined(trained, method, n_m=None):
    run, calibration = trained
    baseline, refiner = load_run(run)[0], _Measuring()
    plain = prune_model(baseline, PRUNERS[method](), sparsity=0.5, n_m=n_m, calibration=calibration, progress=False)
    model = load_run(run)[0]
    result = prune_model(model, PRUNERS[method](), sparsity=0.5, n_m=n_m, calibration=calibration, refiner=refiner,
                         progress=False)
    return model, plain.masks, result.masks, refiner.layers


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_refinement_keeps_every_row_count_and_lowers_the_expected_error(trained, method):
    model, plain, masks, layers = refined(trained, method)
    assert len(layers) == len(masks) == 8
    params = dict(model.named_parameters())
    for name, layer in zip(masks, layers):
        assert torch.equal(layer["refined"].sum(1), layer["mask"].sum(1)), name  # kept per output row
        assert not torch.equal(layer["refined"], layer["mask"]), name  # it did refine
        assert torch.equal(masks[name].sum(0), plain[name].sum(0)), name  # Conv1D: (in, out)
        assert not params[name][~masks[name]].any(), name
        torch.testing.assert_close(params[name].detach().t(), layer["weight"])
        before, after = layer["mean_error"]
        assert after < before, (name, float(before), float(after))
    if method == "wanda":  # the first block's inputs are the same with or without refinement
        assert torch.equal(layers[0]["mask"].t(), plain[next(iter(plain))])
        # the masks Wanda chose in that run, given to the dense model (--refine on a run with masks), refine alike
        initial = {name: layer["mask"].t() for name, layer in zip(masks, layers)}
        given = prune_model(load_run(trained[0])[0], PRUNERS["magnitude"](), sparsity=0.5, masks=initial,
                            calibration=trained[1], refiner=DSnoT(), progress=False)
        assert all(torch.equal(given.masks[n], masks[n]) for n in masks)


def test_n_m_groups_stay_exactly_n_of_m(trained):
    _, plain, masks, layers = refined(trained, "wanda", n_m=(2, 4))
    for name, mask in masks.items():
        groups = mask.t().reshape(mask.shape[1], -1, 4).sum(-1)
        assert bool((groups == 2).all()), name
    assert any(not torch.equal(masks[n], plain[n]) for n in masks)


def test_bias_dominated_error_falls_in_the_squared_norm_too():
    """Inputs whose features have large means (as LLMs' outlier features): most of ||WX - ŴX||² is then the
    error's mean, which DSnoT removes. (On zero-mean inputs it only trades the mean for variance.)"""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * 0.05
    noise = torch.randn(8, SEQLEN, 256, generator=g)
    x = noise * (0.5 + torch.rand(256, generator=g)) + 2 * torch.randn(256, generator=g)  # feature means ~ N(0, 4)
    stats = InputMoments(256, "cpu")
    stats.add(x)
    x = x.reshape(-1, 256).t()
    for n_m in (None, (2, 4)):
        score = wanda_scores(w, stats)
        mask = M.nm_mask(score, 2, 4, in_axis=1) if n_m else prune_rows(score, w.numel() // 2)
        out = DSnoT().refine(w, w * mask, mask, stats, n_m)
        assert ((w - out.weight) @ x).square().sum() < 0.8 * ((w - w * mask) @ x).square().sum()


def test_a_sparse_runs_masks_keep_their_sparsity_exactly(sparse_run):
    """A sparse run's pruned weights are exact zeros: growing one cannot move the output, so DSnoT (which
    brings back dense values) finds no error to reduce and leaves masks and weights as they are."""
    model, tok, masks, _ = load_run(sparse_run)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.tensor(tok("The quick brown fox jumps over the lazy dog. " * 40).input_ids[: 4 * 64]).reshape(4, 64)
    result = prune_model(model, PRUNERS["wanda"](), sparsity=0.5, masks=masks, calibration=ids, refiner=DSnoT(),
                         progress=False)
    assert sorted(result.masks) == sorted(masks)
    for name, given in masks.items():
        assert torch.equal(result.masks[name], given.bool()), name
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
