"""How sure a BLEU number is: bootstrap confidence intervals over test inputs and paired bootstrap
tests between two systems on the same inputs (Koehn 2004).

Corpus BLEU is not a mean of per-input scores, so inputs are resampled and corpus BLEU recomputed
from per-input sufficient statistics (n-gram matches and counts, lengths), with each task's own BLEU
implementation: the E2E scorer's mteval-v13a-sig, or sacrebleu.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..data.tasks import get_task
from .metrics import mteval_bleu_from_stats, mteval_bleu_segments

RESAMPLES = 1000
LEVEL = 0.95


def _implementation(task: str) -> str:
    return get_task(task).scorers.get("bleu", "sacrebleu")


def bleu_segments(task: str, hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> np.ndarray:
    """Per-input BLEU statistics (rows), by the task's BLEU implementation."""
    if _implementation(task) == "mteval":
        return np.asarray(mteval_bleu_segments(hyps, refs), dtype=np.float64)
    from sacrebleu.metrics import BLEU

    n = max(len(r) for r in refs)
    streams = [[rs[k] if k < len(rs) else None for rs in refs] for k in range(n)]
    return np.asarray(BLEU()._extract_corpus_statistics(list(hyps), streams), dtype=np.float64)


def bleu_from_segments(task: str, totals: np.ndarray) -> float:
    """Corpus BLEU (0-100) from summed per-input statistics."""
    if _implementation(task) == "mteval":
        return mteval_bleu_from_stats(totals)
    from sacrebleu.metrics import BLEU

    return float(BLEU()._compute_score_from_stats([int(x) for x in totals]).score)


def _resample(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap_ci(task: str, segments: np.ndarray, resamples: int = RESAMPLES, level: float = LEVEL,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of corpus BLEU over inputs."""
    idx = _resample(len(segments), resamples, seed)
    scores = np.array([bleu_from_segments(task, segments[i].sum(0)) for i in idx])
    tail = (1.0 - level) / 2 * 100
    return float(np.percentile(scores, tail)), float(np.percentile(scores, 100 - tail))


def paired_bootstrap(task: str, a: np.ndarray, b: np.ndarray, resamples: int = RESAMPLES, level: float = LEVEL,
                     seed: int = 0) -> dict:
    """Is system ``a`` different from ``b`` on the same inputs (rows paired)? The BLEU difference
    a - b, its bootstrap interval, and the two-sided p-value (share of resamples whose difference
    falls on the other side of zero, doubled)."""
    if a.shape != b.shape:
        raise ValueError(f"paired bootstrap needs the same inputs: {a.shape[0]} vs {b.shape[0]} rows")
    delta = bleu_from_segments(task, a.sum(0)) - bleu_from_segments(task, b.sum(0))
    idx = _resample(len(a), resamples, seed)
    diffs = np.array([bleu_from_segments(task, a[i].sum(0)) - bleu_from_segments(task, b[i].sum(0)) for i in idx])
    tail = (1.0 - level) / 2 * 100
    p = min(1.0, 2 * min(np.mean(diffs <= 0), np.mean(diffs >= 0)))
    return {"delta": delta, "ci": [float(np.percentile(diffs, tail)), float(np.percentile(diffs, 100 - tail))],
            "p_value": float(p), "level": level, "resamples": resamples, "n_inputs": int(len(a))}
