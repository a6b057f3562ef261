"""Model shapes, the registry of model families (GPT-2, Llama), and building/loading HF models."""

from .family import (
    FAMILIES, BlockLinear, ModelFamily, block_linear_names, build_model, context_length, family_for_config, get_family,
    load_model, lora_config_kwargs, register_family, shape_of, shape_of_dir,
)
from .presets import PRESETS, ModelShape, get_preset
from . import gpt2, llama  # noqa: F401  (each registers its family)

__all__ = [
    "FAMILIES", "PRESETS", "BlockLinear", "ModelFamily", "ModelShape", "block_linear_names", "build_model", "context_length",
    "family_for_config", "get_family", "get_preset", "load_model", "lora_config_kwargs", "register_family",
    "shape_of", "shape_of_dir",
]
