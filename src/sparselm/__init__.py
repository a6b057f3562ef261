"""sparselm: Sparse Pre-training and Dense Fine-tuning (SPDF) of GPT-style language models."""

__version__ = "0.1.0"
