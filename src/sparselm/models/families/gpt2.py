"""GPT-2 (Radford et al. 2019), the SPDF paper's architecture: learned positions, GELU MLP, Conv1D weights."""

from __future__ import annotations

from transformers import GPT2Config, GPT2LMHeadModel

from ..family import ModelFamily, eos_id, register_family
from ..presets import SMALL_TRAINING, TINY_TRAINING, XL_TRAINING, ModelShape, register_preset


# GPT-2's tanh-approximated GELU as one fused kernel (F.gelu(approximate="tanh")). GPT2Config's default,
# "gelu_new", is the same formula written as about eight eager elementwise ops (more in the backward):
# ~10% of a CPU training step at the small preset. A standard transformers value (saved directories load
# with AutoModelForCausalLM as before), equal to "gelu_new" within ~1e-7; directories saved with
# "gelu_new" (older runs, OpenAI's GPT-2) load and run with it unchanged.
ACTIVATION = "gelu_pytorch_tanh"


class GPT2Family(ModelFamily):
    name = "gpt2"
    model_type = "gpt2"
    model_class = GPT2LMHeadModel
    layer_prefix = "transformer.h.{i}."
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
            activation_function=ACTIVATION,
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

# ~1.3M parameters: trains on a 2-core CPU in minutes
register_preset("tiny", ModelShape(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=4096), TINY_TRAINING)
# ~14M parameters: a real-but-small CPU/GPU model
register_preset("small", ModelShape(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=8192), SMALL_TRAINING)
# the shapes of Radford et al. 2019 / Brown et al. 2020 (SPDF paper: GPT-2 Small, GPT-3 XL)
register_preset("gpt2-small", ModelShape(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),
                dict(max_steps=20000, batch_size=16, grad_accum=32, lr=6e-4, warmup_steps=700, eval_every=500, ckpt_every=1000))
register_preset("gpt2-medium", ModelShape(n_layer=24, n_head=16, n_embd=1024, block_size=1024, vocab_size=50257),
                dict(max_steps=40000, batch_size=8, grad_accum=64, lr=3e-4, warmup_steps=1000, eval_every=1000, ckpt_every=1000))
register_preset("gpt3-xl", ModelShape(n_layer=24, n_head=16, n_embd=2048, block_size=2048, vocab_size=50257), XL_TRAINING)
