"""Random (B, T) training windows from a token sequence, stateless in the step.

The batch ``k`` depends only on (seed, k): resuming reads exactly the data an uninterrupted run
would have, with no loader state to checkpoint. Pre-training numbers the micro-batches of all
ranks globally (``step * grad_accum * ranks + micro * ranks + rank``), so a step reads the same
windows on 1 rank with grad_accum 2 as on 2 ranks with grad_accum 1. ``tokens`` is anything with ``len`` and
slices: a numpy array, or a split's shards (``ShardedTokens``), read as one sequence so a
window may span two shards and the batches do not depend on where the shards were cut.
"""

from __future__ import annotations

import numpy as np


def get_batch(tokens, batch_size: int, block_size: int, seed: int, index: int, device="cpu"):
    """Inputs and next-token targets of micro-batch ``index``, each (batch_size, block_size) int64."""
    import torch  # here, not at import: tokenizing workers import this package without torch

    if len(tokens) <= block_size + 1:
        raise ValueError(f"only {len(tokens)} tokens, fewer than one window of {block_size + 1}; use more text or a smaller block_size")
    rng = np.random.default_rng([seed, index])
    starts = rng.integers(0, len(tokens) - block_size - 1, size=batch_size)
    windows = np.stack([np.asarray(tokens[s : s + block_size + 1], dtype=np.int64) for s in starts])
    t = torch.from_numpy(windows)
    if torch.device(device).type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    return t[:, :-1], t[:, 1:]


def eval_batches(tokens, batch_size: int, block_size: int, n_batches: int):
    """Fixed, evenly spaced validation windows: the same ones at every evaluation."""
    import torch

    n_windows = max(1, min(n_batches * batch_size, (len(tokens) - 1) // block_size))
    starts = np.linspace(0, len(tokens) - block_size - 1, n_windows).astype(np.int64)
    for i in range(0, n_windows, batch_size):
        chunk = starts[i : i + batch_size]
        w = torch.from_numpy(np.stack([np.asarray(tokens[s : s + block_size + 1], dtype=np.int64) for s in chunk]))
        yield w[:, :-1], w[:, 1:]
