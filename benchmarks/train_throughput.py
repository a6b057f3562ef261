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
import statistics
import time

import torch

from sparselm.models import build_model, get_preset
from sparselm.sparsity import Static
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


def run(shape, batch_size, steps, sparsity, device, dtype):
    """Median step time and median masking time per step, through the training loop's own step."""
    torch.manual_seed(0)
    model = build_model(shape).to(device)
    opt = adamw(model, 1e-4, 0.1, device_type=device.type)
    sp = Static(sparsity).attach(model, opt) if sparsity > 0 else None
    mask_times: list[float] = []
    if sp is not None:  # time the two sparsity hooks inside the real step
        sp.after_backward, sp.after_step = timed(sp.after_backward, device, mask_times), timed(sp.after_step, device, mask_times)
    x = torch.randint(0, shape.vocab_size, (batch_size, shape.block_size + 1), device=device)
    batch = (x[:, :-1], x[:, 1:])
    phase = Phase(name="bench", total_steps=steps, batch=lambda step, micro: batch, loss=next_token_loss,
                  lr=lambda step: 1e-4, evaluate=lambda m: 0.0, cost=lambda step: StepCost(0.0, 0.0, 0.0))
    trainer = Trainer(model, opt, sp, device, Dist(), RunConfig(out="unused"), None, autocast_for(device, dtype))
    step_times = []
    for step in range(steps):
        sync(device)
        t0 = time.perf_counter()
        train_step(phase, trainer, step)
        sync(device)
        step_times.append(time.perf_counter() - t0)
    warm = max(1, steps // 4)
    per_step_mask = [a + b for a, b in zip(mask_times[0::2], mask_times[1::2])] or [0.0] * steps
    return statistics.median(step_times[warm:]), statistics.median(per_step_mask[warm:])


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
        dense.append(run(shape, args.batch_size, args.steps, 0.0, device, dtype)[0])
        s, m = run(shape, args.batch_size, args.steps, args.sparsity, device, dtype)
        sparse.append(s)
        masking.append(m)
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
