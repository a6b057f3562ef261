"""Training loops: sparse pre-training and (dense or sparse) fine-tuning."""

from .config import PRESET_TRAINING, PretrainConfig, load_config
from .pretraining import RunExistsError, pretrain

__all__ = ["PRESET_TRAINING", "PretrainConfig", "RunExistsError", "load_config", "pretrain"]
from .finetuning import MODES, FinetuneConfig, finetune  # noqa: E402

__all__ += ["MODES", "FinetuneConfig", "finetune"]
