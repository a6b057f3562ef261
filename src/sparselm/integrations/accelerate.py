"""Sparse training in a plain ``accelerate`` loop: the two sparsifier calls, guarded by
``accelerator.sync_gradients`` so they run once per optimizer step, not once per micro-batch.

::

    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    sparsifier.attach(accelerator.unwrap_model(model), optimizer)
    step = 0                                                  # optimizer steps taken so far
    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(model(**batch).loss)
            sparse_after_backward(sparsifier, accelerator, step)   # before clipping: the norm leaves out pruned weights
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step(); optimizer.zero_grad()           # accelerate skips these off sync steps
            if sparse_after_step(sparsifier, accelerator, step):
                step += 1

Off a sync step the gradients are partial (and not yet all-reduced): masking them then is harmless
but RigL would read a partial dense gradient, and a mask update would happen per micro-batch. The
helpers only read ``accelerator.sync_gradients``, so this module imports nothing from accelerate.
"""

from __future__ import annotations


def sparse_after_backward(sparsifier, accelerator, step: int) -> bool:
    """``sparsifier.after_backward(step)`` if this backward completes an optimizer step; whether it ran."""
    if not accelerator.sync_gradients:
        return False
    sparsifier.after_backward(step)
    return True


def sparse_after_step(sparsifier, accelerator, step: int) -> bool:
    """``sparsifier.after_step(step)`` if the optimizer really stepped; whether it ran (count the step then)."""
    if not accelerator.sync_gradients:
        return False
    sparsifier.after_step(step)
    return True
