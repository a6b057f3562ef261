"""Training throughput, dense vs sparse, and the cost of keeping masks exact.

Runs the same preset dense and at a given sparsity on the current device with synthetic tokens
(throughput does not depend on the data), interleaving repeats so drift hits both alike, and
prints tokens/s and the masking overhead: the time spent in ``after_backward`` + ``after_step``
as a percent of a dense step. Our sparsity is simulated with dense kernels (zeros are stored),
so sparse and dense steps cost the same apart from the masking itself.

    python benchmarks/train_throughput.py --preset small --sparsity 0.75
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from dataclasses import dataclass, field

import torch

from sparselm.models import build_model, get_preset
from sparselm.sparsity import Static
from sparselm.sparsity.semi_structured import use_semi_structured
from sparselm.training.config import RunConfig
from sparselm.training.distributed import Dist, pick_device
from sparselm.training.loop import Phase, StepCost, Trainer, autocast_for, train_step
from sparselm.training.optim import adamw
from sparselm.training.pretraining import next_token_loss


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, into: list):
    """``fn`` with its wall time (device-synchronised) appended to ``into`` on every call."""
    def wrapper(*args):
        sync(device)
        t0 = time.perf_counter()
        fn(*args)
        sync(device)
        into.append(time.perf_counter() - t0)
    return wrapper


@dataclass
class Measurement:
    """One run of a variant: median step time, median masking time per step (``after_backward`` +
    ``after_step``), peak CUDA memory, the layers on 2:4 kernels (and why none, if so), the losses."""

    step_s: float
    mask_s: float
    peak_mem: int | None = None  # bytes, CUDA only
    kernel_layers: list[str] = field(default_factory=list)
    kernel_fallback: str | None = None
    losses: list[float] = field(default_factory=list)


def run(shape, batch_size, steps, sparsity, device, dtype, n_m=None, kernel="dense", compile=False) -> Measurement:
    """Median step time and median masking time per step, through the training loop's own step.
    ``n_m``: an N:M mask (its sparsity replaces ``sparsity``); ``kernel='semi-structured'``: the 2:4
    kernels of ``sparselm.sparsity.semi_structured`` (dense, with the reason kept, where they cannot
    run); ``compile``: torch.compile, as ``run.compile``."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    with torch.device(device):  # built where it trains: a 1B model initialises in seconds, not minutes
        model = build_model(shape)
    opt = adamw(model, 1e-4, 0.1, device_type=device.type)
    sp = Static(sparsity, n_m=n_m).attach(model, opt) if sparsity > 0 or n_m else None
    result = Measurement(0.0, 0.0)
    if kernel == "semi-structured":
        notes: list[str] = []
        result.kernel_layers = use_semi_structured(model, sp, dtype, log=notes.append)
        result.kernel_fallback = "; ".join(notes) or None  # why none (or some) of the linears stayed dense
    mask_times: list[float] = []
    if sp is not None:  # time the two sparsity hooks inside the real step
        sp.after_backward, sp.after_step = timed(sp.after_backward, device, mask_times), timed(sp.after_step, device, mask_times)
    x = torch.randint(0, shape.vocab_size, (batch_size, shape.block_size + 1), device=device)
    batch = (x[:, :-1], x[:, 1:])
    phase = Phase(name="bench", total_steps=steps, batch=lambda step, micro: batch, loss=next_token_loss,
                  lr=lambda step: 1e-4, evaluate=lambda m: 0.0, cost=lambda step: StepCost(0.0, 0.0, 0.0))
    trainer = Trainer(model=model, optimizer=opt, sparsifier=sp, device=device, dist=Dist(),
                      run=RunConfig(out="unused", compile=compile), out=None, autocast=autocast_for(device, dtype))
    step_times = []
    for step in range(steps):
        sync(device)
        t0 = time.perf_counter()
        loss, _, _ = train_step(phase, trainer, step)
        sync(device)
        step_times.append(time.perf_counter() - t0)
        result.losses.append(float(loss))
    if sp is not None:
        sp.check()  # masks exact after the last step, whatever the kernels
    warm = max(1, steps // 4)
    per_step_mask = [a + b for a, b in zip(mask_times[0::2], mask_times[1::2])] or [0.0] * steps
    result.step_s, result.mask_s = statistics.median(step_times[warm:]), statistics.median(per_step_mask[warm:])
    if device.type == "cuda":
        result.peak_mem = torch.cuda.max_memory_allocated(device)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--sparsity", type=float, default=0.75)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = pick_device(args.device)
    torch.set_float32_matmul_precision("high")
    amp = device.type == "cuda"
    dtype = "auto"
    shape = get_preset(args.preset)
    tokens = args.batch_size * shape.block_size
    dense, sparse, masking = [], [], []
    for _ in range(args.repeats):
        dense.append(run(shape, args.batch_size, args.steps, 0.0, device, dtype).step_s)
        r = run(shape, args.batch_size, args.steps, args.sparsity, device, dtype)
        sparse.append(r.step_s)
        masking.append(r.mask_s)
    d, s, m = statistics.median(dense), statistics.median(sparse), statistics.median(masking)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"preset {args.preset}, batch {args.batch_size} x {shape.block_size} tokens, {name}, "
          f"{'bf16 autocast' if amp else 'fp32'}, median of {args.repeats} x {args.steps - max(1, args.steps // 4)} steps")
    print("| run | step time (ms) | tokens/s |")
    print("|---|---:|---:|")
    print(f"| dense | {d * 1e3:.1f} | {tokens / d:,.0f} |")
    print(f"| sparse {args.sparsity:.0%} (static) | {s * 1e3:.1f} | {tokens / s:,.0f} |")
    print(f"masking time per step: {m * 1e3:.2f} ms = {100 * m / d:.2f}% of a dense step "
          f"(whole-step difference sparse vs dense: {100 * (s - d) / d:+.2f}%)")


if __name__ == "__main__":
    main()
