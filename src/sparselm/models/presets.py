"""Named model shapes, from a CPU demo up to the SPDF paper's GPT-3 XL and a TinyLlama-sized Llama."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from .family import FAMILIES

_POSITIVE_INTS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "n_kv_head", "d_ff")


@dataclass(frozen=True)
class ModelShape:
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int  # context length T
    vocab_size: int
    dropout: float = 0.0
    family: str = "gpt2"  # a registered ModelFamily name
    n_kv_head: int | None = None  # grouped-query attention: key/value heads; None = n_head
    d_ff: int | None = None  # MLP hidden width; None = 4 * n_embd
    tie_embeddings: bool = True  # LM head shares the token embedding

    @property
    def n_inner(self) -> int:
        return 4 * self.n_embd if self.d_ff is None else self.d_ff

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    def to_dict(self) -> dict:
        return asdict(self)

    def widened(self, sparsity: float) -> "ModelShape":
        """Sparse-IFT's Sparse-Wide (Thangarasa et al. 2024): widths x 1/sqrt(1 - s), rounded to a
        multiple of the head count, so that the block linears at sparsity ``s`` cost the FLOPs of the
        dense ones (GPT-3 Small 768/3072 -> 1536/6144 at 75%); attention and the LM head widen too."""
        scale = (1.0 - sparsity) ** -0.5
        width = lambda x: max(self.n_head, int(round(x * scale / self.n_head)) * self.n_head)  # noqa: E731
        return replace(self, n_embd=width(self.n_embd), d_ff=width(self.n_inner) if self.d_ff is not None else None)

    def override(self, **changes) -> "ModelShape":
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown model field(s) {sorted(unknown)}; fields are {sorted(known)}")
        shape = replace(self, **changes)
        for name in _POSITIVE_INTS:
            value = getattr(shape, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        FAMILIES.lookup(shape.family)
        if shape.n_embd % shape.n_head:
            raise ValueError(f"n_embd={shape.n_embd} is not divisible by n_head={shape.n_head}")
        if shape.n_head % shape.kv_heads:
            raise ValueError(f"n_head={shape.n_head} is not divisible by n_kv_head={shape.n_kv_head}")
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
    # Llama counterparts of tiny and small: SwiGLU width ~8/3 d rounded to a multiple of 8, GQA, untied head
    "llama-tiny": ModelShape(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=4096,
                             family="llama", n_kv_head=2, d_ff=344, tie_embeddings=False),
    "llama-small": ModelShape(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=8192,
                              family="llama", n_kv_head=2, d_ff=1024, tie_embeddings=False),
    # the shape of TinyLlama-1.1B (Zhang et al. 2024)
    "llama-1b": ModelShape(n_layer=22, n_head=32, n_embd=2048, block_size=2048, vocab_size=32000,
                           family="llama", n_kv_head=4, d_ff=5632, tie_embeddings=False),
}


def get_preset(name: str) -> ModelShape:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
