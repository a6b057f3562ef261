"""Data: the pre-training corpus (sources, tokenizer, token shards), batches, and downstream tasks."""

from .corpus import CorpusError, TokenizedCorpus, read_documents
from .loader import eval_batches, get_batch
from .paths import data_root, default_corpus
from .prepare import prepare_corpus
from .shards import ShardedTokens
from .tasks import TASKS, Task, TaskData, TaskDataError, get_task, load_task, register_task
from .tokenizer import EOS_TOKEN, TokenizerError, train_tokenizer

__all__ = [
    "CorpusError", "EOS_TOKEN", "ShardedTokens", "TASKS", "Task", "TaskData", "TaskDataError", "TokenizedCorpus",
    "TokenizerError", "data_root", "default_corpus", "eval_batches", "get_batch", "get_task", "load_task",
    "prepare_corpus", "read_documents", "register_task", "train_tokenizer",
]
