"""sparselm's training step against a plain-PyTorch reference GPT, side by side, in eager fp32.

The reference is a minimal GPT written here from the description of nanoGPT's ``model.py`` (no code
is fetched or vendored): token + position embeddings, pre-LN blocks with one fused qkv ``Linear``,
``F.scaled_dot_product_attention(is_causal=True)``, a 4d MLP with GELU(tanh), a final LayerNorm and an
LM head tied to the token embedding; biases as in GPT-2 (``--no-bias`` drops them). Its step is
forward, cross-entropy, backward, ``clip_grad_norm_(1.0)``, AdamW (betas (0.9, 0.95), weight decay
0.1 on 2-D parameters, PyTorch's default implementation) and ``zero_grad``.

sparselm's step is the training loop's own ``train_step`` on the Hugging Face GPT-2 that
``sparselm.models.build_model`` builds (exactly as ``train_throughput.py`` runs it): dense, and at 75%
static sparsity (``Static(0.75).attach(model, opt)``: gradient and weight mask passes every step).

Variants run in alternating rounds in one process (ref, dense, sparse, then dense, sparse, ref, ...: the
order rotates), each round a few steps after a warmup, so drift and other load on the machine hit all
of them alike; the table gives the median step time over all timed steps, the speed against the
reference from those medians and paired within rounds, and CPU time per step. Synthetic tokens;
nothing is downloaded. ``--compare-activation gelu_new`` adds sparselm with GPT-2's original
``activation_function`` (what sparselm built before ``gelu_pytorch_tanh``), side by side.

    python benchmarks/cpu_reference.py            # 6 x 384, 6 heads, T=256, V=8192, batch 8
    python benchmarks/cpu_reference.py --quick    # a short run
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from sparselm.models import build_model, get_preset
from sparselm.sparsity import Static
from sparselm.training.config import RunConfig
from sparselm.training.distributed import Dist
from sparselm.training.loop import Phase, StepCost, Trainer, train_step
from sparselm.training.optim import adamw
from sparselm.training.pretraining import next_token_loss


# ---- the reference model -------------------------------------------------------------------------
class SelfAttention(nn.Module):
    def __init__(self, d: int, n_head: int, bias: bool):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(d, 3 * d, bias=bias)
        self.c_proj = nn.Linear(d, d, bias=bias)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, d: int, bias: bool):
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d, bias=bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * d, d, bias=bias)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, d: int, n_head: int, bias: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d, bias=bias)
        self.attn = SelfAttention(d, n_head, bias)
        self.ln_2 = nn.LayerNorm(d, bias=bias)
        self.mlp = MLP(d, bias)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ReferenceGPT(nn.Module):
    def __init__(self, n_layer: int, n_head: int, d: int, block_size: int, vocab_size: int, bias: bool = True):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, d)
        self.wpe = nn.Embedding(block_size, d)
        self.h = nn.ModuleList(Block(d, n_head, bias) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d, bias=bias)
        self.lm_head = nn.Linear(d, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layer))
            elif p.dim() >= 2:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx, targets):
        T = idx.size(1)
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def reference_optimizer(model: nn.Module, lr: float = 1e-4, weight_decay: float = 0.1):
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=False)


# ---- the variants: each a zero-argument step --------------------------------------------------------
def reference_step_fn(shape, batch, bias: bool):
    torch.manual_seed(0)
    model = ReferenceGPT(shape.n_layer, shape.n_head, shape.n_embd, shape.block_size, shape.vocab_size, bias)
    model.train()
    opt = reference_optimizer(model)
    x, y = batch

    def step():
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in model.parameters())


def with_activation(model, name: str):
    """``model`` (GPT-2) with its MLP activation swapped for transformers' ``ACT2FN[name]``, config included."""
    from transformers.activations import ACT2FN

    model.config.activation_function = name
    for block in model.transformer.h:
        block.mlp.act = ACT2FN[name]
    return model


def sparselm_step_fn(shape, batch, sparsity: float, activation: str | None = None):
    torch.manual_seed(0)
    model = build_model(shape)
    if activation is not None:
        model = with_activation(model, activation)
    model.train()
    opt = adamw(model, 1e-4, 0.1, device_type="cpu")
    sp = Static(sparsity).attach(model, opt) if sparsity > 0 else None
    phase = Phase(name="bench", total_steps=1 << 30, batch=lambda step, micro: batch, loss=next_token_loss,
                  lr=lambda step: 1e-4, evaluate=lambda m: 0.0, cost=lambda step: StepCost(0.0, 0.0, 0.0))
    trainer = Trainer(model, opt, sp, torch.device("cpu"), Dist(), RunConfig(out="unused"), None)
    counter = [0]

    def step():
        train_step(phase, trainer, counter[0])
        counter[0] += 1

    return step, sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return (f"{cpu}; {os.cpu_count()} cores ({affinity} usable); torch {torch.__version__}, "
            f"{torch.get_num_threads()} intra-op threads, {torch.get_num_interop_threads()} inter-op; "
            f"MKL {torch.backends.mkl.is_available()}, oneDNN {torch.backends.mkldnn.is_available()}; python {platform.python_version()}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", help="shape to start from (default: small = 6 x 384, T=256, V=8192)")
    ap.add_argument("--n-layer", type=int)
    ap.add_argument("--n-head", type=int)
    ap.add_argument("--n-embd", type=int)
    ap.add_argument("--block-size", type=int)
    ap.add_argument("--vocab-size", type=int)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--sparsity", type=float, default=0.75)
    ap.add_argument("--rounds", type=int, default=10, help="alternating rounds (each variant once per round)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before the first round")
    ap.add_argument("--no-bias", action="store_true", help="reference without biases (GPT-2 has them)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--compare-activation", metavar="NAME",
                    help="also run sparselm dense and sparse with this GPT-2 activation_function (e.g. gelu_new, "
                         "the GPT-2 default sparselm used before), side by side")
    ap.add_argument("--quick", action="store_true", help="short run: 3 rounds x 2 steps, 1 warmup step")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.steps, args.warmup = 3, 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)

    changes = {k: v for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
               if (v := getattr(args, k)) is not None}
    shape = get_preset(args.preset).override(dropout=0.0, **changes)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, shape.vocab_size, (args.batch_size, shape.block_size + 1), generator=g)
    batch = (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())

    load = os.getloadavg()[0]
    variants = {"reference GPT (plain PyTorch)": reference_step_fn(shape, batch, not args.no_bias),
                "sparselm dense": sparselm_step_fn(shape, batch, 0.0),
                f"sparselm {args.sparsity:.0%} static": sparselm_step_fn(shape, batch, args.sparsity)}
    if args.compare_activation:
        if shape.family != "gpt2":
            ap.error("--compare-activation needs a GPT-2 shape")
        act = args.compare_activation
        variants[f"sparselm dense, {act}"] = sparselm_step_fn(shape, batch, 0.0, act)
        variants[f"sparselm {args.sparsity:.0%} static, {act}"] = sparselm_step_fn(shape, batch, args.sparsity, act)
    wall: dict[str, list[list[float]]] = {name: [] for name in variants}  # per round, per step
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for name, (step, _) in variants.items():
        for _ in range(args.warmup):
            step()
    names = list(variants)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:  # the order rotates: no variant always first
            step = variants[name][0]
            wall[name].append([])
            for _ in range(args.steps):
                c0, t0 = time.process_time(), time.perf_counter()
                step()
                wall[name][-1].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)

    n_tok = args.batch_size * shape.block_size
    print(f"machine: {machine()}; load average before the run {load:.2f}, after {os.getloadavg()[0]:.2f}")
    print(f"shape: {shape.n_layer} layers, d={shape.n_embd}, {shape.n_head} heads, T={shape.block_size}, "
          f"V={shape.vocab_size}, batch {args.batch_size}, fp32 eager; "
          f"{args.rounds} alternating rounds x {args.steps} steps after {args.warmup} warmup")
    print("params: " + ", ".join(f"{name} {n / 1e6:.2f}M" for name, (_, n) in variants.items()))
    ref_name = names[0]
    ref = statistics.median(t for r in wall[ref_name] for t in r)
    print("ms/step: median wall time over all timed steps; speed vs reference: reference ms/step / this ms/step, "
          "and paired: the median over rounds of that ratio within each round (steps measured close together); "
          "CPU ms/step: process CPU time per step, all threads")
    print("| variant | ms/step | tokens/s | speed vs reference | paired | CPU ms/step |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in names:
        t = statistics.median(x for r in wall[name] for x in r)
        paired = statistics.median(statistics.median(a) / statistics.median(b) for a, b in zip(wall[ref_name], wall[name]))
        print(f"| {name} | {t * 1e3:.1f} | {n_tok / t:,.0f} | {ref / t:.2f}x | {paired:.2f}x | "
              f"{statistics.median(cpu[name]) * 1e3:.1f} |")


if __name__ == "__main__":
    main()
