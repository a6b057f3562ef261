"""Read a run directory (or any HF directory of a registered model family): model, tokenizer, masks, summary."""

from __future__ import annotations

import json
from pathlib import Path

from .family import load_model


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
    """(model, tokenizer, masks or None, summary dict) of a run directory."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json); pass a finished run, e.g. runs/tiny-s75")
    model = load_model(path)
    tok = load_tokenizer(path)
    masks = None
    if (path / "masks.safetensors").exists():
        from safetensors.torch import load_file

        masks = load_file(str(path / "masks.safetensors"))
    summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").exists() else {}
    return model, tok, masks, summary
