"""FLOP accounting against hand-written formulas."""

import pytest

from sparselm import flops
from sparselm.models import ModelShape, get_preset


def hand_forward(L, d, T, V, density):
    """Per-token forward FLOPs written out: 2 FLOPs per multiply-accumulate."""
    qkv = 2 * d * 3 * d
    proj = 2 * d * d
    mlp = 2 * d * 4 * d + 2 * 4 * d * d
    attn = 2 * T * d + 2 * T * d
    return L * ((qkv + proj + mlp) * density + attn) + 2 * d * V


@pytest.mark.parametrize(
    "shape",
    [ModelShape(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=4096),
     ModelShape(n_layer=24, n_head=16, n_embd=2048, block_size=2048, vocab_size=50257)],
)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.75])
def test_forward_flops_match_hand_formula(shape, sparsity):
    got = flops.forward_flops_per_token(shape, 1 - sparsity)["total"]
    want = hand_forward(shape.n_layer, shape.n_embd, shape.block_size, shape.vocab_size, 1 - sparsity)
    assert got == pytest.approx(want, rel=1e-12)
    assert flops.train_flops_per_token(shape, 1 - sparsity) == pytest.approx(3 * want, rel=1e-12)


def test_gpt3_xl_at_75_percent_is_about_2_5x_as_in_the_paper():
    shape = get_preset("gpt3-xl")
    # by hand: 24 * (24 d^2 + 4 T d) + 2 d V with d=2048, T=2048, V=50257
    dense = 24 * (24 * 2048**2 + 4 * 2048 * 2048) + 2 * 2048 * 50257
    sparse = 24 * (24 * 2048**2 * 0.25 + 4 * 2048 * 2048) + 2 * 2048 * 50257
    ratio = flops.forward_flops_per_token(shape, 1.0)["total"] / flops.forward_flops_per_token(shape, 0.25)["total"]
    assert ratio == pytest.approx(dense / sparse, rel=1e-12)
    assert 2.4 < ratio < 2.6


def test_per_layer_densities_by_parameter_name():
    shape = ModelShape(n_layer=2, n_head=2, n_embd=8, block_size=4, vocab_size=10)
    only_first_fc = {"transformer.h.0.mlp.c_fc.weight": 0.0}
    full = flops.forward_flops_per_token(shape, 1.0)
    part = flops.forward_flops_per_token(shape, only_first_fc)
    assert full["total"] - part["total"] == pytest.approx(2 * 8 * 32)


def test_rigl_dense_gradient_step_cost():
    shape = get_preset("tiny")
    fs = flops.forward_flops_per_token(shape, 0.25)["total"]
    fd = flops.forward_flops_per_token(shape, 1.0)["total"]
    assert flops.train_flops_per_token(shape, 0.25, dense_weight_grad=True) == pytest.approx(2 * fs + fd)


def test_llama_1b_matches_hand_formula_with_gqa_and_swiglu():
    shape = get_preset("llama-1b")
    L, d, T, V, kv, f = 22, 2048, 2048, 32000, 4 * 64, 5632  # 4 KV heads of head_dim 64

    def hand(density):
        q, k, v, o = 2 * d * d, 2 * d * kv, 2 * d * kv, 2 * d * d
        gate, up, down = 2 * d * f, 2 * d * f, 2 * f * d
        attn = 4 * T * d
        return L * ((q + k + v + o + gate + up + down) * density + attn) + 2 * d * V

    dense = flops.forward_flops_per_token(shape, 1.0)["total"]
    sparse = flops.forward_flops_per_token(shape, 0.25)["total"]
    assert dense == pytest.approx(hand(1.0), rel=1e-12)
    assert sparse == pytest.approx(hand(0.25), rel=1e-12)
    assert flops.train_flops_per_token(shape, 0.25) == pytest.approx(3 * hand(0.25), rel=1e-12)
    print(f"llama-1b forward FLOPs/token: dense {dense:.4e}, 75% sparse {sparse:.4e}, ratio {dense / sparse:.3f}")


def test_llama_per_layer_densities_by_parameter_name():
    shape = get_preset("llama-tiny")
    part = flops.forward_flops_per_token(shape, {"model.layers.2.self_attn.k_proj.weight": 0.5})
    full = flops.forward_flops_per_token(shape, 1.0)
    assert full["attn.k"] - part["attn.k"] == pytest.approx(0.5 * 2 * 128 * 64)
    assert full["total"] - part["total"] == pytest.approx(0.5 * 2 * 128 * 64)


@pytest.mark.parametrize("preset, name", [
    ("tiny", "lm_head.weight"),
    ("tiny", "transformer.h.4.mlp.c_fc.weight"),  # one layer past the last
    ("llama-tiny", "transformer.h.0.mlp.c_fc.weight"),  # another family's name
])
def test_a_masked_parameter_outside_the_block_linears_raises(preset, name):
    shape = get_preset(preset)
    with pytest.raises(ValueError, match=rf"cannot account for masked parameter {name} in family '{shape.family}'"):
        flops.forward_flops_per_token(shape, {name: 0.5})
    with pytest.raises(ValueError, match="cannot account"):
        flops.train_flops_per_token(shape, {name: 0.5}, dense_weight_grad=True)
