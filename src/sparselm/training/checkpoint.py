"""Atomic, verified checkpoints (weights, masks, optimizer, RNG, trainer state) and finished runs.

A checkpoint is written to ``checkpoint.tmp``, sealed with its manifest (``sparselm.files``) and
swapped in with renames, so a crash or a full disk at any moment leaves the old or the new checkpoint
whole, never a mixture. The files of a finished run are staged the same way in ``final.tmp``. Loading
checks the manifest first, so a damaged file is an error naming it, not a NaN loss later.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from ..data.tokenizer import make_portable
from ..models.card import write_card
from .distributed import is_sharded
from ..files import (MANIFEST, CorruptFileError, Staging, check_mask_counts, read_json, reading, save_torch, verify,
                     write_text)

CHECKPOINT = "checkpoint"
SHARDED = "dcp"  # the torch.distributed.checkpoint folder of an FSDP checkpoint


def _todo(run_dir: Path) -> str:
    """What to do about a damaged checkpoint of ``run_dir``."""
    old = Path(run_dir) / f"{CHECKPOINT}.old"
    older = (f"; {old} holds the checkpoint before it: move the damaged one away and rename {old.name} to "
             f"{CHECKPOINT} to resume from there") if old.exists() else ""
    return f"resume from an intact copy of {run_dir} or start a new run{older}"


def _intact(run_dir: Path) -> str:
    """What a failed write leaves behind to resume from."""
    for path in (run_dir / CHECKPOINT, run_dir / f"{CHECKPOINT}.old"):
        if path.exists():
            return f"the previous checkpoint at {path} is intact: free some space and resume with --resume"
    return "no checkpoint was written yet: free some space and start the run again"


def save_checkpoint(run_dir: Path, model, optimizer, masks: dict | None, state: dict) -> Path:
    """Weights, masks and optimizer state as safetensors / torch files, written by one process
    (single device or rank 0 of DDP, whose replicas are identical)."""
    run_dir = Path(run_dir)
    with Staging(run_dir / f"{CHECKPOINT}.tmp", run_dir / CHECKPOINT, _intact(run_dir)) as stage:
        stage.write("model.safetensors", lambda path: save_model(model, str(path)))
        if masks:
            stage.write("masks.safetensors", lambda path: save_file(masks, str(path)))
        stage.write("optimizer.pt", lambda path: save_torch(optimizer.state_dict(), path))
        _write_trainer_state(stage, masks, state)
    return _swap_in(run_dir)


def save_sharded_checkpoint(run_dir: Path, model, optimizer, masks: dict | None, state: dict) -> Path | None:
    """An FSDP checkpoint, written by every rank at once with ``torch.distributed.checkpoint``:
    each rank writes its shards of the weights, optimizer state and masks into ``dcp/``, with no
    gather. DCP records the global layout, so the checkpoint loads on any number of ranks (or on
    one process without FSDP). Rank 0 adds RNG and trainer state, seals and swaps it in as
    ``save_checkpoint`` does. Every rank must call it; returns the path on rank 0."""
    import torch.distributed as tdist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from ..sparsity.sharding import count_nonzero

    run_dir = Path(run_dir)
    rank0 = tdist.get_rank() == 0
    kept = {k: count_nonzero(m) for k, m in masks.items()} if masks else None  # (collective)
    stage = Staging(run_dir / f"{CHECKPOINT}.tmp", run_dir / CHECKPOINT, _intact(run_dir))
    with stage if rank0 else contextlib.nullcontext():
        tdist.barrier()  # the staging folder is fresh
        model_state, optim_state = get_state_dict(model, optimizer)
        stage.current = SHARDED
        dcp.save({"model": model_state, "optimizer": optim_state, **({"masks": dict(masks)} if masks else {})},
                 checkpoint_id=str(stage.dir / SHARDED))
        if rank0:
            _write_trainer_state(stage, kept, state)
    tdist.barrier()
    return _swap_in(run_dir) if rank0 else None


def _write_trainer_state(stage: Staging, masks, state: dict) -> None:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    stage.write("rng.pt", lambda path: save_torch(rng, path))
    stage.write("trainer_state.json", lambda path: path.write_text(json.dumps(state, indent=2)))
    stage.seal(masks, step=state["step"])


def _swap_in(run_dir: Path) -> Path:
    """Move the sealed ``checkpoint.tmp`` into place, keeping the old one until the new one is there."""
    final, tmp, old = run_dir / CHECKPOINT, run_dir / f"{CHECKPOINT}.tmp", run_dir / f"{CHECKPOINT}.old"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint to resume from: ``checkpoint``, or ``checkpoint.old`` after a crash between the
    two renames of a swap (``checkpoint`` is then absent). An existing ``checkpoint`` was complete
    when renamed into place, so one that fails its manifest is damaged: an error naming both, not a
    silent step back to the older one. (Sizes only here; ``load_checkpoint`` checks the hashes.)"""
    run_dir = Path(run_dir)
    final, old = run_dir / CHECKPOINT, run_dir / f"{CHECKPOINT}.old"
    if final.exists():
        if verify(final, _todo(run_dir), hashes=False) is None and not (final / "trainer_state.json").exists():
            raise CorruptFileError(f"{final} is incomplete (no {MANIFEST}, no trainer_state.json); {_todo(run_dir)}")
        return final
    return old if (old / "trainer_state.json").exists() else None


def load_checkpoint(path: Path, model, optimizer, map_location="cpu") -> tuple[dict | None, dict]:
    """Restore model and optimizer in place; return (masks or None, trainer state). Every file is
    checked against the manifest first; a checkpoint without one (older sparselm) is loaded as it is."""
    path = Path(path)
    todo = _todo(path.parent)
    manifest = verify(path, todo) or {}
    if (path / SHARDED).is_dir():
        return _load_sharded(path, model, optimizer, manifest, todo)
    if is_sharded(model):
        raise ValueError(f"{path} was saved without FSDP (one file per tensor); resume it with --parallel ddp "
                         "(or on one process)")
    with reading(path / "model.safetensors", todo):
        load_model(model, str(path / "model.safetensors"), device=str(map_location))
    with reading(path / "optimizer.pt", todo):
        optimizer_state = torch.load(path / "optimizer.pt", map_location=map_location, weights_only=True)
    optimizer.load_state_dict(optimizer_state)
    _restore_rng(path, todo)
    masks = None
    if (path / "masks.safetensors").exists():
        with reading(path / "masks.safetensors", todo):
            masks = load_file(str(path / "masks.safetensors"))
        check_mask_counts(masks, manifest.get("mask_kept", {}), path / "masks.safetensors", str(path / MANIFEST), todo)
    state = read_json(path / "trainer_state.json", todo)
    return masks, state


def _restore_rng(path: Path, todo: str) -> None:
    with reading(path / "rng.pt", todo):
        rng = torch.load(path / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _load_sharded(path: Path, model, optimizer, manifest: dict, todo: str) -> tuple[dict | None, dict]:
    """A DCP checkpoint into this process's model and optimizer, sharded (FSDP, any number of ranks)
    or not (one process, or DDP): DCP reads each rank's part of every tensor. Masks come back laid
    out like the weights (DTensors under FSDP)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from ..sparsity.sharding import count_nonzero, shard_like

    if not manifest:
        raise CorruptFileError(f"{path} has no {MANIFEST}: the sharded checkpoint cannot be checked, nor its masks "
                               f"found; {todo}")
    model_state, optim_state = get_state_dict(model, optimizer)
    kept = manifest.get("mask_kept") or {}
    params = dict(model.named_parameters())
    masks = {k: shard_like(torch.zeros(params[k].shape, dtype=torch.bool), params[k]) for k in kept if k in params}
    if len(masks) != len(kept):
        raise ValueError(f"{path} has masks for {sorted(set(kept) - set(masks))[:3]}, which this model does not have")
    state = {"model": model_state, "optimizer": optim_state, **({"masks": masks} if masks else {})}
    import torch.distributed as tdist

    with reading(path / SHARDED, todo):
        dcp.load(state, checkpoint_id=str(path / SHARDED), no_dist=not tdist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    _restore_rng(path, todo)
    for name, mask in masks.items():
        if count_nonzero(mask) != kept[name]:
            raise CorruptFileError(f"{path / SHARDED}: layer {name} keeps {count_nonzero(mask)} weights, but "
                                   f"{path / MANIFEST} records {kept[name]}; {todo}")
    return masks or None, read_json(path / "trainer_state.json", todo)


def save_run(out: Path, model, save_tokenizer: Callable[[Path], object], masks: dict | None, summary: dict,
             adapter=None, keep_checkpoint: bool = True) -> None:
    """Write a finished run into ``out``: the HF model directory (weights, config, tokenizer), LoRA
    ``adapter/``, masks, summary, and its manifest. They are staged in ``final.tmp`` and moved in,
    summary then manifest last, so a full disk leaves no half-written file and the checkpoint intact."""
    out = Path(out)
    with Staging(out / "final.tmp", out, _intact(out)) as stage:
        stage.write("model.safetensors", lambda path: model.save_pretrained(str(path.parent)))
        if adapter is not None:
            stage.write("adapter", lambda path: adapter.save_pretrained(str(path)))
        stage.write("tokenizer.json", lambda path: (save_tokenizer(path.parent), make_portable(path.parent)))
        if masks:
            stage.write("masks.safetensors", lambda path: save_file(masks, str(path)))
        if (out / "train_config.json").exists():
            stage.write("train_config.json", lambda path: shutil.copyfile(out / "train_config.json", path))
        stage.write("summary.json", lambda path: path.write_text(json.dumps(summary, indent=2)))
        stage.seal(masks)
    (out / MANIFEST).unlink(missing_ok=True)  # from a run being trained further: stale from here on
    last = {"summary.json": 1, MANIFEST: 2}  # the summary marks the run finished, the manifest complete
    for entry in sorted(stage.dir.iterdir(), key=lambda p: last.get(p.name, 0)):
        if entry.is_dir():
            shutil.rmtree(out / entry.name, ignore_errors=True)
        os.replace(entry, out / entry.name)
    stage.dir.rmdir()
    write_card(out)  # from the files just written; not in the manifest (evaluate refreshes it)
    if not keep_checkpoint:  # the run is complete: the checkpoint (about 3x the model) only served resuming
        shutil.rmtree(out / CHECKPOINT, ignore_errors=True)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows logged after ``step`` (written after the checkpoint a resume starts from),
    so a resumed run's log has each step once. A last row cut off by a crash or a full disk is
    dropped too; a damaged row before it is an error naming the line."""
    path = Path(path)
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    keep = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                break
            raise CorruptFileError(f"{path} is corrupt at line {n}; delete that line (or the file) and resume again") from None
        if row.get("step", 0) <= step:
            keep.append(line)
    write_text(path, "".join(line + "\n" for line in keep))
