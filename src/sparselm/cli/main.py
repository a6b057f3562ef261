"""``sparselm`` command line: thin wrappers that parse flags and call the library."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import yaml


def _kv(text: str):
    """--set key=value (value parsed as YAML: numbers, bools, lists)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def _pretrain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="model preset: tiny, small, gpt2-small, gpt2-medium, gpt3-xl (default tiny)")
    p.add_argument("--config", help="YAML file of config values (CLI flags win)")
    p.add_argument("--out", help="run directory (default runs/pretrain)")
    p.add_argument("--corpus", help="folder of .txt/.jsonl files (default $SPARSELM_DATA/corpus or ../shared/data/corpus)")
    p.add_argument("--sparsity", type=float, help="target fraction of zeros in the block linears (default 0)")
    p.add_argument("--method", choices=["static", "magnitude", "gmp", "set", "rigl"], help="sparse-training method (default static)")
    p.add_argument("--distribution", choices=["uniform", "random", "erk"], help="per-layer sparsity distribution (default uniform)")
    p.add_argument("--n-m", dest="n_m", help="N:M structured masks, e.g. 2:4 (static, gmp)")
    p.add_argument("--max-steps", dest="max_steps", type=int)
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--grad-accum", dest="grad_accum", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model (CUDA)")
    p.add_argument("--set", dest="overrides", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                   help="any config field, e.g. --set warmup_steps=20 --set model.n_layer=2")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_pretrain(args) -> int:
    from ..training import load_config, pretrain

    overrides = {k: getattr(args, k) for k in ("preset", "out", "corpus", "sparsity", "method", "distribution",
                                               "n_m", "max_steps", "batch_size", "grad_accum", "lr", "seed", "device", "compile")}
    model = {}
    for key, value in args.overrides:
        if key.startswith("model."):
            model[key[len("model."):]] = value
        else:
            overrides[key] = value
    cfg = load_config(args.config, model=model, **overrides)
    shape = cfg.shape()
    print(f"pretrain {cfg.preset} ({shape.n_layer}L d={shape.n_embd} T={shape.block_size} V={shape.vocab_size}) "
          f"sparsity={cfg.sparsity} method={cfg.method} steps={cfg.max_steps} tokens/step={cfg.tokens_per_step} -> {cfg.out}")
    summary = pretrain(cfg, resume=args.resume, progress=not args.no_progress)
    print(f"done: val loss {summary['final_val_loss']:.4f} (unigram entropy {summary['unigram_entropy']:.4f}), "
          f"sparsity {summary['sparsity']['measured']:.4f}, train FLOPs {summary['train_flops']:.3e} "
          f"(dense {summary['dense_train_flops']:.3e}, {summary['flops_reduction']:.2f}x fewer), "
          f"{summary['wall_time_s']:.0f}s -> {cfg.out}")
    return 0


def cmd_flops(args) -> int:
    from .. import flops
    from ..models import get_preset

    shape = get_preset(args.preset).override(**dict(args.overrides))
    rows = flops.flops_table(shape, args.sparsity)
    print(f"forward FLOPs per token, {args.preset} (L={shape.n_layer} d={shape.n_embd} T={shape.block_size} "
          f"V={shape.vocab_size}), sparsity {args.sparsity} on the block linears")
    print(f"{'component':<14}{'dense':>14}{'sparse':>14}")
    for name, dense, sparse in rows:
        print(f"{name:<14}{dense:>14.4e}{sparse:>14.4e}")
    total_dense, total_sparse = rows[-1][1], rows[-1][2]
    print(f"dense/sparse ratio: {total_dense / total_sparse:.3f}x")
    if args.tokens:
        print(f"training FLOPs for {args.tokens:.3e} tokens: dense {3 * total_dense * args.tokens:.3e}, "
              f"sparse {3 * total_sparse * args.tokens:.3e}")
    return 0


def quiet_transformers() -> None:
    """transformers' warnings about padding and its save progress bars are noise for our runs."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def cmd_prune(args) -> int:
    from ..sparsity import parse_n_m
    from ..training.prune import prune_run

    s = prune_run(args.from_run, args.out, args.sparsity, args.distribution, parse_n_m(args.n_m))
    print(f"pruned {args.from_run} by magnitude to sparsity {s['sparsity']['measured']:.4f} -> {args.out}")
    return 0


def cmd_finetune(args) -> int:
    from ..training import FinetuneConfig, finetune

    values = {k: getattr(args, k) for k in ("task", "mode", "out", "data_dir", "epochs", "max_steps", "batch_size",
                                            "lr", "limit_train", "seed", "device") if getattr(args, k) is not None}
    values.update(dict(args.overrides))
    cfg = FinetuneConfig(from_run=args.from_run, skip_bad_rows=args.skip_bad_rows, **values)
    print(f"finetune {cfg.from_run} on {cfg.task} ({cfg.mode}) -> {cfg.out}")
    s = finetune(cfg, resume=args.resume, progress=not args.no_progress)
    print(f"done: {s['steps']} steps ({s['epochs']:.2f} epochs), val loss {s['initial_val_loss']:.3f} -> "
          f"{s['final_val_loss']:.3f} (ppl {s['final_val_ppl']:.2f}), fine-tuning FLOPs {s['finetune_flops']:.3e}, "
          f"{s['wall_time_s']:.0f}s -> {cfg.out}")
    return 0


def cmd_evaluate(args) -> int:
    from ..evaluation.evaluate import evaluate, format_table
    from ..evaluation.generate import DecodingConfig
    from ..training.distributed import pick_device

    decoding = DecodingConfig(num_beams=args.beams, length_penalty=args.length_penalty,
                              no_repeat_ngram_size=args.no_repeat_ngram_size, max_new_tokens=args.max_new_tokens,
                              batch_size=args.batch_size)
    result = evaluate(args.model, args.task, args.split, args.limit, decoding, args.data_dir,
                      pick_device(args.device), progress=not args.no_progress)
    print(format_table(result))
    if args.model != "copy":
        print(f"-> {args.model}/eval/{args.task}-{args.split}.json")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparselm", description="Sparse pre-training and dense fine-tuning of GPT models")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pre-train a (sparse) GPT on a text corpus")
    _pretrain_args(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("flops", help="per-component FLOPs of a preset, dense vs sparse")
    p.add_argument("--preset", default="gpt3-xl")
    p.add_argument("--sparsity", type=float, default=0.75)
    p.add_argument("--tokens", type=float, help="also total training FLOPs for this many tokens")
    p.add_argument("--set", dest="overrides", type=_kv, action="append", default=[], metavar="FIELD=VALUE")
    p.set_defaults(func=cmd_flops)

    p = sub.add_parser("prune", help="one-shot magnitude pruning of a dense run (prune-then-fine-tune baseline)")
    p.add_argument("--from", dest="from_run", required=True, help="dense run directory")
    p.add_argument("--out", required=True)
    p.add_argument("--sparsity", type=float, default=0.75)
    p.add_argument("--distribution", choices=["uniform", "erk"], default="uniform")
    p.add_argument("--n-m", dest="n_m", help="N:M structured masks, e.g. 2:4")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("finetune", help="fine-tune a pre-trained run on a data-to-text task (dense = SPDF)")
    p.add_argument("--from", dest="from_run", required=True, help="pre-training run directory (or any HF GPT-2 directory)")
    p.add_argument("--task", help="e2e, e2e-cleaned, webnlg, dart, jsonl (default e2e)")
    p.add_argument("--mode", choices=["dense", "sparse", "lora"], help="dense (SPDF, default), sparse (masks kept), lora")
    p.add_argument("--out", help="run directory (default runs/finetune)")
    p.add_argument("--data-dir", help="task folder (default: its folder in $SPARSELM_DATA / shared/data)")
    p.add_argument("--epochs", type=float)
    p.add_argument("--max-steps", dest="max_steps", type=int)
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--limit-train", dest="limit_train", type=int, help="use only the first N training pairs")
    p.add_argument("--seed", type=int)
    p.add_argument("--device")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip (and count) malformed rows instead of failing")
    p.add_argument("--set", dest="overrides", type=_kv, action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="beam-search a task split and score it with the official metrics")
    p.add_argument("--model", required=True, help="model directory (a fine-tuning run), or 'copy' for the copy-the-input baseline")
    p.add_argument("--task", default="e2e")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--limit", type=int, help="first N inputs only")
    p.add_argument("--beams", type=int, default=10)
    p.add_argument("--length-penalty", type=float, default=0.9)
    p.add_argument("--no-repeat-ngram-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--data-dir")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("reproduce", help="run the SPDF grid of a spec and write a report (resumable)")
    p.add_argument("--spec", default="cpu-demo", help="built-in spec (cpu-demo, cpu-full, gpu-small, paper-gpt2-small, "
                                                      "paper-gpt3-xl) or a YAML file (default cpu-demo)")
    p.add_argument("--out", help="output directory (default runs/<spec name>)")
    p.add_argument("--dry-run", action="store_true", help="print the plan with FLOPs and an ETA, run nothing")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("scaling", help="scaling-law analysis of finished runs")
    ssub = p.add_subparsers(dest="scaling_command", required=True)
    f = ssub.add_parser("fit", help="fit L(N, D) = E + A/N^alpha + B/D^beta (N = average non-zero params)")
    f.add_argument("runs", nargs="+", help="pre-training run directories and/or grid directories (results.json)")
    f.add_argument("--out", default=".", help="where to write scaling_fit.json and scaling_fit.png")
    f.set_defaults(func=cmd_scaling_fit)

    p = sub.add_parser("report", help="regenerate report.md/.html and plots from a grid's results.json")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_transformers()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, RuntimeError) as e:
        if os.environ.get("SPARSELM_DEBUG"):
            raise
        print(f"sparselm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
