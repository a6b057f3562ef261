"""Block-sequential one-shot pruning of a causal LM, as the reference implementations run it.

The calibration tokens go through the model once, up to the first block, whose inputs (hidden
states and the keyword arguments the model passes it: masks, position embeddings) are kept. Then,
block by block: the block's linears see the calibration inputs of the *unpruned* block in one pass
(``true_sequential``: group by group, each group after the earlier ones are pruned), each linear is
pruned, and the pruned block's outputs become the next block's inputs. Only one block and the
calibration activations need to be on the device (``offload``: every block waits on the CPU), so a
model larger than the accelerator can be pruned.

Pruners that need no data (magnitude) skip all of that and see each weight directly.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.family import family_for_config
from ..sparsity import masks as M
from ..sparsity.distributions import per_layer_sparsity
from ..sparsity.selection import Target, select_targets
from .base import Pruned, Pruner, Refiner

log = logging.getLogger(__name__)


@dataclass
class PruneResult:
    masks: dict[str, torch.Tensor]  # by parameter name, in the parameter's layout (True = kept)
    blocks: list[dict] = field(default_factory=list)  # per block: seconds, peak memory
    peak_memory_bytes: int = 0
    device: str = "cpu"


class _StopForward(Exception):
    """Raised by the first block's hook once its inputs are captured."""


def as_rows(target: Target, t: torch.Tensor) -> torch.Tensor:
    """A weight as ``(out, in)``: GPT-2's ``Conv1D`` stores ``(in, out)``."""
    return t.t() if target.in_axis == 0 else t


def prune_model(model: nn.Module, pruner: Pruner, *, sparsity: float, distribution: str = "uniform",
                n_m: tuple[int, int] | None = None, include: list[str] | None = None,
                calibration: torch.Tensor | None = None, refiner: Refiner | None = None,
                masks: dict[str, torch.Tensor] | None = None, true_sequential: bool = False,
                device: str | torch.device = "cpu", offload: bool = False, batch_size: int = 1,
                progress: bool = True) -> PruneResult:
    """Prune ``model``'s block linears (or ``include``) in place and return their masks.

    ``calibration``: ``[n, seqlen]`` token ids, required when the pruner or refiner needs data.
    ``masks``: prune nothing, refine these (a sparse run's masks) with ``refiner``."""
    targets = select_targets(model, include)
    if n_m is not None:
        if distribution != "uniform":
            raise ValueError("an N:M mask fixes every layer at 1 - N/M; use distribution=uniform")
        sparsity = 1.0 - n_m[0] / n_m[1]
        if not pruner.supports_n_m:
            raise ValueError(f"{pruner.name} does not support N:M masks")
    per_layer = per_layer_sparsity(distribution, {t.name: tuple(t.param.shape) for t in targets}, sparsity)
    counts = {t.name: M.n_zeros(t.param.numel(), per_layer[t.name]) for t in targets}
    job = _Job(pruner, refiner, counts, n_m, masks)
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if not (pruner.needs_calibration and masks is None) and not (refiner and refiner.needs_calibration):
        with torch.no_grad():
            for t in targets:
                job.finish(t, None)
        return PruneResult(job.masks, [], _peak_memory(device), str(device))
    if calibration is None:
        raise ValueError(f"{(refiner if masks is not None else pruner).name} needs calibration data")
    blocks = _blocks(model, targets)
    result = PruneResult(job.masks, device=str(device))
    with torch.no_grad(), _evaluating(model):
        _to_device(model, [b for b, _ in blocks] if offload else [], device)
        inputs = _capture(model, blocks[0][0], calibration, batch_size, device)
        bar = _progress(len(blocks), progress)
        for i, (block, block_targets) in enumerate(blocks):
            t0 = time.perf_counter()
            block.to(device)
            modules = {t.name: model.get_submodule(t.name.removesuffix(".weight")) for t in block_targets}
            for group in (_groups(block, block_targets, modules, inputs) if true_sequential else [block_targets]):
                stats = {t.name: job.new_stats(t, device) for t in group}
                with _hooks({t.name: modules[t.name] for t in group}, stats):
                    for hidden, rest in inputs:
                        _run(block, hidden, rest)
                for t in group:
                    job.finish(t, stats[t.name])
            inputs = [(_run(block, hidden, rest), rest) for hidden, rest in inputs]
            if offload:
                block.to("cpu")
            row = {"block": i, "seconds": time.perf_counter() - t0, "peak_memory_bytes": _peak_memory(device)}
            result.blocks.append(row)
            bar.update(1)
            bar.set_postfix_str(f"block {i}: {row['seconds']:.1f}s, peak {row['peak_memory_bytes'] / 2**20:.0f} MiB")
        bar.close()
    result.peak_memory_bytes = _peak_memory(device)
    return result


class _Job:
    """Per-layer work shared by both paths: statistics, pruning, refinement, writing back."""

    def __init__(self, pruner, refiner, counts, n_m, given_masks):
        self.pruner, self.refiner, self.counts, self.n_m, self.given = pruner, refiner, counts, n_m, given_masks
        self.masks: dict[str, torch.Tensor] = {}

    def new_stats(self, t: Target, device):
        n_in = t.param.shape[t.in_axis]
        pruning = self.given is None and self.pruner.needs_calibration
        return (self.pruner.stats(n_in, device) if pruning else None,
                self.refiner.stats(n_in, device) if self.refiner is not None else None)

    def finish(self, t: Target, stats) -> None:
        prune_stats, refine_stats = stats if stats is not None else (None, None)
        dense = as_rows(t, t.param.detach()).float().clone()
        if self.given is not None:
            mask = as_rows(t, self.given[t.name].to(dense.device, torch.bool))
            out = Pruned(mask, dense * mask)
        else:
            out = self.pruner.prune(dense.clone(), prune_stats, self.counts[t.name], self.n_m)
        weight = out.weight if out.weight is not None else dense * out.mask
        if self.refiner is not None:
            out = self.refiner.refine(dense, weight, out.mask, refine_stats, self.n_m)
            weight = out.weight if out.weight is not None else dense * out.mask
        weight = weight * out.mask  # pruned weights are exact zeros whatever the pruner returned
        t.param.data.copy_(as_rows(t, weight).to(t.param.dtype))
        self.masks[t.name] = as_rows(t, out.mask).contiguous().cpu()


def _blocks(model, targets: list[Target]) -> list[tuple[nn.Module, list[Target]]]:
    """The model's transformer blocks in order, each with the targets inside it."""
    family = family_for_config(model.config)
    shape = family.shape_of(model.config)
    prefixes = [family.layer_prefix.format(i=i) for i in range(shape.n_layer)]
    outside = [t.name for t in targets if not any(t.name.startswith(p) for p in prefixes)]
    if outside:
        raise ValueError(f"calibrated pruning works block by block; {outside[:3]} is outside the {family.name} blocks "
                         f"({family.layer_prefix.format(i='N')}...): prune it with --method magnitude")
    return [(model.get_submodule(p.rstrip(".")), [t for t in targets if t.name.startswith(p)]) for p in prefixes]


def _capture(model, first_block: nn.Module, calibration: torch.Tensor, batch_size: int, device) -> list[tuple]:
    """(hidden states, (other positional arguments, keyword arguments)) of the first block's call for
    each calibration batch, replayed for every block (they are the same for all blocks)."""
    captured = []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        rest = (args[1:], kwargs)  # what the model passes besides the hidden states (GPT-2: some positionally)
        if captured and _same(rest, captured[-1][1]):  # the same masks / position embeddings every batch: one copy
            rest = captured[-1][1]
        captured.append((hidden, rest))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in calibration.split(batch_size):
            try:
                model(batch.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _same(a, b) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or (type(a) in (int, float, bool, str) and a == b)


def _run(block, hidden, rest):
    args, kwargs = rest
    return _hidden(block(hidden, *args, **kwargs))


def _hidden(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@contextmanager
def _hooks(modules: dict[str, nn.Module], stats: dict[str, tuple]):
    def make(name):
        def hook(module, args, output):
            for s in stats[name]:
                if s is not None:
                    s.add(args[0].detach())
        return hook

    handles = [m.register_forward_hook(make(name)) for name, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _groups(block, block_targets, modules, inputs) -> list[list[Target]]:
    """Targets that read the same input tensor (q, k, v; gate and up) form a group: pruning one
    cannot change another's input, so calibrating them together equals one at a time."""
    seen: dict[str, int] = {}

    def make(name):
        def hook(module, args, output):
            seen.setdefault(name, id(args[0]))
        return hook

    handles = [m.register_forward_hook(make(t.name)) for t, m in ((t, modules[t.name]) for t in block_targets)]
    try:
        _run(block, *inputs[0])
    finally:
        for h in handles:
            h.remove()
    order = sorted(block_targets, key=lambda t: list(seen).index(t.name) if t.name in seen else len(seen))
    groups: list[list[Target]] = []
    for t in order:
        if groups and seen.get(t.name) is not None and seen.get(t.name) == seen.get(groups[-1][0].name):
            groups[-1].append(t)
        else:
            groups.append([t])
    return groups


def _to_device(model: nn.Module, keep_off: list[nn.Module], device) -> None:
    """Move ``model`` to ``device`` except the modules in ``keep_off`` (they stay where they are)."""
    skip = {id(m) for m in keep_off}

    def visit(module):
        if id(module) in skip:
            return
        module._apply(lambda t: t.to(device), recurse=False)
        for child in module.children():
            visit(child)

    visit(model)


@contextmanager
def _evaluating(model):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _peak_memory(device) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="pruning blocks", unit="block", disable=not enabled, leave=False)
