"""Decoding settings for data-to-text generation, and the ``generation_config.json`` that records them.

Defaults follow the LoRA / SPDF NLG setups: 10 beams, length penalty 0.9, no repeated 4-grams, at
most 64 new tokens. A fine-tuned run saves them, so ``model.generate`` (or a pipeline) on the run
directory decodes as ``sparselm evaluate`` does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..config import option


@dataclass
class DecodingConfig:
    num_beams: int = option(10, "beam width", lo=1)
    length_penalty: float = option(0.9, "beam length penalty (>1 favours longer outputs)")
    no_repeat_ngram_size: int = option(4, "forbid repeating n-grams of this size (0 = off)", lo=0)
    max_new_tokens: int = option(64, "generation length limit", lo=1)
    batch_size: int = option(16, "inputs per generation batch", lo=1)

    def to_dict(self) -> dict:
        return asdict(self)

    def generation_config(self, eos_token_id: int):
        """The same settings as a ``transformers.GenerationConfig`` (deterministic beam search)."""
        from transformers import GenerationConfig

        return GenerationConfig(
            num_beams=self.num_beams, length_penalty=self.length_penalty, no_repeat_ngram_size=self.no_repeat_ngram_size,
            max_new_tokens=self.max_new_tokens, do_sample=False, early_stopping=True,
            eos_token_id=eos_token_id, pad_token_id=eos_token_id,
        )
