"""Pre-training: what it supplies to the one training loop (``loop.py``): random windows of the
tokenized corpus, next-token cross-entropy, warmup + cosine LR, the FLOPs of the masks in use, and
a summary with the honest FLOP and parameter accounting of the whole run."""

from __future__ import annotations

import functools
import logging
import math

import torch

from .. import flops
from ..data import eval_batches, get_batch, prepare_corpus
from ..data.paths import default_corpus
from ..data.tokenizer import save_hf_tokenizer
from ..models import block_linear_names, build_model, load_model
from ..models.loss import chunked_cross_entropy
from ..sparsity import global_sparsity
from ..sparsity.semi_structured import use_semi_structured
from ..sparsity.sharding import count_nonzero
from .config import PretrainConfig
from .engine import PhaseSetup, run_phase, start_run
from .loop import Phase, StepCost
from .lock import writes_run
from .optim import adamw, cosine_lr

logger = logging.getLogger(__name__)

__all__ = ["pretrain", "param_count", "next_token_loss", "prepare_run_corpus"]


def param_count(model: torch.nn.Module) -> int:
    """Parameters, each tensor once (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def next_token_loss(model, batch, vocab_size: int | None = None, chunk: int = 4096) -> torch.Tensor:
    """Mean next-token cross-entropy over the tokenizer's ``vocab_size`` tokens (the rows the model's
    vocabulary was padded with, to a multiple of 64, are never predicted), ``chunk`` tokens of the
    logits upcast to fp32 at a time: never an fp32 copy of them all."""
    x, y = batch
    logits = model(input_ids=x, use_cache=False).logits  # (no K/V cache: nothing generates here)
    return chunked_cross_entropy(logits, y, vocab_size, chunk=chunk)


@torch.no_grad()
def evaluate_loss(model, tokens, batch_size: int, block_size: int, n_batches: int, device, autocast,
                  vocab_size: int | None = None, chunk: int = 4096) -> float:
    model.eval()
    total, count = 0.0, 0
    for x, y in eval_batches(tokens, batch_size, block_size, n_batches):
        x, y = x.to(device), y.to(device)
        with autocast:
            logits = model(input_ids=x, use_cache=False).logits
        total += chunked_cross_entropy(logits, y, vocab_size, chunk=chunk, reduction="sum").item()
        count += y.numel()
    model.train()
    return total / count


def prepare_run_corpus(cfg: PretrainConfig, log=logger.info, progress: bool = False):
    """The tokenized corpus ``cfg`` trains on, prepared now or found in the cache: one function, so
    that calibration (``sparselm.pruning.calibration``) finds a finished run's corpus as it was."""
    options = cfg.data.prepare_options()
    if cfg.model.init_from:  # the model's own tokenizer, never another one
        options["tokenizer"] = cfg.model.init_from
    return prepare_corpus(cfg.data.corpus or str(default_corpus()), cfg.shape().vocab_size, cfg.data.val_fraction,
                          cfg.data.cache_dir, log=log, progress=progress, **options)


@writes_run
def pretrain(cfg: PretrainConfig, resume: bool = False, progress: bool | None = None, log=logger.info) -> dict:
    """Train, write the run directory, return its summary."""
    start = start_run(cfg, resume, progress, log)
    if start.finished is not None:
        return start.finished
    device, dist, log = start.device, start.dist, start.log

    shape, init = cfg.shape(), cfg.model.init_from
    corpus = prepare_run_corpus(cfg, log, progress=cfg.run.progress and dist.is_main)
    if init and corpus.vocab_size > shape.vocab_size:
        raise ValueError(f"{init}: the tokenizer has {corpus.vocab_size} tokens but the model's embedding only "
                         f"{shape.vocab_size} rows; the directory's tokenizer and model do not belong together")
    if not init:
        shape = shape.override(vocab_size=corpus.model_vocab_size(cfg.model.vocab_size))  # follows the tokenizer
    corpus.check_windows(shape.block_size)
    if shape.vocab_size != corpus.vocab_size:
        log(f"tokenizer: {corpus.vocab_size} tokens; model vocab_size {shape.vocab_size} "
            f"({'as in ' + init if init else 'padded to a multiple of 64'}; the extra rows are never predicted)")
    train_tokens, val_tokens = corpus.train(), corpus.val()

    torch.manual_seed(cfg.run.seed)
    if init:
        log(f"continuing from {init} ({shape.family}, {shape.n_layer}L d={shape.n_embd} T={shape.block_size} V={shape.vocab_size})")
        model = load_model(init).to(device)
        save_tokenizer = functools.partial(_copy_tokenizer, init)
    else:
        model = build_model(shape, corpus.eos_id).to(device)
        save_tokenizer = functools.partial(save_hf_tokenizer, corpus.dir / "tokenizer.json",
                                           model_max_length=shape.block_size, eos_token=corpus.eos_token)

    def attach_sparsifier(model, optimizer):
        sparsifier = cfg.sparsity.build(cfg.optim.max_steps, cfg.run.seed, default_include=block_linear_names(model))
        if sparsifier is not None:
            sparsifier.attach(model, optimizer)
        if cfg.run.kernel == "semi-structured" and device.type == "cuda":  # (elsewhere start_run said it does not apply)
            use_semi_structured(model, sparsifier, cfg.run.dtype, log=logger.warning)
        return sparsifier

    setup = PhaseSetup(
        model=model,
        optimizer=lambda m: adamw(m, cfg.optim.lr, cfg.optim.weight_decay, (cfg.optim.beta1, cfg.optim.beta2), device.type),
        sparsifier=attach_sparsifier,
        save_files=lambda d: save_tokenizer(out_dir=d),
    )
    n_params = param_count(model)
    dense_fpt = flops.train_flops_per_token(shape, 1.0)
    masks_cost: dict = {}

    def make_phase(trainer, state) -> Phase:
        sparsifier = trainer.sparsifier

        def cost(step: int) -> StepCost:
            if sparsifier is None or sparsifier.released(step):  # dense run, or Variable SPDF's dense tail
                return StepCost(dense_fpt, dense_fpt, float(n_params))
            if masks_cost.get("masks") is not sparsifier.masks:  # recomputed only when masks move
                masks_cost.update(masks=sparsifier.masks, densities=sparsifier.densities(),
                                  nonzero=float(_nonzero_params(n_params, sparsifier, step)))
            dense_grad = sparsifier.dense_gradient_step(step)  # RigL reads the dense gradient
            fpt = flops.train_flops_per_token(shape, masks_cost["densities"], dense_weight_grad=dense_grad)
            return StepCost(fpt, dense_fpt, masks_cost["nonzero"])

        micro_batches = cfg.optim.grad_accum * dist.world_size  # per step, over all ranks
        return Phase(
            name="pretrain",
            total_steps=cfg.optim.max_steps,
            batch=lambda step, micro: get_batch(train_tokens, cfg.optim.batch_size, shape.block_size, cfg.run.seed,
                                                step * micro_batches + micro * dist.world_size + dist.rank, device),
            loss=functools.partial(next_token_loss, vocab_size=corpus.vocab_size, chunk=cfg.run.loss_chunk),
            lr=lambda step: cosine_lr(step, cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.max_steps, cfg.optim.min_lr_ratio),
            evaluate=lambda m: evaluate_loss(m, val_tokens, cfg.optim.batch_size, shape.block_size, cfg.run.eval_batches,
                                             device, trainer.autocast, corpus.vocab_size, cfg.run.loss_chunk),
            cost=cost,
            grad_accum=cfg.optim.grad_accum,
            grad_clip=cfg.optim.grad_clip,
            log_fields=lambda step: {"sparsity": 0.0 if sparsifier.released(step - 1) else round(global_sparsity(sparsifier.masks), 5)}
            if sparsifier is not None else {},
        )

    def summarize(trainer, state, val_loss, final) -> dict:
        sparsifier = trainer.sparsifier
        ended_dense = sparsifier is not None and sparsifier.released(cfg.optim.max_steps - 1)  # Variable SPDF
        summary = {
            "kind": "pretrain",
            "preset": None if init else cfg.model.preset,
            "init_from": init,
            "family": shape.family,
            "model": shape.to_dict(),
            "n_params": n_params,
            "final_val_loss": val_loss,
            "final_val_ppl": math.exp(val_loss),
            "unigram_entropy": corpus.unigram_entropy,
            "train_flops": state["train_flops"],
            "dense_train_flops": state["dense_train_flops"],  # the dense model of the same shape, same tokens
            "flops_reduction": state["dense_train_flops"] / state["train_flops"] if state["train_flops"] else 1.0,
            "final_param_count": _nonzero_params(n_params, sparsifier, state["step"]),
            "average_param_count": state["param_steps"] / max(1, state["step"]),
            "sparsity": _sparsity_report(sparsifier, ended_dense),
            "data": f"{cfg.data.corpus or default_corpus()}: {corpus.train_tokens:,} training tokens, "
                    f"tokenizer {corpus.tokenizer_source} ({corpus.vocab_size:,} tokens)",
        }
        if cfg.sparsity.iso_flop != "none":  # Sparse-Wide: the saving is stated against the dense *base* model
            summary["wide_dense_train_flops"] = state["dense_train_flops"]
            base_fpt = flops.train_flops_per_token(cfg.model.shape().override(vocab_size=shape.vocab_size), 1.0)
            summary["dense_train_flops"] = state["dense_train_flops"] * base_fpt / dense_fpt
            summary["flops_reduction"] = summary["dense_train_flops"] / state["train_flops"] if state["train_flops"] else 1.0
        return summary

    return run_phase(cfg, start, setup, make_phase, summarize)


def _nonzero_params(n_params: int, sparsifier, step: int) -> int:
    """Parameters not pruned during ``step`` (all of them in a dense run or a dense tail)."""
    if sparsifier is None or sparsifier.released(step):
        return n_params
    return n_params - sum(m.numel() - count_nonzero(m) for m in sparsifier.masks.values())


def _copy_tokenizer(model_dir: str, out_dir) -> None:
    """The tokenizer of the model a run continues from, saved as transformers loads it (all its files)."""
    from ..models.runs import load_tokenizer

    load_tokenizer(model_dir).save_pretrained(str(out_dir))


def _sparsity_report(sparsifier, ended_dense: bool) -> dict:
    """The masks' report; after a dense tail (Variable SPDF) the model itself is dense."""
    if sparsifier is None:
        return {"method": "dense", "target": 0.0, "measured": 0.0, "layers": {}}
    report = sparsifier.report()
    if ended_dense:
        report.update(measured=0.0, measured_before_dense_tail=report["measured"],
                      layers={k: 0.0 for k in report["layers"]})
    return report
