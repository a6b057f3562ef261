"""The GPU suite: the CUDA tests, then one table of dense vs sparse training, measured side by side.

On a CUDA machine it runs ``pytest -m cuda`` (the tests that need a GPU: the 2:4 kernels against the
dense-masked path, training steps with exact masks), then, for GPT-2 Small (124M, T=1024) and
``llama-1b`` (TinyLlama's shape, T=2048; skipped when it does not fit in memory), trains dense, 75%
static, 2:4 on masked dense kernels and 2:4 on PyTorch's semi-structured kernels through the
training loop's own step (bf16 autocast, fused AdamW, synthetic tokens; the vocabulary padded to a
multiple of 64 as ``pretrain`` pads it) and prints tokens/s, MFU, peak memory and the masking
overhead, with a PASS/FAIL column for the targets:

- masking overhead (``after_backward`` + ``after_step``) <= 2% of the step, for every sparse run;
- dense GPT-2 Small MFU >= 45% (the target is set for an H100; MFU counts the dense training FLOPs,
  ``flops.train_flops_per_token``, over ``flops.peak_flops`` of the device);
- the 2:4 kernels >= 1.1x the tokens/s of the same 2:4 run on masked dense kernels.

Variants run in interleaved rounds (``--repeats``) so drift hits all alike; each cell is the median.
Without a CUDA device it says so on a ``no CUDA device`` line and runs the same table on the ``tiny``
preset for a few steps, so that every code path but the kernels runs (MFU n/a, targets n/a; the 2:4
kernel row shows the dense fallback and its reason), and exits 0.

    python benchmarks/gpu_suite.py                       # CUDA: tests + gpt2-small + llama-1b
    python benchmarks/gpu_suite.py --compile --repeats 3
    python benchmarks/gpu_suite.py --presets gpt2-small --skip-tests
    python benchmarks/gpu_suite.py --device cpu          # the CPU-safe parts (what CI can run)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sparselm import flops
from sparselm.data.corpus import pad_vocab
from sparselm.models import get_preset
from sparselm.training.distributed import pick_device

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import Measurement, run  # noqa: E402  (the shared timing code)

ROOT = Path(__file__).resolve().parents[1]
MASKING_MAX = 0.02  # of the step
MFU_MIN = 0.45  # dense GPT-2 Small
KERNEL_SPEEDUP_MIN = 1.1  # 2:4 kernels over the dense-masked 2:4 run
CUDA_BATCH = {"gpt2-small": 8, "llama-1b": 4}


@dataclass(frozen=True)
class Variant:
    label: str
    sparsity: float = 0.0
    n_m: tuple[int, int] | None = None
    kernel: str = "dense"


VARIANTS = (
    Variant("dense"),
    Variant("75% static", sparsity=0.75),
    Variant("2:4 static, dense kernels", n_m=(2, 4)),
    Variant("2:4 static, semi-structured kernels", n_m=(2, 4), kernel="semi-structured"),
)


@dataclass
class Row:
    preset: str
    variant: Variant
    runs: list[Measurement]
    tokens_per_step: int
    mfu: float | None = None
    skipped: str | None = None

    @property
    def step_s(self) -> float:
        return statistics.median(r.step_s for r in self.runs)

    @property
    def mask_s(self) -> float:
        return statistics.median(r.mask_s for r in self.runs)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s

    @property
    def peak_mem(self) -> int | None:
        mems = [r.peak_mem for r in self.runs if r.peak_mem is not None]
        return max(mems) if mems else None


def run_cuda_tests() -> tuple[bool, str]:
    """``pytest -m cuda`` in a subprocess: (passed, its summary line)."""
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "tests"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    summary = lines[-1] if lines else proc.stderr.strip()[-500:]
    if proc.returncode not in (0, 5):  # 5: no tests collected
        print(proc.stdout[-6000:], proc.stderr[-2000:], sep="\n")
    return proc.returncode in (0, 5), summary


def fits(shape, batch: int, device: torch.device) -> str | None:
    """Why ``shape`` cannot train here (a rough lower bound of the memory it needs), else None."""
    if device.type != "cuda":
        return None
    n_params = sum(n_in * n_out for _, _, n_in, n_out in flops.linear_layers(shape)) + \
        shape.vocab_size * shape.n_embd * (1 if shape.tie_embeddings else 2)
    need = 16 * n_params  # fp32 weights + gradients + AdamW's two moments; activations come on top
    total = torch.cuda.get_device_properties(device).total_memory
    if need > 0.9 * total:
        return f"needs over {need / 2**30:.0f} GiB for weights, gradients and AdamW state; the GPU has {total / 2**30:.0f}"
    return None


def measure(presets, batch_sizes, steps, repeats, device, compile_, log) -> list[Row]:
    rows: list[Row] = []
    for preset in presets:
        shape = get_preset(preset)
        shape = shape.override(vocab_size=pad_vocab(shape.vocab_size))
        batch = batch_sizes[preset]
        these = [Row(preset, v, [], batch * shape.block_size) for v in VARIANTS]
        why = fits(shape, batch, device)
        if not why:  # an untimed warm-up, so that the first variant does not pay the process's first steps
            try:
                run(shape, batch, 2, 0.0, device, "auto", compile=compile_)
            except torch.cuda.OutOfMemoryError:
                why = f"out of memory at batch {batch} x {shape.block_size}"
                torch.cuda.empty_cache()
        for _ in range(repeats):
            for row in these:
                if why or row.skipped:
                    continue
                t0 = time.perf_counter()
                try:
                    row.runs.append(run(shape, batch, steps, row.variant.sparsity, device, "auto", n_m=row.variant.n_m,
                                        kernel=row.variant.kernel, compile=compile_))
                except torch.cuda.OutOfMemoryError:
                    row.skipped = f"out of memory at batch {batch} x {shape.block_size}"
                    torch.cuda.empty_cache()
                    continue
                log(f"  {preset} | {row.variant.label}: {row.runs[-1].step_s * 1e3:.1f} ms/step "
                    f"({time.perf_counter() - t0:.0f} s)")
        peak = flops.peak_flops(torch.cuda.get_device_name(device), "bfloat16") if device.type == "cuda" else None
        dense_fpt = flops.train_flops_per_token(shape, 1.0)  # what masked-dense kernels execute
        for row in these:
            if why and not row.skipped:
                row.skipped = why
            if row.runs:
                row.mfu = flops.mfu(dense_fpt, row.tokens_per_s, peak)
        rows += these
    return rows


def targets(row: Row, rows: list[Row], device: torch.device) -> str:
    """PASS/FAIL of the targets that apply to this row."""
    if row.skipped or not row.runs:
        return ""
    if device.type != "cuda":
        return "n/a (no CUDA)"
    out = []
    if row.variant.sparsity or row.variant.n_m:
        share = row.mask_s / row.step_s
        out.append(f"masking <= {MASKING_MAX:.0%}: {'PASS' if share <= MASKING_MAX else 'FAIL'}")
    if row.variant.label == "dense" and row.preset == "gpt2-small":
        out.append(f"MFU >= {MFU_MIN:.0%}: " + ("n/a (unknown peak)" if row.mfu is None else
                                               "PASS" if row.mfu >= MFU_MIN else "FAIL"))
    if row.variant.kernel == "semi-structured":
        base = next((r for r in rows if r.preset == row.preset and r.variant.n_m == row.variant.n_m
                     and r.variant.kernel == "dense" and r.runs), None)
        if not row.runs[0].kernel_layers:
            out.append(f">= {KERNEL_SPEEDUP_MIN}x: FAIL (dense fallback)")
        elif base is not None:
            speedup = row.tokens_per_s / base.tokens_per_s
            out.append(f">= {KERNEL_SPEEDUP_MIN}x: {'PASS' if speedup >= KERNEL_SPEEDUP_MIN else 'FAIL'} ({speedup:.2f}x)")
    return "; ".join(out)


def table(rows: list[Row], device: torch.device) -> list[str]:
    lines = ["| model | run | step (ms) | tokens/s | vs dense | MFU | peak mem (GiB) | masking (% of step) | "
             "final loss | 2:4 kernel layers | targets |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    notes = []
    for row in rows:
        if row.skipped or not row.runs:
            lines.append(f"| {row.preset} | {row.variant.label} | skipped: {row.skipped} |  |  |  |  |  |  |  |  |")
            continue
        dense = next((r for r in rows if r.preset == row.preset and r.variant.label == "dense" and r.runs), None)
        vs = f"{row.tokens_per_s / dense.tokens_per_s:.2f}x" if dense else "n/a"
        mfu = f"{row.mfu:.1%}" if row.mfu is not None else "n/a"
        mem = f"{row.peak_mem / 2**30:.1f}" if row.peak_mem is not None else "n/a"
        sparse = row.variant.sparsity or row.variant.n_m
        masking = f"{100 * row.mask_s / row.step_s:.2f}%" if sparse else ""
        loss = statistics.median(r.losses[-1] for r in row.runs)
        kernel = ""
        if row.variant.kernel == "semi-structured":
            kernel = str(len(row.runs[0].kernel_layers))
            if row.runs[0].kernel_fallback:
                why = row.runs[0].kernel_fallback.replace("semi-structured kernels: ", "")
                notes.append(f"{row.preset}, {row.variant.label}: {why}")
        lines.append(f"| {row.preset} | {row.variant.label} | {row.step_s * 1e3:.1f} | {row.tokens_per_s:,.0f} | {vs} | "
                     f"{mfu} | {mem} | {masking} | {loss:.4f} | {kernel} | {targets(row, rows, device)} |")
    return lines + [f"note: {n}" for n in notes]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default=None, help="comma-separated (default: gpt2-small,llama-1b on CUDA, tiny on CPU)")
    ap.add_argument("--batch-size", type=int, default=None, help="sequences per step (default: gpt2-small 8, llama-1b 4, "
                                                                 "CPU 4)")
    ap.add_argument("--steps", type=int, default=None, help="steps per run, the first quarter untimed (default: 20 on "
                                                            "CUDA, 3 on CPU)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default: 2 on CUDA, 1 on CPU)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (as run.compile)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--skip-tests", action="store_true", help="do not run pytest -m cuda first")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target FAILs (default: only when tests fail)")
    args = ap.parse_args(argv)
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        cap = torch.cuda.get_device_capability(device)
        log(f"device: {torch.cuda.get_device_name(device)} (sm{cap[0]}{cap[1]}), torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}, cuSPARSELt {'yes' if torch.backends.cusparselt.is_available() else 'no'}")
    else:
        why = "torch.cuda.is_available() is False" if not torch.cuda.is_available() else f"--device {args.device}"
        log(f"no CUDA device: {why}; running the CPU-safe parts (tiny preset, a few steps; MFU and targets n/a; "
            f"the 2:4 kernels fall back to dense)")
    ok = True
    if cuda and not args.skip_tests:
        log("CUDA tests: pytest -m cuda ...")
        ok, summary = run_cuda_tests()
        log(f"CUDA tests: {'PASS' if ok else 'FAIL'} ({summary})")
    elif not cuda:
        log("CUDA tests: skipped (no CUDA device)")
    presets = (args.presets or ("gpt2-small,llama-1b" if cuda else "tiny")).split(",")
    batch_sizes = {p: args.batch_size or (CUDA_BATCH.get(p, 8) if cuda else 4) for p in presets}
    steps = args.steps or (20 if cuda else 3)
    repeats = args.repeats or (2 if cuda else 1)
    log(f"measuring {', '.join(presets)}: {steps} steps per run ({max(1, steps // 4)} untimed), {repeats} round(s), "
        f"{'bf16 autocast' if cuda else 'fp32'}, {'compiled' if args.compile else 'eager'}, fused AdamW"
        f"{'' if cuda else ' off (CPU)'}")
    rows = measure(presets, batch_sizes, steps, repeats, device, args.compile, log)
    print()
    for line in table(rows, device):
        print(line)
    failed = any("FAIL" in targets(r, rows, device) for r in rows)
    return 0 if ok and not (args.strict and failed) else 1


if __name__ == "__main__":
    sys.exit(main())
