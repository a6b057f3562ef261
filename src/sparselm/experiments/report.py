"""``report.md`` / ``report.html`` and PNG plots from a results dict (nothing else is read, so
``sparselm report RUN_DIR`` can regenerate them from ``results.json`` alone)."""

from __future__ import annotations

import html
import json
import base64
import logging
from pathlib import Path

from .._optional import MissingExtra, require
from ..evaluation.metrics import METRICS
from .stats import aggregate

log = logging.getLogger(__name__)


def _fmt(x, digits=2) -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and (abs(x) >= 1e5 or (0 < abs(x) < 1e-3)):
        return f"{x:.2e}"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _group(rows, keys):
    return aggregate(rows, keys)


def _spread(cell: dict, field: str, digits: int = 2) -> str:
    """``mean`` for one seed, ``mean ± std (n=k)`` for several."""
    if cell is None or cell.get(field) is None:
        return "—"
    if cell.get("n_seeds", 1) > 1:
        return f"{cell[field]:.{digits}f} ± {cell.get(field + '_std', 0.0):.{digits}f} (n={cell['n_seeds']})"
    return _fmt(cell[field], digits)


def _significance(results: dict) -> list[str]:
    """One sentence per SPDF comparison: the difference, its interval and whether it is significant."""
    labels = _labels(results)
    words = {"spdf_vs_dense": "sparse pre-training + dense fine-tuning vs dense pre-training + dense fine-tuning",
             "pruned_vs_dense": "dense pre-training, pruning + dense fine-tuning vs dense pre-training + dense fine-tuning",
             "dense_ft_vs_sparse_ft": "dense vs sparse fine-tuning of the same sparse model",
             "spdf_vs_pruned": "sparse pre-training vs pruning the dense run ({b}), both + dense fine-tuning"}
    out = []
    for c in results.get("comparisons", []):
        a = _label(c["a"][1], c["a"][2], labels)
        verdict = ("significant" if c["p_value"] < 1 - c["level"] else "not significant") + f" at {100 * (1 - c['level']):.0f}%"
        what = words[c["what"]].format(b=_label(c["b"][1], c["b"][2], labels))
        out.append(f"{c['task']}, {a}: {what}: ΔBLEU {c['delta']:+.2f} "
                   f"({100 * c['level']:.0f}% CI [{c['ci'][0]:+.2f}, {c['ci'][1]:+.2f}], p = {c['p_value']:.3f}, "
                   f"{c['n_inputs']} paired inputs over {c['n_seeds']} seed(s)): {verdict}.")
    return out


def _label(sparsity: float, method: str, labels: dict | None = None) -> str:
    """'dense', '75% static', or a prune row's own label ('75% pruned: wanda')."""
    if sparsity == 0:
        return "dense"
    return (labels or {}).get((sparsity, method)) or f"{round(100 * sparsity)}% {method}"


def _labels(results: dict) -> dict:
    """(sparsity, method) -> label of the prune rows, which say their method, refinement and sparsity."""
    return {(p["sparsity"], p["method"]): p["label"] for p in results["pretrain"] if p.get("label")}


def _order(sparsity: float, method: str, labels: dict) -> tuple:
    """Rows by sparsity, pre-training methods before prune rows."""
    return sparsity, (sparsity, method) in labels, method


# ---- plots ----------------------------------------------------------------------------------
def _plots(results: dict, out: Path) -> list[tuple[str, str]]:
    """The PNG plots, or none (one logged line) without matplotlib, the ``report`` extra."""
    try:
        matplotlib = require("matplotlib", "report", "the report's plots")
    except MissingExtra as e:
        log.warning("report plots skipped: %s", e.reason)
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    def sci(ax, axis="x"):
        fmt = ScalarFormatter(useMathText=True)
        fmt.set_powerlimits((-3, 3))
        (ax.xaxis if axis == "x" else ax.yaxis).set_major_formatter(fmt)

    plt.rcParams.update({"font.size": 11, "axes.grid": True, "grid.alpha": 0.3})
    labels = _labels(results)
    (out / "plots").mkdir(exist_ok=True)
    made = []

    pre = [p for p in results["pretrain"] if p["curve"]]
    if pre:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for p in sorted(pre, key=lambda p: (p["sparsity"], p["method"], p["seed"])):
            val = [c for c in p["curve"] if "val_loss" in c and c.get("tokens") is not None]
            if not val:
                continue
            label = _label(p["sparsity"], p["method"], labels) + (f" (seed {p['seed']})" if len(results["spec"]["seeds"]) > 1 else "")
            line, = axes[0].plot([c["tokens"] for c in val], [c["val_loss"] for c in val], marker="o", label=label)
            axes[1].plot([c["train_flops"] for c in val], [c["val_loss"] for c in val], marker="o", color=line.get_color(), label=label)
        axes[0].set_xlabel("tokens seen")
        axes[1].set_xlabel("pre-training FLOPs (sparse, as counted; log scale)")
        axes[1].set_xscale("log")
        for ax in axes:
            ax.set_ylabel("validation loss (nats/token)")
            ax.legend(fontsize=8)
        sci(axes[0])
        axes[0].set_title("Pre-training: validation loss vs tokens")
        axes[1].set_title("... vs pre-training compute")
        fig.tight_layout()
        fig.savefig(out / "plots" / "pretrain_loss.png", dpi=110)
        plt.close(fig)
        made.append(("Pre-training validation loss per sparsity", "plots/pretrain_loss.png"))

    cells = _group(results["rows"], ("task", "mode", "sparsity", "method"))
    tasks = sorted({k[0] for k in cells})
    if tasks:
        fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.5), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            for mode, marker in (("dense", "o"), ("sparse", "s"), ("lora", "^")):
                def point(k, v):
                    return v["pretrain_flops"], v["bleu"], v.get("bleu_std", 0.0), _label(k[2], k[3], labels)

                pts = sorted(point(k, v) for k, v in cells.items()
                             if k[0] == task and k[1] == mode and v.get("bleu") is not None and v.get("pretrain_flops"))
                if mode == "sparse":  # a dense model's sparse fine-tuning is its dense fine-tuning
                    pts = sorted(pts + [point(k, v) for k, v in cells.items()
                                        if k[0] == task and k[1] == "dense" and k[2] == 0 and v.get("bleu") is not None])
                if not pts:
                    continue
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker=marker,
                            capsize=3, label=f"{mode} fine-tuning")
                for j, (x, y, _, label) in enumerate(pts):  # alternate sides so neighbouring labels do not overlap
                    ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 6 if j % 2 == 0 else -12), fontsize=8)
            ax.set_title(f"{task}: BLEU vs pre-training FLOPs")
            ax.set_xlabel("pre-training FLOPs (log scale)")
            ax.set_xscale("log")
            ax.set_ylabel(f"BLEU ({results['eval_split']}; bars: std over seeds)")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "plots" / "bleu_vs_flops.png", dpi=110)
        plt.close(fig)
        made.append(("Downstream BLEU vs pre-training FLOPs (labels: pre-training sparsity)", "plots/bleu_vs_flops.png"))

        sparse_levels = sorted({k[2] for k in cells if k[2] > 0})
        if sparse_levels and any(k[1] == "sparse" for k in cells):
            fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.5), squeeze=False)
            for ax, task in zip(axes[0], tasks):
                xs = range(len(sparse_levels))
                top = 0.0
                for j, mode in enumerate(("dense", "sparse")):
                    # SPDF's own method (static masks) where a sparsity has several methods
                    found = [sorted(((k[3] != "static", str(k[3])), v) for k, v in cells.items()
                                    if k[0] == task and k[1] == mode and k[2] == s and v.get("bleu") is not None
                                    and (k[2], k[3]) not in labels)
                             for s in sparse_levels]
                    vals = [f[0][1]["bleu"] if f else 0.0 for f in found]
                    errs = [f[0][1].get("bleu_std", 0.0) if f else 0.0 for f in found]
                    bars = ax.bar([x + (j - 0.5) * 0.38 for x in xs], vals, width=0.38, yerr=errs, capsize=3,
                                  label=f"{mode} fine-tuning")
                    ax.bar_label(bars, fmt="%.1f", fontsize=9, padding=2)
                    top = max(top, *(v + e for v, e in zip(vals, errs)))
                base = next((v["bleu"] for k, v in cells.items() if k[0] == task and k[1] == "dense" and k[2] == 0), None)
                if base is not None:
                    ax.axhline(base, color="k", ls="--", lw=1, label=f"dense pre-training + dense FT ({base:.1f})")
                    top = max(top, base)
                ax.set_ylim(0, 1.4 * top if top > 0 else 1)
                ax.set_xticks(list(xs), [f"{round(100 * s)}%" for s in sparse_levels])
                ax.set_xlabel("pre-training sparsity")
                ax.set_ylabel(f"BLEU ({results['eval_split']}; bars: std over seeds)")
                ax.set_title(f"{task}: dense vs sparse fine-tuning (static masks)")
                ax.legend(loc="upper center", ncol=1, fontsize=9, framealpha=0.9)
            fig.tight_layout()
            fig.savefig(out / "plots" / "finetune_gap.png", dpi=110)
            plt.close(fig)
            made.append(("Dense (SPDF) vs sparse fine-tuning at each pre-training sparsity", "plots/finetune_gap.png"))

    curves = [r for r in results["rows"] if r.get("ft_curve")]
    if curves:
        fig, axes = plt.subplots(1, len(tasks) or 1, figsize=(5.5 * max(1, len(tasks)), 4.5), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            for r in sorted((r for r in curves if r["task"] == task), key=lambda r: (r["sparsity"], r["method"], r["mode"], r["seed"])):
                label = f"{_label(r['sparsity'], r['method'], labels)}, {r['mode']} FT" + (
                    f" (seed {r['seed']})" if len(results["spec"]["seeds"]) > 1 else "")
                ax.plot([c["step"] for c in r["ft_curve"]], [c["val_loss"] for c in r["ft_curve"]], marker=".",
                        ls="--" if r["mode"] == "sparse" else "-", label=label)
            ax.set_title(f"{task}: fine-tuning validation loss")
            ax.set_xlabel("fine-tuning step")
            ax.set_ylabel("validation loss on targets (nats/token)")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "plots" / "finetune_loss.png", dpi=110)
        plt.close(fig)
        made.append(("Fine-tuning validation loss per cell (dashed: sparse fine-tuning)", "plots/finetune_loss.png"))
    return made


# ---- tables -----------------------------------------------------------------------------------
def _blocks(results: dict, plots) -> list[tuple]:
    spec = results["spec"]
    blocks: list[tuple] = [("h1", f"SPDF report: {spec['name']}")]
    labels = _labels(results)
    pruned = f"prune-then-fine-tune rows {sorted(set(labels.values()))}, " if labels else ""
    blocks.append(("p", f"Preset {spec['preset']}, sparsities {spec['sparsities']}, methods {spec['methods']}, {pruned}"
                        f"tasks {spec['tasks']}, fine-tuning modes {spec['modes']}, seeds {spec['seeds']}; "
                        f"metrics on the {results['eval_split']} split"
                        + (f" (first {spec['eval_limit']} inputs)" if spec.get("eval_limit") else "") + "."))
    cells = _group(results["rows"], ("task", "mode", "sparsity", "method"))
    tasks = [t for t in spec["tasks"] if any(k[0] == t for k in cells)]

    # main table, laid out like the SPDF paper's: BLEU per task per sparsity, dense vs sparse FT
    pooled = {(c["task"], c["mode"], c["sparsity"], c["method"]): c["ci"] for c in results.get("pooled_bleu_ci", [])}
    header = (["pre-training", "pre-train FLOPs", "FT"] + [f"{t} BLEU" for t in tasks] + [f"{t} Δ" for t in tasks]
              + [f"{t} BLEU 95% CI" for t in tasks])
    rows = []
    levels = sorted({(k[2], k[3]) for k in cells}, key=lambda k: _order(*k, labels))
    for sparsity, method in levels:
        for mode in spec["modes"]:
            if sparsity == 0 and mode == "sparse":
                continue
            vals, deltas, cis, fl = [], [], [], None
            for t in tasks:
                v = cells.get((t, mode, sparsity, method))
                base = cells.get((t, "dense", 0.0, "dense"))
                fl = fl or (v or {}).get("pretrain_flops")
                vals.append(_spread(v, "bleu"))
                deltas.append(_fmt(v["bleu"] - base["bleu"], 2) if v and base and sparsity > 0 else "")
                ci = pooled.get((t, mode, sparsity, method))
                cis.append(f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "—")
            rows.append([_label(sparsity, method, labels), _fmt(fl), mode] + vals + deltas + cis)
    blocks += [("h2", "Main result"),
               ("p", "BLEU: mean ± standard deviation over seeds (n = seeds) where there are several. "
                     "Δ: difference of the means to dense pre-training + dense fine-tuning (negative = quality lost). "
                     "95% CI: percentile bootstrap over test inputs (1000 resamples), every seed's outputs pooled."),
               ("table", header, rows)]
    if labels:
        blocks.append(("p", "Rows 'pruned: M' (or 'M+R') are the dense pre-training run pruned one-shot with M (and its masks "
                            "refined with R) to that sparsity or N:M pattern, then fine-tuned with the same budget as every "
                            "other row; their pre-training FLOPs are the dense run's (pruning's calibration passes not counted), "
                            "and their validation loss after pruning is not measured (—)."))
    sentences = _significance(results)
    if sentences:
        blocks += [("h2", "Which differences are significant"),
                   ("p", "Paired bootstrap over test inputs (Koehn 2004), seeds pooled and paired by seed; "
                         "p is two-sided."),
                   ("list", sentences)]

    # pre-training
    prow = []
    for p in sorted(results["pretrain"], key=lambda p: (*_order(p["sparsity"], p["method"], labels), p["seed"])):
        ratio = p["dense_train_flops"] / p["train_flops"] if p.get("train_flops") else None
        prow.append([_label(p["sparsity"], p["method"], labels), p["seed"], p["status"], _fmt(p.get("val_loss"), 4), _fmt(p.get("train_flops")),
                     _fmt(ratio), _fmt(p.get("average_param_count"), 0), _fmt(p.get("wall_time_s"), 0)])
    blocks += [("h2", "Pre-training"),
               ("table", ["run", "seed", "status", "val loss", "train FLOPs", "FLOPs saved (x)", "avg non-zero params", "wall s"], prow)]

    for t in tasks:
        metrics = [m for name, m in METRICS.items() if any(name in v for k, v in cells.items() if k[0] == t)]
        trows = []
        for (task, mode, sparsity, method), v in sorted(cells.items(), key=lambda kv: (kv[0][2], kv[0][2:4] in labels, kv[0][1])):
            if task != t:
                continue
            trows.append([_label(sparsity, method, labels), mode] + [_spread(v, m.name) for m in metrics]
                         + [_spread(v, "finetune_val_loss", 3), _fmt(v.get("finetune_flops"))])
        arrows = [m.display + (" ↑" if m.higher_is_better else " ↓") for m in metrics]
        blocks += [("h2", f"{t}"), ("table", ["pre-training", "FT"] + arrows + ["FT val loss", "FT FLOPs"], trows)]

    failed = [r["cell"] for r in results["rows"] if r["status"] != "done"] + [p["cell"] for p in results["pretrain"] if p["status"] != "done"]
    if failed:
        blocks += [("h2", "Incomplete cells"), ("p", "Not finished or failed (see failures/): " + ", ".join(failed))]
    if plots:
        blocks.append(("h2", "Plots"))
        for caption, path in plots:
            blocks.append(("img", caption, path))
    blocks.append(("p", "FLOPs follow the convention in sparselm.flops (2 FLOPs per multiply-accumulate, training = 3x forward, "
                        "sparse layers cost their density). Wall times are real: sparsity here is simulated with dense kernels."))
    return blocks


def _markdown(blocks) -> str:
    out = []
    for b in blocks:
        if b[0] == "h1":
            out.append(f"# {b[1]}\n")
        elif b[0] == "h2":
            out.append(f"## {b[1]}\n")
        elif b[0] == "p":
            out.append(b[1] + "\n")
        elif b[0] == "table":
            header, rows = b[1], b[2]
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + "|".join("---" if i < 3 else "---:" for i in range(len(header))) + "|")
            out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
            out.append("")
        elif b[0] == "list":
            out += [f"- {item}" for item in b[1]] + [""]
        elif b[0] == "img":
            out.append(f"![{b[1]}]({b[2]})\n")
    return "\n".join(out)


def _html(blocks, title: str, out: Path) -> str:
    e = html.escape
    body = []
    for b in blocks:
        if b[0] in ("h1", "h2"):
            body.append(f"<{b[0]}>{e(b[1])}</{b[0]}>")
        elif b[0] == "p":
            body.append(f"<p>{e(b[1])}</p>")
        elif b[0] == "table":
            head = "".join(f"<th>{e(str(h))}</th>" for h in b[1])
            rows = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in b[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif b[0] == "list":
            body.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in b[1]) + "</ul>")
        elif b[0] == "img":  # embedded, so report.html is one standalone file
            data = base64.b64encode((out / b[2]).read_bytes()).decode() if (out / b[2]).exists() else ""
            body.append(f"<figure><img src=\"data:image/png;base64,{data}\" alt=\"{e(b[1])}\"><figcaption>{e(b[1])}</figcaption></figure>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}img{max-width:100%}figcaption{color:#555}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n"


def write_report(results: dict, out: str | Path) -> Path:
    out = Path(out)
    plots = _plots(results, out)
    blocks = _blocks(results, plots)
    (out / "report.md").write_text(_markdown(blocks))
    (out / "report.html").write_text(_html(blocks, f"SPDF report: {results['spec']['name']}", out))
    return out / "report.md"


def report_from_dir(run_dir: str | Path) -> Path:
    """Regenerate the report from ``results.json`` alone."""
    path = Path(run_dir) / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; run `sparselm reproduce` first (it writes results.json)")
    return write_report(json.loads(path.read_text()), run_dir)
