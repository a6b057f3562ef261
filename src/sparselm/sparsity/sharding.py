"""Masks of sharded parameters (FSDP2's DTensors), without knowing what sharded them.

A mask of a DTensor parameter is a DTensor with the same mesh and placements, so each rank holds the
mask of exactly the weights it holds. The hot path (zeroing gradients and weights) works on local
shards with no communication; only mask *updates* see whole tensors: scores are gathered on update
steps, every rank computes the same new masks from the same gathered values, and keeps its own
shard (no scatter). A plain tensor passes through every function here unchanged.
"""

from __future__ import annotations

import torch

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch built without distributed support
    DTensor, distribute_tensor = (), None


def is_sharded(t) -> bool:
    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard (the tensor itself when not sharded); in-place ops on it change the DTensor."""
    return t.to_local() if isinstance(t, DTensor) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (an all-gather for a DTensor)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor, the same on every rank) laid out like ``param``: for a DTensor
    parameter each rank keeps its own shard of it, with no communication."""
    if not isinstance(param, DTensor):
        return value.to(param.device)
    return distribute_tensor(value.to(local(param).device), param.device_mesh, param.placements, src_data_rank=None)


def count_nonzero(t: torch.Tensor) -> int:
    """Non-zeros over the whole tensor (summed over the shards of a DTensor)."""
    if isinstance(t, DTensor):
        return int(t.ne(0).sum().full_tensor())  # a partial sum on each rank, all-reduced
    return int(torch.count_nonzero(t))
