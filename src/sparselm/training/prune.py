"""``sparselm prune``: one-shot pruning of a trained run or HF model directory into a sparse run that
``finetune`` accepts (its summary keeps the source's pre-training FLOPs)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ..models import block_linear_names, context_length
from ..models.card import invocation
from ..models.runs import load_run
from ..pruning import PRUNERS, REFINERS, prune_model
from ..sparsity import Sparsifier, parse_n_m
from .checkpoint import save_run
from .config import PruneConfig
from .distributed import pick_device
from .rundir import RunExistsError

log = logging.getLogger(__name__)


class _Given(Sparsifier):
    """Masks computed elsewhere (by a pruner), held as a fixed-mask sparsifier for its report and state."""

    def __init__(self, masks, name: str, **kw):
        super().__init__(**kw)
        self.name, self._given = name, masks

    def init_masks(self):
        return self._given


def prune_run(cfg: PruneConfig, calibration: torch.Tensor | None = None) -> dict:
    """Prune ``cfg.from_run`` with ``cfg.method`` (and refine with ``cfg.refine``) into ``cfg.out``.
    ``calibration``: ``[n, seqlen]`` token ids to use instead of reading ``cfg.calibration`` (a sweep
    reads them once for all its runs, with ``calibration_for``)."""
    out = Path(cfg.out)
    if (out / "summary.json").exists():
        raise RunExistsError(f"{out} already holds a run; choose another --out")
    model, tok, masks, source = load_run(cfg.from_run)
    check_dense(cfg.from_run, masks)
    pruner = PRUNERS[cfg.method](**cfg.options)
    refiner = REFINERS[cfg.refine](**cfg.refine_options) if cfg.refine else None
    needs_data = pruner.needs_calibration or (refiner is not None and refiner.needs_calibration)
    if not needs_data:
        calibration = None
    elif calibration is None:
        calibration = calibration_for(cfg, model, tok)
    n_m = parse_n_m(cfg.n_m)
    t0 = time.perf_counter()
    result = prune_model(model, pruner, sparsity=cfg.target, distribution=cfg.distribution, n_m=n_m,
                         include=block_linear_names(model), calibration=calibration, refiner=refiner,
                         true_sequential=cfg.true_sequential, device=pick_device(cfg.device), offload=cfg.offload,
                         batch_size=cfg.batch_size, progress=cfg.progress)
    seconds = time.perf_counter() - t0
    model.to("cpu")
    label = cfg.method + (f"+{cfg.refine}" if cfg.refine else "")
    held = _Given(result.masks, label, sparsity=1.0 - n_m[0] / n_m[1] if n_m else cfg.target,
                  distribution=cfg.distribution, n_m=n_m, include=list(result.masks)).attach(model)
    summary = dict(source)
    summary.update(kind="pretrain", pruned_from=str(cfg.from_run), sparsity=held.report(), command=invocation(),
                   pruning={"method": cfg.method, "refine": cfg.refine,
                            "options": dict(cfg.options), "refine_options": dict(cfg.refine_options),
                            "calibration": None if calibration is None else {
                                "source": cfg.calibration, "nsamples": int(calibration.shape[0]),
                                "seqlen": int(calibration.shape[1]), "seed": cfg.seed},
                            "true_sequential": cfg.true_sequential, "seconds": seconds, "device": result.device,
                            "peak_memory_bytes": result.peak_memory_bytes, "blocks": result.blocks})
    save_run(out, model, lambda d: tok.save_pretrained(str(d)), held.state_dict(), summary)
    return summary


def check_dense(source, masks) -> None:
    """Only a dense run is pruned (``masks``: the source's, None when it is dense)."""
    if masks is not None:
        raise ValueError(f"{source} is already sparse (it has masks.safetensors): prune a dense run. Refining its "
                         "masks cannot help: its pruned weights are exact zeros and a refinement such as DSnoT regrows a "
                         "pruned weight at its dense value; refine while pruning the dense source instead "
                         "(--from DENSE_RUN --method wanda --refine dsnot)")


def calibration_for(cfg: PruneConfig, model, tok) -> torch.LongTensor:
    """The calibration tokens ``cfg`` asks for, for ``model`` and its tokenizer ``tok``."""
    from ..pruning.calibration import calibration_tokens

    return calibration_tokens(cfg.calibration, tok, model.config.vocab_size, nsamples=cfg.nsamples, seqlen=cfg.seqlen,
                              context=context_length(model), seed=cfg.seed, run_dir=cfg.from_run)
