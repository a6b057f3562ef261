"""One-shot pruners side by side: seconds per block and peak memory, magnitude as the baseline.

For each preset shape (default ``small`` and ``gpt2-small``) a model is built (timing does not depend on
the weights' values), calibration token ids are drawn at random (``--nsamples`` x the model's context),
and each method prunes it to 50% (``--n-m 2:4`` for N:M) through ``sparselm.pruning.prune_model``, the
block-sequential driver ``sparselm prune`` uses. Each method runs in its own process so that its peak
memory is its own: on CPU the peak resident set size of that process (``ru_maxrss``: model, calibration
activations and the pruner's statistics, e.g. SparseGPT's in x in Hessians), and above that the growth
over the process's size once the model and tokens are loaded; on CUDA ``torch.cuda.max_memory_allocated``.

    python benchmarks/pruning.py                                # small and gpt2-small, CPU, 16 samples
    python benchmarks/pruning.py --presets small --nsamples 8 --n-m 2:4
    python benchmarks/pruning.py --device cuda --nsamples 128   # the references' calibration size
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

METHODS = ("magnitude", "wanda", "sparsegpt")


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def child(preset: str, method: str, nsamples: int, n_m: str | None, device: str, refine: str | None) -> dict:
    import torch

    from sparselm.models import block_linear_names, build_model, get_preset
    from sparselm.pruning import PRUNERS, REFINERS, prune_model
    from sparselm.sparsity import parse_n_m

    torch.manual_seed(0)
    shape = get_preset(preset)
    model = build_model(shape)
    calibration = torch.randint(0, shape.vocab_size, (nsamples, shape.block_size), generator=torch.Generator().manual_seed(0))
    loaded = rss_bytes()
    t0 = time.perf_counter()
    result = prune_model(model, PRUNERS[method](), sparsity=0.5, n_m=parse_n_m(n_m), include=block_linear_names(model),
                         calibration=calibration, refiner=REFINERS[refine]() if refine else None, device=device,
                         progress=False)
    total = time.perf_counter() - t0
    per_block = [b["seconds"] for b in result.blocks] or [total / shape.n_layer]
    return {"preset": preset, "method": method + (f"+{refine}" if refine else ""), "blocks": shape.n_layer,
            "s_per_block": statistics.median(per_block), "total_s": total, "peak": result.peak_memory_bytes,
            "growth": max(0, result.peak_memory_bytes - loaded) if device == "cpu" else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="small,gpt2-small")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--refine", default=None, help="also time METHOD+REFINE for each method (e.g. dsnot)")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--n-m", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--child", nargs=3, metavar=("PRESET", "METHOD", "REFINE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.child:
        preset, method, refine = args.child
        print(json.dumps(child(preset, method, args.nsamples, args.n_m, args.device, None if refine == "-" else refine)))
        return 0

    rows = []
    jobs = [(pr, m, "-") for pr in args.presets.split(",") for m in args.methods.split(",")]
    if args.refine:
        jobs += [(pr, m, args.refine) for pr in args.presets.split(",") for m in args.methods.split(",")]
    for preset, method, refine in jobs:
        cmd = [sys.executable, __file__, "--child", preset, method, refine, "--nsamples", str(args.nsamples),
               "--device", args.device] + (["--n-m", args.n_m] if args.n_m else []) + (
               ["--threads", str(args.threads)] if args.threads else [])
        out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        if out.returncode:
            print(out.stderr[-2000:], file=sys.stderr)
            return out.returncode
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))

    import torch

    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    print(f"one-shot pruning at {args.n_m or '50% unstructured'}, {args.nsamples} calibration samples x the context, "
          f"on {args.device} ({where})")
    mem = "peak RSS MiB | growth MiB" if args.device == "cpu" else "peak allocated MiB | -"
    print(f"| preset | method | blocks | s / block | total s | vs magnitude | {mem} |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    base = {r["preset"]: r["total_s"] for r in rows if r["method"] == "magnitude"}
    for r in rows:
        ratio = f"{r['total_s'] / base[r['preset']]:.0f}x" if r["preset"] in base and base[r["preset"]] > 0 else "-"
        growth = f"{r['growth'] / 2**20:,.0f}" if r["growth"] is not None else "-"
        print(f"| {r['preset']} | {r['method']} | {r['blocks']} | {r['s_per_block']:.3g} | {r['total_s']:.3g} | {ratio} | "
              f"{r['peak'] / 2**20:,.0f} | {growth} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
