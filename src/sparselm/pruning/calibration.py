"""Calibration tokens for one-shot pruning: ``[nsamples, seqlen]`` token ids from what a user has.

Wanda and SparseGPT choose weights by the activations of a few calibration sequences (128 windows of
the model's context in their papers). Sources, all seeded with ``numpy.random.default_rng(seed)``:

- ``"corpus"``: the train split of the corpus the run ``run_dir`` was pre-trained on (followed back
  through ``pruned_from`` / ``source_run`` of pruned and fine-tuned runs), found in the cache the way
  pre-training found it (``prepare_run_corpus``; prepared again if the cache was deleted);
- a directory written by ``sparselm data prepare``: its train split (one named ``corpus``: pass
  ``"./corpus"`` or a ``Path``);
- ``"task:NAME"``: the task's training pairs as fine-tuning encodes them (``prompt + target + EOS``,
  no context cut), concatenated in a seeded shuffled order;
- ``FILE.npy``: an integer array ``[n, seqlen]`` used exactly as given, so that a result can be
  compared with another implementation on identical inputs.

Windows of the first three are ``tokens[s : s + seqlen]`` with each start ``s`` drawn uniformly from
``[0, N - seqlen]`` (inclusive; draws are independent, so windows may overlap), after the task's
shuffle when there is one. The references draw a random document first, then a window in it; here
the whole token stream is one sequence, so documents (joined by EOS) may share a window.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

NSAMPLES = 128  # the default of Wanda's and SparseGPT's reference code
TASK_PREFIX = "task:"
MAX_HOPS = 8  # pruned -> fine-tuned -> ... chains followed back to the pre-training run


class CalibrationError(ValueError):
    """Calibration data that cannot be used as asked; the message names the source and the fix."""


def calibration_tokens(source: str | Path, tokenizer, vocab_size: int, *, nsamples: int | None = None,
                       seqlen: int | None = None, context: int, seed: int = 0, run_dir: str | Path | None = None,
                       cache_dir=None, task_dir: str | Path | None = None) -> torch.LongTensor:
    """``[nsamples, seqlen]`` int64 token ids (defaults: 128 windows of ``context`` tokens; a
    ``.npy`` file's own shape). ``tokenizer``: the model's (an HF tokenizer); a prepared corpus made
    with another one is refused. ``vocab_size``: the model's; every id must be below it.
    ``cache_dir``: where prepared corpora are looked up (default: the run's, else ``$SPARSELM_CACHE``).
    ``task_dir``: the task's folder for ``task:NAME`` (default: its folder in the shared data)."""
    is_path = isinstance(source, Path)  # a Path is never the keyword: Path("./corpus") prints as "corpus"
    source = str(source)
    if source.endswith(".npy"):
        return npy_tokens(Path(source), vocab_size, context, nsamples, seqlen)
    n = NSAMPLES if nsamples is None else nsamples
    length = context if seqlen is None else seqlen
    if n < 1:
        raise CalibrationError(f"nsamples={n}: need at least 1 calibration window")
    if not 1 <= length <= context:
        raise CalibrationError(f"seqlen={length}: must be between 1 and the model's context of {context} tokens")
    rng = np.random.default_rng(seed)
    if source.startswith(TASK_PREFIX) and not is_path:
        tokens, what = task_stream(source.removeprefix(TASK_PREFIX), tokenizer, rng, task_dir), "training pairs"
    else:
        tokens, what = corpus_stream(source, tokenizer, run_dir, cache_dir, is_path), "train split"
    windows = random_windows(tokens, n, length, rng, source)
    log.info("calibration: %d windows of %d tokens from %s (%s, %s tokens), seed %d", n, length, source, what,
             f"{len(tokens):,}", seed)
    top = int(windows.max())
    if top >= vocab_size:
        raise CalibrationError(f"calibration source {source}: token id {top} is outside the model's vocabulary of "
                               f"{vocab_size}; use data tokenized with the model's tokenizer")
    return torch.from_numpy(windows)


def random_windows(tokens, n: int, seqlen: int, rng: np.random.Generator, source: str) -> np.ndarray:
    """``n`` windows ``tokens[s : s + seqlen]``, each ``s`` uniform in ``[0, len - seqlen]``, as int64.
    ``tokens``: anything with ``len`` and slices (an array, a split's shards)."""
    total = len(tokens)
    if total < seqlen + 1:
        raise CalibrationError(f"calibration source {source} has {total} tokens, fewer than seqlen + 1 = {seqlen + 1}; "
                               "use more text or a smaller --seqlen")
    starts = rng.integers(0, total - seqlen, size=n, endpoint=True)
    return np.stack([np.asarray(tokens[s: s + seqlen], dtype=np.int64) for s in starts])


def npy_tokens(path: Path, vocab_size: int, context: int, nsamples: int | None, seqlen: int | None) -> torch.LongTensor:
    """The array in ``path`` as int64, exactly as given, after checking it fits the model."""
    fix = "save the token ids as a 2-D integer array [nsamples, seqlen] with numpy.save"
    try:
        ids = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise CalibrationError(f"{path}: cannot read it as a .npy array ({e}); {fix}") from None
    if ids.ndim != 2:
        raise CalibrationError(f"{path}: an array of shape {ids.shape}, not 2-D [nsamples, seqlen]; {fix}")
    if ids.dtype.kind not in "iu":
        raise CalibrationError(f"{path}: dtype {ids.dtype}, not integer token ids; {fix} (e.g. ids.astype(numpy.int64))")
    if ids.size == 0:
        raise CalibrationError(f"{path}: empty array of shape {ids.shape}; {fix}")
    low, high = ids.min(), ids.max()
    if low < 0 or high >= vocab_size:
        raise CalibrationError(f"{path}: token ids from {low} to {high}, outside the model's vocabulary [0, {vocab_size}); "
                               "write the ids with the model's own tokenizer")
    if ids.shape[1] > context:
        raise CalibrationError(f"{path}: rows of {ids.shape[1]} tokens, longer than the model's context of {context}; "
                               f"save rows of at most {context} tokens")
    if nsamples not in (None, ids.shape[0]) or seqlen not in (None, ids.shape[1]):
        raise CalibrationError(f"{path} holds [{ids.shape[0]}, {ids.shape[1]}] token ids but nsamples={nsamples}, "
                               f"seqlen={seqlen} were asked for; a file is used exactly as given: leave --nsamples "
                               "and --seqlen unset or equal to its shape")
    return torch.from_numpy(ids.astype(np.int64))


def task_stream(name: str, tokenizer, rng: np.random.Generator, task_dir=None) -> np.ndarray:
    """The task's training pairs, each ``prompt ids + target ids + EOS`` (``encode_pairs`` without
    the context cut), concatenated in the order of ``rng.permutation``."""
    from ..data.tasks import load_task

    pairs = load_task(name, task_dir).pairs("train")
    prompts = tokenizer([p for p, _ in pairs], verbose=False).input_ids  # (the whole stream: no length warning)
    targets = tokenizer([t for _, t in pairs], verbose=False).input_ids
    eos = tokenizer.eos_token_id
    encoded = [p + t + [eos] for p, t in zip(prompts, targets)]
    return np.concatenate([np.asarray(encoded[k], dtype=np.int64) for k in rng.permutation(len(encoded))])


def corpus_stream(source: str, tokenizer, run_dir, cache_dir, is_path: bool = False):
    """The train split of ``"corpus"`` (the run's) or of a prepared directory, after the tokenizer check."""
    from ..data.corpus import TokenizedCorpus
    from ..data.prepare import is_prepared

    if source == "corpus" and not is_path:
        if run_dir is None:
            raise CalibrationError("calibration source 'corpus' needs the run it was pre-trained on (run_dir); "
                                   "or pass a prepared corpus directory, task:NAME or FILE.npy")
        corpus, model = run_corpus(run_dir, cache_dir), str(run_dir)
    elif Path(source).is_dir():
        if not is_prepared(source):
            raise CalibrationError(f"{source} is not a prepared corpus (no sparselm manifest.json); prepare it with "
                                   f"sparselm data prepare --corpus {source} --tokenizer MODEL_DIR --out DIR")
        corpus, model = TokenizedCorpus.load(source), str(run_dir or getattr(tokenizer, "name_or_path", "") or "MODEL_DIR")
    else:
        raise CalibrationError(f"calibration source {source!r}: not 'corpus', task:NAME, a prepared corpus directory "
                               "or an existing FILE.npy")
    corpus.check_tokenizer(tokenizer, model)
    return corpus.train()


def run_corpus(run_dir: str | Path, cache_dir=None):
    """The ``TokenizedCorpus`` the pre-training run behind ``run_dir`` trained on."""
    from .. import config
    from ..files import read_json
    from ..training.config import PretrainConfig
    from ..training.pretraining import prepare_run_corpus

    run = pretraining_run(Path(run_dir))
    saved = read_json(run / "train_config.json")
    if cache_dir is not None:
        saved.setdefault("data", {})["cache_dir"] = str(cache_dir)
    cfg = config.from_dict(PretrainConfig, saved, source=str(run / "train_config.json"))
    return prepare_run_corpus(cfg, log.info)


def pretraining_run(run_dir: Path) -> Path:
    """``run_dir``, or the run it was pruned or fine-tuned from, back to a sparselm pre-training run."""
    from ..files import read_json

    run = run_dir
    for _ in range(MAX_HOPS):
        summary = read_json(run / "summary.json") if (run / "summary.json").is_file() else {}
        parent = summary.get("pruned_from") or (summary.get("source_run") if summary.get("kind") == "finetune" else None)
        if parent:
            run = Path(parent)
            continue
        if summary.get("kind") == "pretrain" and (run / "train_config.json").is_file():
            return run
        break
    raise CalibrationError(f"{run_dir}: no sparselm pre-training run found behind it ({run} has no pre-training "
                           "summary.json and train_config.json), so its corpus is unknown; pass a prepared corpus "
                           "directory (sparselm data prepare --tokenizer MODEL_DIR --out DIR), task:NAME or FILE.npy")
