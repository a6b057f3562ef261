"""Data: the pre-training corpus and its tokenizer, batches, and downstream tasks."""

from .corpus import CorpusError, TokenizedCorpus, prepare_corpus, read_documents
from .loader import eval_batches, get_batch
from .paths import data_root, default_corpus
from .tokenizer import EOS_TOKEN, train_tokenizer

__all__ = [
    "CorpusError", "EOS_TOKEN", "TokenizedCorpus", "data_root", "default_corpus", "eval_batches",
    "get_batch", "prepare_corpus", "read_documents", "train_tokenizer",
]
