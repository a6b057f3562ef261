"""The model card (``README.md``) of a run directory: what a person needs before using or publishing it.

Written from the run's own files (``summary.json``, ``config.json``, ``eval/*.json``), so it can be
rebuilt at any time and always agrees with them: ``save_run`` writes it, ``evaluate`` refreshes it
with the metrics. It is not in the manifest, for that reason.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from .. import __version__
from ..files import write_text

CARD = "README.md"


_command: str | None = None  # set by the CLI: the sparselm command being run


def set_command(argv: list[str]) -> None:
    global _command
    _command = shlex.join(argv)


def invocation() -> str:
    """The command that is making this run: the sparselm command line, or this process's own."""
    return _command or shlex.join([Path(sys.executable).name, *sys.argv])


def write_card(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    path = run_dir / CARD
    write_text(path, render(run_dir))
    return path


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def render(run_dir: Path) -> str:
    s = _json(run_dir / "summary.json")
    config = _json(run_dir / "config.json")
    kind = s.get("kind", "model")
    model = s.get("model") or {}
    sparsity = s.get("sparsity") or {}
    tags = ["sparselm", "sparse" if sparsity.get("measured") else "dense", kind]
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [" + ", ".join(tags) + "]", "---", "", f"# {run_dir.resolve().name}", ""]
    what = {"pretrain": "pre-trained", "finetune": f"fine-tuned on {s.get('task')} ({s.get('mode')} fine-tuning)"}.get(kind, kind)
    lines += [f"A {config.get('model_type', s.get('family', '?'))} causal language model {what} with "
              f"sparselm {__version__}" + (f", made by `{s['command']}`." if s.get("command") else "."), ""]

    lines += ["## Model", "", "| | |", "|---|---|"]
    if model:
        lines += [f"| family | {model.get('family')} |", f"| layers | {model.get('n_layer')} |",
                  f"| width d | {model.get('n_embd')} |", f"| heads | {model.get('n_head')} |",
                  f"| context | {model.get('block_size')} tokens |", f"| vocabulary | {model.get('vocab_size')} |"]
    else:
        for key in ("n_layer", "num_hidden_layers", "n_embd", "hidden_size", "vocab_size"):
            if key in config:
                lines.append(f"| {key} | {config[key]} |")
    if s.get("n_params"):
        lines.append(f"| parameters | {s['n_params']:,} |")
    if s.get("final_param_count"):
        lines.append(f"| non-zero parameters at the end | {int(s['final_param_count']):,} |")
    lines.append("")

    lines += _sparsity_section(run_dir, s, sparsity)
    lines += _training_section(s)
    if s.get("prompt_format"):
        p = s["prompt_format"]
        lines += ["## Prompt format", "", f"Prompt: `{p['prompt']}`, then the model writes the text and ends it with EOS. "
                  "Decoding settings (beam search) are in `generation_config.json`; "
                  "`model.generate(**tokenizer(prompt, return_tensors='pt'))` uses them.", "",
                  f"Example prompt: `{p.get('example', '')}`", ""]
    lines += _eval_section(run_dir)
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "", f'model = AutoModelForCausalLM.from_pretrained("{run_dir.name}")',
              f'tokenizer = AutoTokenizer.from_pretrained("{run_dir.name}")', "```", ""]
    if (run_dir / "masks.safetensors").exists():
        lines += ["`masks.safetensors` holds the boolean masks (True = kept) by parameter name; pruned weights are "
                  "stored as zeros in `model.safetensors`. `sparselm export` writes a compressed copy.", ""]
    return "\n".join(lines)


def _sparsity_section(run_dir: Path, s: dict, sparsity: dict) -> list[str]:
    if not sparsity.get("layers") and not (run_dir / "masks.safetensors").exists():
        return ["## Sparsity", "", "Dense." + (f" (Pre-trained sparse: {s['source_sparsity']:.1%} "
                f"{s.get('source_method')}, then fine-tuned densely: SPDF.)" if s.get("source_sparsity") else ""), ""]
    out = ["## Sparsity", "", f"Method **{sparsity.get('method')}**, target {sparsity.get('target', 0):.2%}, "
           f"measured **{sparsity.get('measured', 0):.2%}** of the masked weights "
           f"({sparsity.get('masked_params', 0):,} weights in {len(sparsity.get('layers', {}))} layers).", ""]
    layers = sparsity.get("layers") or {}
    if layers:
        out += ["| layer | sparsity |", "|---|---:|"] + [f"| `{k}` | {v:.2%} |" for k, v in layers.items()] + [""]
    return out


def _training_section(s: dict) -> list[str]:
    out = ["## Training", ""]
    if s.get("pruned_from"):
        p = s.get("pruning") or {"method": "magnitude"}
        how = " + ".join(x for x in (p.get("method"), p.get("refine") and f"{p['refine']} refinement") if x)
        calib = p.get("calibration")
        out.append(f"- one-shot pruning ({how}) of `{s['pruned_from']}`"
                   + (f" on {calib['nsamples']} x {calib['seqlen']} calibration tokens from {calib['source']}" if calib else "")
                   + "; the lines below are the source run's, before pruning")
    if s.get("kind") == "pretrain":
        from .. import flops

        out += [f"- {s.get('steps', 0):,} steps, {s.get('tokens_seen', 0):,} tokens"
                + (f", continued from `{s['init_from']}`" if s.get("init_from") else ""),
                f"- pre-training FLOPs: {s.get('train_flops', 0):.3e} (the dense base model: {s.get('dense_train_flops', 0):.3e}, "
                f"{flops.compared(s.get('dense_train_flops', 0), s.get('train_flops', 0))})",
                f"- final validation loss {s.get('final_val_loss', float('nan')):.4f}"]
        if s.get("data"):
            out.append(f"- data: {s['data']}")
    elif s.get("kind") == "finetune":
        out += [f"- from `{s.get('source_run')}` ({s.get('source_method')}, sparsity {s.get('source_sparsity') or 0:.2%})",
                f"- {s.get('steps', 0):,} steps ({s.get('epochs', 0):.2f} epochs) on {s.get('train_pairs', 0):,} "
                f"{s.get('task')} training pairs, validation loss {s.get('initial_val_loss', 0):.3f} -> "
                f"{s.get('final_val_loss', 0):.3f}",
                f"- fine-tuning FLOPs {s.get('finetune_flops', 0):.3e}"
                + (f"; pre-training FLOPs {s['pretrain_flops']:.3e} (dense {s.get('pretrain_dense_flops') or 0:.3e})"
                   if s.get("pretrain_flops") else "")]
    if s.get("wall_time_s"):
        out.append(f"- wall time {s['wall_time_s']:.0f} s on {s.get('device', '?')} x {s.get('world_size', 1)}")
    return out + [""]


def _eval_section(run_dir: Path) -> list[str]:
    results = sorted((run_dir / "eval").glob("*.json")) if (run_dir / "eval").is_dir() else []
    rows, ppl_rows = [], []
    for path in results:
        r = _json(path)
        if r.get("task") == "perplexity" and "ppl" in r:
            ppl_rows.append(f"| `{Path(str(r.get('data'))).name}` | {r.get('seqlen')} | {r.get('n_windows')} | "
                            f"{r.get('n_tokens_scored', 0):,} | {r['ppl']:.3f} |")
        if "metrics" not in r:
            continue
        ci = r.get("confidence", {}).get("bleu")
        metrics = ", ".join(f"{k} {v:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if k == "bleu" and ci else "")
                            for k, v in r["metrics"].items())
        rows.append(f"| {r.get('task')} | {r.get('split')} | {r.get('n_examples')} | "
                    f"{r.get('decoding', {}).get('num_beams')} | {metrics} |")
    if not rows and not ppl_rows:
        return []
    out = ["## Evaluation", ""]
    if rows:
        out += ["BLEU with its 95% bootstrap interval over test inputs.", "",
                "| task | split | inputs | beams | metrics |", "|---|---|---:|---:|---|", *rows, ""]
    if ppl_rows:
        out += ["Perplexity: exp of the mean next-token loss over non-overlapping windows of the text (the tail "
                "shorter than a window dropped), as Wanda and SparseGPT report it.", "",
                "| data | window | windows | tokens scored | perplexity |", "|---|---:|---:|---:|---:|", *ppl_rows, ""]
    return out
