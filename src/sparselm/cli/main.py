"""``sparselm`` command line: thin wrappers that parse flags into the one config system and call the library.

Every training command takes ``--config FILE.yaml`` and ``--set section.key=value`` (any config key);
its flags are shortcuts for config keys and their help shows the key and its default.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import typing
from pathlib import Path

from .. import __version__


# ---- flags that are shortcuts for config keys -----------------------------------------------------
def _field(cls: type, dotted: str) -> dataclasses.Field:
    """The dataclass field behind a dotted config key (for its help text and default)."""
    *sections, leaf = dotted.split(".")
    for s in sections:
        cls = typing.get_type_hints(cls)[s]
    return next(f for f in dataclasses.fields(cls) if f.name == leaf)


def _flag(p: argparse.ArgumentParser, cls: type, key: str, *names: str, **kw) -> None:
    """A flag for config key ``key``: help and default come from the config's declaration."""
    f = _field(cls, key)
    default = f.default if f.default is not dataclasses.MISSING else None
    shown = "the preset's" if default is None and key.startswith("optim.") else default
    help_text = kw.pop("help", None) or f.metadata.get("help", "")
    choices = f.metadata.get("choices")
    if "choices" not in kw and choices is not None:  # the config field's own list (a registry's names are read now)
        kw["choices"] = list(choices() if callable(choices) else choices)
    if kw.get("choices") is None:
        kw.setdefault("metavar", key.rsplit(".", 1)[-1].upper())
    shown = "" if "default" in help_text else f"default: {shown}; "
    p.add_argument(*names, dest=key, default=None, help=f"{help_text} ({shown}config key {key})", **kw)


def _common_run_flags(p: argparse.ArgumentParser, cls: type, default_out: str) -> None:
    _flag(p, cls, "run.out", "--out", metavar="DIR", help=f"run directory (default {default_out})")
    _flag(p, cls, "run.seed", "--seed", type=int)
    _flag(p, cls, "run.device", "--device")
    _flag(p, cls, "run.dtype", "--dtype")
    p.add_argument("--compile", dest="run.compile", action="store_const", const=True, default=None,
                   help="torch.compile the model for training (CPU: inductor with the system C compiler; config key run.compile)")
    _flag(p, cls, "run.parallel", "--parallel")
    _flag(p, cls, "run.kernel", "--kernel")
    p.add_argument("--activation-checkpointing", dest="run.activation_checkpointing", action="store_const", const=True,
                   default=None, help="recompute each block's activations in the backward (config key run.activation_checkpointing)")
    _flag(p, cls, "run.report_to", "--report-to", metavar="jsonl,tensorboard,wandb")
    p.add_argument("--keep-checkpoint", dest="run.keep_checkpoint", action="store_const", const=True, default=None,
                   help="keep checkpoint/ after the run finishes (default: removed then; always kept on failure or "
                        "interrupt; config key run.keep_checkpoint)")
    _config_file_flags(p, "training", "e.g. --set optim.warmup_steps=20 --set model.n_layer=2 --set sparsity.options.drop_fraction=0.2")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint (a finished run: nothing to do)")
    p.add_argument("--no-progress", dest="run.progress", action="store_const", const=False, default=None, help="no progress bar")


NOT_CONFIG = {"func", "command", "config", "overrides", "resume"}


def _config_file_flags(p: argparse.ArgumentParser, what: str, example: str = "") -> None:
    p.add_argument("--config", metavar="FILE", help=f"YAML file of {what} config values, nested by section (flags and --set win)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"any {what} config key{'; ' + example if example else ''}")


def _config_flags(args) -> dict:
    """The flags that are shortcuts for config keys (their dest is the key)."""
    return {k: v for k, v in vars(args).items() if k not in NOT_CONFIG}


def _say(*args, **kw) -> None:
    """``print`` on the main process only (under torchrun every rank runs the command)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kw)


def _pretrain_args(p: argparse.ArgumentParser) -> None:
    from ..sparsity import METHODS
    from ..training.config import PretrainConfig as C

    _flag(p, C, "model.preset", "--preset", help="model shape: " + ", ".join(_presets()),
          choices=None)  # (listed in the help; a wrong name is the config's error, which names the key)
    _flag(p, C, "model.init_from", "--init-from", metavar="DIR")
    _flag(p, C, "data.corpus", "--corpus", metavar="DIR")
    _data_flags(p, C)
    _flag(p, C, "sparsity.target", "--sparsity", type=float)
    _flag(p, C, "sparsity.method", "--method",
          help="; ".join(f"{name}: {cls.help}" for name, cls in sorted(METHODS.items())))
    _flag(p, C, "sparsity.distribution", "--distribution")
    _flag(p, C, "sparsity.n_m", "--n-m", metavar="N:M")
    _flag(p, C, "optim.max_steps", "--max-steps", type=int)
    _flag(p, C, "optim.batch_size", "--batch-size", type=int)
    _flag(p, C, "optim.grad_accum", "--grad-accum", type=int)
    _flag(p, C, "optim.lr", "--lr", type=float)
    _common_run_flags(p, C, "runs/pretrain")


def _data_flags(p: argparse.ArgumentParser, C: type) -> None:
    """How a raw corpus is tokenized (``pretrain`` and ``data prepare``: the same keys, the same cache)."""
    _flag(p, C, "data.tokenizer", "--tokenizer", metavar="bpe|gpt2|PATH")
    _flag(p, C, "data.text_field", "--text-field", metavar="NAME")
    _flag(p, C, "data.workers", "--workers", type=int, metavar="N")
    p.add_argument("--skip-bad-rows", dest="data.skip_bad_rows", action="store_const", const=True, default=None,
                   help="skip (and count) corpus rows without text instead of failing (config key data.skip_bad_rows)")


def _data_prepare_args(p: argparse.ArgumentParser) -> None:
    from ..training.config import PretrainConfig as C

    _flag(p, C, "data.corpus", "--corpus", metavar="PATH")
    _data_flags(p, C)
    _flag(p, C, "model.preset", "--preset", help="model shape whose vocab_size a trained BPE gets: " + ", ".join(_presets()))
    _flag(p, C, "model.vocab_size", "--vocab-size", type=int, metavar="V",
          help="size of a trained BPE (default: the preset's)")
    _flag(p, C, "data.val_fraction", "--val-fraction", type=float)
    _flag(p, C, "data.cache_dir", "--cache-dir", metavar="DIR")
    _flag(p, C, "data.shard_tokens", "--shard-tokens", type=int, metavar="N")
    _flag(p, C, "data.dtype", "--dtype")
    _flag(p, C, "data.eos_token", "--eos-token", metavar="TOKEN")
    p.add_argument("--out", dest="prepare_out", metavar="DIR",
                   help="write the shards here instead of the cache (then: sparselm pretrain --corpus DIR)")
    _config_file_flags(p, "pre-training", "the same file as for pretrain gives the same tokens and cache")
    p.add_argument("--no-progress", dest="run.progress", action="store_const", const=False, default=None, help="no progress bar")


def cmd_data_prepare(args) -> int:
    from ..data.paths import default_corpus
    from ..data.prepare import prepare_corpus
    from ..training import load_pretrain_config

    flags = {k: v for k, v in _config_flags(args).items() if k not in ("data_command", "prepare_out")}
    cfg = load_pretrain_config(args.config, args.overrides, flags)
    data = cfg.data
    corpus = prepare_corpus(data.corpus or str(default_corpus()), cfg.shape().vocab_size, data.val_fraction,
                            data.cache_dir, log=print, out=args.prepare_out, progress=cfg.run.progress,
                            **data.prepare_options())
    print(f"sparselm pretrain --corpus {corpus.dir} trains on it as it is")
    return 0


def _presets() -> list[str]:
    from ..models import PRESETS

    return sorted(PRESETS)


def cmd_pretrain(args) -> int:
    from .. import flops
    from ..training import load_pretrain_config, pretrain

    cfg = load_pretrain_config(args.config, args.overrides, _config_flags(args))
    shape = cfg.planned_shape()
    _say(f"pretrain {cfg.model.init_from or cfg.model.preset} ({shape.family}, {shape.n_layer}L d={shape.n_embd} T={shape.block_size} "
          f"V={shape.vocab_size}) sparsity={cfg.sparsity.target} method={cfg.sparsity.method} steps={cfg.optim.max_steps} "
          f"tokens/step={cfg.tokens_per_step * int(os.environ.get('WORLD_SIZE', '1'))} -> {cfg.run.out}")
    summary = pretrain(cfg, resume=args.resume)
    _say(f"done: val loss {summary['final_val_loss']:.4f} (unigram entropy {summary['unigram_entropy']:.4f}), "
          f"sparsity {summary['sparsity']['measured']:.4f}, train FLOPs {summary['train_flops']:.3e} "
          f"(dense base model {summary['dense_train_flops']:.3e}: "
          f"{flops.compared(summary['dense_train_flops'], summary['train_flops'])}), "
          f"{summary['wall_time_s']:.0f}s -> {cfg.run.out}")
    return 0


def cmd_flops(args) -> int:
    from .. import config, flops
    from ..training.config import ModelConfig

    model = config.load(ModelConfig, overrides=[o.removeprefix("model.") for o in args.overrides],
                        flags={"preset": args.preset, "init_from": args.from_dir})
    shape = model.shape()
    name = args.from_dir or args.preset
    sparse_shape = shape.widened(args.sparsity) if args.iso_flop == "wide" else shape
    rows = flops.flops_table(shape, 0.0)
    sparse = flops.forward_flops_per_token(sparse_shape, 1.0 - args.sparsity)
    _say(f"forward FLOPs per token, {name} ({shape.family}, L={shape.n_layer} d={shape.n_embd} "
          f"T={shape.block_size} V={shape.vocab_size}), sparsity {args.sparsity} on the block linears")
    if args.iso_flop == "wide":
        _say(f"Sparse-Wide: d={shape.n_embd} -> {sparse_shape.n_embd}, d_ff={shape.n_inner} -> {sparse_shape.n_inner} "
              f"(x{(1 - args.sparsity) ** -0.5:.3f}, rounded to a multiple of {shape.n_head} heads)")
    label = "sparse-wide" if args.iso_flop == "wide" else "sparse"
    _say(f"{'component':<14}{'dense':>14}{label:>14}")
    for name, dense, _ in rows:
        _say(f"{name:<14}{dense:>14.4e}{sparse[name]:>14.4e}")
    total_dense, total_sparse = rows[-1][1], sparse["total"]
    _say(f"dense/{label} ratio: {total_dense / total_sparse:.3f}x ({flops.compared(total_dense, total_sparse)} FLOPs than "
         f"the dense base model)")
    if args.tokens:
        _say(f"training FLOPs for {args.tokens:.3e} tokens: dense {3 * total_dense * args.tokens:.3e}, "
              f"{label} {3 * total_sparse * args.tokens:.3e}")
    return 0


def quiet_transformers() -> None:
    """transformers' warnings about padding and its save progress bars are noise for our runs."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _names(text: str) -> list[str]:
    """``a,b`` -> ``["a", "b"]`` (a flag that takes one value or a comma list)."""
    names = [t.strip() for t in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r}: an empty name in the comma list")
    return names


def _fractions(text: str) -> list[float]:
    try:
        return [float(t) for t in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number or a comma list of numbers, e.g. 0.5 or "
                                         "0.3,0.5,0.7") from None


def _pruner_names() -> list[str]:
    from ..pruning import PRUNERS

    return sorted(PRUNERS)


def cmd_prune(args) -> int:
    from .. import config
    from ..training.config import PruneConfig
    from ..training.prune import prune_run

    flags = _config_flags(args)
    tolerance = flags.pop("knee_tolerance")
    lists = {k: flags[k] for k in ("method", "target", "n_m") if flags[k] is not None}
    flags.update({k: v[0] for k, v in lists.items()})  # the first of each: the sweep's other settings are checked once
    cfg = config.load(PruneConfig, args.config, args.overrides, flags)
    if any(len(v) > 1 for v in lists.values()):
        return _prune_sweep(cfg, lists, tolerance)
    if tolerance is not None:
        raise config.ConfigError("--knee-tolerance: only for a sweep (a comma list in --method, --sparsity or --n-m)")
    s = prune_run(cfg)
    p = s["pruning"]
    _say(f"pruned {cfg.from_run} ({s['sparsity']['method']}) to sparsity {s['sparsity']['measured']:.4f} in {p['seconds']:.1f}s "
         f"on {p['device']} (peak memory {p['peak_memory_bytes'] / 2**20:.0f} MiB) -> {cfg.out}")
    if cfg.eval_data:
        from ..evaluation.perplexity import evaluate_perplexity, format_perplexity, perplexity_path
        from ..training.distributed import pick_device

        result = evaluate_perplexity(cfg.out, cfg.eval_data, cfg.eval_seqlen, device=pick_device(cfg.device))
        _say(format_perplexity(result))
        _say(f"-> {perplexity_path(cfg.out, cfg.eval_data, result['seqlen'])}")
    return 0


def _prune_sweep(cfg, lists: dict, tolerance: float | None) -> int:
    from ..experiments.prune_sweep import KNEE_TOLERANCE, run_sweep

    sparsities = lists.get("target") or ([] if "n_m" in lists else [cfg.target])
    record = run_sweep(cfg, lists.get("method") or [cfg.method], sparsities, lists.get("n_m", []),
                       tolerance=KNEE_TOLERANCE if tolerance is None else tolerance, progress=cfg.progress)
    knees = ", ".join(f"{k} {'none' if v is None else f'{100 * v:g}%'}" for k, v in record["essential_sparsity"].items())
    _say(f"swept {len(record['points'])} runs of {cfg.from_run}: essential sparsity {knees} -> {cfg.out}/sweep.md"
         + (f", {cfg.out}/{record['plot']}" if record["plot"] else " (plot skipped: pip install 'sparselm[report]')"))
    return 0


def cmd_finetune(args) -> int:
    from ..training import finetune, load_finetune_config

    cfg = load_finetune_config(args.config, args.overrides, _config_flags(args))
    _say(f"finetune {cfg.model.from_run} on {cfg.data.task} ({cfg.tuning.mode}) -> {cfg.run.out}")
    s = finetune(cfg, resume=args.resume)
    _say(f"done: {s['steps']} steps ({s['epochs']:.2f} epochs), val loss {s['initial_val_loss']:.3f} -> "
          f"{s['final_val_loss']:.3f} (ppl {s['final_val_ppl']:.2f}), fine-tuning FLOPs {s['finetune_flops']:.3e}, "
          f"{s['wall_time_s']:.0f}s -> {cfg.run.out}")
    return 0


def cmd_evaluate(args) -> int:
    from .. import config
    from ..evaluation.evaluate import PERPLEXITY, EvaluateConfig, eval_path, evaluate, format_table
    from ..training.distributed import pick_device

    cfg = config.load(EvaluateConfig, args.config, args.overrides, _config_flags(args))
    if cfg.task == PERPLEXITY:
        from ..evaluation.perplexity import evaluate_perplexity, format_perplexity, perplexity_path

        result = evaluate_perplexity(cfg.model, cfg.data, cfg.seqlen, device=pick_device(cfg.device),
                                     batch_size=cfg.ppl_batch_size, progress=cfg.progress, out=cfg.out)
        print(format_perplexity(result))
        print(f"-> {perplexity_path(cfg.model, cfg.data, result['seqlen'], cfg.out)}")
        return 0
    result = evaluate(cfg.model, cfg.task, cfg.split, cfg.limit, cfg.decoding, cfg.data_dir,
                      pick_device(cfg.device), progress=cfg.progress, out=cfg.out)
    print(format_table(result))
    if cfg.model != "copy":
        print(f"-> {eval_path(cfg.model, cfg.task, cfg.split, cfg.out)}")
    return 0


def cmd_reproduce(args) -> int:
    from ..experiments import load_spec
    from ..experiments.runner import dry_run, run

    spec = load_spec(args.spec)
    out = args.out or f"runs/{spec.name}"
    if args.dry_run:
        print(dry_run(spec, Path(out), args.device))
        return 0
    print(f"reproduce {spec.name}: {spec.description}".rstrip(": "))
    print(dry_run(spec, Path(out), args.device))
    run(spec, out, device=args.device, progress=not args.no_progress)
    print(f"report: {out}/report.md (and report.html, plots/*.png); results: {out}/results.csv")
    return 0


def cmd_report(args) -> int:
    from ..experiments.report import report_from_dir

    path = report_from_dir(args.run_dir)
    print(f"wrote {path} and {path.with_suffix('.html')}")
    return 0


def cmd_scaling_fit(args) -> int:
    import json as _json

    from ..experiments import scaling

    points = scaling.load_points(args.runs)
    result = scaling.fit(points)
    print(scaling.report(points, result))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling_fit.json").write_text(_json.dumps(scaling.to_json(points, result), indent=2))
    scaling.plot(points, result, out / "scaling_fit.png")
    print(f"-> {out}/scaling_fit.json, {out}/scaling_fit.png")
    return 0


def cmd_export(args) -> int:
    from ..models.export import export_run

    r = export_run(args.run, args.out, args.layout)
    rows = [("dense model.safetensors", f"{r['dense_bytes']:,} B"), ("exported model.safetensors", f"{r['exported_bytes']:,} B"),
            ("ratio", f"{r['ratio']:.3f}"), ("masked layers", r["masked_layers"]), ("sparsity", f"{r['sparsity']:.4f}"),
            ("layout", r["layout"])]
    for name, value in rows:
        print(f"{name:<28}{value:>16}")
    print(f"-> {r['out']} (load it with sparselm.models.export.load_exported)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ..experiments.spec import builtin_specs
    from ..training.config import FinetuneConfig as F
    from ..evaluation.evaluate import EvaluateConfig as E
    from ..training.config import PruneConfig as P

    parser = argparse.ArgumentParser(prog="sparselm", description="Sparse pre-training and dense fine-tuning of GPT-style models")
    parser.add_argument("--version", action="version", version=f"sparselm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pre-train a (sparse) model on a text corpus")
    _pretrain_args(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("flops", help="per-component FLOPs of a preset, dense vs sparse")
    p.add_argument("--preset", default="gpt3-xl", help="model shape: " + ", ".join(_presets()) + " (default gpt3-xl)")
    p.add_argument("--from", dest="from_dir", metavar="DIR", help="a local HF model directory instead of a preset")
    p.add_argument("--sparsity", type=float, default=0.75, help="sparsity of the block linears (default 0.75)")
    p.add_argument("--tokens", type=float, help="also total training FLOPs for this many tokens")
    p.add_argument("--iso-flop", choices=["none", "wide"], default="none",
                   help="'wide': compare with the Sparse-Wide model (Sparse-IFT) at this sparsity (default none)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="model.FIELD=VALUE",
                   help="override a shape field, e.g. --set model.n_layer=2")
    p.set_defaults(func=cmd_flops)

    p = sub.add_parser("prune", help="one-shot pruning of a trained run or HF model directory (magnitude, Wanda, SparseGPT)")
    _flag(p, P, "from_run", "--from", metavar="DIR")
    _flag(p, P, "out", "--out", metavar="DIR")
    _flag(p, P, "method", "--method", type=_names, choices=None, metavar="NAME[,NAME...]",
          help=f"one-shot pruner ({', '.join(_pruner_names())}; default: magnitude), or a comma list for a sweep")
    _flag(p, P, "target", "--sparsity", type=_fractions, metavar="S[,S...]",
          help="fraction of zeros in the block linears (default: 0.75), or a comma list for a sweep")
    _flag(p, P, "distribution", "--distribution")
    _flag(p, P, "n_m", "--n-m", type=_names, metavar="N:M[,N:M...]",
          help="N:M structured masks, e.g. 2:4 (overrides --sparsity); in a sweep, a comma list of extra points")
    _flag(p, P, "eval_data", "--eval-data", metavar="FILE.txt|PREPARED_DIR")
    _flag(p, P, "eval_seqlen", "--eval-seqlen", type=int, metavar="N")
    p.add_argument("--knee-tolerance", dest="knee_tolerance", type=float, metavar="TOL",
                   help="a sweep's essential sparsity: the largest sparsity whose perplexity, and that of every lower "
                        "one, is within TOL of dense (default 0.01: within 1%%)")
    _flag(p, P, "refine", "--refine")
    _flag(p, P, "calibration", "--calibration", metavar="SOURCE")
    _flag(p, P, "nsamples", "--nsamples", type=int)
    _flag(p, P, "seqlen", "--seqlen", type=int)
    _flag(p, P, "seed", "--seed", type=int)
    _flag(p, P, "batch_size", "--batch-size", type=int)
    _flag(p, P, "device", "--device")
    for key in ("true_sequential", "offload"):
        p.add_argument("--" + key.replace("_", "-"), dest=key, action="store_const", const=True, default=None,
                       help=f"{_field(P, key).metadata['help']} (config key {key})")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False, default=None, help="no progress bar")
    _config_file_flags(p, "prune")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("export", help="write a sparse run as a compressed checkpoint (kept values + bitmask or packed 2:4)")
    p.add_argument("run", metavar="RUN", help="a finished sparse run directory (has masks.safetensors)")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the export (new or empty)")
    p.add_argument("--layout", choices=["auto", "bitmask", "2:4"], default="auto",
                   help="bitmask: any mask; 2:4: packed for sparse tensor cores (2:4 runs only); auto: 2:4 where the run is (default auto)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("finetune", help="fine-tune a pre-trained run on a data-to-text task (dense = SPDF)")
    _flag(p, F, "model.from_run", "--from", metavar="DIR")
    _flag(p, F, "data.task", "--task")
    _flag(p, F, "tuning.mode", "--mode")
    _flag(p, F, "data.data_dir", "--data-dir", metavar="DIR")
    _flag(p, F, "optim.epochs", "--epochs", type=float)
    _flag(p, F, "optim.max_steps", "--max-steps", type=int)
    _flag(p, F, "optim.batch_size", "--batch-size", type=int)
    _flag(p, F, "optim.lr", "--lr", type=float)
    _flag(p, F, "data.limit_train", "--limit-train", type=int)
    p.add_argument("--skip-bad-rows", dest="data.skip_bad_rows", action="store_const", const=True, default=None,
                   help="skip (and count) malformed rows instead of failing (config key data.skip_bad_rows)")
    _common_run_flags(p, F, "runs/finetune")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="beam-search a task split and score it with the official metrics, "
                                        "or the perplexity of a text (--task perplexity --data FILE)")
    _flag(p, E, "model", "--from", "--model", metavar="DIR")
    _flag(p, E, "out", "--out", metavar="DIR")
    _flag(p, E, "task", "--task")
    _flag(p, E, "split", "--split")
    _flag(p, E, "limit", "--limit", type=int)
    _flag(p, E, "decoding.num_beams", "--beams", type=int)
    _flag(p, E, "decoding.length_penalty", "--length-penalty", type=float)
    _flag(p, E, "decoding.no_repeat_ngram_size", "--no-repeat-ngram-size", type=int)
    _flag(p, E, "decoding.max_new_tokens", "--max-new-tokens", type=int)
    _flag(p, E, "decoding.batch_size", "--batch-size", type=int)
    _flag(p, E, "data_dir", "--data-dir", metavar="DIR")
    _flag(p, E, "data", "--data", metavar="FILE.txt|PREPARED_DIR")
    _flag(p, E, "seqlen", "--seqlen", type=int)
    _flag(p, E, "ppl_batch_size", "--ppl-batch-size", type=int)
    _flag(p, E, "device", "--device")
    _config_file_flags(p, "evaluate")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False, default=None, help="no progress bar")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("reproduce", help="run the SPDF grid of a spec and write a report (resumable)")
    p.add_argument("--spec", default="cpu-demo", help=f"built-in spec ({', '.join(builtin_specs())}) or a YAML file (default cpu-demo)")
    p.add_argument("--out", help="output directory (default runs/<spec name>)")
    p.add_argument("--dry-run", action="store_true", help="print the plan with FLOPs and an ETA, run nothing")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("data", help="corpus preparation")
    dsub = p.add_subparsers(dest="data_command", required=True)
    d = dsub.add_parser("prepare", help="tokenize a corpus into token shards (what pretrain does first; resumable)")
    _data_prepare_args(d)
    d.set_defaults(func=cmd_data_prepare)

    p = sub.add_parser("scaling", help="scaling-law analysis of finished runs")
    ssub = p.add_subparsers(dest="scaling_command", required=True)
    f = ssub.add_parser("fit", help="fit L(N, D) = E + A/N^alpha + B/D^beta (N = average non-zero params)")
    f.add_argument("runs", nargs="+", help="pre-training run directories and/or grid directories (results.json)")
    f.add_argument("--out", default=".", help="where to write scaling_fit.json and scaling_fit.png (default .)")
    f.set_defaults(func=cmd_scaling_fit)

    p = sub.add_parser("report", help="regenerate report.md/.html and plots from a grid's results.json")
    p.add_argument("run_dir", help="grid output directory (holds results.json)")
    p.set_defaults(func=cmd_report)
    return parser


class _ConsoleHandler(logging.StreamHandler):
    """Writes to whatever ``sys.<name>`` is when a message comes (redirected, or captured by a test)."""

    def __init__(self, name: str):
        self.stream_name = name
        super().__init__()

    @property
    def stream(self):
        return getattr(sys, self.stream_name)

    @stream.setter
    def stream(self, _):
        pass


def _log_to_console() -> None:
    """The library's messages (``logging.getLogger("sparselm")``): info on stdout, warnings on stderr."""
    logger = logging.getLogger("sparselm")
    if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        out, err = _ConsoleHandler("stdout"), _ConsoleHandler("stderr")
        out.addFilter(lambda record: record.levelno < logging.WARNING)
        err.setLevel(logging.WARNING)
        for h in (out, err):
            h.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(h)
    logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    from ..models.card import set_command
    from ..training.loop import TrainingInterrupted

    _log_to_console()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_transformers()
    args = build_parser().parse_args(argv)
    set_command(["sparselm", *(sys.argv[1:] if argv is None else argv)])  # for the model card
    try:
        return args.func(args)
    except TrainingInterrupted as e:
        print(f"sparselm {args.command}: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print(f"sparselm {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, KeyError, RuntimeError, FloatingPointError) as e:  # OSError: full disk, missing files
        if os.environ.get("SPARSELM_DEBUG"):
            raise
        print(f"sparselm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
