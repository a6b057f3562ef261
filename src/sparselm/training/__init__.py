"""Training: one loop (``loop.py``) inside one phase skeleton (``engine.py``), driven by two phases,
sparse pre-training and fine-tuning; run-directory and resume policy in ``rundir.py``."""

from .config import (
    FINETUNE_MODES as MODES, FinetuneConfig, PretrainConfig, PruneConfig,
    load_finetune_config, load_pretrain_config,
)
from .finetuning import finetune
from .loop import TrainingInterrupted
from .rundir import RunExistsError
from .pretraining import pretrain

__all__ = [
    "MODES", "FinetuneConfig", "PretrainConfig", "PruneConfig", "RunExistsError",
    "TrainingInterrupted", "finetune", "load_finetune_config", "load_pretrain_config", "pretrain",
]
