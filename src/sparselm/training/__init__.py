"""Training loops: sparse pre-training and (dense or sparse) fine-tuning."""

from .config import PRESET_TRAINING, PretrainConfig, load_config
from .pretraining import RunExistsError, pretrain

__all__ = ["PRESET_TRAINING", "PretrainConfig", "RunExistsError", "load_config", "pretrain"]
