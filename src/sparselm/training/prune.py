"""One-shot magnitude pruning of a trained (dense) run: the "prune, then fine-tune" baseline."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from ..files import write_json
from ..models.runs import load_run
from ..sparsity import Magnitude, parse_n_m
from .config import PruneConfig
from .loop import RunExistsError


def prune_run(cfg: PruneConfig) -> dict:
    """Keep the largest-magnitude weights of every block linear; write a run directory that
    ``finetune`` accepts (its summary keeps the source's pre-training FLOPs)."""
    out = Path(cfg.out)
    if (out / "summary.json").exists():
        raise RunExistsError(f"{out} already holds a run; choose another --out")
    model, tok, masks, source = load_run(cfg.from_run)
    if masks is not None:
        raise ValueError(f"{cfg.from_run} is already sparse (it has masks.safetensors); prune a dense run")
    sparsifier = Magnitude(cfg.target, distribution=cfg.distribution, n_m=parse_n_m(cfg.n_m)).attach(model)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    save_file(sparsifier.state_dict(), str(out / "masks.safetensors"))
    summary = dict(source)
    summary.update(kind="pretrain", pruned_from=str(cfg.from_run), sparsity=sparsifier.report())
    write_json(out / "summary.json", summary)
    return summary
