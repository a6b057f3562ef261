"""Read a run directory (or any HF directory of a registered model family): model, tokenizer, masks, summary."""

from __future__ import annotations

from pathlib import Path

from ..files import MANIFEST, check_mask_counts, read_json, reading, verify
from .family import load_model

RESTORE_RUN_HINT = "restore the run directory from a copy or train the run again"


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    path = Path(path)
    if not ((path / "tokenizer.json").exists() or (path / "vocab.json").exists()):
        raise FileNotFoundError(f"{path} has no tokenizer (tokenizer.json); point at a sparselm run or an HF model directory")
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer in {path} has no EOS token")
    return tok


def load_run(path: str | Path):
    """(model, tokenizer, masks or None, summary dict) of a run directory. A run sparselm finished
    is checked against its manifest first; a directory without one (an HF model from elsewhere, an
    older run) loads as it is, with parse errors naming the file."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json); pass a finished run, e.g. runs/tiny-s75")
    manifest = verify(path, RESTORE_RUN_HINT) or {}
    read_json(path / "config.json", RESTORE_RUN_HINT)  # load_model's own parse would not name the file
    with reading(path / "model.safetensors", RESTORE_RUN_HINT):
        model = load_model(path)
    with reading(f"the tokenizer files in {path}", RESTORE_RUN_HINT):
        tok = load_tokenizer(path)
    summary = read_json(path / "summary.json", RESTORE_RUN_HINT) if (path / "summary.json").exists() else {}
    masks = None
    if (path / "masks.safetensors").exists():
        from safetensors.torch import load_file

        with reading(path / "masks.safetensors", RESTORE_RUN_HINT):
            masks = load_file(str(path / "masks.safetensors"))
        if manifest.get("mask_kept"):
            kept, source, tol = manifest["mask_kept"], path / MANIFEST, 0.0
        else:  # no manifest: the summary's per-layer sparsity, a float (hence a tolerance)
            layers = summary.get("sparsity", {}).get("layers", {})
            kept = {k: (1 - s) * masks[k].numel() for k, s in layers.items() if k in masks}
            source, tol = path / "summary.json", 1e-6
        check_mask_counts(masks, kept, path / "masks.safetensors", str(source), RESTORE_RUN_HINT, rel_tol=tol)
    return model, tok, masks, summary
