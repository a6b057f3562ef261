"""Build and load GPT-2-architecture models through Hugging Face ``transformers``."""

from __future__ import annotations

import logging

from transformers import GPT2Config, GPT2LMHeadModel

from .presets import ModelShape


def gpt2_config(shape: ModelShape, eos_token_id: int | None = None) -> GPT2Config:
    eos = shape.vocab_size - 1 if eos_token_id is None else eos_token_id
    return GPT2Config(
        vocab_size=shape.vocab_size,
        n_positions=shape.block_size,
        n_embd=shape.n_embd,
        n_layer=shape.n_layer,
        n_head=shape.n_head,
        n_inner=shape.n_inner,
        resid_pdrop=shape.dropout,
        embd_pdrop=shape.dropout,
        attn_pdrop=shape.dropout,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        tie_word_embeddings=True,
    )


def build_model(shape: ModelShape, eos_token_id: int | None = None) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2 with SDPA attention."""
    return GPT2LMHeadModel._from_config(gpt2_config(shape, eos_token_id), attn_implementation="sdpa")


def load_model(path) -> GPT2LMHeadModel:
    """A model saved with ``save_pretrained`` (a sparselm run directory or any HF GPT-2 directory)."""
    logging.getLogger("transformers.modeling_utils").setLevel(logging.ERROR)
    return GPT2LMHeadModel.from_pretrained(path, attn_implementation="sdpa")


def shape_of(config: GPT2Config) -> ModelShape:
    return ModelShape(
        n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd,
        block_size=config.n_positions, vocab_size=config.vocab_size, dropout=config.resid_pdrop,
    )
