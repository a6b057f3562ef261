"""One SET / RigL mask update: the stable sort it used to be against the top-k threshold it is now.

On a preset (default ``small``: 6 x 384, 24 masked block linears, 10.6M masked weights) the model is
built, SET and RigL are attached at 75% sparsity, one real backward gives RigL its dense gradients,
and ``update_masks`` of the first update step is timed with ``sparselm.sparsity.masks.topk_mask``
(a threshold from ``torch.topk`` on the smaller side, ties kept by position) and with the stable
descending sort it replaced (kept here, as in ``tests/test_sparsity.py``). The two run in alternating
rounds (the order rotates), so drift and other load on the machine hit both alike; the table gives
the median over rounds of the whole update and of the time spent inside ``topk_mask`` (two calls per
layer: drop, then grow), and says whether every new mask is identical. ``update_masks`` is what a
training step pays for the masks' move; ``after_step`` adds the reset of changed weights and optimizer
moments (and, under FSDP, the gather), which are the same either way. CPU by default.

    python benchmarks/mask_update.py                   # small, 5 rounds
    python benchmarks/mask_update.py --threads 1 --rounds 9
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from sparselm.models import build_model, get_preset
from sparselm.sparsity import Schedule, make_sparsifier
from sparselm.sparsity import masks as M
from sparselm.training.pretraining import next_token_loss


def stable_sort_topk_mask(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """``topk_mask`` before the top-k: a stable descending sort of the whole layer."""
    flat = scores.reshape(-1).float()
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=scores.device)
    if n_keep > 0:
        idx = torch.sort(flat, descending=True, stable=True).indices[:n_keep]
        mask[idx] = True
    return mask.view(scores.shape)


IMPLEMENTATIONS = {"stable sort (before)": stable_sort_topk_mask, "top-k threshold (now)": M.topk_mask}


def sparsifiers(shape, sparsity: float, device: torch.device, batch: int):
    """{method: (sparsifier, step, dense grads)} at the first update step of each method, each on its
    own model (built alike)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, shape.vocab_size, (batch, shape.block_size + 1), generator=g).to(device)
    out = {}
    for method in ("set", "rigl"):
        torch.manual_seed(0)
        model = build_model(shape).to(device)
        sp = make_sparsifier(method, sparsity=sparsity, schedule=Schedule.of(1000, 100, end=0.75)).attach(model)
        next_token_loss(model, (x[:, :-1], x[:, 1:])).backward()
        grads = {t.name: t.param.grad.detach().clone() for t in sp.targets}
        out[method] = (sp, sp.schedule.update_steps()[0], grads)
    return out


def timed_update(sp, step, grads, topk) -> tuple[float, float, dict[str, torch.Tensor]]:
    """(seconds for update_masks, seconds inside topk_mask, new masks) with ``topk`` as topk_mask."""
    inside = [0.0]

    def counted(scores, n_keep):
        _sync(scores.device)
        t0 = time.perf_counter()
        mask = topk(scores, n_keep)
        _sync(scores.device)
        inside[0] += time.perf_counter() - t0
        return mask

    saved, M.topk_mask = M.topk_mask, counted
    try:
        _sync(sp.targets[0].param.device)
        t0 = time.perf_counter()
        new = sp.update_masks(step, grads)
        _sync(sp.targets[0].param.device)
        return time.perf_counter() - t0, inside[0], new
    finally:
        M.topk_mask = saved


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return (f"{cpu}; {os.cpu_count()} cores; torch {torch.__version__}, {torch.get_num_threads()} intra-op threads; "
            f"python {platform.python_version()}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--n-layer", type=int, help="override the preset's layer count")
    ap.add_argument("--sparsity", type=float, default=0.75)
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (each implementation once per round)")
    ap.add_argument("--batch-size", type=int, default=2, help="of the one backward that gives RigL its gradients")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    load = os.getloadavg()[0]
    shape = get_preset(args.preset).override(**({"n_layer": args.n_layer} if args.n_layer else {}))
    methods = sparsifiers(shape, args.sparsity, device, args.batch_size)
    names = list(IMPLEMENTATIONS)
    update = {(m, n): [] for m in methods for n in names}
    inside = {(m, n): [] for m in methods for n in names}
    identical = {m: True for m in methods}
    for r in range(args.rounds + 1):  # round 0 warms up, untimed
        for method, (sp, step, grads) in methods.items():
            masks = {}
            for name in names[r % 2:] + names[:r % 2]:  # the order rotates
                total, in_topk, masks[name] = timed_update(sp, step, grads, IMPLEMENTATIONS[name])
                if r:
                    update[method, name].append(total)
                    inside[method, name].append(in_topk)
            a, b = (masks[n] for n in names)
            identical[method] &= a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    sp = methods["set"][0]
    layers, weights = len(sp.targets), sum(t.param.numel() for t in sp.targets)
    print(f"machine: {machine()}; device {device}; load average before the run {load:.2f}, after {os.getloadavg()[0]:.2f}")
    print(f"preset {args.preset} ({shape.n_layer} x {shape.n_embd}): {layers} masked layers, {weights / 1e6:.1f}M masked weights at {args.sparsity:.0%} "
          f"sparsity; one update_masks at the first update step (drop fraction "
          f"{sp.drop_fraction_at(methods['set'][1]):.2f}); median of {args.rounds} alternating rounds")
    print("| method | topk_mask | update ms | in topk_mask ms | speed-up (update) | masks identical |")
    print("|---|---|---:|---:|---:|---|")
    for method in methods:
        before = statistics.median(update[method, names[0]])
        for name in names:
            t = statistics.median(update[method, name])
            print(f"| {method} | {name} | {t * 1e3:.1f} | {statistics.median(inside[method, name]) * 1e3:.1f} | "
                  f"{before / t:.2f}x | {'yes' if identical[method] else 'NO'} |")
    return 0 if all(identical.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
