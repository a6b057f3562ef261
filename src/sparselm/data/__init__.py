"""Data: the pre-training corpus and its tokenizer, batches, and downstream tasks."""

from .corpus import CorpusError, TokenizedCorpus, prepare_corpus, read_documents
from .loader import eval_batches, get_batch
from .paths import data_root, default_corpus
from .tasks import TASKS, Task, TaskData, TaskDataError, get_task, load_task, register_task
from .tokenizer import EOS_TOKEN, train_tokenizer

__all__ = [
    "CorpusError", "EOS_TOKEN", "TASKS", "Task", "TaskData", "TaskDataError", "TokenizedCorpus", "data_root",
    "default_corpus", "eval_batches", "get_batch", "get_task", "load_task", "prepare_corpus", "read_documents",
    "register_task", "train_tokenizer",
]
