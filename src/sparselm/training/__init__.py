"""Training loops: sparse pre-training and (dense or sparse) fine-tuning."""

from .config import PRESET_TRAINING, PretrainConfig, load_config
from .finetuning import MODES, FinetuneConfig, finetune
from .pretraining import RunExistsError, pretrain

__all__ = ["MODES", "PRESET_TRAINING", "FinetuneConfig", "PretrainConfig", "RunExistsError", "finetune", "load_config", "pretrain"]
