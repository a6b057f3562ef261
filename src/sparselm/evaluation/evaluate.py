"""Evaluate a model directory on a task split: beam-search outputs, metrics, validation perplexity."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError, option
from ..data.tasks import TASKS, load_task
from ..files import MANIFEST, write_json
from ..models import context_length
from ..models.loss import encode_pairs, validation_loss
from ..models.card import write_card
from ..models.runs import load_run
from .generate import DecodingConfig, generate
from .metrics import score
from .uncertainty import LEVEL, RESAMPLES, bleu_segments, bootstrap_ci

log = logging.getLogger(__name__)
PERPLEXITY = "perplexity"  # not a data-to-text task: the perplexity of a text (evaluation/perplexity.py)


@dataclass
class EvaluateConfig:
    """What ``sparselm evaluate`` runs: a model on a task split, with a decoding setup."""

    model: str | None = option(None, "model directory (a fine-tuning run), or 'copy' for the copy-the-input baseline")
    task: str = option("e2e", "task, or 'perplexity' (of --data)", choices=lambda: [*sorted(TASKS), PERPLEXITY])
    split: str = option("test", "split", choices=("train", "validation", "test"))
    limit: int | None = option(None, "first N inputs only (default: all)", lo=1)
    data_dir: str | None = option(None, "task folder (default: its folder in $SPARSELM_DATA / shared/data)")
    out: str | None = option(None, "folder for the evaluation files (default: eval/ inside a run sparselm made; "
                                   "required for any other model directory, which is never written to)")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    progress: bool = option(True, "show a progress bar")
    data: str | None = option(None, "task perplexity: a text file, or a prepared corpus folder (its validation split)")
    seqlen: int | None = option(None, "task perplexity: tokens per window (default: the model's context)", lo=2)
    ppl_batch_size: int = option(8, "task perplexity: windows per forward pass", lo=1)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)

    def __post_init__(self):
        if not self.model:
            raise ConfigError("model: required (--from DIR, or --from copy)")
        if self.task == PERPLEXITY:
            if not self.data:
                raise ConfigError("data: required with task perplexity (--data FILE.txt or a prepared corpus folder)")
            if self.model == "copy":
                raise ConfigError("model: the copy baseline has no perplexity; pass --from DIR")
        elif self.data or self.seqlen:
            raise ConfigError(f"{'data' if self.data else 'seqlen'}: only for --task perplexity; task {self.task} "
                              "reads its own splits (--data-dir for its folder)")


def evaluate(model_dir: str | Path, task: str = "e2e", split: str = "test", limit: int | None = None,
             decoding: DecodingConfig = DecodingConfig(), data_dir=None, device="cpu", progress=True,
             val_limit: int = 256, out: str | Path | None = None) -> dict:
    """Write ``<task>-<split>.json`` (+ ``.hyp.txt``, ``.ref.txt``, ``.src.txt``) into ``out`` (default:
    ``eval/`` of a sparselm run) and return the result. Nothing else in ``model_dir`` changes, and a
    model directory sparselm did not make is never written to."""
    if str(model_dir) == "copy":
        return copy_baseline(task, split, limit, data_dir)
    model_dir = Path(model_dir)
    if out is None and not is_sparselm_run(model_dir):
        raise ValueError(f"{model_dir} is not a run sparselm made (no summary.json); pass --out DIR for the "
                         "evaluation files: a model directory from elsewhere is never written to")
    path = eval_path(model_dir, task, split, out)
    model, tok, _, _ = load_run(model_dir)
    model.to(device)
    data = load_task(task, data_dir)
    if split not in data.splits:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(data.splits)}")
    examples = data.splits[split][:limit] if limit else data.splits[split]
    t0 = time.time()
    hyps = generate(model, tok, [e.prompt for e in examples], decoding, device, progress)
    gen_time = time.time() - t0
    skipped: dict[str, str] = {}  # metrics this install cannot compute (a missing extra, no Java) -> why
    result = {
        "task": task,
        "split": split,
        "n_examples": len(examples),
        "n_references": sum(len(e.refs) for e in examples),
        "model": str(model_dir),
        "decoding": decoding.to_dict(),
        "metrics": score(task, hyps, [e.refs for e in examples], skipped),
        "generation_time_s": gen_time,
    }
    if skipped:
        result["skipped"] = skipped
    if "bleu" in result["metrics"]:  # BLEU by sacrebleu (WebNLG, DART) is skipped without the eval extra
        segments = bleu_segments(task, hyps, [e.refs for e in examples])
        lo, hi = bootstrap_ci(task, segments)
        result["confidence"] = {"bleu": [lo, hi], "level": LEVEL, "resamples": RESAMPLES, "over": "test inputs"}
        result["bleu_segments"] = segments.astype(int).tolist()  # per-input statistics for paired tests between runs
    context = context_length(model)
    val, long_val = encode_pairs(tok, data.pairs("validation")[:val_limit], context, skip_too_long=True)
    result["metrics"]["val_ppl"] = math.exp(validation_loss(model, val, decoding.batch_size, tok.eos_token_id, device))
    max_prompt = context - decoding.max_new_tokens
    result["prompts_truncated"] = sum(len(tok(e.prompt).input_ids) > max_prompt for e in examples)
    result["val_pairs_left_out_too_long"] = long_val
    if result["prompts_truncated"]:
        log.warning("%d of %d prompts were longer than %d tokens and lost their start for generation",
                    result["prompts_truncated"], len(examples), max_prompt)

    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".hyp.txt").write_text("\n".join(hyps) + "\n")
    # references in the E2E scorer's format: one block per input, blank line between blocks
    path.with_suffix(".ref.txt").write_text("\n\n".join("\n".join(e.refs) for e in examples) + "\n")
    path.with_suffix(".src.txt").write_text("\n".join(e.source for e in examples) + "\n")
    write_json(path, result)  # last and atomic: an existing result means a finished evaluation
    if path.parent == model_dir / "eval":
        write_card(model_dir)  # the run's model card shows its metrics
    return result


def eval_path(model_dir: str | Path, task: str, split: str, out: str | Path | None = None) -> Path:
    """Where ``evaluate`` writes its result (its existence marks the evaluation as done): ``out``, or
    ``eval/`` inside a run sparselm made (it has a summary.json or a manifest)."""
    folder = Path(model_dir) / "eval" if out is None else Path(out)
    return folder / f"{task}-{split}.json"


def is_sparselm_run(path: str | Path) -> bool:
    return (Path(path) / "summary.json").is_file() or (Path(path) / MANIFEST).is_file()


def copy_baseline(task: str, split: str, limit: int | None = None, data_dir=None) -> dict:
    """Score the linearised input itself as the output: the floor any model must clear."""
    data = load_task(task, data_dir)
    examples = data.splits[split][:limit] if limit else data.splits[split]
    skipped: dict[str, str] = {}
    result = {"task": task, "split": split, "n_examples": len(examples), "n_references": sum(len(e.refs) for e in examples),
              "model": "copy-the-input baseline", "decoding": {"num_beams": 0},
              "metrics": score(task, [e.source for e in examples], [e.refs for e in examples], skipped)}
    if skipped:
        result["skipped"] = skipped
    return result


def format_table(result: dict) -> str:
    rows = [f"{result['task']} {result['split']} ({result['n_examples']} inputs, {result['n_references']} refs, "
            f"beam {result['decoding']['num_beams']})"]
    ci = result.get("confidence", {})
    for k, v in result["metrics"].items():
        interval = f"   {100 * ci['level']:.0f}% CI [{ci[k][0]:.2f}, {ci[k][1]:.2f}] over inputs" if k in ci else ""
        rows.append(f"  {k:<8} {v:8.3f}{interval}")
    for k, why in result.get("skipped", {}).items():
        rows.append(f"  {k:<8} skipped: {why}")
    return "\n".join(rows)
