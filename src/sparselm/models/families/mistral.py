"""Mistral (Jiang et al. 2023): Llama's block (RoPE, RMSNorm, SwiGLU, grouped-query attention) with
sliding-window attention. A ModelShape attends over its whole context, so sparselm builds Mistral
without a window and reads only configs whose window covers the context (Mistral 7B v0.2 and later)."""

from __future__ import annotations

from transformers import MistralConfig, MistralForCausalLM

from ..family import eos_id, register_family
from ..presets import TINY_TRAINING, ModelShape, register_preset
from .llama import LlamaFamily


class MistralFamily(LlamaFamily):
    name = "mistral"
    model_type = "mistral"
    model_class = MistralForCausalLM

    def hf_config(self, shape: ModelShape, eos_token_id: int | None = None) -> MistralConfig:
        fields = self.config_fields(shape, eos_id(shape, eos_token_id))
        return MistralConfig(**fields, rms_norm_eps=1e-5, sliding_window=None)  # Mistral 7B's eps

    def shape_of(self, config: MistralConfig) -> ModelShape:
        window = config.sliding_window
        if window is not None and window < config.max_position_embeddings:
            raise ValueError(f"a mistral config with sliding_window={window} < max_position_embeddings="
                             f"{config.max_position_embeddings} has no ModelShape: sparselm's attention and FLOPs "
                             "span the whole context (Mistral 7B v0.2 and later have no window)")
        return super().shape_of(config)


MISTRAL = register_family(MistralFamily())

register_preset("mistral-tiny", ModelShape(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=4096,
                                           family="mistral", n_kv_head=2, d_ff=344, tie_embeddings=False), TINY_TRAINING)
