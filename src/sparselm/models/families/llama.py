"""Llama (Touvron et al. 2023): RoPE, RMSNorm, SwiGLU MLP, grouped-query attention, no biases."""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM

from ..family import ModelFamily, eos_id, register_family
from ..presets import SMALL_TRAINING, TINY_TRAINING, XL_TRAINING, ModelShape, register_preset


class LlamaFamily(ModelFamily):
    """Also the base of the Llama-style families (Mistral, Qwen): the same block linears and shape
    fields; a subclass builds its own config class from ``config_fields`` and checks its own fields."""

    name = "llama"
    model_type = "llama"
    model_class = LlamaForCausalLM
    layer_prefix = "model.layers.{i}."

    def config_fields(self, shape: ModelShape, eos: int) -> dict:
        """The config fields every Llama-style family sets from a shape."""
        return dict(
            vocab_size=shape.vocab_size,
            hidden_size=shape.n_embd,
            intermediate_size=shape.n_inner,
            num_hidden_layers=shape.n_layer,
            num_attention_heads=shape.n_head,
            num_key_value_heads=shape.kv_heads,
            max_position_embeddings=shape.block_size,
            attention_dropout=shape.dropout,
            bos_token_id=eos,
            eos_token_id=eos,
            pad_token_id=eos,
            tie_word_embeddings=shape.tie_embeddings,
        )

    def hf_config(self, shape: ModelShape, eos_token_id: int | None = None) -> LlamaConfig:
        fields = self.config_fields(shape, eos_id(shape, eos_token_id))
        return LlamaConfig(**fields, rms_norm_eps=1e-5, attention_bias=False, mlp_bias=False)  # Llama 2 / TinyLlama

    def shape_of(self, config) -> ModelShape:
        d, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or d // heads  # (configs without the field: d / heads)
        if head_dim * heads != d:
            raise ValueError(f"a {self.name} config with head_dim={head_dim} x {heads} heads != hidden_size={d} has no ModelShape")
        return ModelShape(
            n_layer=config.num_hidden_layers, n_head=heads, n_embd=d, block_size=config.max_position_embeddings,
            vocab_size=config.vocab_size, dropout=config.attention_dropout, family=self.name,
            n_kv_head=None if kv in (None, heads) else kv, d_ff=config.intermediate_size,
            tie_embeddings=config.tie_word_embeddings,
        )

    def layer_linears(self, shape: ModelShape) -> list[tuple[str, str, int, int]]:
        d, f, kv = shape.n_embd, shape.n_inner, shape.kv_heads * shape.head_dim
        return [
            ("attn.q", "self_attn.q_proj.weight", d, d),
            ("attn.k", "self_attn.k_proj.weight", d, kv),
            ("attn.v", "self_attn.v_proj.weight", d, kv),
            ("attn.o", "self_attn.o_proj.weight", d, d),
            ("mlp.gate", "mlp.gate_proj.weight", d, f),
            ("mlp.up", "mlp.up_proj.weight", d, f),
            ("mlp.down", "mlp.down_proj.weight", f, d),
        ]


LLAMA = register_family(LlamaFamily())

# counterparts of GPT-2's tiny and small: SwiGLU width ~8/3 d rounded to a multiple of 8, GQA, untied head
register_preset("llama-tiny", ModelShape(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=4096,
                                         family="llama", n_kv_head=2, d_ff=344, tie_embeddings=False), TINY_TRAINING)
register_preset("llama-small", ModelShape(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=8192,
                                          family="llama", n_kv_head=2, d_ff=1024, tie_embeddings=False), SMALL_TRAINING)
# the shape of TinyLlama-1.1B (Zhang et al. 2024)
register_preset("llama-1b", ModelShape(n_layer=22, n_head=32, n_embd=2048, block_size=2048, vocab_size=32000,
                                       family="llama", n_kv_head=4, d_ff=5632, tie_embeddings=False), dict(XL_TRAINING, lr=4e-4))
