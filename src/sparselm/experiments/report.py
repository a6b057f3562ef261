"""``report.md`` / ``report.html`` and PNG plots from a results dict (nothing else is read, so
``sparselm report RUN_DIR`` can regenerate them from ``results.json`` alone)."""

from __future__ import annotations

import html
import json
from collections import defaultdict
from pathlib import Path
from statistics import mean

from ..evaluation.metrics import METRICS


def _fmt(x, digits=2) -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and (abs(x) >= 1e5 or (0 < abs(x) < 1e-3)):
        return f"{x:.2e}"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _group(rows, keys):
    """Mean of numeric fields over seeds for rows sharing ``keys``."""
    groups = defaultdict(list)
    for r in rows:
        if r.get("status") == "done":
            groups[tuple(r[k] for k in keys)].append(r)
    out = {}
    for k, rs in groups.items():
        merged = dict(rs[0])
        for f in rs[0]:
            vals = [r.get(f) for r in rs]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
                merged[f] = mean(vals)
        merged["n_seeds"] = len(rs)
        out[k] = merged
    return out


def _label(sparsity: float, method: str) -> str:
    return "dense" if sparsity == 0 else f"{round(100 * sparsity)}% {method}"


# ---- plots ----------------------------------------------------------------------------------
def _plots(results: dict, out: Path) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    def sci(ax, axis="x"):
        fmt = ScalarFormatter(useMathText=True)
        fmt.set_powerlimits((-3, 3))
        (ax.xaxis if axis == "x" else ax.yaxis).set_major_formatter(fmt)

    plt.rcParams.update({"font.size": 11, "axes.grid": True, "grid.alpha": 0.3})
    (out / "plots").mkdir(exist_ok=True)
    made = []

    pre = [p for p in results["pretrain"] if p["curve"]]
    if pre:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for p in sorted(pre, key=lambda p: (p["sparsity"], p["method"], p["seed"])):
            val = [c for c in p["curve"] if "val_loss" in c and c.get("tokens") is not None]
            if not val:
                continue
            label = _label(p["sparsity"], p["method"]) + (f" (seed {p['seed']})" if len(results["spec"]["seeds"]) > 1 else "")
            line, = axes[0].plot([c["tokens"] for c in val], [c["val_loss"] for c in val], marker="o", label=label)
            axes[1].plot([c["train_flops"] for c in val], [c["val_loss"] for c in val], marker="o", color=line.get_color(), label=label)
        axes[0].set_xlabel("tokens seen")
        axes[1].set_xlabel("pre-training FLOPs (sparse, as counted)")
        for ax in axes:
            ax.set_ylabel("validation loss (nats/token)")
            sci(ax)
            ax.legend()
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
                pts = sorted((v["pretrain_flops"], v["bleu"], k[2]) for k, v in cells.items()
                             if k[0] == task and k[1] == mode and v.get("bleu") is not None and v.get("pretrain_flops"))
                if mode == "sparse":  # a dense model's sparse fine-tuning is its dense fine-tuning
                    pts = sorted(pts + [(v["pretrain_flops"], v["bleu"], k[2]) for k, v in cells.items()
                                        if k[0] == task and k[1] == "dense" and k[2] == 0 and v.get("bleu") is not None])
                if not pts:
                    continue
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=f"{mode} fine-tuning")
                for x, y, s in pts:
                    ax.annotate(f"{round(100 * s)}%", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=9)
            ax.set_title(f"{task}: BLEU vs pre-training FLOPs")
            ax.set_xlabel("pre-training FLOPs")
            ax.set_ylabel(f"BLEU ({results['eval_split']})")
            sci(ax)
            ax.legend()
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
                    vals = [next((v["bleu"] for k, v in cells.items() if k[0] == task and k[1] == mode and k[2] == s), 0) for s in sparse_levels]
                    bars = ax.bar([x + (j - 0.5) * 0.38 for x in xs], vals, width=0.38, label=f"{mode} fine-tuning")
                    ax.bar_label(bars, fmt="%.1f", fontsize=9)
                    top = max(top, *vals)
                base = next((v["bleu"] for k, v in cells.items() if k[0] == task and k[1] == "dense" and k[2] == 0), None)
                if base is not None:
                    ax.axhline(base, color="k", ls="--", lw=1, label=f"dense pre-training + dense FT ({base:.1f})")
                    top = max(top, base)
                ax.set_ylim(0, 1.4 * top if top > 0 else 1)
                ax.set_xticks(list(xs), [f"{round(100 * s)}%" for s in sparse_levels])
                ax.set_xlabel("pre-training sparsity")
                ax.set_ylabel(f"BLEU ({results['eval_split']})")
                ax.set_title(f"{task}: dense vs sparse fine-tuning")
                ax.legend(loc="upper center", ncol=1, fontsize=9, framealpha=0.9)
            fig.tight_layout()
            fig.savefig(out / "plots" / "finetune_gap.png", dpi=110)
            plt.close(fig)
            made.append(("Dense (SPDF) vs sparse fine-tuning at each pre-training sparsity", "plots/finetune_gap.png"))
    return made


# ---- tables -----------------------------------------------------------------------------------
def _blocks(results: dict, plots) -> list[tuple]:
    spec = results["spec"]
    blocks: list[tuple] = [("h1", f"SPDF report: {spec['name']}")]
    blocks.append(("p", f"Preset {spec['preset']}, sparsities {spec['sparsities']}, methods {spec['methods']}, "
                        f"tasks {spec['tasks']}, fine-tuning modes {spec['modes']}, seeds {spec['seeds']}; "
                        f"metrics on the {results['eval_split']} split"
                        + (f" (first {spec['eval_limit']} inputs)" if spec.get("eval_limit") else "") + "."))
    cells = _group(results["rows"], ("task", "mode", "sparsity", "method"))
    tasks = [t for t in spec["tasks"] if any(k[0] == t for k in cells)]

    # main table, laid out like the SPDF paper's: BLEU per task per sparsity, dense vs sparse FT
    header = ["pre-training", "pre-train FLOPs", "FT"] + [f"{t} BLEU" for t in tasks] + [f"{t} Δ" for t in tasks]
    rows = []
    levels = sorted({(k[2], k[3]) for k in cells})
    for sparsity, method in levels:
        for mode in spec["modes"]:
            if sparsity == 0 and mode == "sparse":
                continue
            vals, deltas, fl = [], [], None
            for t in tasks:
                v = cells.get((t, mode, sparsity, method))
                base = cells.get((t, "dense", 0.0, "dense"))
                fl = fl or (v or {}).get("pretrain_flops")
                vals.append(_fmt(v.get("bleu")) if v else "—")
                deltas.append(_fmt(v["bleu"] - base["bleu"], 2) if v and base and sparsity > 0 else "")
            rows.append([_label(sparsity, method), _fmt(fl), mode] + vals + deltas)
    blocks += [("h2", "Main result"),
               ("p", "Δ: BLEU difference to dense pre-training + dense fine-tuning (negative = quality lost)."),
               ("table", header, rows)]

    # pre-training
    prow = []
    for p in sorted(results["pretrain"], key=lambda p: (p["sparsity"], p["method"], p["seed"])):
        ratio = p["dense_train_flops"] / p["train_flops"] if p.get("train_flops") else None
        prow.append([_label(p["sparsity"], p["method"]), p["seed"], p["status"], _fmt(p.get("val_loss"), 4), _fmt(p.get("train_flops")),
                     _fmt(ratio), _fmt(p.get("average_param_count"), 0), _fmt(p.get("wall_time_s"), 0)])
    blocks += [("h2", "Pre-training"),
               ("table", ["run", "seed", "status", "val loss", "train FLOPs", "FLOPs saved (x)", "avg non-zero params", "wall s"], prow)]

    for t in tasks:
        metrics = [m for name, m in METRICS.items() if any(name in v for k, v in cells.items() if k[0] == t)]
        trows = []
        for (task, mode, sparsity, method), v in sorted(cells.items(), key=lambda kv: (kv[0][2], kv[0][1])):
            if task != t:
                continue
            trows.append([_label(sparsity, method), mode] + [_fmt(v.get(m.name)) for m in metrics]
                         + [_fmt(v.get("finetune_val_loss"), 3), _fmt(v.get("finetune_flops"))])
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
        elif b[0] == "img":
            out.append(f"![{b[1]}]({b[2]})\n")
    return "\n".join(out)


def _html(blocks, title: str) -> str:
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
        elif b[0] == "img":
            body.append(f"<figure><img src=\"{e(b[2])}\" alt=\"{e(b[1])}\"><figcaption>{e(b[1])}</figcaption></figure>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}img{max-width:100%}figcaption{color:#555}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n"


def write_report(results: dict, out: str | Path) -> Path:
    out = Path(out)
    plots = _plots(results, out)
    blocks = _blocks(results, plots)
    (out / "report.md").write_text(_markdown(blocks))
    (out / "report.html").write_text(_html(blocks, f"SPDF report: {results['spec']['name']}"))
    return out / "report.md"


def report_from_dir(run_dir: str | Path) -> Path:
    """Regenerate the report from ``results.json`` alone."""
    path = Path(run_dir) / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; run `sparselm reproduce` first (it writes results.json)")
    return write_report(json.loads(path.read_text()), run_dir)
