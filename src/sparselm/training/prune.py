"""One-shot magnitude pruning of a trained (dense) run: the "prune, then fine-tune" baseline."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from ..files import write_json
from ..models.runs import load_run
from ..sparsity import Magnitude
from .pretraining import RunExistsError


def prune_run(from_run: str | Path, out: str | Path, sparsity: float, distribution: str = "uniform",
              n_m: tuple[int, int] | None = None) -> dict:
    """Keep the largest-magnitude weights of every block linear; write a run directory that
    ``finetune`` accepts (its summary keeps the source's pre-training FLOPs)."""
    out = Path(out)
    if (out / "summary.json").exists():
        raise RunExistsError(f"{out} already holds a run; choose another --out")
    model, tok, masks, source = load_run(from_run)
    if masks is not None:
        raise ValueError(f"{from_run} is already sparse (it has masks.safetensors); prune a dense run")
    sparsifier = Magnitude(sparsity, distribution=distribution, n_m=n_m).attach(model)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    save_file(sparsifier.state_dict(), str(out / "masks.safetensors"))
    summary = dict(source)
    summary.update(kind="pretrain", pruned_from=str(from_run), sparsity=sparsifier.report())
    write_json(out / "summary.json", summary)
    return summary
