"""Sparse training inside someone else's Hugging Face ``Trainer``: ``SparsityCallback``.

::

    sparsifier = Static(sparsity=0.75)                # or any sparselm method (SET, RigL with a Schedule, ...)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    SparsityCallback(sparsifier).install(trainer)     # adds the callback and its one pre-clipping hook
    trainer.train()                                   # or trainer.train(resume_from_checkpoint=...)

Where each sparsifier call goes, and why (transformers 5.24, ``Trainer._run_epoch`` in trainer.py):

* ``after_backward`` must run after the last backward of an optimizer step and *before* gradient
  clipping (l. 1939 ``self._clip_grad_norm``), so the clipped norm, and the logged ``grad_norm``, leave
  out pruned weights, as in sparselm's own loop. No callback event fires there:
  ``on_pre_optimizer_step`` (l. 1942) comes after clipping, ``on_substep_end`` only after
  non-final micro-batches. So ``install`` wraps the trainer's ``training_step`` (a public override
  point, called once per micro-batch, l. 1917) and calls ``after_backward`` after it when
  ``trainer.accelerator.sync_gradients`` is set (l. 1899: the last micro-batch of an accumulation).
  The gradients are then complete (and all-reduced under DDP), so RigL reads the full dense gradient.
  ``on_pre_optimizer_step`` then checks that this happened for the step, rather than training on.
* ``after_step`` runs in ``on_optimizer_step`` (l. 1944): right after ``optimizer.step()``, once per
  real optimizer step (not per micro-batch), so masks move on the scheduled steps and pruned weights
  are zero again before anything reads them.
* Both receive ``state.global_step``: the number of optimizer steps already taken (it is
  incremented at l. 1955, after both), the same 0-based step sparselm's loop passes, so a
  ``Schedule`` means the same steps in both.
* The optimizer exists only once training starts (``accelerator.prepare`` in ``_prepare_for_training``);
  ``on_train_begin`` (l. 1653) hands it to the sparsifier, which zeroes AdamW moments at positions whose
  mask changes.
* ``on_save`` (after ``_save_checkpoint``, l. 2286) writes ``masks.safetensors`` into ``checkpoint-N``.
  On ``train(resume_from_checkpoint=...)`` (``install`` records the path; ``True`` means the last
  checkpoint in ``output_dir``, as Trainer resolves it) ``on_train_begin`` loads those masks, after
  Trainer has loaded weights and optimizer, so a resumed run holds exactly the masks it saved. A
  resume the callback could not see (a path given some other way) is refused: call
  ``callback.load(checkpoint_dir)`` first.

Not covered: DeepSpeed and FSDP (gradients live in sharded engines) and ``model_init`` (the model is
rebuilt inside ``train``, after ``install`` attached the sparsifier to the first one).
"""

from __future__ import annotations

import functools
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..sparsity import Sparsifier

MASKS_FILE = "masks.safetensors"


class SparsityCallback(TrainerCallback):
    """Keeps a sparselm ``Sparsifier``'s masks exact through ``Trainer.train``; see the module doc."""

    def __init__(self, sparsifier: Sparsifier):
        self.sparsifier = sparsifier
        self.trainer = None
        self.resume_from: str | None = None  # the checkpoint this train() resumes from
        self._loaded = False  # masks restored by load() for this train()
        self._masked_step: int | None = None  # the last step whose gradients were masked before clipping

    def install(self, trainer) -> "SparsityCallback":
        """Attach the sparsifier to ``trainer.model`` (if not attached yet), add this callback, and wrap
        ``trainer.training_step`` (masking before clipping) and ``trainer.train`` (seeing the resume path)."""
        if self.trainer is not None:
            raise RuntimeError("this SparsityCallback is already installed on a Trainer")
        if not self.sparsifier.targets:
            # Now, before train(): on a resume Trainer then loads the checkpoint's weights over the masked ones.
            self.sparsifier.attach(trainer.model)
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        training_step, train = trainer.training_step, trainer.train

        @functools.wraps(training_step)
        def training_step_then_mask(*args, **kwargs):
            loss = training_step(*args, **kwargs)
            if trainer.accelerator.sync_gradients:  # last micro-batch: gradients complete, clipping next
                self.sparsifier.after_backward(trainer.state.global_step)
                self._masked_step = trainer.state.global_step
            return loss

        @functools.wraps(train)
        def train_seeing_resume(resume_from_checkpoint=None, *args, **kwargs):
            path = resume_from_checkpoint
            if path is True:
                path = get_last_checkpoint(trainer.args.output_dir)  # as Trainer resolves it (None: it raises)
            self.resume_from = str(path) if path else None
            return train(resume_from_checkpoint, *args, **kwargs)

        trainer.training_step, trainer.train = training_step_then_mask, train_seeing_resume
        self.trainer = trainer
        return self

    def load(self, checkpoint_dir: str | Path) -> None:
        """Restore the masks saved in a checkpoint folder (for a resume ``install`` cannot see)."""
        from safetensors.torch import load_file

        path = Path(checkpoint_dir) / MASKS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: was this checkpoint saved with a SparsityCallback?")
        self.sparsifier.load_state_dict(load_file(str(path)))
        self._loaded = True

    # ---- events -------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.trainer is None:
            raise RuntimeError("SparsityCallback needs callback.install(trainer): no Trainer event fires between "
                               "backward and gradient clipping, so it wraps trainer.training_step")
        s = self.sparsifier
        s.optimizer = optimizer if optimizer is not None else self.trainer.optimizer
        self._masked_step = None
        if self.resume_from and not self._loaded and not s.released(state.global_step):
            self.load(self.resume_from)  # (in a dense tail the weights are no longer masked)
        if state.global_step > 0 and not (self._loaded or s.released(state.global_step)):
            raise RuntimeError(f"resuming at step {state.global_step} without the checkpoint's masks: "
                               "call callback.load(checkpoint_dir) before train()")
        self._loaded = False  # a later train() on the same trainer loads again

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._masked_step != state.global_step:
            raise RuntimeError(f"step {state.global_step}: gradients were not masked before clipping "
                               "(was trainer.training_step replaced after install?)")

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.sparsifier.after_step(state.global_step)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from safetensors.torch import save_file

            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            save_file(self.sparsifier.state_dict(), str(folder / MASKS_FILE))

    def on_train_end(self, args, state, control, **kwargs):
        if not self.sparsifier.released(state.global_step):
            self.sparsifier.check()  # fail loudly if anything outside the callback broke the invariant
