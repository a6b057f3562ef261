"""Evaluate a model directory on a task split: beam-search outputs, metrics, validation perplexity."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from ..data.tasks import load_task
from ..files import write_json
from ..models.loss import encode_pairs, validation_loss
from ..models.runs import load_run
from .generate import DecodingConfig, generate
from .metrics import score

log = logging.getLogger(__name__)


def evaluate(model_dir: str | Path, task: str = "e2e", split: str = "test", limit: int | None = None,
             decoding: DecodingConfig = DecodingConfig(), data_dir=None, device="cpu", progress=True,
             val_limit: int = 256) -> dict:
    """Write ``eval/<task>-<split>.json`` (+ ``.hyp.txt``, ``.ref.txt``) in ``model_dir`` and return the result."""
    if str(model_dir) == "copy":
        return copy_baseline(task, split, limit, data_dir)
    model_dir = Path(model_dir)
    model, tok, _, summary = load_run(model_dir)
    model.to(device)
    data = load_task(task, data_dir)
    if split not in data.splits:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(data.splits)}")
    examples = data.splits[split][:limit] if limit else data.splits[split]
    t0 = time.time()
    hyps = generate(model, tok, [e.prompt for e in examples], decoding, device, progress)
    gen_time = time.time() - t0
    result = {
        "task": task,
        "split": split,
        "n_examples": len(examples),
        "n_references": sum(len(e.refs) for e in examples),
        "model": str(model_dir),
        "decoding": decoding.to_dict(),
        "metrics": score(task, hyps, [e.refs for e in examples]),
        "generation_time_s": gen_time,
    }
    val, long_val = encode_pairs(tok, data.pairs("validation")[:val_limit], model.config.n_positions, skip_too_long=True)
    result["metrics"]["val_ppl"] = math.exp(validation_loss(model, val, decoding.batch_size, tok.eos_token_id, device))
    max_prompt = model.config.n_positions - decoding.max_new_tokens
    result["prompts_truncated"] = sum(len(tok(e.prompt).input_ids) > max_prompt for e in examples)
    result["val_pairs_left_out_too_long"] = long_val
    if result["prompts_truncated"]:
        log.warning("%d of %d prompts were longer than %d tokens and lost their start for generation",
                    result["prompts_truncated"], len(examples), max_prompt)

    out = model_dir / "eval"
    out.mkdir(exist_ok=True)
    stem = f"{task}-{split}"
    (out / f"{stem}.hyp.txt").write_text("\n".join(hyps) + "\n")
    # references in the E2E scorer's format: one block per input, blank line between blocks
    (out / f"{stem}.ref.txt").write_text("\n\n".join("\n".join(e.refs) for e in examples) + "\n")
    (out / f"{stem}.src.txt").write_text("\n".join(e.source for e in examples) + "\n")
    write_json(out / f"{stem}.json", result)
    if summary.get("kind") == "finetune":  # so experiments can join pre-training, fine-tuning and metrics
        summary.setdefault("metrics", {})[f"{task}-{split}"] = result["metrics"]
        write_json(model_dir / "summary.json", summary)
    return result


def copy_baseline(task: str, split: str, limit: int | None = None, data_dir=None) -> dict:
    """Score the linearised input itself as the output: the floor any model must clear."""
    data = load_task(task, data_dir)
    examples = data.splits[split][:limit] if limit else data.splits[split]
    return {"task": task, "split": split, "n_examples": len(examples), "n_references": sum(len(e.refs) for e in examples),
            "model": "copy-the-input baseline", "decoding": {"num_beams": 0},
            "metrics": score(task, [e.source for e in examples], [e.refs for e in examples])}


def format_table(result: dict) -> str:
    rows = [f"{result['task']} {result['split']} ({result['n_examples']} inputs, {result['n_references']} refs, "
            f"beam {result['decoding']['num_beams']})"]
    for k, v in result["metrics"].items():
        rows.append(f"  {k:<8} {v:8.3f}")
    return "\n".join(rows)
