"""Qwen3 (Yang et al. 2025): Qwen2's block without the q/k/v biases, with an RMSNorm on each query and
key head (q_norm, k_norm: per-head vectors, never masked) and an explicit ``head_dim`` config field
(128 by default), set here to n_embd / n_head. Configs whose heads do not tile the width (Qwen3-0.6B:
16 x 128 != 1024) have no ModelShape and are refused by name."""

from __future__ import annotations

from transformers import Qwen3Config, Qwen3ForCausalLM

from ..family import eos_id, register_family
from ..presets import TINY_TRAINING, ModelShape, register_preset
from .qwen2 import Qwen2Family


class Qwen3Family(Qwen2Family):
    name = "qwen3"
    model_type = "qwen3"
    model_class = Qwen3ForCausalLM

    def hf_config(self, shape: ModelShape, eos_token_id: int | None = None) -> Qwen3Config:
        fields = self.config_fields(shape, eos_id(shape, eos_token_id))
        return Qwen3Config(**fields, head_dim=shape.head_dim, rms_norm_eps=1e-6, attention_bias=False,
                           use_sliding_window=False)

    def shape_of(self, config: Qwen3Config) -> ModelShape:
        if config.attention_bias:
            raise ValueError(f"a {self.name} config with attention_bias=true has no ModelShape (sparselm builds Qwen3 without attention biases, as released)")
        return super().shape_of(config)


QWEN3 = register_family(Qwen3Family())

register_preset("qwen3-tiny", ModelShape(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=4096,
                                         family="qwen3", n_kv_head=2, d_ff=344, tie_embeddings=False), TINY_TRAINING)
