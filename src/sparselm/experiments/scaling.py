"""Fit the Chinchilla scaling law L(N, D) = E + A / N^alpha + B / D^beta to finished runs.

N is the *average* number of non-zero parameters over training for sparse runs (The Journey
Matters, 2025), the parameter count for dense ones; D is tokens seen; L the final validation loss.
Fitted as Hoffmann et al. (2022) do: L = exp(LSE(a - alpha log N, b - beta log D, e)) with a Huber
loss (delta 1e-3) on log L, L-BFGS from a grid of starting points, the best fit kept.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass
class Point:
    name: str
    n: float  # (average) non-zero parameters
    d: float  # tokens
    loss: float
    sparsity: float = 0.0


@dataclass
class Fit:
    E: float
    A: float
    alpha: float
    B: float
    beta: float
    rmse: float
    mean_abs_rel_error: float
    n_points: int

    def predict(self, n: float, d: float) -> float:
        return self.E + self.A / n**self.alpha + self.B / d**self.beta


def load_points(paths: list[str | Path]) -> list[Point]:
    """Points from pre-training run directories (summary.json), or grids (results.json)."""
    points = []
    for p in map(Path, paths):
        if (p / "results.json").exists() or p.name == "results.json":
            res = json.loads((p if p.name == "results.json" else p / "results.json").read_text())
            for r in res["pretrain"]:
                if r.get("status") == "done":
                    points.append(Point(r["cell"], r["average_param_count"], r["tokens"], r["val_loss"], r["sparsity"]))
        elif (p / "summary.json").exists():
            s = json.loads((p / "summary.json").read_text())
            if s.get("kind") != "pretrain":
                raise ValueError(f"{p}: not a pre-training run (kind={s.get('kind')!r})")
            points.append(Point(p.name, s["average_param_count"], s["tokens_seen"], s["final_val_loss"], s["sparsity"]["measured"]))
        else:
            raise FileNotFoundError(f"{p}: neither a run directory with summary.json nor a grid with results.json")
    return points


def fit(points: list[Point], delta: float = 1e-3) -> Fit:
    if len(points) < 3:
        raise ValueError(f"a scaling-law fit needs at least 3 finished runs, got {len(points)}")
    log_n = torch.tensor([math.log(p.n) for p in points], dtype=torch.float64)
    log_d = torch.tensor([math.log(p.d) for p in points], dtype=torch.float64)
    log_l = torch.tensor([math.log(p.loss) for p in points], dtype=torch.float64)

    def objective(theta):
        a, b, e, log_alpha, log_beta = theta
        alpha, beta = log_alpha.exp(), log_beta.exp()  # exponents stay positive, as the law assumes
        pred = torch.logsumexp(torch.stack([a - alpha * log_n, b - beta * log_d, e.expand_as(log_n)]), dim=0)
        return torch.nn.functional.huber_loss(pred, log_l, delta=delta, reduction="sum")

    best, best_loss = None, math.inf
    for a0, b0, e0, al0, be0 in itertools.product((0.0, 5.0, 10.0), (0.0, 5.0, 10.0), (-1.0, 0.0, 1.0), (0.1, 0.5), (0.1, 0.5)):
        theta = torch.tensor([a0, b0, e0, math.log(al0), math.log(be0)], dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([theta], max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = objective(theta)
            loss.backward()
            return loss

        try:
            opt.step(closure)
        except RuntimeError:
            continue
        value = float(objective(theta.detach()))
        if math.isfinite(value) and value < best_loss:
            best, best_loss = theta.detach().clone(), value
    a, b, e, log_alpha, log_beta = (float(x) for x in best)
    alpha, beta = math.exp(log_alpha), math.exp(log_beta)
    result = Fit(E=math.exp(e), A=math.exp(a), alpha=alpha, B=math.exp(b), beta=beta, rmse=0.0, mean_abs_rel_error=0.0, n_points=len(points))
    errors = [result.predict(p.n, p.d) - p.loss for p in points]
    result.rmse = math.sqrt(sum(x * x for x in errors) / len(errors))
    result.mean_abs_rel_error = sum(abs(x) / p.loss for x, p in zip(errors, points)) / len(points)
    return result


def plot(points: list[Point], result: Fit, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    measured = [p.loss for p in points]
    predicted = [result.predict(p.n, p.d) for p in points]
    sc = ax.scatter(measured, predicted, c=[p.sparsity for p in points], cmap="viridis", vmin=0, vmax=1, zorder=3)
    lo, hi = min(measured + predicted), max(measured + predicted)
    pad = 0.05 * (hi - lo or 1)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=1, label="predicted = measured")
    fig.colorbar(sc, ax=ax, label="sparsity")
    ax.set_xlabel("measured validation loss")
    ax.set_ylabel("predicted validation loss")
    ax.set_title(f"L = {result.E:.2f} + {result.A:.3g}/N^{result.alpha:.2f} + {result.B:.3g}/D^{result.beta:.2f}", fontsize=10)
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(points: list[Point], result: Fit) -> str:
    lines = [f"fit over {result.n_points} runs: L(N, D) = {result.E:.4f} + {result.A:.4g} / N^{result.alpha:.4f} + {result.B:.4g} / D^{result.beta:.4f}",
             f"RMSE {result.rmse:.4f} nats, mean |relative error| {100 * result.mean_abs_rel_error:.2f}%"]
    n_values, d_values = len({p.n for p in points}), len({p.d for p in points})
    if result.n_points <= 5 or n_values < 3 or d_values < 3:
        lines.append(f"warning: {result.n_points} runs with {n_values} distinct N and {d_values} distinct D for 5 parameters: "
                     "the constants are not identifiable, only the fit to these runs is meaningful")
    lines.append(f"{'run':<28}{'N (avg non-zero)':>18}{'D (tokens)':>14}{'loss':>9}{'predicted':>11}")
    for p in points:
        lines.append(f"{p.name:<28}{p.n:>18,.0f}{p.d:>14.3e}{p.loss:>9.4f}{result.predict(p.n, p.d):>11.4f}")
    return "\n".join(lines)


def to_json(points: list[Point], result: Fit) -> dict:
    return {"fit": asdict(result), "points": [asdict(p) for p in points]}
