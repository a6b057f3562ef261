"""sparselm.integrations: sparsifiers inside the Hugging Face Trainer and a plain accelerate loop.

A micro GPT-2 trains for a few CPU steps on random tokens with gradient accumulation 2 and clipping;
the tests check what sparselm's own loop guarantees: exact masks, AdamW moments zero at pruned
positions, clipping that sees only masked gradients, moving masks (RigL), and resume.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sparselm.integrations import MASKS_FILE, SparsityCallback, sparse_after_backward, sparse_after_step
from sparselm.models import build_model, get_preset
from sparselm.sparsity import RigL, Schedule, Static

MICRO = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=512)
STEPS = 4


def micro_model():
    torch.manual_seed(0)
    return build_model(get_preset("tiny").override(**MICRO))


def random_tokens(n=64, length=16):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, MICRO["vocab_size"], (n, length), generator=g)
    return [{"input_ids": x, "labels": x} for x in ids]


def make_trainer(out: Path, sparsifier, **overrides):
    from transformers import Trainer, TrainingArguments

    args = dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                max_grad_norm=0.05, learning_rate=1e-2, weight_decay=0.1, lr_scheduler_type="constant",
                optim="adamw_torch", logging_steps=1, save_steps=2, report_to="none", use_cpu=True,
                disable_tqdm=True, seed=0)
    args.update(overrides)
    trainer = Trainer(model=micro_model(), args=TrainingArguments(**args), train_dataset=random_tokens())
    callback = SparsityCallback(sparsifier).install(trainer)
    return trainer, callback


def spy_on_clipping(trainer, sparsifier) -> list[float]:
    """Record the norm of the gradients clipping sees, after checking pruned ones are exactly zero."""
    norms, clip = [], trainer.accelerator.clip_grad_norm_

    def spy(parameters, max_norm, *a, **kw):
        parameters = list(parameters)
        sparsifier.check()  # raises if a pruned weight or its gradient is non-zero
        norms.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters if p.grad is not None]))))
        return clip(parameters, max_norm, *a, **kw)

    trainer.accelerator.clip_grad_norm_ = spy
    return norms


def assert_exact(sparsifier, optimizer):
    sparsifier.check()
    for t in sparsifier.targets:
        pruned = ~sparsifier.masks[t.name]
        assert pruned.any() and not t.param[pruned].any()
        state = optimizer.state[t.param]
        assert not state["exp_avg"][pruned].any() and not state["exp_avg_sq"][pruned].any(), t.name


def test_static_mask_clipping_and_moments(tmp_path):
    sparsifier = Static(0.5)
    trainer, _ = make_trainer(tmp_path, sparsifier)
    norms = spy_on_clipping(trainer, sparsifier)
    before = {t.name: t.param.detach().clone() for t in sparsifier.targets}
    masks = {k: v.clone() for k, v in sparsifier.masks.items()}
    trainer.train()

    assert len(norms) == STEPS  # once per optimizer step, not per micro-batch
    logged = [row["grad_norm"] for row in trainer.state.log_history if "grad_norm" in row]
    assert logged == pytest.approx(norms, rel=1e-5)  # Trainer's pre-clip norm is the masked gradient's
    assert min(norms) > 0.05  # so clipping was active
    assert all(torch.equal(masks[k], v) for k, v in sparsifier.masks.items())
    assert_exact(sparsifier, trainer.optimizer)
    kept = sparsifier.masks[sparsifier.targets[0].name]
    assert not torch.equal(before[sparsifier.targets[0].name][kept], sparsifier.targets[0].param.detach()[kept])
    saved = load_file(str(tmp_path / "checkpoint-4" / MASKS_FILE))
    assert saved.keys() == masks.keys() and all(torch.equal(saved[k], masks[k]) for k in masks)


def test_rigl_moves_masks_and_resume_is_identical(tmp_path):
    def rigl():
        return RigL(0.5, schedule=Schedule.of(STEPS, update_every=1))  # masks move after (0-based) steps 1 and 2

    first, callback = make_trainer(tmp_path / "a", rigl())
    sparsifier = callback.sparsifier
    initial = {k: v.clone() for k, v in sparsifier.masks.items()}
    first.train()
    assert_exact(sparsifier, first.optimizer)
    changed = sum(int((initial[k] ^ m).sum()) for k, m in sparsifier.masks.items())
    assert changed > 0  # the masks moved ...
    assert all(int(m.sum()) == int(initial[k].sum()) for k, m in sparsifier.masks.items())  # ... at exact density
    at_2 = load_file(str(tmp_path / "a" / "checkpoint-2" / MASKS_FILE))
    assert any(not torch.equal(at_2[k], initial[k]) for k in initial)  # moved before the checkpoint

    second, callback = make_trainer(tmp_path / "b", rigl())
    second.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert callback.resume_from.endswith("checkpoint-2")
    resumed = callback.sparsifier
    assert all(torch.equal(resumed.masks[k], m) for k, m in sparsifier.masks.items())
    assert_exact(resumed, second.optimizer)
    weights = dict(first.model.named_parameters())
    for name, p in second.model.named_parameters():
        assert torch.equal(p, weights[name]), name  # bit for bit


def test_callback_without_install_refuses(tmp_path):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to="none", use_cpu=True, disable_tqdm=True)
    model = micro_model()
    trainer = Trainer(model=model, args=args, train_dataset=random_tokens(8),
                      callbacks=[SparsityCallback(Static(0.5).attach(model))])
    with pytest.raises(RuntimeError, match="install"):
        trainer.train()


def test_accelerate_loop_with_accumulation():
    from accelerate import Accelerator

    accelerator = Accelerator(gradient_accumulation_steps=2, cpu=True)
    model = micro_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader = torch.utils.data.DataLoader(random_tokens(16), batch_size=2)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    sparsifier = RigL(0.5, schedule=Schedule.of(4, update_every=1)).attach(accelerator.unwrap_model(model), optimizer)
    initial = {k: v.clone() for k, v in sparsifier.masks.items()}
    step, synced = 0, []
    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(model(**batch).loss)
            synced.append(sparse_after_backward(sparsifier, accelerator, step))
            if accelerator.sync_gradients:
                sparsifier.check()  # what clipping sees
                accelerator.clip_grad_norm_(model.parameters(), 0.05)
            optimizer.step()
            optimizer.zero_grad()
            if sparse_after_step(sparsifier, accelerator, step):
                step += 1
    assert synced == [False, True] * 4 and step == 4
    assert any(not torch.equal(initial[k], m) for k, m in sparsifier.masks.items())
    assert_exact(sparsifier, optimizer.optimizer)


def test_example_script(tmp_path):
    path = Path(__file__).resolve().parents[1] / "examples" / "hf_trainer_sparse_finetune.py"
    spec = importlib.util.spec_from_file_location("hf_trainer_sparse_finetune", path)
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example
    spec.loader.exec_module(example)
    out = tmp_path / "out"
    report = example.main(["--tiny", "--max-steps", "2", "--batch-size", "2", "--limit-train", "16",
                           "--sparsity", "0.5", "--out", str(out)])
    assert report["measured"] == pytest.approx(0.5, abs=1e-3)
    masks = load_file(str(out / MASKS_FILE))
    assert masks.keys() == load_file(str(out / "checkpoint-2" / MASKS_FILE)).keys()
    assert (out / "model.safetensors").is_file()
