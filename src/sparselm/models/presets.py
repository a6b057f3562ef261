"""Named GPT-2-architecture shapes, from a CPU demo up to the SPDF paper's GPT-3 XL."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace


@dataclass(frozen=True)
class ModelShape:
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int  # context length T
    vocab_size: int
    dropout: float = 0.0

    @property
    def n_inner(self) -> int:
        return 4 * self.n_embd

    def to_dict(self) -> dict:
        return asdict(self)

    def override(self, **changes) -> "ModelShape":
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown model field(s) {sorted(unknown)}; fields are {sorted(known)}")
        shape = replace(self, **changes)
        if shape.n_embd % shape.n_head:
            raise ValueError(f"n_embd={shape.n_embd} is not divisible by n_head={shape.n_head}")
        return shape


PRESETS: dict[str, ModelShape] = {
    # ~1.3M parameters: trains on a 2-core CPU in minutes
    "tiny": ModelShape(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=4096),
    # ~14M parameters: a real-but-small CPU/GPU model
    "small": ModelShape(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=8192),
    # the shapes of Radford et al. 2019 / Brown et al. 2020 (SPDF paper: GPT-2 Small, GPT-3 XL)
    "gpt2-small": ModelShape(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),
    "gpt2-medium": ModelShape(n_layer=24, n_head=16, n_embd=1024, block_size=1024, vocab_size=50257),
    "gpt3-xl": ModelShape(n_layer=24, n_head=16, n_embd=2048, block_size=2048, vocab_size=50257),
}


def get_preset(name: str) -> ModelShape:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
