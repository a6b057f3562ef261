"""Peak bytes of live tensors, on any device, CPU included (where PyTorch has no allocator stats).

    with LiveTensorBytes() as mem:
        loss = fn(logits, targets)
        loss.backward()
    print(mem.peak / 2**20, "MiB")

A ``TorchDispatchMode`` that sees every tensor an ATen op returns while it is active, forward and
backward alike, and counts the bytes of its storage once (keyed by the storage's device and data
pointer; an output in the storage of one of the op's inputs, a view or an in-place result, is no
new memory and is not counted) until the storage is freed (``weakref.finalize`` on it). ``peak`` is the most bytes alive at once, on top of what was
alive before the block (the tracker does not see those). What it cannot see: scratch memory an
op's kernel allocates and frees inside itself (e.g. the temporary of ``torch.logsumexp``), and
allocator caching/fragmentation; on CUDA ``torch.cuda.max_memory_allocated`` is the ground truth.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live: dict[tuple, int] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # an output in an input's storage (a view, an in-place op) is no new memory: counted when
        # it was allocated under the tracker, or alive before it (and not ours to count)
        inputs = {self._key(s) for s in map(self._storage, tree_leaves((args, kwargs))) if s is not None}
        for storage in map(self._storage, tree_leaves(out)):
            if storage is not None and self._key(storage) not in inputs:
                self._track(storage)
        return out

    @staticmethod
    def _storage(t):
        if not isinstance(t, torch.Tensor):
            return None
        try:
            return t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse tensors, subclasses: nothing to count
            return None

    @staticmethod
    def _key(storage) -> tuple:
        return str(storage.device), storage.data_ptr()

    def _track(self, storage) -> None:
        nbytes = storage.nbytes()
        key = self._key(storage)
        if nbytes == 0 or key in self.live:
            return
        self.live[key] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key) -> None:
        self.current -= self.live.pop(key, 0)


def peak_bytes(fn, *args, **kwargs) -> tuple[int, object]:
    """(peak live tensor bytes while ``fn(*args, **kwargs)`` runs, its result). The result is
    returned after the count: whatever it holds was alive at the end and counted."""
    with LiveTensorBytes() as mem:
        result = fn(*args, **kwargs)
    return mem.peak, result
