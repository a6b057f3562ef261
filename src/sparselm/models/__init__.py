"""GPT models: named presets and Hugging Face GPT-2 construction."""

from .gpt import build_model, gpt2_config, load_model, shape_of
from .presets import PRESETS, ModelShape, get_preset

__all__ = ["PRESETS", "ModelShape", "build_model", "get_preset", "gpt2_config", "load_model", "shape_of"]
