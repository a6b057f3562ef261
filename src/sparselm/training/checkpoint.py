"""Atomic checkpoints: weights, masks, optimizer, RNG and trainer state in one directory.

A checkpoint is written to ``checkpoint.tmp`` and swapped in with renames, so a crash at any
moment leaves either the old or the new checkpoint whole, never a mixture.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

CHECKPOINT = "checkpoint"


def save_checkpoint(run_dir: Path, model, optimizer, masks: dict | None, state: dict) -> Path:
    run_dir = Path(run_dir)
    final, tmp, old = run_dir / CHECKPOINT, run_dir / f"{CHECKPOINT}.tmp", run_dir / f"{CHECKPOINT}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    if masks:
        save_file(masks, str(tmp / "masks.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint of a run, also after a crash in the middle of a swap."""
    for name in (CHECKPOINT, f"{CHECKPOINT}.old"):
        path = Path(run_dir) / name
        if (path / "trainer_state.json").exists():
            return path
    return None


def load_checkpoint(path: Path, model, optimizer, map_location="cpu") -> tuple[dict | None, dict]:
    """Restore model and optimizer in place; return (masks or None, trainer state)."""
    path = Path(path)
    load_model(model, str(path / "model.safetensors"), device=str(map_location))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=map_location, weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    masks = load_file(str(path / "masks.safetensors")) if (path / "masks.safetensors").exists() else None
    state = json.loads((path / "trainer_state.json").read_text())
    return masks, state


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows logged after ``step`` (written after the checkpoint a resume starts from),
    so a resumed run's log has each step once."""
    path = Path(path)
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
