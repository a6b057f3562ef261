"""Sparse fine-tuning on E2E with the Hugging Face Trainer and sparselm's ``SparsityCallback``.

    python examples/hf_trainer_sparse_finetune.py --run runs/tiny-s75 --max-steps 200
    python examples/hf_trainer_sparse_finetune.py --tiny --max-steps 5     # no run needed: a fresh tiny GPT-2

The masks are the run's ``masks.safetensors`` when it has one (SPDF's sparse fine-tuning keeps the
pre-training sparsity), else a fresh static mask at ``--sparsity``. The data are sparselm's own E2E
pairs (prompt tokens labelled -100), found in the shared data folder (or ``--data-dir``). The output
folder holds the fine-tuned model, its tokenizer and masks, and Trainer's checkpoints (each with its
masks); ``--resume`` continues from the last of them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Trainer, TrainingArguments

from sparselm.data.paths import data_root
from sparselm.data.tasks import load_task
from sparselm.data.tokenizer import save_hf_tokenizer
from sparselm.integrations import MASKS_FILE, SparsityCallback
from sparselm.models import build_model, context_length, get_preset
from sparselm.models.loss import collate, encode_pairs
from sparselm.models.runs import load_run, load_tokenizer
from sparselm.sparsity import Static


def load_model_and_masks(args):
    """(model, tokenizer, masks or None): a sparselm run, or with ``--tiny`` a fresh tiny GPT-2 with
    the GPT-2 tokenizer from the shared data folder."""
    if not args.tiny:
        model, tokenizer, masks, _ = load_run(args.run)
        return model, tokenizer, masks
    save_hf_tokenizer(data_root() / "tokenizers" / "gpt2" / "tokenizer.json", args.out, 128, "<|endoftext|>")
    tokenizer = load_tokenizer(args.out)
    shape = get_preset("tiny").override(vocab_size=len(tokenizer))
    return build_model(shape, tokenizer.eos_token_id), tokenizer, None


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a sparselm run directory (pre-trained, ideally sparse)")
    src.add_argument("--tiny", action="store_true", help="a freshly built tiny GPT-2 instead (a demo)")
    p.add_argument("--out", default="runs/hf-trainer-e2e")
    p.add_argument("--sparsity", type=float, default=0.75, help="static mask when the run has none")
    p.add_argument("--max-steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--limit-train", type=int, default=2000, help="E2E training pairs to encode (0: all)")
    p.add_argument("--data-dir", help="E2E folder (default: e2e/ in the shared data folder)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    args = p.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)

    model, tokenizer, masks = load_model_and_masks(args)
    if masks is not None:  # keep the pre-training masks, as sparselm's `finetune --mode sparse`
        sparsifier = Static(0.0, include=list(masks)).attach(model)
        sparsifier.load_state_dict(masks)
    else:  # the callback attaches it to Trainer's model when training begins
        sparsifier = Static(args.sparsity)

    pairs = load_task("e2e", args.data_dir).pairs("train")
    train_set, _ = encode_pairs(tokenizer, pairs[: args.limit_train or None], context_length(model), skip_too_long=True)
    columns = ("input_ids", "labels", "attention_mask")  # the order collate returns them in
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=args.out, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, max_grad_norm=1.0,
            logging_steps=max(1, args.max_steps // 10), save_steps=max(1, args.max_steps // 2),
            report_to="none", use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
        ),
        train_dataset=train_set,
        data_collator=lambda rows: dict(zip(columns, collate(rows, tokenizer.eos_token_id))),
        callbacks=[SparsityCallback(sparsifier)],
    )
    trainer.train(resume_from_checkpoint=True if args.resume else None)

    sparsifier.check()
    trainer.save_model(args.out)
    tokenizer.save_pretrained(args.out)
    save_file(sparsifier.state_dict(), str(Path(args.out) / MASKS_FILE))
    report = sparsifier.report()
    print(f"{trainer.state.global_step} steps, final loss {trainer.state.log_history[-1].get('train_loss')}, "
          f"sparsity {report['measured']:.3f} -> {args.out}")
    return report


if __name__ == "__main__":
    main()
