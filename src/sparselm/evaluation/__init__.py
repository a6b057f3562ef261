"""Evaluation: beam-search generation and the standard NLG metrics."""

from .generate import DecodingConfig, generate
from .metrics import METRICS, Metric, get_metric, register_metric, score

__all__ = ["DecodingConfig", "METRICS", "Metric", "generate", "get_metric", "register_metric", "score"]
