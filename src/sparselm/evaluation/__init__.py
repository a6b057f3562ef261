"""Evaluation: beam-search generation and the standard NLG metrics."""

from .generate import DecodingConfig, generate
from .metrics import TASK_METRICS, score

__all__ = ["DecodingConfig", "TASK_METRICS", "generate", "score"]
