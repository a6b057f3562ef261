"""Model families: building, loading, and the block linears that FLOP accounting and masking share."""

import re

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from sparselm import flops
from sparselm.models import (
    FAMILIES, PRESETS, ModelFamily, ModelShape, block_linear_names, build_model, context_length, family_for_config, get_family,
    get_preset, load_model, lora_config_kwargs, preset_training, register_family, register_preset, shape_of,
)
from sparselm.sparsity import Static, select_targets

from family_fixtures import FAMILY_NAMES, micro_shape

GPT2_MICRO = ModelShape(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100)
LLAMA_MICRO = ModelShape(n_layer=2, n_head=4, n_embd=64, block_size=16, vocab_size=100,
                         family="llama", n_kv_head=2, d_ff=96, tie_embeddings=False)


class NeoXFamily(ModelFamily):
    """GPT-NeoX, registered from this test file only: a new family is one class and one register call."""

    name = "neox-test"
    model_type = "gpt_neox"
    model_class = transformers.GPTNeoXForCausalLM
    layer_prefix = "gpt_neox.layers.{i}."

    def hf_config(self, shape, eos_token_id=None):
        return transformers.GPTNeoXConfig(
            vocab_size=shape.vocab_size, hidden_size=shape.n_embd, num_hidden_layers=shape.n_layer,
            num_attention_heads=shape.n_head, intermediate_size=shape.n_inner,
            max_position_embeddings=shape.block_size, tie_word_embeddings=shape.tie_embeddings,
        )

    def shape_of(self, config):
        return ModelShape(n_layer=config.num_hidden_layers, n_head=config.num_attention_heads, n_embd=config.hidden_size,
                          block_size=config.max_position_embeddings, vocab_size=config.vocab_size, family=self.name,
                          d_ff=config.intermediate_size, tie_embeddings=config.tie_word_embeddings)

    def layer_linears(self, shape):
        d, f = shape.n_embd, shape.n_inner
        return [("attn.qkv", "attention.query_key_value.weight", d, 3 * d), ("attn.proj", "attention.dense.weight", d, d),
                ("mlp.fc", "mlp.dense_h_to_4h.weight", d, f), ("mlp.proj", "mlp.dense_4h_to_h.weight", f, d)]


@pytest.fixture
def presets():
    """Presets registered in a test are gone afterwards."""
    saved = dict(PRESETS)
    try:
        yield
    finally:
        PRESETS.clear()
        PRESETS.update(saved)


@pytest.fixture
def neox():
    """The NeoX family, registered for one test; the registry is restored afterwards."""
    saved = dict(FAMILIES)
    try:
        yield register_family(NeoXFamily())
    finally:
        FAMILIES.clear()
        FAMILIES.update(saved)


NEOX_MICRO = ModelShape(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=100, d_ff=128, tie_embeddings=False)


def built(shape):
    torch.manual_seed(0)
    return build_model(shape)


def sizes(targets):
    return {t.name: (t.param.shape[t.in_axis], t.param.numel() // t.param.shape[t.in_axis]) for t in targets}


def assert_block_linears_are_the_masked_weights(shape):
    """The family's block linears are, with their (n_in, n_out), exactly the weights a sparse run masks
    by default, and every linear weight inside a block is one of them (none is forgotten)."""
    model = built(shape)
    family = get_family(shape.family)
    listed = {b.param_name: (b.n_in, b.n_out) for b in family.block_linears(shape)}
    assert sizes(select_targets(model, include=block_linear_names(model))) == listed
    in_blocks = [family.layer_prefix.format(i=i) + "*" for i in range(shape.n_layer)]
    assert sizes(select_targets(model, include=in_blocks, exclude=())) == listed


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_block_linears_are_exactly_the_masked_weights(family):
    assert_block_linears_are_the_masked_weights(micro_shape(family))


@pytest.mark.parametrize("shape", [GPT2_MICRO, LLAMA_MICRO], ids=["gpt2", "llama"])
def test_family_selection_keeps_the_masks_of_the_name_globs(shape):
    """Runs from before the family declared the masked weights: same targets, same order, same masks."""
    by_globs, by_family = built(shape), built(shape)
    old = Static(0.75, seed=3).attach(by_globs)
    new = Static(0.75, seed=3, include=block_linear_names(by_family)).attach(by_family)
    assert [t.name for t in new.targets] == [t.name for t in old.targets]
    assert all(torch.equal(new.masks[k], old.masks[k]) for k in old.masks)


def test_a_head_under_another_name_stays_dense():
    """A Llama-style LM head called ``output`` slips past the engine's name globs, not past the family."""
    model = built(LLAMA_MICRO)
    model.output = torch.nn.Linear(64, 100, bias=False)
    assert "output.weight" in {t.name for t in select_targets(model)}
    assert "output.weight" not in block_linear_names(model)
    assert "output.weight" not in Static(0.5, include=block_linear_names(model)).attach(model).masks


def test_a_family_registered_elsewhere_builds_counts_flops_and_loads(neox, tmp_path):
    shape = NEOX_MICRO.override(family="neox-test")
    model = built(shape)
    assert isinstance(model, transformers.GPTNeoXForCausalLM)
    assert_block_linears_are_the_masked_weights(shape)
    d, f, T, V = 32, 128, 16, 100
    want = 2 * (2 * d * 3 * d + 2 * d * d + 2 * 2 * d * f + 4 * T * d) + 2 * d * V
    assert flops.forward_flops_per_token(shape)["total"] == want
    model.save_pretrained(tmp_path)
    assert shape_of(load_model(tmp_path).config) == shape


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match=rf"unknown model family 'nope'; registered families: {re.escape(str(FAMILY_NAMES))}"):
        get_preset("tiny").override(family="nope")
    with pytest.raises(ValueError, match="unknown model family 'nope'"):
        build_model(ModelShape(n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=10, family="nope"))


def test_registry_refuses_duplicates(neox):
    with pytest.raises(ValueError, match="already registered"):
        register_family(NeoXFamily())
    assert register_family(NeoXFamily(), replace=True) is FAMILIES["neox-test"]

    class AnotherGPT2(NeoXFamily):
        name, model_type = "gpt2-again", "gpt2"

    with pytest.raises(ValueError, match="model_type 'gpt2' is already loaded by family 'gpt2'"):
        register_family(AnotherGPT2())


@pytest.mark.parametrize("changes, message", [
    (dict(n_kv_head=3), "n_head=4 is not divisible by n_kv_head=3"),
    (dict(n_embd=130), "n_embd=130 is not divisible by n_head=4"),
    (dict(n_layer=0), "n_layer must be a positive integer"),
    (dict(d_ff=2.5), "d_ff must be a positive integer"),
    (dict(heads=2), r"unknown model field\(s\) \['heads'\]; fields are .*'n_kv_head'"),
])
def test_shape_override_checks(changes, message):
    with pytest.raises(ValueError, match=message):
        get_preset("llama-tiny").override(**changes)


def test_a_preset_is_one_registration_with_its_training_defaults(presets):
    from sparselm.training import load_pretrain_config

    mine = dict(preset_training("tiny"), max_steps=77, lr=1e-4)
    register_preset("mine-test", get_preset("tiny").override(n_layer=2), mine)
    cfg = load_pretrain_config(flags={"model.preset": "mine-test"})
    assert (cfg.optim.max_steps, cfg.optim.lr, cfg.shape().n_layer) == (77, 1e-4, 2)
    with pytest.raises(ValueError, match="preset 'half-test': training defaults need exactly .*; missing grad_accum, "
                                         "warmup_steps, eval_every, ckpt_every; unknown steps"):
        register_preset("half-test", get_preset("tiny"), dict(max_steps=5, batch_size=2, lr=1e-3, steps=3))
    with pytest.raises(ValueError, match="preset 'tiny' is already registered"):
        register_preset("tiny", get_preset("small"))


def test_a_preset_without_training_defaults_borrows_the_nearest_in_size(presets, tmp_path):
    """Not a generic table: a model 2x tiny gets tiny's budget, a 7B Llama the largest preset's (GPT-3 XL,
    1.2B block weights, over TinyLlama's 1.0B), llama-tiny with another vocabulary llama-tiny's, and a
    directory to continue from those of the preset nearest its model."""
    micro = register_preset("micro-test", get_preset("tiny").override(n_embd=192))  # 2.3x tiny, 1/6 of small
    big = register_preset("big-test", get_preset("llama-1b").override(n_layer=32, n_embd=4096, n_head=32, d_ff=11008))
    llama = register_preset("llama-tiny-copy-test", get_preset("llama-tiny").override(vocab_size=512))
    assert (micro.training_from, big.training_from, llama.training_from) == ("tiny", "gpt3-xl", "llama-tiny")
    assert micro.training == preset_training("tiny") and big.training == preset_training("gpt3-xl")
    from sparselm.training import load_pretrain_config

    assert load_pretrain_config(flags={"model.preset": "big-test"}).optim.grad_accum == 128
    built(LLAMA_MICRO).save_pretrained(tmp_path)
    cfg = load_pretrain_config(flags={"model.init_from": str(tmp_path)})
    assert cfg.model.training_preset() == "llama-tiny" and cfg.optim.max_steps == preset_training("llama-tiny")["max_steps"]


def test_shape_defaults():
    tiny = get_preset("tiny")
    assert (tiny.family, tiny.n_inner, tiny.head_dim, tiny.kv_heads, tiny.tie_embeddings) == ("gpt2", 512, 32, 4, True)
    big = get_preset("llama-1b")
    assert (big.n_inner, big.head_dim, big.kv_heads, big.tie_embeddings) == (5632, 64, 4, False)


def test_tiny_gpt2_weights_are_bit_identical_to_the_gpt2_only_builder():
    """Existing demo numbers rest on this: the GPT-2 config the code built before model families."""
    shape, eos = get_preset("tiny"), 4095
    before = transformers.GPT2Config(
        vocab_size=4096, n_positions=128, n_embd=128, n_layer=4, n_head=4, n_inner=512, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    want = transformers.GPT2LMHeadModel._from_config(before, attn_implementation="sdpa")
    got = built(shape)
    # one difference, on purpose: the same tanh GELU as one fused kernel ("gelu_new" is ~8 eager ops)
    assert want.config.activation_function == "gelu_new" and got.config.activation_function == "gelu_pytorch_tanh"
    assert {**got.config.to_dict(), "activation_function": "gelu_new"} == want.config.to_dict()
    want_sd, got_sd = want.state_dict(), got.state_dict()
    assert list(got_sd) == list(want_sd)
    assert all(torch.equal(got_sd[k], want_sd[k]) for k in want_sd)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_shape_round_trips_through_the_hf_config(preset):
    shape = get_preset(preset)
    config = get_family(shape.family).hf_config(shape)
    assert shape_of(config) == shape and context_length(config) == shape.block_size


CONFIG_BOOKKEEPING = {"architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype"}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_a_saved_config_rebuilds_the_same_model(family, tmp_path):
    """hf_config(shape_of(config)) of a saved directory's config is that config: the shape loses nothing
    that changes the model, so a run's recorded shape builds its model again."""
    shape = micro_shape(family)
    built(shape).save_pretrained(tmp_path)
    saved = transformers.AutoConfig.from_pretrained(tmp_path)
    again = get_family(family).hf_config(shape_of(saved), eos_token_id=saved.eos_token_id)
    drop = lambda c: {k: v for k, v in c.to_dict().items() if k not in CONFIG_BOOKKEEPING}  # noqa: E731
    assert shape_of(saved) == shape and drop(again) == drop(saved)
    assert shape_of(load_model(tmp_path).config) == shape  # every weight loaded, none missing or unexpected


def test_llama_saves_and_reloads_with_gqa(tmp_path):
    model = built(LLAMA_MICRO)
    model.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    ours = load_model(tmp_path)
    for other in (hf, ours):
        assert isinstance(other, transformers.LlamaForCausalLM)
        assert other.config.num_key_value_heads == 2 < other.config.num_attention_heads == 4
        assert other.model.layers[0].self_attn.k_proj.weight.shape == (2 * 16, 64)
        sd = other.state_dict()
        assert sd.keys() == model.state_dict().keys()
        assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    assert not torch.equal(ours.lm_head.weight, ours.model.embed_tokens.weight)  # untied head, saved and loaded
    assert context_length(ours) == 16 and shape_of(ours.config) == LLAMA_MICRO
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(model.eval()(ids).logits, ours.eval()(ids).logits)


@pytest.mark.parametrize("config, message", [
    (transformers.MistralConfig(num_attention_heads=4, hidden_size=64, sliding_window=64, max_position_embeddings=128),
     "a mistral config with sliding_window=64 < max_position_embeddings=128 has no ModelShape"),
    (transformers.Qwen2Config(num_hidden_layers=4, use_sliding_window=True, max_window_layers=2, sliding_window=8),
     r"a qwen2 config with sliding_window=8 in layers \[2, 3\] has no ModelShape"),
    (transformers.Qwen3Config(hidden_size=1024, num_attention_heads=16, num_key_value_heads=8),  # Qwen3-0.6B's heads
     "a qwen3 config with head_dim=128 x 16 heads != hidden_size=1024 has no ModelShape"),
    (transformers.Qwen3Config(hidden_size=64, num_attention_heads=4, head_dim=16, attention_bias=True),
     "a qwen3 config with attention_bias=true has no ModelShape"),
], ids=["mistral-window", "qwen2-window", "qwen3-head-dim", "qwen3-bias"])
def test_configs_a_shape_cannot_rebuild_are_refused(config, message):
    """What a ModelShape cannot express (a window, a head width apart from d / heads, extra biases) is
    refused by name rather than read as another model."""
    with pytest.raises(ValueError, match=message):
        shape_of(config)


def test_load_model_refuses_unsupported_architectures(tmp_path):
    opt = transformers.OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                                 max_position_embeddings=16, word_embed_proj_dim=16)
    transformers.OPTForCausalLM(opt).save_pretrained(tmp_path)
    with pytest.raises(ValueError) as err:
        load_model(tmp_path)
    msg = str(err.value)
    assert str(tmp_path) in msg and "OPTForCausalLM" in msg and "'opt'" in msg
    assert all(f"{name} (model_type '{FAMILIES[name].model_type}')" in msg for name in FAMILY_NAMES)
    with pytest.raises(ValueError, match="not supported"):
        family_for_config(opt)


def test_load_model_refuses_missing_or_unexpected_weights(tmp_path):
    built(LLAMA_MICRO).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    sd = load_file(weights)
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{tmp_path}.*missing model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(tmp_path)
    sd = load_file(weights)
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(96, 64)
    sd["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    save_file(sd, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="unexpected model.layers.1.mlp.extra.weight"):
        load_model(tmp_path)


def test_tied_gpt2_head_reloads(tmp_path):
    model = built(GPT2_MICRO)
    model.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    loaded = load_model(tmp_path)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_old_gpt2_causal_mask_buffers_are_harmless(tmp_path):
    built(GPT2_MICRO).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    sd = load_file(weights)
    sd["transformer.h.0.attn.bias"] = torch.ones(1, 1, 16, 16)
    sd["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(sd, weights, metadata={"format": "pt"})
    load_model(tmp_path)


def test_load_model_needs_a_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_lora_targets_are_the_block_linears(family):
    from peft import LoraConfig, get_peft_model

    shape = micro_shape(family)
    model = built(shape)
    kwargs = lora_config_kwargs(model)
    assert kwargs["fan_in_fan_out"] == (shape.family == "gpt2")
    peft_model = get_peft_model(model, LoraConfig(r=2, task_type="CAUSAL_LM", **kwargs))
    wrapped = {n.removeprefix("base_model.model.").removesuffix(".lora_A") for n, _ in peft_model.named_modules() if n.endswith(".lora_A")}
    assert wrapped == {b.param_name.removesuffix(".weight") for b in get_family(shape.family).block_linears(shape)}
    assert context_length(peft_model) == shape.block_size
