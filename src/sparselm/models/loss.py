"""Prompt/target encoding, the target-only language-model loss used by fine-tuning and evaluation,
and the chunked cross-entropy every training and validation loss goes through."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


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


def _chunk_rows(x: torch.Tensor, targets: torch.Tensor, vocab: int, chunk: int, ignore_index: int,
                grad: torch.Tensor | None, scale: torch.Tensor | None) -> torch.Tensor:
    """Summed cross-entropy of the rows of ``x`` (N, V) over its first ``vocab`` columns, ``chunk``
    rows at a time, each chunk upcast to fp32 on its own. With ``grad`` (N, V, the dtype of ``x``)
    it also writes d(loss)/d(x) there: ``(softmax - one_hot) * scale`` on rows whose target is not
    ``ignore_index``, 0 on ignored rows and on the columns from ``vocab`` on."""
    n = x.size(0)
    step = n if chunk <= 0 else chunk
    in_place = grad is not None and grad.dtype == torch.float32  # fp32 logits: the gradient's rows are the workspace
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    for start in range(0, n, max(step, 1)):
        rows = x[start: start + step, :vocab]
        t = targets[start: start + step]
        if in_place:
            work = grad[start: start + step, :vocab]
            work.copy_(rows)
        else:
            work = rows.to(torch.float32, copy=True)  # never the caller's tensor: it is changed in place
        valid = t != ignore_index
        safe = torch.where(valid, t, torch.zeros_like(t))
        picked = work.gather(1, safe[:, None]).squeeze(1)
        # logsumexp by hand, in place in the chunk: torch.logsumexp would allocate another chunk
        top = work.amax(dim=-1)
        top = torch.where(top.isfinite(), top, torch.zeros_like(top))  # rows of +-inf: no inf - inf
        sums = work.sub_(top[:, None]).exp_().sum(dim=-1)  # work = exp(x - top)
        lse = sums.log().add_(top)
        total = total + torch.where(valid, lse - picked, torch.zeros_like(lse)).sum()
        if grad is not None:
            row_scale = torch.where(valid, scale, torch.zeros((), dtype=torch.float32, device=x.device))
            work.mul_((row_scale / sums)[:, None])  # softmax, scaled; 0 on ignored rows
            work.scatter_add_(1, safe[:, None], -row_scale[:, None])  # minus the one-hot
            if not in_place:
                grad[start: start + step, :vocab].copy_(work)
            if vocab < grad.size(1):
                grad[start: start + step, vocab:].zero_()
        del work  # before the next chunk's is allocated: one chunk of fp32 at a time
    return total


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and, chunk by chunk, its gradient w.r.t. the logits (in the logits'
    dtype); backward scales that stored gradient by ``grad_output``. The only buffer the size of
    the logits is that gradient, which the backward would have allocated anyway."""

    @staticmethod
    def forward(ctx, logits, targets, vocab, chunk, ignore_index, mean):
        x = logits.reshape(-1, logits.size(-1))
        t = targets.reshape(-1)
        grad = torch.empty_like(x, memory_format=torch.contiguous_format)
        n_valid = (t != ignore_index).sum()
        scale = 1.0 / n_valid.to(torch.float32) if mean else torch.ones((), dtype=torch.float32, device=x.device)
        total = _chunk_rows(x, t, vocab, chunk, ignore_index, grad, scale)
        ctx.grad, ctx.shape = grad, logits.shape
        return total / n_valid if mean else total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        grad = getattr(ctx, "grad", None)
        if grad is None:
            raise RuntimeError("chunked_cross_entropy: backward through the same loss twice is not supported")
        del ctx.grad  # the stored gradient becomes the returned one: scaled in place, not copied
        return grad.mul_(grad_output).view(ctx.shape), None, None, None, None, None


def chunked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int | None = None,
                          chunk: int = 4096, ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """``F.cross_entropy(logits[..., :vocab_size].float(), targets)`` without an fp32 copy (or an
    fp32 log-softmax) of all the logits: ``chunk`` rows (tokens) at a time are upcast to fp32, so
    the extra memory is a few chunks of fp32 plus, when the logits need a gradient, one gradient
    buffer in their own dtype (bf16 under autocast) that the backward would allocate anyway.

    ``logits`` (..., V) of any float dtype; ``targets`` (...) integer, in ``[0, vocab_size)`` or
    ``ignore_index``. Columns from ``vocab_size`` on (the rows a model's vocabulary is padded with)
    are left out of the softmax and get gradient 0. ``chunk`` 0 = one chunk. ``reduction`` "mean"
    (over the targets that are not ignored; nan when all are, with gradient 0, as F.cross_entropy)
    or "sum". Returns an fp32 scalar. The backward reuses the stored gradient in place, so one
    graph can be backpropagated once (``retain_graph`` and a second backward raise). Pass
    contiguous logits: others are copied (in their own dtype) by the flattening reshape."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a float tensor, not {logits.dtype}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} do not match logits {tuple(logits.shape)}")
    vocab = logits.size(-1) if vocab_size is None else min(int(vocab_size), logits.size(-1))
    mean = reduction == "mean"
    with torch.autocast(logits.device.type, enabled=False):  # the fp32 upcast is ours, chunk by chunk
        if torch.is_grad_enabled() and logits.requires_grad:
            return _ChunkedCrossEntropy.apply(logits, targets, vocab, int(chunk), ignore_index, mean)
        x, t = logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
        total = _chunk_rows(x, t, vocab, int(chunk), ignore_index, None, None)
        return total / (t != ignore_index).sum() if mean else total


def target_loss(model, ids, labels, mask, reduction="mean", chunk: int = 4096):
    """Next-token cross-entropy on target tokens only (``chunked_cross_entropy``, ``chunk`` tokens
    at a time)."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    # the label of position i is token i + 1; the last position has none (-100): the logits stay
    # whole, where slicing off the last position would copy them all
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    return chunked_cross_entropy(logits, targets, chunk=chunk, ignore_index=-100, reduction=reduction)


@torch.no_grad()
def validation_loss(model, encoded, batch_size, pad_id, device, chunk: int = 4096) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(encoded), batch_size):
        ids, labels, mask = (t.to(device) for t in collate(encoded[i : i + batch_size], pad_id))
        total += target_loss(model, ids, labels, mask, reduction="sum", chunk=chunk).item()
        count += int((labels[:, 1:] != -100).sum())
    model.train()
    return total / max(count, 1)
