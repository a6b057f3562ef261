"""Batched, deterministic beam search through ``transformers.generate`` (settings: ``DecodingConfig``)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..models import context_length
from ..models.decoding import DecodingConfig

__all__ = ["DecodingConfig", "generate"]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], cfg: DecodingConfig = DecodingConfig(), device="cpu",
             progress: bool = True) -> list[str]:
    """One output string per prompt: the text after the prompt, up to EOS or the first newline."""
    model.eval()
    context = context_length(model)
    max_prompt = context - cfg.max_new_tokens
    if max_prompt < 8:
        raise ValueError(f"context of {context} tokens leaves no room for prompts with max_new_tokens={cfg.max_new_tokens}")
    eos = tokenizer.eos_token_id
    outputs: list[str] = []
    for i in tqdm(range(0, len(prompts), cfg.batch_size), disable=not progress, desc="generate", unit="batch"):
        batch = [tokenizer(p).input_ids[-max_prompt:] for p in prompts[i : i + cfg.batch_size]]
        width = max(len(b) for b in batch)
        ids = torch.full((len(batch), width), eos, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for j, b in enumerate(batch):  # left padding, so every prompt ends where generation starts
            ids[j, width - len(b):] = torch.tensor(b)
            mask[j, width - len(b):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             generation_config=cfg.generation_config(eos))
        for row in out[:, width:].tolist():
            if eos in row:
                row = row[: row.index(eos)]
            text = tokenizer.decode(row, skip_special_tokens=True)
            outputs.append(text.strip().split("\n")[0].strip())
    return outputs
