"""Sparse training inside other people's training loops: ``SparsityCallback`` for the Hugging Face
``Trainer`` and two guarded calls for plain ``accelerate`` loops. Both drive any sparselm
``Sparsifier`` through its two hooks, ``after_backward`` and ``after_step``."""

from .accelerate import sparse_after_backward, sparse_after_step


def __getattr__(name: str):
    # SparsityCallback imports transformers' Trainer machinery: only when asked for.
    if name in ("SparsityCallback", "MASKS_FILE"):
        from . import hf_trainer

        return getattr(hf_trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MASKS_FILE", "SparsityCallback", "sparse_after_backward", "sparse_after_step"]
