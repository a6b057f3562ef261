"""Corpus-level NLG metrics, computed the way each task's official scorer computes them.

- E2E (tuetschek/e2e-metrics): BLEU and NIST from NIST's ``mteval-v13a.pl`` (lower-cased, its own
  tokenisation, references padded with empty strings to the largest reference count, one
  document), ported here because no maintained package implements NIST; METEOR 1.5, ROUGE-L and
  CIDEr(-D) from ``pycocoevalcap`` after its PTB tokenisation, as the E2E scorer runs them.
- WebNLG / DART: BLEU and TER from ``sacrebleu`` (13a tokenisation, cased) and METEOR 1.5.

BLEU, METEOR, ROUGE-L and TER are reported in 0-100 (the papers' tables); NIST and CIDEr as is.

Each metric is a ``Metric`` in ``METRICS`` (``register_metric`` adds one); a task lists the metrics
it is scored with, and ``score`` computes them.

Only the mteval port needs nothing beyond the core install. sacrebleu and pycocoevalcap come with
the ``eval`` extra (``pip install 'sparselm[eval]'``), and METEOR and the PTB tokenizer are Java
programs. A scorer that cannot run here raises ``MetricUnavailable``; ``score`` then leaves its
metrics out, reports why (``skipped``) and logs it once, so the metrics that can be computed still are.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from .._optional import MissingExtra, require
from ..data.tasks import Task, get_task
from ..registry import Registry

log = logging.getLogger(__name__)


class MetricUnavailable(RuntimeError):
    """A scorer that cannot run on this machine (a missing extra, no Java); the message is the reason,
    e.g. "needs Java (java not on PATH): ..." or "needs sacrebleu: pip install 'sparselm[eval]'"."""


# ---- mteval-v13a port ------------------------------------------------------------------------
_PUNCT = re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])")
_PERIOD_COMMA_AFTER = re.compile(r"([^0-9])([\.,])")
_PERIOD_COMMA_BEFORE = re.compile(r"([\.,])([^0-9])")
_DASH_AFTER_DIGIT = re.compile(r"([0-9])(-)")
_SPACES = re.compile(r"\s+")


def mteval_tokenize(text: str, preserve_case: bool = False) -> list[str]:
    """``tokenization`` of mteval-v13a.pl (its default, non-international rules)."""
    t = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    t = t.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    t = f" {t} "
    if not preserve_case:
        t = t.translate(str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz"))
    t = _PUNCT.sub(r" \1 ", t)
    t = _PERIOD_COMMA_AFTER.sub(r"\1 \2 ", t)
    t = _PERIOD_COMMA_BEFORE.sub(r" \1 \2", t)
    t = _DASH_AFTER_DIGIT.sub(r"\1 \2 ", t)
    return _SPACES.sub(" ", t).strip().split()


def _ngrams(words: list[str], max_n: int) -> Counter:
    c: Counter = Counter()
    for i in range(len(words)):
        for n in range(1, min(max_n, len(words) - i) + 1):
            c[tuple(words[i : i + n])] += 1
    return c


def _closest(current: int, ref_len: int, hyp_len: int) -> int:
    """brevity_penalty_closest: nearest reference length, the shorter one on ties."""
    if abs(hyp_len - ref_len) < abs(hyp_len - current):
        return ref_len
    if abs(hyp_len - ref_len) == abs(hyp_len - current) and current > ref_len:
        return ref_len
    return current


def _nist_length_penalty(ratio: float) -> float:
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    beta = -math.log(0.5) / math.log(1.5) / math.log(1.5)
    return math.exp(-beta * math.log(ratio) ** 2)


def mteval_bleu_nist(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> dict[str, float]:
    """System-level BLEU (0-100) and NIST as the E2E scorer computes them: mteval-v13a-sig.pl with
    references padded by empty segments, which take no part in BLEU's closest reference length nor
    in NIST's average reference length (so a short or degenerate output is penalised as it should)."""
    segments, nist = _mteval(hyps, refs)
    return {"bleu": mteval_bleu_from_stats([sum(col) for col in zip(*segments)]), "nist": nist}


def mteval_bleu_segments(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> list[list[int]]:
    """Per-segment BLEU statistics ``[ref_len, match_1..4, hyp_ngrams_1..4]``: summed over any subset
    of segments they give that subset's corpus BLEU (``mteval_bleu_from_stats``), for bootstrapping."""
    return _mteval(hyps, refs)[0]


def mteval_bleu_from_stats(totals: Sequence[float]) -> float:
    """mteval's corpus BLEU (0-100, with its smoothing of n-gram orders without a match) from summed
    segment statistics."""
    ref_len, match, tst = totals[0], totals[1:5], totals[5:9]
    if tst[0] <= 0:
        return 0.0
    bp = math.exp(min(0.0, 1.0 - ref_len / tst[0]))
    log_sum, smooth = 0.0, 1
    for m, t in zip(match, tst):
        if t == 0:
            iscore = 0.0
        elif m == 0:
            smooth *= 2
            iscore = math.log(1.0 / (smooth * t))
        else:
            iscore = math.log(m / t)
        log_sum += iscore
    return 100.0 * math.exp(log_sum / 4) * bp


def _mteval(hyps, refs) -> tuple[list[list[int]], float]:
    """(per-segment BLEU statistics, system NIST) of mteval-v13a-sig with padded references."""
    _check_lengths(hyps, refs)
    max_n = 9
    n_sys = max(len(r) for r in refs)
    padded = [list(r) + [""] * (n_sys - len(r)) for r in refs]
    tok_refs = [[mteval_tokenize(r) for r in rs] for rs in padded]
    tok_hyps = [mteval_tokenize(h) for h in hyps]

    # information weights from all reference n-grams (compute_ngram_info)
    counts: Counter = Counter()
    total_words = 0
    for rs in tok_refs:
        for r in rs:
            total_words += len(r)
            counts.update(_ngrams(r, max_n))
    info = {}
    for g, c in counts.items():
        denom = counts[g[:-1]] if len(g) > 1 else total_words
        info[g] = -math.log(c / denom) / math.log(2)

    segments = []
    nonempty_refs = 0  # mteval-v13a-sig: padding references do not count as references
    tst = [0] * (max_n + 1)
    ref_cnt1 = 0
    tst_info = [0.0] * (max_n + 1)
    for hyp, rs in zip(tok_hyps, tok_refs):
        hyp_ngrams = _ngrams(hyp, max_n)
        seg_tst = [max(0, len(hyp) - n + 1) for n in range(max_n + 1)]
        for n in range(1, max_n + 1):
            tst[n] += seg_tst[n]
        ref_max: dict = {}
        ref_len = None
        for r in rs:
            for g, c in _ngrams(r, max_n).items():
                ref_max[g] = max(ref_max.get(g, 0), c)
            ref_cnt1 += len(r)
            nonempty_refs += bool(r)
            if ref_len is None:
                ref_len = len(r)
            elif r:  # -sig: an empty (padding) reference is never the closest length
                ref_len = _closest(ref_len, len(r), len(hyp))
        seg_match = [0] * (max_n + 1)
        for g, c in hyp_ngrams.items():
            if g in ref_max:
                m = min(c, ref_max[g])
                seg_match[len(g)] += m
                tst_info[len(g)] += info[g] * m
        segments.append([ref_len, *seg_match[1:5], *seg_tst[1:5]])

    # nist_score over 1..5-grams; -sig: the average reference length is over each segment's non-empty references
    nist = sum(tst_info[n] / max(tst[n], 1) for n in range(1, 6))
    nist *= _nist_length_penalty(tst[1] / (ref_cnt1 / (nonempty_refs / len(tok_hyps)))) if ref_cnt1 else 0.0
    return segments, nist


# ---- pycocoevalcap: METEOR 1.5, ROUGE-L, CIDEr -------------------------------------------------
def java_available() -> bool:
    return shutil.which("java") is not None


_NO_JAVA = ("needs Java (java not on PATH): METEOR 1.5 and the PTB tokenizer that ROUGE-L and CIDEr are "
            "scored after are Java programs; install a JRE, e.g. apt-get install default-jre-headless")


def _coco_modules():
    """pycocoevalcap's scorers and tokenizer, or ``MetricUnavailable`` saying what is missing
    (pycocoevalcap, Java or both)."""
    reasons, modules = [], None
    try:
        modules = [require(f"pycocoevalcap.{m}", "eval", "METEOR, ROUGE-L and CIDEr")
                   for m in ("cider.cider", "meteor.meteor", "rouge.rouge", "tokenizer.ptbtokenizer")]
    except MissingExtra as e:
        reasons.append(e.reason)
    if not java_available():
        reasons.append(_NO_JAVA)
    if reasons:
        raise MetricUnavailable("; ".join(reasons))
    cider, meteor, rouge, ptb = modules
    return cider.Cider, meteor.Meteor, rouge.Rouge, ptb.PTBTokenizer


def coco_scores(hyps: Sequence[str], refs: Sequence[Sequence[str]], tokenize: bool = True) -> dict[str, float]:
    """METEOR (0-100), ROUGE-L (0-100) and CIDEr as the E2E scorer's COCO evaluator computes them,
    all three from one PTB tokenisation (ROUGE-L and CIDEr add under a second to METEOR). Needs
    pycocoevalcap (the ``eval`` extra) and Java (METEOR and the PTB tokenizer are Java programs
    shipped in pycocoevalcap): without either, ``MetricUnavailable``."""
    _check_lengths(hyps, refs)
    Cider, Meteor, Rouge, PTBTokenizer = _coco_modules()

    gts = {i: [{"caption": r} for r in rs] for i, rs in enumerate(refs)}
    res = {i: [{"caption": h}] for i, h in enumerate(hyps)}
    if tokenize:
        tok = PTBTokenizer()
        with _stderr_to_devnull():  # the Java tokenizer reports its speed on stderr
            gts, res = tok.tokenize(gts), tok.tokenize(res)
    else:
        gts = {i: [c["caption"] for c in v] for i, v in gts.items()}
        res = {i: [c["caption"] for c in v] for i, v in res.items()}
    scorer = Meteor()
    try:
        meteor = 100.0 * float(scorer.compute_score(gts, res)[0])
    finally:
        _close_meteor(scorer)
    return {"meteor": meteor, "rouge_l": 100.0 * float(Rouge().compute_score(gts, res)[0]),
            "cider": float(Cider().compute_score(gts, res)[0])}


@contextlib.contextmanager
def _stderr_to_devnull():
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _close_meteor(scorer) -> None:
    proc = getattr(scorer, "meteor_p", None)
    if proc is not None and proc.poll() is None:
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except Exception:
                pass
        proc.kill()
        proc.wait()


# ---- sacrebleu: BLEU, TER --------------------------------------------------------------------
def _ref_streams(refs: Sequence[Sequence[str]]) -> list[list[str | None]]:
    n = max(len(r) for r in refs)
    return [[rs[k] if k < len(rs) else None for rs in refs] for k in range(n)]


def sacrebleu_scores(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> dict[str, float]:
    """BLEU and TER (both 0-100) with sacrebleu's defaults (13a tokenisation, cased). Needs sacrebleu
    (the ``eval`` extra): without it, ``MetricUnavailable``."""
    _check_lengths(hyps, refs)
    try:
        sacrebleu_metrics = require("sacrebleu.metrics", "eval", "BLEU and TER by sacrebleu")
    except MissingExtra as e:
        raise MetricUnavailable(e.reason) from e
    BLEU, TER = sacrebleu_metrics.BLEU, sacrebleu_metrics.TER

    streams = _ref_streams(refs)
    return {"bleu": float(BLEU().corpus_score(list(hyps), streams).score),
            "ter": float(TER().corpus_score(list(hyps), streams).score)}


# ---- the registry ------------------------------------------------------------------------------
Scorer = Callable[[Sequence[str], Sequence[Sequence[str]]], dict[str, float]]


@dataclass(frozen=True)
class Metric:
    """A score in results, declared once: its key, its name in tables, which way is better, and how
    it is computed.

    ``scorers``: implementation name -> ``(hyps, refs) -> {metric name: value}``. The first is the
    default; a task picks another by name (``Task.scorers``). Metrics computed together declare the
    same function (mteval: BLEU, NIST; sacrebleu: BLEU, TER; COCO: METEOR, ROUGE-L, CIDEr), which
    ``score`` calls once. No scorers: not computed from outputs (``val_ppl``, added by ``evaluate``).
    """

    name: str
    display: str
    higher_is_better: bool
    scorers: Mapping[str, Scorer] = field(default_factory=dict)


METRICS: Registry[Metric] = Registry("metric", entry_points="sparselm.metrics")


@METRICS.registrar
def register_metric(metric: Metric, replace: bool = False) -> Metric:
    """Make ``metric`` usable in task declarations and reports; a second metric of the same name is
    an error unless ``replace``."""
    return METRICS.register(metric.name, metric, replace)


get_metric = METRICS.lookup


_MTEVAL = {"mteval": mteval_bleu_nist}
_SACREBLEU = {"sacrebleu": sacrebleu_scores}
_COCO = {"coco": coco_scores}
register_metric(Metric("bleu", "BLEU", True, {**_SACREBLEU, **_MTEVAL}))
register_metric(Metric("nist", "NIST", True, _MTEVAL))
register_metric(Metric("meteor", "METEOR", True, _COCO))
register_metric(Metric("rouge_l", "ROUGE-L", True, _COCO))
register_metric(Metric("cider", "CIDEr", True, _COCO))
register_metric(Metric("ter", "TER", False, _SACREBLEU))
register_metric(Metric("val_ppl", "val PPL", False))


def score(task: str, hyps: Sequence[str], refs: Sequence[Sequence[str]],
          skipped: dict[str, str] | None = None) -> dict[str, float]:
    """The task's metrics in its order, each from the task's official implementation; an
    implementation giving several metrics runs once.

    A metric whose implementation cannot run here (``MetricUnavailable``: a missing extra, no Java)
    is left out of the result: its reason goes into ``skipped`` (metric name -> reason) when given,
    and is logged once per process."""
    declared = get_task(task)
    computed: dict[Scorer, dict[str, float] | MetricUnavailable] = {}
    out: dict[str, float] = {}
    missing: dict[str, str] = {}
    for name in declared.metrics:
        scorer = _scorer_for(declared, get_metric(name))
        if scorer not in computed:
            try:
                computed[scorer] = scorer(hyps, refs)
            except MetricUnavailable as e:
                computed[scorer] = e
        if isinstance(computed[scorer], MetricUnavailable):
            missing[name] = str(computed[scorer])
        else:
            out[name] = computed[scorer][name]
    for reason in dict.fromkeys(missing.values()):
        names = ", ".join(get_metric(n).display for n, r in missing.items() if r == reason)
        if (names, reason) not in _LOGGED:
            _LOGGED.add((names, reason))
            log.warning("%s skipped: %s", names, reason)
    if skipped is not None:
        skipped.update(missing)
    return out


_LOGGED: set[tuple[str, str]] = set()  # (metrics, reason) already logged by ``score``


def _scorer_for(task: Task, metric: Metric) -> Scorer:
    if not metric.scorers:
        raise ValueError(f"task {task.name}: metric {metric.name!r} is not computed from outputs")
    impl = task.scorers.get(metric.name, next(iter(metric.scorers)))
    if impl not in metric.scorers:
        raise ValueError(f"task {task.name}: metric {metric.name!r} has no implementation {impl!r}; "
                         f"it has {sorted(metric.scorers)}")
    return metric.scorers[impl]


def _check_lengths(hyps, refs) -> None:
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} reference sets")
    if not hyps:
        raise ValueError("nothing to score: no hypotheses")
    if any(len(r) == 0 for r in refs):
        raise ValueError("every hypothesis needs at least one reference")
