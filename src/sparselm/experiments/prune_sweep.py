"""Pruning sweeps: every method x sparsity (and N:M pattern) of one trained run, each pruned into
``DIR/<method>-s<NN>/`` (``-<N>of<M>`` for N:M), scored by perplexity on a held-out text, and drawn as
the essential-sparsity curve into ``DIR/sweep.json``, ``sweep.md`` and ``sweep.png``.

Essential sparsity (Jaiswal et al. 2023, "The Emergence of Essential Sparsity in Large Pre-trained
Models") is the sharp dropping point of one-shot pruning: up to it performance stays within about 1%
of the dense model, beyond it it falls much faster as sparsity rises. The rule used here
(``essential_sparsity``): a method's essential sparsity is the largest swept sparsity s such that the
perplexity at s, and at every lower swept sparsity, is at most ``(1 + tolerance) x`` the dense
perplexity (default tolerance 1%, the paper's); none when the lowest swept sparsity already exceeds
it. N:M points are drawn and tabled but take no part in the rule.

The calibration tokens and the held-out text are read once for every run. A run directory with a
``summary.json`` is finished and is not pruned again, one with its perplexity file is not evaluated
again, so a killed sweep resumes where it stopped; ``sweep.json`` records what the sweep compares (the
source, the held-out tokens, the calibration settings) and a different sweep in ``DIR`` is refused.
The dense model is evaluated in memory: nothing is written into the source run.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from .. import config
from .._optional import MissingExtra, require
from ..config import ConfigError
from ..files import read_json, write_json, write_text
from ..training.config import PruneConfig

log = logging.getLogger(__name__)

KNEE_TOLERANCE = 0.01  # the paper's "within 1% of dense"
SWEEP_FILE = "sweep.json"
# the settings that change a sweep's numbers: a sweep in DIR with others is a different sweep
SETTINGS = ("calibration", "nsamples", "seqlen", "seed", "distribution", "refine", "options", "refine_options",
            "true_sequential")


class SweepError(ConfigError):
    """A sweep that cannot run as asked; the message names the flag or directory and the fix."""


@dataclass(frozen=True)
class Point:
    """One run of a sweep: a method at an unstructured sparsity, or at an N:M pattern."""

    method: str
    sparsity: float  # fraction of zeros; 1 - N/M for an N:M point
    n_m: str | None = None

    @property
    def name(self) -> str:
        """The run directory's name: ``wanda-s50``, ``magnitude-s37.5``, ``sparsegpt-2of4``."""
        if self.n_m:
            n, m = self.n_m.split(":")
            return f"{self.method}-{n}of{m}"
        pct = round(100 * self.sparsity, 6)
        return f"{self.method}-s{int(pct):02d}" if pct.is_integer() else f"{self.method}-s{pct:g}"

    @property
    def level(self) -> str:
        """The table column: ``50%`` or ``2:4``."""
        return self.n_m or f"{round(100 * self.sparsity, 6):g}%"


def plan(methods: list[str], sparsities: list[float], n_ms: list[str]) -> list[Point]:
    """Every method at every sparsity, then at every N:M pattern (duplicates dropped, order kept)."""
    from ..sparsity import parse_n_m

    points = [Point(m, float(s)) for m in dict.fromkeys(methods) for s in dict.fromkeys(sparsities)]
    for m in dict.fromkeys(methods):
        for nm in dict.fromkeys(n_ms):
            n, k = parse_n_m(nm)
            points.append(Point(m, 1.0 - n / k, f"{n}:{k}"))
    return points


def essential_sparsity(curve: list[tuple[float, float]], dense_ppl: float, tolerance: float = KNEE_TOLERANCE):
    """The largest sparsity of ``curve`` (``(sparsity, ppl)`` pairs) whose perplexity, and that of every
    lower sparsity in it, is at most ``(1 + tolerance) * dense_ppl``; None if the lowest already exceeds it."""
    limit = (1.0 + tolerance) * dense_ppl
    knee = None
    for sparsity, ppl in sorted(curve):
        if not ppl <= limit:  # (a NaN perplexity ends the range too)
            break
        knee = sparsity
    return knee


def rule_text(tolerance: float) -> str:
    return (f"essential sparsity: the largest swept sparsity whose perplexity, and that of every lower one, "
            f"is at most {1 + tolerance:g} x dense (within {100 * tolerance:g}%; Jaiswal et al. 2023)")


def run_sweep(cfg: PruneConfig, methods: list[str], sparsities: list[float], n_ms: list[str] = (), *,
              tolerance: float = KNEE_TOLERANCE, progress: bool = True) -> dict:
    """Prune ``cfg.from_run`` at every point of ``plan(methods, sparsities, n_ms)`` into ``cfg.out``,
    evaluate each on ``cfg.eval_data`` and write the sweep's JSON, table and plot. ``cfg`` gives every
    other setting (calibration, distribution, refinement, device). Returns the ``sweep.json`` record."""
    from tqdm.auto import tqdm

    from ..evaluation.perplexity import check_seqlen, eval_tokens, perplexity
    from ..models import context_length
    from ..models.card import invocation
    from ..models.runs import load_run
    from ..pruning import PRUNERS, REFINERS
    from ..training.distributed import pick_device
    from ..training.prune import calibration_for, check_dense

    out, source = Path(cfg.out), Path(cfg.from_run)
    if not cfg.eval_data:
        raise SweepError("a sweep (a list in --method, --sparsity or --n-m) needs --eval-data FILE.txt|PREPARED_DIR: "
                         "the held-out text whose perplexity it compares")
    if not tolerance >= 0:
        raise SweepError(f"--knee-tolerance {tolerance}: must be >= 0 (0.01: within 1% of the dense perplexity)")
    if out.resolve() == source.resolve() or source.resolve() in out.resolve().parents:
        raise SweepError(f"--out {out} is inside the source run {source}; a sweep never writes into it: choose another --out")
    points = plan(methods, sparsities, n_ms)
    configs = {p: point_config(cfg, p) for p in points}  # every point checked before anything runs

    model, tok, masks, _ = load_run(source)
    check_dense(source, masks)
    device = pick_device(cfg.device)
    seqlen = cfg.eval_seqlen or context_length(model)
    check_seqlen(seqlen, model)
    tokens = eval_tokens(cfg.eval_data, tok)
    record = {
        "source": str(source.resolve()), "eval_data": str(Path(cfg.eval_data).resolve()), "eval_seqlen": seqlen,
        "eval_tokens": {"n": int(tokens.numel()), "sha1": hashlib.sha1(tokens.numpy().tobytes()).hexdigest()},
        "settings": {k: getattr(cfg, k) for k in SETTINGS},
    }
    previous = check_out(out, record)
    if previous is not None and previous.get("dense"):
        dense = previous["dense"]
    else:
        dense = perplexity(model.to(device), tokens, seqlen, device=device)
    record.update(knee={"rule": rule_text(tolerance), "tolerance": tolerance}, dense=dense, points=[],
                  command=invocation())
    to_prune = [p for p in points if not (out / p.name / "summary.json").is_file()]  # (a resumed sweep: the rest)
    needs_data = any(PRUNERS[p.method].needs_calibration for p in to_prune) or (
        bool(to_prune) and cfg.refine is not None and REFINERS[cfg.refine].needs_calibration)
    calibration = calibration_for(cfg, model, tok) if needs_data else None
    del model
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / SWEEP_FILE, record)

    say = tqdm.write if progress else log.info
    say(f"dense {source}: ppl {dense['ppl']:.3f} on {cfg.eval_data} ({dense['n_windows']} windows of {seqlen} tokens)")
    bar = tqdm(points, desc="sweep", unit="run", disable=not progress)
    for p in bar:
        bar.set_postfix_str(p.name)
        row = run_point(configs[p], p, calibration, tokens, seqlen, device)
        record["points"].append(row)
        say(f"{row['label']} {p.level}: ppl {row['ppl']:.3f}, sparsity {row['measured_sparsity']:.4f}, "
            f"{row['seconds']:.1f}s" + (" (done before)" if row["resumed"] else ""))
        write_json(out / SWEEP_FILE, record)
    bar.close()

    record["essential_sparsity"] = {
        label: essential_sparsity([(r["sparsity"], r["ppl"]) for r in rows if r["n_m"] is None], dense["ppl"], tolerance)
        for label, rows in by_label(record["points"]).items()}
    record["plot"] = plot(record, out / "sweep.png")
    write_json(out / SWEEP_FILE, record)
    write_text(out / "sweep.md", markdown(record))
    return record


def point_config(cfg: PruneConfig, p: Point) -> PruneConfig:
    """``cfg`` for one point (checked as the CLI's flags are: an unknown method lists the registered ones)."""
    from ..pruning import PRUNERS

    values = dict(config.to_dict(cfg), method=p.method, n_m=p.n_m, out=str(Path(cfg.out) / p.name), progress=False)
    if p.n_m is None:
        values["target"] = p.sparsity
    what = f"sweep point {p.method} at {p.level}"
    sub = config.from_dict(PruneConfig, values, source=what)
    if p.n_m is not None and not PRUNERS[p.method].supports_n_m:
        raise SweepError(f"{what}: {p.method} does not support N:M masks; leave it out of --method or drop --n-m")
    if p.n_m is not None and cfg.distribution != "uniform":
        raise SweepError(f"{what}: an N:M mask fixes every layer at 1 - N/M; use --distribution uniform")
    return sub


def run_point(cfg: PruneConfig, p: Point, calibration, tokens, seqlen: int, device) -> dict:
    """Prune (unless finished) and evaluate (unless evaluated) one point; its row of ``sweep.json``."""
    from ..evaluation.perplexity import evaluate_perplexity, perplexity_path
    from ..training.prune import prune_run

    run_dir = Path(cfg.out)
    t0 = time.perf_counter()
    pruned = not (run_dir / "summary.json").is_file()
    if pruned:
        prune_run(cfg, calibration=calibration)
    ppl_file = perplexity_path(run_dir, cfg.eval_data, seqlen)
    evaluated = not ppl_file.is_file()
    result = (evaluate_perplexity(run_dir, cfg.eval_data, seqlen, device=device, tokens=tokens) if evaluated
              else read_json(ppl_file))
    summary = read_json(run_dir / "summary.json")
    label = summary["sparsity"]["method"] if summary.get("sparsity", {}).get("method") else p.method
    return {"method": p.method, "label": label, "sparsity": p.sparsity, "n_m": p.n_m, "dir": p.name,
            "ppl": result["ppl"], "nll": result["nll"], "measured_sparsity": summary["sparsity"]["measured"],
            "prune_seconds": summary["pruning"]["seconds"], "seconds": time.perf_counter() - t0,
            "resumed": not (pruned or evaluated)}


def check_out(out: Path, record: dict) -> dict | None:
    """The sweep already in ``out`` (to resume), None for a new or empty directory; a different sweep,
    or a directory that is not a sweep, is an error naming what differs."""
    path = out / SWEEP_FILE
    if not path.is_file():
        if out.is_dir() and any(out.iterdir()):
            raise SweepError(f"--out {out} holds files but no {SWEEP_FILE}, so it is not a sweep to resume; "
                             "choose a new or empty directory")
        return None
    old = read_json(path)
    names = {"source": "--from", "eval_data": "--eval-data", "eval_seqlen": "--eval-seqlen",
             "eval_tokens": "the held-out text's tokens"}
    differ = [f"{names[k]}: {old.get(k)} there, {record[k]} now" for k in names if old.get(k) != record[k]]
    differ += [f"{k}: {old.get('settings', {}).get(k)!r} there, {v!r} now" for k, v in record["settings"].items()
               if old.get("settings", {}).get(k) != v]
    if differ:
        raise SweepError(f"--out {out} holds a different sweep ({'; '.join(differ)}); choose another --out, or "
                         "repeat that sweep's flags to resume it")
    return old


def by_label(rows: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["label"], []).append(r)
    return groups


def levels(rows: list[dict]) -> list[str]:
    """Table columns: unstructured sparsities ascending, then N:M patterns."""
    unstructured = sorted({r["sparsity"] for r in rows if r["n_m"] is None})
    return [f"{round(100 * s, 6):g}%" for s in unstructured] + list(dict.fromkeys(r["n_m"] for r in rows if r["n_m"]))


def level(row: dict) -> str:
    return row["n_m"] or f"{round(100 * row['sparsity'], 6):g}%"


def markdown(record: dict) -> str:
    """``sweep.md``: perplexity per method (rows) and sparsity (columns), the dense row, each method's
    essential sparsity, and the rule."""
    dense, cols = record["dense"], levels(record["points"])
    tol = record["knee"]["tolerance"]
    header = ["method", "0% (dense)"] + cols + [f"essential sparsity (ppl ≤ {1 + tol:g} × dense)"]
    rows = [["dense", f"{dense['ppl']:.2f}"] + ["—"] * len(cols) + ["—"]]
    first = cols[0] if cols and cols[0].endswith("%") else None
    for label, group in by_label(record["points"]).items():
        cells = {level(r): f"{r['ppl']:.2f}" for r in group}
        knee = record.get("essential_sparsity", {}).get(label)
        shown = f"{round(100 * knee, 6):g}%" if knee is not None else (f"none (< {first})" if first else "—")
        rows.append([label, "—"] + [cells.get(c, "—") for c in cols] + [shown])
    calib = record["settings"]
    lines = [f"# Pruning sweep of {record['source']}", "",
             f"Perplexity (lower is better) on {record['eval_data']}: {dense['n_windows']} windows of "
             f"{record['eval_seqlen']} tokens, {dense['n_tokens_scored']:,} tokens scored. One-shot pruning of the block "
             f"linears ({calib['distribution']} per-layer sparsity"
             + (f", refined with {calib['refine']}" if calib["refine"] else "")
             + f"); calibration: {calib['calibration']} (seed {calib['seed']}).", "",
             f"The {record['knee']['rule']}. N:M columns take no part in it.", "",
             "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if record.get("plot"):
        lines += ["", f"![perplexity against sparsity]({record['plot']})"]
    return "\n".join(lines) + "\n"


def plot(record: dict, path: Path) -> str | None:
    """``sweep.png``: perplexity (log scale) against sparsity, a line per method, N:M points, dense and
    its tolerance as horizontal lines, each method's essential sparsity ringed. None (and one logged
    line) without matplotlib, the ``report`` extra."""
    try:
        matplotlib = require("matplotlib", "report", "the sweep plot")
    except MissingExtra as e:
        log.warning("sweep plot skipped (the table is written): %s", e.reason)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    dense, tol = record["dense"]["ppl"], record["knee"]["tolerance"]
    groups = by_label(record["points"])
    patterns = list(dict.fromkeys(r["n_m"] for r in record["points"] if r["n_m"]))
    shapes = dict(zip(patterns, "Ds^vP*X"))
    fig, ax = plt.subplots(figsize=(7.5, 5))
    ax.axhline(dense, color="k", ls="--", lw=1, label=f"dense ({dense:.2f})")
    ax.axhline((1 + tol) * dense, color="0.5", ls=":", lw=1, label=f"{1 + tol:g} × dense")
    for i, (label, group) in enumerate(groups.items()):
        color = f"C{i}"
        curve = sorted((r["sparsity"], r["ppl"]) for r in group if r["n_m"] is None)
        if curve:
            ax.plot([100 * s for s, _ in curve], [y for _, y in curve], marker="o", color=color, label=label)
        shift = (i - (len(groups) - 1) / 2) * 0.8  # N:M points side by side, not on top of each other
        for r in (r for r in group if r["n_m"]):
            ax.scatter([100 * r["sparsity"] + shift], [r["ppl"]], marker=shapes[r["n_m"]], color=color, zorder=3,
                       label=None if curve else label)
        knee = record.get("essential_sparsity", {}).get(label)
        if knee is not None:
            ax.scatter([100 * knee], [dict(curve)[knee]], s=180, facecolors="none", edgecolors=color, linewidths=2,
                       zorder=4, label=f"{label}: essential sparsity {100 * knee:g}%")
    for nm in patterns:
        ax.scatter([], [], marker=shapes[nm], color="0.4", label=f"{nm} (N:M)")
    swept = sorted({r["sparsity"] for r in record["points"]})
    ax.set_xticks([100 * s for s in swept], [f"{100 * s:g}" for s in swept])
    ax.set_yscale("log")
    plain = FuncFormatter(lambda y, _: f"{y:g}")
    ax.yaxis.set_major_formatter(plain)
    low, high = ax.get_ylim()
    if high / low < 10:  # within one decade the minor ticks are the only labels
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=8)
    ax.set_xlabel("sparsity of the block linears (%)")
    ax.set_ylabel(f"perplexity on {Path(record['eval_data']).name} (log scale)")
    ax.set_title("One-shot pruning: perplexity against sparsity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left",
              title=f"ringed: largest sparsity within {100 * tol:g}% of dense\n(and every lower one)", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name
