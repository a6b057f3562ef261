"""Model shapes and presets, the registry of model families (one module each in ``families/``), and
building/loading HF models."""

from .family import (
    FAMILIES, BlockLinear, ModelFamily, block_linear_names, build_model, context_length, family_for_config, get_family,
    load_model, lora_config_kwargs, register_family, shape_of, shape_of_dir,
)
from .presets import PRESETS, ModelShape, Preset, get_preset, preset_training, register_preset
from . import families  # noqa: F401  (imports every family module: each registers its family and presets)

__all__ = [
    "FAMILIES", "PRESETS", "BlockLinear", "ModelFamily", "ModelShape", "Preset", "block_linear_names", "build_model",
    "context_length", "family_for_config", "get_family", "get_preset", "load_model", "lora_config_kwargs",
    "preset_training", "register_family", "register_preset", "shape_of", "shape_of_dir",
]
