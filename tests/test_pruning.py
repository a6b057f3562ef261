"""One-shot pruners on a model trained here (not a random one): exact counts, N:M validity, every GPT-2
``Conv1D`` pruned, Wanda's scores and SparseGPT's updates against direct computations, block-sequential
propagation, and the quality ordering the literature reports (dense < SparseGPT < magnitude)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import MICRO_MODEL, make_config
from sparselm.models import block_linear_names
from sparselm.models.runs import load_run
from sparselm.pruning import PRUNERS, prune_model, spread
from sparselm.pruning.sequential import as_rows
from sparselm.pruning.sparsegpt import Hessian
from sparselm.pruning.wanda import InputNorms
from sparselm.sparsity import masks as M
from sparselm.sparsity.selection import select_targets

SEQLEN = 64


@pytest.fixture(scope="session")
def trained_dense(tmp_path_factory, small_corpus, cache_dir):
    """A dense 2-layer GPT-2 (d=96) trained for 300 steps on the small corpus, and that corpus' tokens."""
    from sparselm.pruning.calibration import run_corpus
    from sparselm.training import PretrainConfig, pretrain

    out = tmp_path_factory.mktemp("trained-dense") / "run"
    cfg = make_config(PretrainConfig, preset="tiny", model=dict(MICRO_MODEL, n_embd=96, block_size=SEQLEN),
                      corpus=str(small_corpus), cache_dir=str(cache_dir), out=str(out), sparsity=0.0, max_steps=300,
                      batch_size=16, warmup_steps=20, eval_every=300, ckpt_every=300, eval_batches=2, lr=3e-3)
    pretrain(cfg, progress=False, log=lambda *_: None)
    corpus = run_corpus(out)  # the run's own corpus (the session cache holds others, with other tokenizers)
    return out, np.asarray(corpus.train()[:], dtype=np.int64), np.asarray(corpus.val()[:], dtype=np.int64)


def windows(tokens: np.ndarray, n: int, seed: int = 0) -> torch.Tensor:
    starts = np.random.default_rng(seed).integers(0, len(tokens) - SEQLEN, n)
    return torch.from_numpy(np.stack([tokens[s:s + SEQLEN] for s in starts]))


def perplexity(model, tokens: np.ndarray) -> float:
    n = len(tokens) // SEQLEN
    x = torch.from_numpy(tokens[: n * SEQLEN]).view(n, SEQLEN)
    with torch.no_grad():
        return math.exp(model.eval()(x, labels=x).loss.item())


def pruned(trained_dense, method, n_calib=16, **kw):
    run, train, _ = trained_dense
    model = load_run(run)[0]
    result = prune_model(model, PRUNERS[method](), include=block_linear_names(model), calibration=windows(train, n_calib),
                         progress=False, **{"sparsity": 0.5, **kw})
    return model, result.masks


def layer_inputs(model, calibration) -> dict[str, torch.Tensor]:
    """Every block linear's input over a whole-model pass, ``[tokens, in]``."""
    seen: dict[str, list] = {}
    handles = [model.get_submodule(t.name.removesuffix(".weight")).register_forward_hook(
        lambda mod, args, out, name=t.name: seen.setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1])))
        for t in select_targets(model, block_linear_names(model))]
    with torch.no_grad():
        for x in calibration.split(1):
            model.eval()(x)
    for h in handles:
        h.remove()
    return {k: torch.cat(v) for k, v in seen.items()}


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity", [0.5, 0.37])
def test_every_layer_gets_exactly_its_share_and_no_conv1d_is_skipped(trained_dense, method, sparsity):
    model, masks = pruned(trained_dense, method, sparsity=sparsity)
    names = block_linear_names(model)
    assert sorted(masks) == sorted(names) and len(names) == 8  # c_attn, c_proj, c_fc, c_proj of both blocks
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert mask.shape == params[name].shape
        assert int((~mask).sum()) == round(sparsity * mask.numel()), name
        assert not params[name][~mask].any(), name  # pruned weights are exact zeros
    dense = dict(load_run(trained_dense[0])[0].named_parameters())
    for name, mask in masks.items():  # nothing outside the block linears moved
        if method != "sparsegpt":
            assert torch.equal(params[name][mask], dense[name][mask]), name
    for name in dense:
        if name not in masks:
            assert torch.equal(params[name], dense[name]), name


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("n_m", [(2, 4), (4, 8)])
def test_n_m_masks_are_valid_and_exactly_half(trained_dense, method, n_m):
    model, masks = pruned(trained_dense, method, n_m=n_m)
    targets = {t.name: t for t in select_targets(model, block_linear_names(model))}
    for name, mask in masks.items():
        assert M.nm_problem(mask, *n_m, targets[name].in_axis) is None, name
        groups = as_rows(targets[name], mask).reshape(-1, n_m[1]).sum(-1)
        assert bool((groups == n_m[0]).all()), name  # exactly N kept in every group


def test_wanda_masks_equal_a_direct_computation_and_blocks_are_sequential(trained_dense):
    """Block 0: scores from a whole-model pass of the dense model. Later blocks: the first linear's input
    is the output of the *pruned* earlier blocks, so a pass of the pruned model gives it."""
    run, train, _ = trained_dense
    calibration = windows(train, 16)
    model, masks = pruned(trained_dense, "wanda")
    dense_inputs = layer_inputs(load_run(run)[0], calibration)
    pruned_inputs = layer_inputs(model, calibration)
    dense = dict(load_run(run)[0].named_parameters())
    targets = {t.name: t for t in select_targets(model, block_linear_names(model))}
    checked = 0
    for name, t in targets.items():
        if name.startswith("transformer.h.0."):
            x = dense_inputs[name]
        elif name.endswith("attn.c_attn.weight"):
            x = pruned_inputs[name]
        else:
            continue
        norms = (x.float() ** 2).sum(0) / len(calibration)  # per-sample sums, mean over samples
        score = as_rows(t, dense[name].detach()).abs() * norms.sqrt()
        k = round(0.5 * score.shape[1])
        expected = torch.ones_like(score, dtype=torch.bool)
        expected.scatter_(1, score.argsort(dim=1, stable=True)[:, :k], False)
        got = as_rows(t, masks[name])
        assert (got == expected).float().mean() > 0.999, name  # float rounding of the running mean may flip a tie
        checked += 1
    assert checked == 5  # 4 linears of block 0, c_attn of block 1
    # the unpruned model's block-1 inputs differ: propagation really used the pruned block 0
    assert not torch.allclose(dense_inputs["transformer.h.1.attn.c_attn.weight"], pruned_inputs["transformer.h.1.attn.c_attn.weight"])


def naive_sparsegpt(W: torch.Tensor, H: torch.Tensor, n_prune: int, blocksize: int, damp: float = 0.01) -> torch.Tensor:
    """SparseGPT from its definition: each pruned weight removed by the OBS update of the weights to its
    right, with the inverse of the remaining sub-Hessian computed directly (no Cholesky)."""
    W, H = W.double().clone(), H.double().clone()
    H += damp * H.diagonal().mean() * torch.eye(len(H), dtype=H.dtype)
    rows, cols = W.shape
    share = spread(n_prune, cols)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        d = torch.stack([torch.linalg.inv(H[i:, i:])[0, 0].sqrt() for i in range(i1, i2)])
        score = W[:, i1:i2] ** 2 / d ** 2
        prune = ~M.topk_mask(score, score.numel() - sum(share[i1:i2]))
        for i in range(i1, i2):
            inv = torch.linalg.inv(H[i:, i:])
            w_i = torch.where(prune[:, i - i1], W[:, i], torch.zeros_like(W[:, i]))
            W[:, i:] -= (w_i / inv[0, 0]).unsqueeze(1) * inv[0].unsqueeze(0)
    return W


def test_sparsegpt_equals_the_obs_definition():
    torch.manual_seed(0)
    X = torch.randn(3, 40, 12) @ torch.randn(12, 12)  # correlated inputs
    W = torch.randn(6, 12)
    stats = Hessian(12, "cpu")
    for x in X:
        stats.add(x.unsqueeze(0))
    direct = 2 * sum(x.t() @ x for x in X) / len(X)
    assert torch.allclose(stats.H, direct, rtol=1e-5, atol=1e-4)  # the running mean is 2 X Xᵀ / n
    out = PRUNERS["sparsegpt"](blocksize=4).prune(W.clone(), stats, 36, None)
    expected = naive_sparsegpt(W, stats.H, 36, 4)
    assert int((~out.mask).sum()) == 36
    assert torch.allclose(out.weight, expected.float(), atol=1e-4)
    assert torch.equal(out.weight == 0, expected.float().abs() < 1e-6)


def test_wanda_running_norms_are_the_mean_over_samples():
    torch.manual_seed(0)
    X = torch.randn(5, 7, 4)
    stats = InputNorms(4, "cpu")
    stats.add(X[:2])
    stats.add(X[2:])
    assert torch.allclose(stats.sq_norm, (X ** 2).sum((0, 1)) / 5)


def test_sparsegpt_reconstructs_every_layer_better_than_magnitude(trained_dense):
    run, train, _ = trained_dense
    calibration = windows(train, 16)
    inputs = layer_inputs(load_run(run)[0], calibration)
    dense = {k: v.detach() for k, v in load_run(run)[0].named_parameters()}
    errors = {}
    for method in ("magnitude", "sparsegpt"):
        model = pruned(trained_dense, method)[0]
        params = {k: v.detach() for k, v in model.named_parameters()}
        targets = select_targets(model, block_linear_names(model))
        errors[method] = {t.name: float(torch.linalg.norm(inputs[t.name] @ (as_rows(t, dense[t.name] - params[t.name]).t())))
                          for t in targets}
    for name, err in errors["sparsegpt"].items():
        assert err < errors["magnitude"][name], name


def test_perplexity_orders_dense_sparsegpt_magnitude(trained_dense):
    run, train, val = trained_dense
    dense = perplexity(load_run(run)[0], val)
    sparsegpt = perplexity(pruned(trained_dense, "sparsegpt", n_calib=32)[0], val)
    magnitude = perplexity(pruned(trained_dense, "magnitude")[0], val)
    assert dense < sparsegpt < magnitude, (dense, sparsegpt, magnitude)


def test_batching_and_offload_give_the_same_masks(trained_dense):
    _, one = pruned(trained_dense, "wanda")
    _, batched = pruned(trained_dense, "wanda", batch_size=4, offload=True)
    for name in one:
        assert (one[name] == batched[name]).float().mean() > 0.999, name


def test_data_free_pruners_need_no_calibration_and_calibrated_ones_do(trained_dense):
    model = load_run(trained_dense[0])[0]
    prune_model(model, PRUNERS["magnitude"](), sparsity=0.5, include=block_linear_names(model), progress=False)
    with pytest.raises(ValueError, match="calibration"):
        prune_model(model, PRUNERS["wanda"](), sparsity=0.5, include=block_linear_names(model), progress=False)


def test_llama_linears_and_true_sequential_groups():
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparselm.pruning.sequential import _blocks, _capture, _groups

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    calibration = torch.randint(0, 64, (4, 16))
    block, block_targets = _blocks(model, select_targets(model, block_linear_names(model)))[0]
    modules = {t.name: model.get_submodule(t.name.removesuffix(".weight")) for t in block_targets}
    with torch.no_grad():
        groups = _groups(block, block_targets, modules, _capture(model.eval(), block, calibration, 1, "cpu"))
    short = [[t.name.split(".")[-2] for t in g] for g in groups]
    assert short == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    for method in ("wanda", "sparsegpt"):
        for true_sequential in (False, True):
            m = LlamaForCausalLM(model.config)
            m.load_state_dict(model.state_dict())
            masks = prune_model(m, PRUNERS[method](), sparsity=0.5, include=block_linear_names(m), calibration=calibration,
                                true_sequential=true_sequential, progress=False).masks
            assert len(masks) == 14
            assert all(int((~mk).sum()) == mk.numel() // 2 for mk in masks.values())


def test_cli_prunes_with_calibration_from_a_file_exactly_as_the_api(trained_dense, tmp_path):
    from safetensors.torch import load_file

    from sparselm.cli.main import main
    from sparselm.models.runs import load_run as load

    run, train, _ = trained_dense
    calibration = windows(train, 8, seed=3)
    np.save(tmp_path / "calib.npy", calibration.numpy())
    argv = ["prune", "--from", str(run), "--out", str(tmp_path / "p"), "--method", "sparsegpt", "--sparsity", "0.5",
            "--calibration", str(tmp_path / "calib.npy")]
    assert main(argv) == 0
    model, _, masks, summary = load(tmp_path / "p")
    assert summary["pruning"]["calibration"]["nsamples"] == 8 and summary["sparsity"]["method"] == "sparsegpt"
    direct = load_run(run)[0]
    expected = prune_model(direct, PRUNERS["sparsegpt"](), sparsity=0.5, include=block_linear_names(direct),
                           calibration=calibration, progress=False).masks
    weights = load_file(str(tmp_path / "p" / "model.safetensors"))
    for name, mask in expected.items():
        assert torch.equal(masks[name], mask), name
        assert torch.equal(weights[name], dict(direct.named_parameters())[name].detach()), name
    assert main(argv[:4] + [str(tmp_path / "q"), "--method", "wanda", "--nsamples", "4", "--seqlen", "32"]) == 0  # corpus
    assert load(tmp_path / "q")[3]["pruning"]["calibration"] == {"source": "corpus", "nsamples": 4, "seqlen": 32, "seed": 0}
    assert "one-shot pruning (wanda)" in (tmp_path / "q" / "README.md").read_text()
