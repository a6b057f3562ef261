"""sparselm.integrations: sparsifiers inside the Hugging Face Trainer and a plain accelerate loop.

A micro GPT-2 trains for a few CPU steps on random tokens with gradient accumulation 2 and clipping;
the tests check what sparselm's own loop guarantees: exact masks, AdamW moments zero at pruned
positions, clipping that sees only masked gradients, moving masks (RigL), and resume; for the callback
passed in ``Trainer(callbacks=[...])`` and added by ``install``, in one process and under DDP (gloo).
Where it matters, gradients are recomputed here from the recorded batches, without Trainer.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

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


def trainer_args(out: Path, **overrides):
    from transformers import TrainingArguments

    args = dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                max_grad_norm=0.05, learning_rate=1e-2, weight_decay=0.1, lr_scheduler_type="constant",
                optim="adamw_torch", logging_steps=1, save_steps=2, report_to="none", use_cpu=True,
                disable_tqdm=True, seed=0)
    return TrainingArguments(**{**args, **overrides})


def make_trainer(out: Path, sparsifier, **overrides):
    """A Trainer with the callback added by ``install`` (which attaches the sparsifier at once)."""
    from transformers import Trainer

    trainer = Trainer(model=micro_model(), args=trainer_args(out, **overrides), train_dataset=random_tokens())
    callback = SparsityCallback(sparsifier).install(trainer)
    return trainer, callback


def callback_trainer(out: Path, sparsifier, **overrides):
    """A Trainer given ``callbacks=[SparsityCallback(sparsifier)]``, the way Hugging Face users add callbacks."""
    from transformers import Trainer

    callback = SparsityCallback(sparsifier)
    trainer = Trainer(model=micro_model(), args=trainer_args(out, **overrides), train_dataset=random_tokens(),
                      callbacks=[callback])
    return trainer, callback


class StepRecorder:
    """Records each optimizer step's starting weights and masks, micro-batches and label count, to
    recompute its gradient directly."""

    def __init__(self, trainer, sparsifier):
        from transformers import TrainerCallback

        self.weights, self.masks, self.batches, self.n_items = {}, {}, {}, {}
        recorder, training_step = self, trainer.training_step

        def recording_step(model, inputs, num_items_in_batch=None):
            self.batches.setdefault(trainer.state.global_step, []).append({k: v.clone() for k, v in inputs.items()})
            self.n_items[trainer.state.global_step] = int(num_items_in_batch)
            return training_step(model, inputs, num_items_in_batch)

        class Snapshot(TrainerCallback):
            def on_step_begin(self, args, state, control, model=None, **kwargs):
                recorder.weights[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()}
                recorder.masks[state.global_step] = {k: m.clone() for k, m in sparsifier.masks.items()}

        trainer.training_step = recording_step
        trainer.add_callback(Snapshot)

    def dense_gradient(self, step: int) -> dict[str, torch.Tensor]:
        """The step's accumulated gradient (this process's share under DDP), in one backward over all its
        sequences: the summed next-token loss over the number of labels Trainer counted for the step (its
        ``num_items_in_batch``, over all processes)."""
        model = micro_model()
        model.load_state_dict(self.weights[step], strict=False)
        ids = torch.cat([b["input_ids"] for b in self.batches[step]])
        labels = torch.cat([b["labels"] for b in self.batches[step]])
        model.train()
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                                 reduction="sum")
        (loss / self.n_items[step]).backward()
        return {n: p.grad for n, p in model.named_parameters()}

    def masked_norm(self, step: int, grads: dict[str, torch.Tensor]) -> float:
        """The norm of ``grads`` with the masks in use during ``step`` applied."""
        masks = self.masks[step]
        return float(torch.linalg.vector_norm(torch.stack([(g * masks[n] if n in masks else g).norm()
                                                           for n, g in grads.items()])))


def spy_on_updates(sparsifier) -> dict[int, dict[str, torch.Tensor]]:
    """Record the dense gradients a RigL sparsifier is given on each update step."""
    seen, update_masks = {}, sparsifier.update_masks

    def spy(step, grads):
        seen[step] = {k: g.clone() for k, g in grads.items()}
        return update_masks(step, grads)

    sparsifier.update_masks = spy
    return seen


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


def test_callbacks_list_static_exactness(tmp_path):
    sparsifier = Static(0.5)
    trainer, callback = callback_trainer(tmp_path, sparsifier)
    assert not sparsifier.targets  # attached to Trainer's model in on_train_begin
    recorder = StepRecorder(trainer, sparsifier)
    trainer.train()

    assert_exact(sparsifier, trainer.optimizer)
    assert len(recorder.batches) == STEPS and all(len(b) == 2 for b in recorder.batches.values())
    logged = [row["grad_norm"] for row in trainer.state.log_history if "grad_norm" in row]
    direct = [recorder.masked_norm(step, recorder.dense_gradient(step)) for step in range(STEPS)]
    assert min(direct) > 0.05  # so clipping was active
    assert logged == pytest.approx(direct, rel=1e-4)  # Trainer's pre-clip norm is the masked gradient's
    dense = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in recorder.dense_gradient(0).values()])))
    assert logged[0] < dense * (1 - 1e-3)  # (and the pruned weights' gradients are not negligible)
    for name, mask in sparsifier.masks.items():  # the masks never moved
        assert all(torch.equal(m[name], mask) for m in recorder.masks.values())
    saved = load_file(str(tmp_path / "checkpoint-4" / MASKS_FILE))
    assert saved.keys() == sparsifier.masks.keys()
    assert all(torch.equal(saved[k], m) for k, m in sparsifier.masks.items())
    assert not callback._hooks  # removed in on_train_end
    assert all(not t.param._post_accumulate_grad_hooks for t in sparsifier.targets)


def test_callbacks_list_rigl_sees_the_accumulated_dense_gradient(tmp_path):
    sparsifier = RigL(0.5, schedule=Schedule.of(STEPS, update_every=1))
    trainer, _ = callback_trainer(tmp_path, sparsifier)
    recorder = StepRecorder(trainer, sparsifier)
    seen = spy_on_updates(sparsifier)
    trainer.train()

    assert sorted(seen) == [1, 2]  # the scheduled update steps, once each (not per micro-batch)
    for step, grads in seen.items():
        direct = recorder.dense_gradient(step)
        for name, g in grads.items():
            assert torch.allclose(g, direct[name], rtol=1e-4, atol=1e-7), (step, name)
        name = sparsifier.targets[0].name
        assert grads[name][~recorder.masks[step][name]].abs().sum() > 0  # dense: pruned weights' gradients too
    assert_exact(sparsifier, trainer.optimizer)


def test_callbacks_list_resume_restores_the_checkpoint_masks(tmp_path):
    def rigl():
        return RigL(0.5, schedule=Schedule.of(STEPS, update_every=1))

    first, callback = callback_trainer(tmp_path / "a", rigl(), save_steps=1)
    first.train()
    final = callback.sparsifier.masks
    ckpt = tmp_path / "a" / "checkpoint-3"  # after the update steps 1 and 2: weights grown at 1 have trained
    at_3, weights_3 = load_file(str(ckpt / MASKS_FILE)), load_file(str(ckpt / "model.safetensors"))
    initial = Static(0.5).attach(micro_model()).masks  # RigL starts from the same random masks as static
    # a resume must load these masks, and must not zero what the initial masks pruned and these keep
    assert any(bool((weights_3[k].ne(0) & at_3[k] & ~initial[k]).any()) for k in initial if k in weights_3)
    weights = dict(first.model.named_parameters())

    def resumed(trainer, callback, expect_from):
        assert callback.resume_from == str(expect_from)
        assert all(torch.equal(callback.sparsifier.masks[k], m) for k, m in final.items())
        assert_exact(callback.sparsifier, trainer.optimizer)
        for name, p in trainer.model.named_parameters():
            assert torch.equal(p, weights[name]), name  # bit for bit

    # resume_from_checkpoint=True: the last checkpoint in output_dir
    shutil.copytree(ckpt, tmp_path / "b" / "checkpoint-3")
    trainer, callback = callback_trainer(tmp_path / "b", rigl())
    trainer.train(resume_from_checkpoint=True)
    resumed(trainer, callback, tmp_path / "b" / "checkpoint-3")

    # a checkpoint outside output_dir, named in TrainingArguments as HF scripts do
    trainer, callback = callback_trainer(tmp_path / "c", rigl(), resume_from_checkpoint=str(ckpt))
    trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
    resumed(trainer, callback, ckpt)

    # ... and not named: the callback cannot tell where the masks are, and says so before training; a
    # checkpoint-3 of another run in output_dir (here: another log history) is not taken for it
    shutil.copytree(ckpt, tmp_path / "d" / "checkpoint-3")
    other = json.loads((ckpt / "trainer_state.json").read_text())
    other["log_history"][0]["loss"] += 1.0
    (tmp_path / "d" / "checkpoint-3" / "trainer_state.json").write_text(json.dumps(other))
    trainer, _ = callback_trainer(tmp_path / "d", rigl())
    with pytest.raises(RuntimeError, match="resume_from_checkpoint"):
        trainer.train(resume_from_checkpoint=str(ckpt))
    assert trainer.state.global_step == 3

    # masks that the loaded weights contradict (here: another seed's) are refused
    shutil.copytree(ckpt, tmp_path / "e" / "checkpoint-3")
    save_file(Static(0.5, seed=1).attach(micro_model()).masks, str(tmp_path / "e" / "checkpoint-3" / MASKS_FILE))
    trainer, _ = callback_trainer(tmp_path / "e", rigl())
    with pytest.raises(RuntimeError, match="not this run's masks"):
        trainer.train(resume_from_checkpoint=True)


def test_callbacks_list_with_model_init(tmp_path):
    from transformers import Trainer

    sparsifier = Static(0.5)
    trainer = Trainer(model_init=micro_model, args=trainer_args(tmp_path, max_steps=1), train_dataset=random_tokens(),
                      callbacks=[SparsityCallback(sparsifier)])
    for _ in range(2):  # each train() builds a new model: the callback attaches the sparsifier to it
        trainer.train()
        params = {id(p) for p in trainer.model.parameters()}
        assert all(id(t.param) in params for t in sparsifier.targets)
        assert_exact(sparsifier, trainer.optimizer)


def test_sparsifier_attached_to_another_model_is_refused(tmp_path):
    trainer, _ = callback_trainer(tmp_path, Static(0.5).attach(micro_model()), max_steps=1)
    with pytest.raises(RuntimeError, match="different model"):
        trainer.train()


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    sparsifier = RigL(0.5, schedule=Schedule.of(STEPS, update_every=1))
    trainer, _ = callback_trainer(Path(out) / "run", sparsifier, save_steps=STEPS, ddp_backend="gloo")
    recorder = StepRecorder(trainer, sparsifier)
    seen = spy_on_updates(sparsifier)
    trainer.train()
    assert isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel)
    assert_exact(sparsifier, trainer.optimizer)

    def global_gradient(step):  # the whole global batch's: the sum of each process's share
        grads = recorder.dense_gradient(step)
        for g in grads.values():
            dist.all_reduce(g)
        return grads

    direct_norms = [recorder.masked_norm(step, global_gradient(step)) for step in range(STEPS)]
    dense_error = 0.0
    for step, grads in seen.items():
        direct = global_gradient(step)
        dense_error = max(dense_error, *(float((g - direct[k]).abs().max() / direct[k].abs().max())
                                         for k, g in grads.items()))
    flat = torch.cat([m.flatten() for m in sparsifier.masks.values()]).to(torch.uint8)
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        logged = [row["grad_norm"] for row in trainer.state.log_history if "grad_norm" in row]
        torch.save({"logged": logged, "direct": direct_norms, "updates": sorted(seen), "dense_error": dense_error,
                    "same_masks": all(torch.equal(gathered[0], g) for g in gathered[1:])}, Path(out) / "result.pt")


@pytest.mark.slow
def test_callbacks_list_under_ddp(tmp_path):
    """Two gloo processes: each masks its local gradient before DDP's all-reduce, which is exact because
    the masks are the same on both; RigL's dense copies are averaged over the processes on update steps."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, 29400 + os.getpid() % 1000, str(tmp_path)), nprocs=2, join=True)
    result = torch.load(tmp_path / "result.pt")
    assert result["same_masks"] and result["updates"] == [1, 2]
    assert result["logged"] == pytest.approx(result["direct"], rel=1e-4)  # the global masked gradient's norm
    assert min(result["direct"]) > 0.05  # so clipping was active
    assert result["dense_error"] < 1e-5  # RigL grew from the global batch's dense gradient


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
    # --resume: Trainer picks checkpoint-2 in --out, and the callback finds its masks there
    example.main(["--tiny", "--max-steps", "4", "--batch-size", "2", "--limit-train", "16", "--sparsity", "0.5",
                  "--out", str(out), "--resume"])
    at_4 = load_file(str(out / "checkpoint-4" / MASKS_FILE))
    assert all(torch.equal(at_4[k], m) for k, m in masks.items())
