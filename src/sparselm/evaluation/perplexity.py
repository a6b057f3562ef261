"""Perplexity as the pruning literature reports it: exp of the mean next-token NLL over
non-overlapping windows of a held-out text.

Wanda's and SparseGPT's ``eval_ppl`` tokenize the whole test text once, cut it into ``len // seqlen``
windows (the shorter tail is dropped), score the ``seqlen - 1`` predicted tokens of each window (no
context carried between windows) and report ``exp(total NLL / tokens scored)``. ``perplexity`` does
the same on any model; ``eval_tokens`` reads the text (a file, or a prepared corpus's validation
split); ``evaluate_perplexity`` is ``sparselm evaluate --task perplexity``: it writes the result as
``perplexity-<data>-<seqlen>.json`` beside the task evaluations, where the model card finds it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..files import write_json
from ..models import context_length
from ..models.loss import chunked_cross_entropy

TASK = "perplexity"
CHUNK_CHARS = 1 << 20  # text tokenized per call: memory stays bounded on large files
NEEDS_WHOLE_TEXT = ("Metaspace", "Prepend")  # SentencePiece-style: each call's text gets a leading "▁"


def eval_tokens(data: str | Path, tokenizer, *, cache_dir=None) -> torch.LongTensor:
    """The 1-D token ids of ``data``: a text file (all of it, with the model's ``tokenizer``; its
    special tokens, e.g. a BOS, once at the start, as tokenizing the file at once does; no EOS added)
    or a ``sparselm data prepare`` directory (its validation split, EOS between documents, refused if
    prepared with another tokenizer). A file's ids are cached under ``cache_dir`` (default
    ``$SPARSELM_CACHE``), keyed by its path, size, mtime and the tokenizer."""
    from ..data.corpus import TokenizedCorpus, default_cache_dir
    from ..data.prepare import is_prepared
    from ..data.tokenizer import tokenizer_hash

    path = Path(data)
    if path.is_dir():
        if not is_prepared(path):
            raise ValueError(f"{path} is not a prepared corpus (no sparselm manifest.json); pass a text file or "
                             f"prepare it: sparselm data prepare --corpus {path} --tokenizer MODEL_DIR --out DIR")
        corpus = TokenizedCorpus.load(path)
        corpus.check_tokenizer(tokenizer, getattr(tokenizer, "name_or_path", "") or "MODEL_DIR")
        return torch.from_numpy(np.concatenate([b.astype(np.int64) for b in corpus.val().blocks()]))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file or directory; pass a text file or a prepared corpus directory")
    st = path.stat()
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{tokenizer_hash(tokenizer.backend_tokenizer)}:{CHUNK_CHARS}"
    cached = Path(cache_dir or default_cache_dir()) / "eval-tokens" / (hashlib.sha1(key.encode()).hexdigest()[:16] + ".npy")
    if cached.is_file():
        return torch.from_numpy(np.load(cached).astype(np.int64))
    ids = tokenize_file(path, tokenizer)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, ids.astype(np.uint32))
    os.replace(tmp, cached)
    return torch.from_numpy(ids)


def tokenize_file(path: Path, tokenizer) -> np.ndarray:
    """A file's token ids, tokenized in pieces of about ``CHUNK_CHARS`` that give the ids of the
    whole text: a piece ends with a newline right after a non-space character and the next starts
    with a non-space one, where byte-level BPE pre-tokenizers (GPT-2's, Llama 3's, sparselm's)
    always split. Tokenizers that prefix every call's text (SentencePiece's "▁") get the whole file."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    size = None if any(k in json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")]) for k in NEEDS_WHOLE_TEXT) \
        else CHUNK_CHARS
    parts = []
    try:
        for i, text in enumerate(text_pieces(path, size)):
            parts.append(np.asarray(tokenizer(text, add_special_tokens=i == 0, verbose=False).input_ids, dtype=np.int64))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start} of a piece); convert it to UTF-8") from None
    if not parts or not sum(p.size for p in parts):
        raise ValueError(f"{path} holds no text; pass a held-out text file")
    return np.concatenate(parts)


def text_pieces(path: Path, size: int | None):
    """The file's text in order, cut only between a line ending in ``<non-space>\\n`` and a line
    starting with a non-space character, once a piece has ``size`` characters (None: never)."""
    with open(path, encoding="utf-8", newline="") as fh:
        piece, n, prev = [], 0, ""
        for line in fh:
            if size is not None and n >= size and line[:1].strip() and prev.endswith("\n") and prev[-2:-1].strip():
                yield "".join(piece)
                piece, n = [], 0
            piece.append(line)
            n += len(line)
            prev = line
        if piece:
            yield "".join(piece)


@torch.no_grad()
def perplexity(model, tokens: torch.LongTensor, seqlen: int, *, device="cpu", batch_size: int = 8, progress=False,
               vocab_size: int | None = None) -> dict:
    """Perplexity of ``model`` (already on ``device``) on ``tokens`` (1-D): ``len // seqlen``
    non-overlapping windows, the tail shorter than ``seqlen`` dropped, the ``seqlen - 1`` next tokens
    of each window scored; ``ppl = exp(nll)``, ``nll`` the mean over all scored tokens. ``vocab_size``
    leaves the logit columns from it on out of the softmax (a sparselm model's padding rows, as its
    validation loss does); None (default) uses all, as the references do."""
    from tqdm.auto import tqdm

    tokens = torch.as_tensor(tokens).reshape(-1)
    check_seqlen(seqlen, model)
    n_windows = tokens.numel() // seqlen
    if n_windows == 0:
        raise ValueError(f"{tokens.numel()} tokens, fewer than one window of seqlen={seqlen}; use more text or a smaller --seqlen")
    windows = tokens[: n_windows * seqlen].view(n_windows, seqlen)
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for i in tqdm(range(0, n_windows, batch_size), disable=not progress, desc="perplexity", unit="batch"):
            x = windows[i: i + batch_size].to(device)
            logits = model(input_ids=x, use_cache=False).logits
            targets = F.pad(x[:, 1:], (0, 1), value=-100)  # the last position predicts nothing in its window
            total += chunked_cross_entropy(logits, targets, vocab_size, reduction="sum").item()
    finally:
        model.train(was_training)
    scored = n_windows * (seqlen - 1)
    nll = total / scored
    return {"ppl": math.exp(nll), "nll": nll, "n_windows": n_windows, "n_tokens_scored": scored, "seqlen": seqlen,
            "n_tokens_dropped": tokens.numel() - n_windows * seqlen}


def check_seqlen(seqlen: int, model) -> None:
    context = context_length(model)
    if not 2 <= seqlen <= context:
        raise ValueError(f"seqlen={seqlen}: must be between 2 and the model's context of {context} tokens")


def evaluate_perplexity(model_dir: str | Path, data: str | Path, seqlen: int | None = None, *, device="cpu",
                        batch_size: int = 8, progress=False, out: str | Path | None = None, cache_dir=None,
                        tokens: torch.LongTensor | None = None) -> dict:
    """Write ``perplexity-<data name>-<seqlen>.json`` into ``out`` (default: ``eval/`` of a sparselm
    run, whose model card then shows it) and return the result. ``seqlen``: default the model's context.
    ``tokens``: ``eval_tokens(data, ...)`` already read (a sweep reads them once for all its runs)."""
    from ..models.card import write_card
    from ..models.runs import load_run
    from .evaluate import is_sparselm_run

    model_dir = Path(model_dir)
    if out is None and not is_sparselm_run(model_dir):
        raise ValueError(f"{model_dir} is not a run sparselm made (no summary.json); pass --out DIR for the "
                         "evaluation files: a model directory from elsewhere is never written to")
    model, tok, _, _ = load_run(model_dir)
    model.to(device)
    seqlen = seqlen or context_length(model)
    check_seqlen(seqlen, model)  # before the text is read
    path = perplexity_path(model_dir, data, seqlen, out)
    t0 = time.time()
    if tokens is None:
        tokens = eval_tokens(data, tok, cache_dir=cache_dir)
    result = {"task": TASK, "data": str(data), "model": str(model_dir), **perplexity(
        model, tokens, seqlen, device=device, batch_size=batch_size, progress=progress), "time_s": time.time() - t0}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result)
    if path.parent == model_dir / "eval":
        write_card(model_dir)
    return result


def perplexity_path(model_dir: str | Path, data: str | Path, seqlen: int, out: str | Path | None = None) -> Path:
    """``perplexity-<data name>-<seqlen>.json`` in ``out``, or in ``eval/`` of the run. The data name
    is the file's stem (``wiki.test.raw`` -> ``wiki.test``) or the directory's name."""
    data = Path(data)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", data.name if data.is_dir() else data.stem) or "data"
    folder = Path(model_dir) / "eval" if out is None else Path(out)
    return folder / f"{TASK}-{name}-{seqlen}.json"


def format_perplexity(result: dict) -> str:
    return (f"perplexity on {result['data']}: {result['ppl']:.3f} (nll {result['nll']:.4f}; {result['n_windows']} windows "
            f"of {result['seqlen']} tokens, {result['n_tokens_scored']:,} tokens scored, "
            f"{result['n_tokens_dropped']} tail tokens dropped)")
