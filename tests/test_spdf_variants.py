"""Variable SPDF (a dense tail at the end of sparse pre-training) and Sparse-IFT's Sparse-Wide (an
iso-FLOP wider sparse model): shapes, FLOPs against hand computations, and runs end to end."""

import json

import pytest
import torch
from safetensors.torch import load_file

from sparselm import flops
from sparselm.models import get_preset


@pytest.mark.parametrize("preset,sparsity,d,f", [("gpt2-small", 0.75, 1536, 6144), ("tiny", 0.75, 256, 1024),
                                                 ("tiny", 0.5, 180, 720), ("llama-1b", 0.75, 4096, 11264)])
def test_sparse_wide_keeps_the_block_linear_flops_within_2_percent(preset, sparsity, d, f):
    shape = get_preset(preset)
    wide = shape.widened(sparsity)
    assert (wide.n_embd, wide.n_inner) == (d, f) and wide.n_embd % shape.n_head == 0
    linear = lambda s, density: sum(2 * n_in * n_out * density for _, _, n_in, n_out in flops.linear_layers(s))  # noqa: E731
    assert linear(wide, 1 - sparsity) == pytest.approx(linear(shape, 1.0), rel=0.02)
    # attention and the LM head widen too, and the total counts them: by hand for the GPT-2 shape
    if shape.family == "gpt2":
        L, T, V = shape.n_layer, shape.block_size, shape.vocab_size
        hand = L * ((2 * d * 3 * d + 2 * d * d + 2 * d * f + 2 * f * d) * (1 - sparsity) + 4 * T * d) + 2 * d * V
        assert flops.forward_flops_per_token(wide, 1 - sparsity)["total"] == pytest.approx(hand, rel=1e-12)


def test_sparse_wide_flops_command(capsys):
    from sparselm.cli.main import main

    assert main(["flops", "--preset", "gpt2-small", "--sparsity", "0.75", "--iso-flop", "wide"]) == 0
    out = capsys.readouterr().out
    assert "d=768 -> 1536, d_ff=3072 -> 6144" in out and "dense/sparse-wide ratio: 0.712x (1.40x more FLOPs than the dense base model)" in out


def test_variable_spdf_pretrains_sparse_then_dense_with_exact_flops(micro_config):
    from sparselm.sparsity.masks import n_zeros
    from sparselm.training import pretrain

    # 75% static for the first 15 of 20 steps, then a dense tail of 5 steps (dense_tail 0.25)
    cfg = micro_config(sparsity=0.75, max_steps=20, dense_tail=0.25)
    summary = pretrain(cfg, log=lambda *_: None)
    shape, tokens = cfg.shape(), cfg.optim.batch_size * cfg.shape().block_size
    hand = tokens * (15 * flops.train_flops_per_token(shape, 0.25) + 5 * flops.train_flops_per_token(shape, 1.0))
    assert summary["train_flops"] == pytest.approx(hand, rel=1e-9)
    pruned = sum(n_zeros(n_in * n_out, 0.75) for _, _, n_in, n_out in flops.linear_layers(shape))
    assert summary["average_param_count"] == pytest.approx(summary["n_params"] - 15 * pruned / 20, rel=1e-12)
    assert summary["sparsity"]["dense_from_step"] == 15 and summary["sparsity"]["measured"] == 0.0
    weights = load_file(f"{cfg.run.out}/model.safetensors")
    for name in (k for k in weights if k.endswith("attn.c_attn.weight")):
        assert torch.count_nonzero(weights[name]) > 0.99 * weights[name].numel()  # the tail revived the pruned weights


@pytest.mark.slow
def test_sparse_wide_pretrains_a_wider_sparse_model(micro_config):
    from sparselm.training import pretrain

    cfg = micro_config(sparsity=0.75, max_steps=6, iso_flop="wide")
    summary = pretrain(cfg, log=lambda *_: None)
    assert summary["model"]["n_embd"] == 64 and summary["model"]["d_ff"] is None  # 32 x 2, GPT-2's 4d
    config = json.loads((__import__("pathlib").Path(cfg.run.out) / "config.json").read_text())
    assert config["n_embd"] == 64
    dense_linear = sum(2 * n_in * n_out for _, _, n_in, n_out in flops.linear_layers(micro_config().shape()))
    wide_linear = sum(2 * n_in * n_out * 0.25 for _, _, n_in, n_out in flops.linear_layers(cfg.shape()))
    assert wide_linear == pytest.approx(dense_linear, rel=0.02)
    assert summary["sparsity"]["measured"] == pytest.approx(0.75, abs=1e-3)
    # its saving is stated against the dense *base* model (it costs more), the widened dense one kept beside it
    tokens = summary["tokens_seen"]
    base = micro_config().shape().override(vocab_size=summary["model"]["vocab_size"])
    assert summary["dense_train_flops"] == pytest.approx(tokens * flops.train_flops_per_token(base, 1.0), rel=1e-9)
    assert summary["wide_dense_train_flops"] == pytest.approx(tokens * flops.train_flops_per_token(cfg.shape().override(
        vocab_size=summary["model"]["vocab_size"]), 1.0), rel=1e-9)
    assert summary["flops_reduction"] < 1 and "x more" in flops.compared(summary["dense_train_flops"], summary["train_flops"])
