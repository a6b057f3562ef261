"""Qwen2 / Qwen2.5 (Yang et al. 2024): Llama's block with biases on the query, key and value
projections. The biases stay dense (the masks cover weights) and, as every bias, are left out of the
FLOPs. Sliding-window layers have no ModelShape: sparselm builds and reads full attention only."""

from __future__ import annotations

from transformers import Qwen2Config, Qwen2ForCausalLM

from ..family import eos_id, register_family
from ..presets import TINY_TRAINING, ModelShape, register_preset
from .llama import LlamaFamily


class Qwen2Family(LlamaFamily):
    name = "qwen2"
    model_type = "qwen2"
    model_class = Qwen2ForCausalLM

    def hf_config(self, shape: ModelShape, eos_token_id: int | None = None) -> Qwen2Config:
        fields = self.config_fields(shape, eos_id(shape, eos_token_id))
        return Qwen2Config(**fields, rms_norm_eps=1e-6, use_sliding_window=False)  # Qwen2's eps

    def shape_of(self, config: Qwen2Config) -> ModelShape:
        windowed = [i for i, kind in enumerate(config.layer_types or ()) if kind != "full_attention"]
        if windowed and config.sliding_window is not None:
            raise ValueError(f"a {self.name} config with sliding_window={config.sliding_window} in layers {windowed} has no ModelShape "
                             "(sparselm's attention and FLOPs span the whole context)")
        return super().shape_of(config)


QWEN2 = register_family(Qwen2Family())

register_preset("qwen2-tiny", ModelShape(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=4096,
                                         family="qwen2", n_kv_head=2, d_ff=344, tie_embeddings=False), TINY_TRAINING)
