"""Prompt/target encoding and the target-only language-model loss used by fine-tuning and evaluation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


MIN_TARGET_TOKENS = 8


def encode_pairs(tokenizer, pairs, block_size: int, skip_too_long: bool = False) -> tuple[list, int]:
    """Token ids and labels for ``prompt + target + eos``, labels -100 on prompt tokens; targets
    longer than the context are cut at its end. Returns (encoded, n_left_out): a pair whose prompt
    leaves fewer than ``MIN_TARGET_TOKENS`` positions raises, or with ``skip_too_long`` is left out
    and counted, so nothing disappears unreported."""
    eos = tokenizer.eos_token_id
    out, left_out = [], 0
    for prompt, target in pairs:
        p, t = tokenizer(prompt).input_ids, tokenizer(target).input_ids + [eos]
        if len(p) > block_size - MIN_TARGET_TOKENS:
            if skip_too_long:
                left_out += 1
                continue
            raise ValueError(f"prompt of {len(p)} tokens leaves no room in the context of {block_size}: {prompt[:80]!r}...")
        ids = (p + t)[:block_size]
        labels = ([-100] * len(p) + t)[:block_size]
        out.append((ids, labels))
    return out, left_out


def collate(examples, pad_id: int):
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return ids, labels, mask


def target_loss(model, ids, labels, mask, reduction="mean"):
    """Next-token cross-entropy on target tokens only."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                           ignore_index=-100, reduction=reduction)


@torch.no_grad()
def validation_loss(model, encoded, batch_size, pad_id, device) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(encoded), batch_size):
        ids, labels, mask = (t.to(device) for t in collate(encoded[i : i + batch_size], pad_id))
        total += target_loss(model, ids, labels, mask, reduction="sum").item()
        count += int((labels[:, 1:] != -100).sum())
    model.train()
    return total / max(count, 1)
