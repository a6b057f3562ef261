"""The pre-training loop, top to bottom: batch, forward, backward, mask, clip, step, mask, log,
evaluate, checkpoint. The sparsity engine is called at two points: after backward, after step."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import flops
from ..data import eval_batches, get_batch, prepare_corpus
from ..data.paths import default_corpus
from ..data.tokenizer import save_hf_tokenizer
from ..files import write_json
from ..models import build_model
from ..sparsity import global_sparsity, make_sparsifier, parse_n_m
from . import distributed
from .checkpoint import find_checkpoint, load_checkpoint, save_checkpoint, truncate_metrics
from .config import RESUMABLE_CHANGES, PretrainConfig
from .optim import adamw, cosine_lr


class RunExistsError(FileExistsError):
    """The output directory already holds a run."""


def build_sparsifier(cfg: PretrainConfig):
    """The configured sparse-training method, or None for a dense run."""
    if cfg.sparsity == 0 and cfg.n_m is None:
        return None
    kw = dict(
        sparsity=cfg.sparsity, distribution=cfg.distribution, include=cfg.include, seed=cfg.seed,
        n_m=parse_n_m(cfg.n_m), total_steps=cfg.max_steps,
    )
    if cfg.exclude is not None:
        kw["exclude"] = cfg.exclude
    if cfg.method in ("gmp", "set", "rigl"):
        kw["update_every"] = cfg.update_every
    if cfg.method == "gmp":
        kw.update(start=cfg.sparsity_start, end=cfg.sparsity_end, schedule=cfg.schedule)
    if cfg.method in ("set", "rigl"):
        kw.update(end=cfg.sparsity_end, drop_fraction=cfg.drop_fraction)
    return make_sparsifier(cfg.method, **kw)


def param_count(model: torch.nn.Module) -> int:
    """Non-zero-able parameters: every parameter once (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@torch.no_grad()
def evaluate_loss(model, tokens, batch_size: int, block_size: int, n_batches: int, device, autocast) -> float:
    model.eval()
    total, count = 0.0, 0
    for x, y in eval_batches(tokens, batch_size, block_size, n_batches):
        x, y = x.to(device), y.to(device)
        with autocast:
            logits = model(input_ids=x).logits
        total += F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), reduction="sum").item()
        count += y.numel()
    model.train()
    return total / count


def _check_resume_config(saved: dict, cfg: PretrainConfig, log) -> None:
    diffs = {k for k in saved if k not in RESUMABLE_CHANGES and saved.get(k) != cfg.to_dict().get(k)}
    if diffs:
        raise ValueError(
            f"cannot resume: config differs from the checkpoint in {sorted(diffs)} "
            f"(e.g. {next(iter(sorted(diffs)))}: saved {saved.get(next(iter(sorted(diffs))))!r}); use a new --out"
        )
    if saved.get("max_steps") != cfg.max_steps:
        log(f"note: max_steps changed {saved.get('max_steps')} -> {cfg.max_steps}; the LR schedule follows the new value")


def pretrain(cfg: PretrainConfig, resume: bool = False, progress: bool = True, log=print) -> dict:
    """Train, write the run directory, return its summary."""
    out = Path(cfg.out)
    device = distributed.pick_device(cfg.device)
    dist = distributed.setup(device)
    log = log if dist.is_main else (lambda *a, **k: None)
    if cfg.dtype == "auto":
        amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    else:
        amp_dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()

    checkpoint = find_checkpoint(out)
    if checkpoint is not None and not resume:
        raise RunExistsError(f"{out} already holds a checkpoint; pass --resume to continue it or choose another --out")
    if (out / "summary.json").exists() and not resume:
        raise RunExistsError(f"{out} already holds a finished run; choose another --out")

    corpus_path = cfg.corpus or str(default_corpus())
    shape = cfg.shape()
    corpus = prepare_corpus(corpus_path, shape.vocab_size, cfg.val_fraction, cfg.cache_dir, log=log)
    train_tokens, val_tokens = corpus.train(), corpus.val()

    torch.manual_seed(cfg.seed)
    model = build_model(shape, corpus.eos_id).to(device)
    optimizer = adamw(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device.type)
    sparsifier = build_sparsifier(cfg)
    if sparsifier is not None:
        sparsifier.attach(model, optimizer)
    n_params = param_count(model)

    state = {"step": 0, "tokens_seen": 0, "train_flops": 0.0, "dense_train_flops": 0.0, "param_steps": 0.0, "wall_time_s": 0.0}
    if checkpoint is not None:
        saved_cfg = json.loads((out / "train_config.json").read_text())
        _check_resume_config(saved_cfg, cfg, log)
        masks, state = load_checkpoint(checkpoint, model, optimizer, map_location=device)
        if sparsifier is not None:
            sparsifier.load_state_dict(masks)
        truncate_metrics(out / "metrics.jsonl", state["step"])
        log(f"resumed from {checkpoint} at step {state['step']}")
    elif resume and (out / "metrics.jsonl").exists():
        truncate_metrics(out / "metrics.jsonl", 0)  # rows of an attempt killed before its first checkpoint
        log(f"no checkpoint in {out}; starting the run again")

    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "train_config.json")
        shutil.copy(corpus.dir / "tokenizer.json", out / "tokenizer.json")

    train_model = model
    if cfg.compile and device.type == "cuda":
        train_model = torch.compile(model)
    if dist.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None
        )

    tokens_per_step = cfg.tokens_per_step * dist.world_size
    dense_fpt = flops.train_flops_per_token(shape, 1.0)

    def mask_cost() -> tuple[float, float]:
        """Training FLOPs per token under the current masks, and the non-zero parameter count
        (recomputed only when masks move)."""
        if sparsifier is None:
            return dense_fpt, float(n_params)
        pruned = sum(m.numel() - int(m.sum()) for m in sparsifier.masks.values())
        return flops.train_flops_per_token(shape, sparsifier.densities()), float(n_params - pruned)

    metrics = open(out / "metrics.jsonl", "a") if dist.is_main else None
    def log_metrics(row: dict) -> None:
        if metrics is not None:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()

    def save(step_state):
        if dist.is_main:
            masks = sparsifier.state_dict() if sparsifier is not None else None
            save_checkpoint(out, model, optimizer, masks, step_state)

    cost = mask_cost()
    bar = tqdm(total=cfg.max_steps, initial=state["step"], disable=not (progress and dist.is_main), desc="pretrain", unit="step")
    t0, t_last, tok_last = time.time(), time.time(), state["tokens_seen"]
    wall0 = state["wall_time_s"]
    val_loss = None
    step = state["step"]
    try:
        while step < cfg.max_steps:
            lr = cosine_lr(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                x, y = get_batch(train_tokens, cfg.batch_size, shape.block_size, cfg.seed + 7919 * dist.rank,
                                 step * cfg.grad_accum + micro, device)
                sync = contextlib.nullcontext() if (not dist.enabled or micro == cfg.grad_accum - 1) else train_model.no_sync()
                with sync:
                    with autocast:
                        logits = train_model(input_ids=x).logits
                        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
                    (loss / cfg.grad_accum).backward()
                loss_sum += loss.detach()
            if sparsifier is not None:
                sparsifier.after_backward(step)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            fpt, nonzero = cost
            if sparsifier is not None and sparsifier.dense_gradient_step(step):  # RigL reads the dense gradient
                fpt = flops.train_flops_per_token(shape, sparsifier.densities(), dense_weight_grad=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if sparsifier is not None:
                moved = sparsifier.is_update_step(step)
                sparsifier.after_step(step)
                if moved:
                    cost = mask_cost()
            state["train_flops"] += fpt * tokens_per_step
            state["dense_train_flops"] += dense_fpt * tokens_per_step
            state["param_steps"] += nonzero
            step += 1
            state["step"] = step
            state["tokens_seen"] += tokens_per_step

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                train_loss = distributed.all_reduce_mean(loss_sum.item() / cfg.grad_accum, dist, device)
                if not math.isfinite(train_loss):
                    raise FloatingPointError(f"training loss is {train_loss} at step {step}; lower --lr or check the data")
                now = time.time()
                tps = (state["tokens_seen"] - tok_last) / max(now - t_last, 1e-9)
                t_last, tok_last = now, state["tokens_seen"]
                row = {"step": step, "loss": round(train_loss, 5), "lr": lr, "tokens": state["tokens_seen"],
                       "tokens_per_s": round(tps, 1), "train_flops": state["train_flops"]}
                if sparsifier is not None:
                    row["sparsity"] = round(global_sparsity(sparsifier.masks), 5)
                log_metrics(row)
                bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tps:,.0f}")
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                val_loss = evaluate_loss(model, val_tokens, cfg.batch_size, shape.block_size, cfg.eval_batches, device, autocast)
                log_metrics({"step": step, "val_loss": round(val_loss, 5), "val_ppl": round(math.exp(val_loss), 3)})
                bar.set_postfix(val=f"{val_loss:.3f}")
            state["wall_time_s"] = wall0 + time.time() - t0
            if step % cfg.ckpt_every == 0 or step == cfg.max_steps:
                save(dict(state))
            bar.update(1)
    except KeyboardInterrupt:
        log(f"interrupted at step {step}; saving a checkpoint (resume with --resume)")
        save(dict(state))
        raise
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()

    if sparsifier is not None:
        sparsifier.check()
    if val_loss is None:  # resumed a finished run
        val_loss = evaluate_loss(model, val_tokens, cfg.batch_size, shape.block_size, cfg.eval_batches, device, autocast)
    summary = {
        "kind": "pretrain",
        "preset": cfg.preset,
        "model": shape.to_dict(),
        "n_params": n_params,
        "final_val_loss": val_loss,
        "final_val_ppl": math.exp(val_loss),
        "unigram_entropy": corpus.unigram_entropy,
        "steps": state["step"],
        "tokens_seen": state["tokens_seen"],
        "train_flops": state["train_flops"],
        "dense_train_flops": state["dense_train_flops"],
        "flops_reduction": state["dense_train_flops"] / state["train_flops"] if state["train_flops"] else 1.0,
        "final_param_count": int(mask_cost()[1]),
        "average_param_count": state["param_steps"] / max(1, state["step"]),
        "sparsity": sparsifier.report() if sparsifier is not None else {"method": "dense", "target": 0.0, "measured": 0.0, "layers": {}},
        "wall_time_s": state["wall_time_s"],
        "device": str(device),
        "world_size": dist.world_size,
    }
    if dist.is_main:
        model.save_pretrained(out)
        save_hf_tokenizer(out / "tokenizer.json", out, shape.block_size)
        if sparsifier is not None:
            from safetensors.torch import save_file
            save_file(sparsifier.state_dict(), str(out / "masks.safetensors"))
        write_json(out / "summary.json", summary)
    return summary
