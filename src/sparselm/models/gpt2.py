"""GPT-2 (Radford et al. 2019), the SPDF paper's architecture: learned positions, GELU MLP, Conv1D weights."""

from __future__ import annotations

from transformers import GPT2Config, GPT2LMHeadModel

from .family import ModelFamily, eos_id, register_family
from .presets import ModelShape


FAST_GELU = "gelu_pytorch_tanh"


class GPT2Family(ModelFamily):
    name = "gpt2"
    model_type = "gpt2"
    model_class = GPT2LMHeadModel
    layer_prefix = "transformer.h.{i}."
    lora_targets = ("c_attn", "c_proj", "c_fc")
    lora_fan_in_fan_out = True  # Conv1D stores (in, out)
    harmless_keys = ("*.attn.masked_bias",)  # a buffer of old checkpoints that transformers does not skip itself

    def hf_config(self, shape: ModelShape, eos_token_id: int | None = None) -> GPT2Config:
        eos = eos_id(shape, eos_token_id)
        return GPT2Config(
            vocab_size=shape.vocab_size,
            n_positions=shape.block_size,
            n_embd=shape.n_embd,
            n_layer=shape.n_layer,
            n_head=shape.n_head,
            n_inner=shape.n_inner,
            # GPT-2's tanh GELU as one fused kernel (F.gelu(approximate="tanh")), not "gelu_new", the same
            # formula in six eager ops; a standard transformers value, equal to it within ~1e-7
            activation_function=FAST_GELU,
            resid_pdrop=shape.dropout,
            embd_pdrop=shape.dropout,
            attn_pdrop=shape.dropout,
            bos_token_id=eos,
            eos_token_id=eos,
            pad_token_id=eos,
            tie_word_embeddings=shape.tie_embeddings,
        )

    def shape_of(self, config: GPT2Config) -> ModelShape:
        d = config.n_embd
        return ModelShape(
            n_layer=config.n_layer, n_head=config.n_head, n_embd=d, block_size=config.n_positions,
            vocab_size=config.vocab_size, dropout=config.resid_pdrop, family=self.name,
            d_ff=None if config.n_inner in (None, 4 * d) else config.n_inner,
            tie_embeddings=config.tie_word_embeddings,
        )

    def layer_linears(self, shape: ModelShape) -> list[tuple[str, str, int, int]]:
        d, f = shape.n_embd, shape.n_inner
        return [
            ("attn.qkv", "attn.c_attn.weight", d, 3 * d),
            ("attn.proj", "attn.c_proj.weight", d, d),
            ("mlp.fc", "mlp.c_fc.weight", d, f),
            ("mlp.proj", "mlp.c_proj.weight", f, d),
        ]


GPT2 = register_family(GPT2Family())
