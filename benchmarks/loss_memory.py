"""Peak memory and time of the loss step: forward + backward of the cross-entropy on a leaf tensor
of logits, the old way (``F.cross_entropy`` on an fp32 copy of the real-vocabulary logits) against
``chunked_cross_entropy`` (``chunk`` tokens upcast to fp32 at a time, the gradient stored in the
logits' dtype).

Peak = the most bytes of tensors alive at once during the step, over the logits themselves
(``memtrack.LiveTensorBytes``; on CUDA also ``torch.cuda.max_memory_allocated`` over the
logits). ms = the median of ``--repeats`` timed steps (after one warm-up).

    python benchmarks/loss_memory.py                       # GPT-2 vocabulary, 4096 tokens
    python benchmarks/loss_memory.py --tokens 16384 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from memtrack import LiveTensorBytes
from sparselm.models.loss import chunked_cross_entropy


def old_loss(logits, targets, vocab_size, chunk):
    """What the training step did before: ``real_logits`` then F.cross_entropy."""
    real = logits[..., :vocab_size] if vocab_size < logits.size(-1) else logits
    return F.cross_entropy(real.float().reshape(-1, vocab_size), targets.reshape(-1))


def new_loss(logits, targets, vocab_size, chunk):
    return chunked_cross_entropy(logits, targets, vocab_size, chunk=chunk)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(fn, logits, targets, vocab_size, chunk):
    logits.grad = None
    fn(logits, targets, vocab_size, chunk).backward()


def measure(fn, logits, targets, vocab_size, chunk, repeats, device) -> dict:
    step(fn, logits, targets, vocab_size, chunk)  # warm-up
    logits.grad = None
    sync(device)
    cuda_peak = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step(fn, logits, targets, vocab_size, chunk)
        sync(device)
        cuda_peak = torch.cuda.max_memory_allocated(device) - base
        logits.grad = None
    with LiveTensorBytes() as mem:
        step(fn, logits, targets, vocab_size, chunk)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        step(fn, logits, targets, vocab_size, chunk)
        sync(device)
        times.append(time.perf_counter() - t0)
    logits.grad = None
    return {"peak": mem.peak, "cuda_peak": cuda_peak, "ms": 1e3 * statistics.median(times)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096, help="tokens in the micro-batch (rows of the logits)")
    ap.add_argument("--vocab", type=int, default=50304, help="columns of the logits (the padded vocabulary)")
    ap.add_argument("--vocab-size", type=int, default=50257, help="the tokenizer's tokens (the rest is padding)")
    ap.add_argument("--chunks", default="512,4096", help="chunk sizes of the chunked loss, comma-separated")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(0)
    targets = torch.randint(0, args.vocab_size, (1, args.tokens), device=device)
    chunks = [int(c) for c in args.chunks.split(",")]
    print(f"device {device}, {args.tokens} tokens x {args.vocab} columns ({args.vocab_size} real), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    header = f"{'method':<28} {'dtype':<9} {'logits MB':>9} {'peak MB':>9} {'ms':>9}"
    if device.type == "cuda":
        header += f" {'cuda peak MB':>13}"
    print(header)
    for dtype in args.dtypes.split(","):
        logits = torch.randn(1, args.tokens, args.vocab, device=device, dtype=getattr(torch, dtype)).requires_grad_()
        methods = [("F.cross_entropy(fp32 copy)", old_loss, 0)] + [(f"chunked (chunk={c})", new_loss, c) for c in chunks]
        for name, fn, chunk in methods:
            r = measure(fn, logits, targets, args.vocab_size, chunk, args.repeats, device)
            row = (f"{name:<28} {dtype:<9} {logits.numel() * logits.element_size() / 1e6:>9.1f} "
                   f"{r['peak'] / 1e6:>9.1f} {r['ms']:>9.1f}")
            if r["cuda_peak"] is not None:
                row += f" {r['cuda_peak'] / 1e6:>13.1f}"
            print(row, flush=True)
        del logits


if __name__ == "__main__":
    main()
