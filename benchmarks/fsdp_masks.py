"""The cost of exact masks under FSDP2: the hot-path hooks (local shards, no communication) and a
mask update (weights, masks and, for RigL, gradients gathered whole, new masks computed alike on
every rank, each rank keeping its shard), against the training step they sit in.

Spawns ``--ranks`` processes on one machine (gloo on the CPU, NCCL on GPUs when there are enough),
shards the preset with ``sparselm.training.distributed.shard_model`` and prints one table.

    python benchmarks/fsdp_masks.py --preset small --ranks 2 --method rigl
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparselm.models import build_model, get_preset
from sparselm.sparsity import Schedule, make_sparsifier, sharding
from sparselm.training.distributed import Dist, shard_model
from sparselm.training.optim import adamw
from sparselm.training.pretraining import next_token_loss


def _worker(rank, args, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= args.ranks
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=args.ranks)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // args.ranks))
    shape = get_preset(args.preset)
    torch.manual_seed(0)
    model = shard_model(build_model(shape).to(device), device, "float32", Dist(rank, args.ranks, rank))
    opt = adamw(model, 1e-4, 0.1, device_type=device.type)
    schedule = Schedule.of(10_000, update_every=args.update_every)
    extra = {"schedule": schedule} if args.method != "static" else {}
    sp = make_sparsifier(args.method, sparsity=args.sparsity, **extra).attach(model, opt)
    x = torch.randint(0, shape.vocab_size, (args.batch_size, shape.block_size + 1), device=device)

    def sync():
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()

    times = {"step": [], "hooks": [], "update": []}
    for step in range(1, args.steps + 1):
        sync()
        t0 = time.perf_counter()
        next_token_loss(model, (x[:, :-1], x[:, 1:])).backward()
        sync()
        t1 = time.perf_counter()
        sp.after_backward(step)
        sync()
        t2 = time.perf_counter()
        opt.step()
        sync()
        t3 = time.perf_counter()
        sp.after_step(step)
        sync()
        t4 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if step <= 2:  # warm-up
            continue
        key = "update" if sp.is_update_step(step) else "hooks"
        times[key].append((t2 - t1) + (t4 - t3))
        times["step"].append(t4 - t0)
    # the communication part of an update alone: weights, masks and gradients of every masked layer gathered
    next_token_loss(model, (x[:, :-1], x[:, 1:])).backward()
    for _ in range(3):
        sync()
        t0 = time.perf_counter()
        for t in sp.targets:
            sharding.full(t.param.detach()), sharding.full(sp.masks[t.name]), sharding.full(t.param.grad)
        sync()
        times.setdefault("gather", []).append(time.perf_counter() - t0)
    if rank == 0:
        queue.put({k: statistics.median(v) if v else float("nan") for k, v in times.items()} | {"device": str(device)})
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--method", default="rigl", choices=["static", "gmp", "set", "rigl"])
    ap.add_argument("--sparsity", type=float, default=0.75)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--update-every", type=int, default=4)
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, args, 29650 + os.getpid() % 300, queue)) for r in range(args.ranks)]
    for p in procs:
        p.start()
    r = queue.get()
    for p in procs:
        p.join()
    step = r["step"]
    print(f"FSDP2 masks: {args.preset}, {args.ranks} ranks on {r['device']}, {args.method} {args.sparsity:.0%}, "
          f"batch {args.batch_size}/rank, torch {torch.__version__}")
    print(f"| {'what':<44} | {'ms':>9} | {'% of step':>9} |")
    print(f"|{'-' * 46}|{'-' * 11}|{'-' * 11}|")
    print(f"| {'training step (median)':<44} | {step * 1e3:9.1f} | {100:9.1f} |")
    print(f"| {'mask hooks on local shards (normal step)':<44} | {r['hooks'] * 1e3:9.2f} | {100 * r['hooks'] / step:9.2f} |")
    print(f"| {'mask update step (gather + recompute)':<44} | {r['update'] * 1e3:9.2f} | {100 * r['update'] / step:9.2f} |")
    print(f"| {'  of which gathering weights, masks, grads':<44} | {r['gather'] * 1e3:9.2f} | {100 * r['gather'] / step:9.2f} |")
    print(f"| {'update amortised over update_every=' + str(args.update_every):<44} | "
          f"{r['update'] / args.update_every * 1e3:9.2f} | {100 * r['update'] / args.update_every / step:9.2f} |")


if __name__ == "__main__":
    main()
