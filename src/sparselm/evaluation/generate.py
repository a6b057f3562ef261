"""Batched, deterministic beam search through ``transformers.generate``.

Defaults follow the LoRA / SPDF NLG setups: 10 beams, length penalty 0.9, no repeated 4-grams,
at most 64 new tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ..config import option
from ..models import context_length


@dataclass
class DecodingConfig:
    num_beams: int = option(10, "beam width", lo=1)
    length_penalty: float = option(0.9, "beam length penalty (>1 favours longer outputs)")
    no_repeat_ngram_size: int = option(4, "forbid repeating n-grams of this size (0 = off)", lo=0)
    max_new_tokens: int = option(64, "generation length limit", lo=1)
    batch_size: int = option(16, "inputs per generation batch", lo=1)

    def to_dict(self) -> dict:
        return asdict(self)


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
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), num_beams=cfg.num_beams,
            length_penalty=cfg.length_penalty, no_repeat_ngram_size=cfg.no_repeat_ngram_size,
            max_new_tokens=cfg.max_new_tokens, do_sample=False, early_stopping=True,
            eos_token_id=eos, pad_token_id=eos,
        )
        for row in out[:, width:].tolist():
            if eos in row:
                row = row[: row.index(eos)]
            text = tokenizer.decode(row, skip_special_tokens=True)
            outputs.append(text.strip().split("\n")[0].strip())
    return outputs
