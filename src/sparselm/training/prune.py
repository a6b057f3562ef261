"""One-shot magnitude pruning of a trained (dense) run: the "prune, then fine-tune" baseline."""

from __future__ import annotations

from pathlib import Path

from ..models import block_linear_names
from ..models.card import invocation
from ..models.runs import load_run
from ..sparsity import Magnitude, parse_n_m
from .checkpoint import save_run
from .config import PruneConfig
from .rundir import RunExistsError


def prune_run(cfg: PruneConfig) -> dict:
    """Keep the largest-magnitude weights of every block linear; write a run directory that
    ``finetune`` accepts (its summary keeps the source's pre-training FLOPs)."""
    out = Path(cfg.out)
    if (out / "summary.json").exists():
        raise RunExistsError(f"{out} already holds a run; choose another --out")
    model, tok, masks, source = load_run(cfg.from_run)
    if masks is not None:
        raise ValueError(f"{cfg.from_run} is already sparse (it has masks.safetensors); prune a dense run")
    sparsifier = Magnitude(cfg.target, distribution=cfg.distribution, n_m=parse_n_m(cfg.n_m),
                           include=block_linear_names(model)).attach(model)
    out.mkdir(parents=True, exist_ok=True)
    summary = dict(source)
    summary.update(kind="pretrain", pruned_from=str(cfg.from_run), sparsity=sparsifier.report(), command=invocation())
    save_run(out, model, lambda d: tok.save_pretrained(str(d)), sparsifier.state_dict(), summary)
    return summary
