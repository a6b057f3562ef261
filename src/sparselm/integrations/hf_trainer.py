"""Sparse training inside someone else's Hugging Face ``Trainer``: ``SparsityCallback``.

::

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[SparsityCallback(Static(sparsity=0.75))])   # or SET, RigL with a Schedule, ...
    trainer.train()                                   # or trainer.train(resume_from_checkpoint=True)

``SparsityCallback(sparsifier).install(trainer)`` does the same from outside, and also sees a resume
path given to ``train`` (see Resume). Where each sparsifier call goes, and why (transformers 5.25,
``Trainer._run_epoch`` in trainer.py):

* Gradients of pruned weights are zeroed before clipping (l. 1976 ``self._clip_grad_norm``), so the
  clipped norm, and the logged ``grad_norm``, leave them out, as in sparselm's own loop, and AdamW's
  moments for them stay exactly zero. No callback event fires between backward and clipping
  (``on_pre_optimizer_step``, l. 1979, comes after), so ``on_train_begin`` puts a post-accumulate-grad
  hook (``Tensor.register_post_accumulate_grad_hook``) on each masked weight: it fires inside
  backward, right after that weight's ``.grad`` is accumulated. It masks only on the last micro-batch
  of an optimizer step (``sync_gradients``, which Trainer sets at l. 1936 in accelerate's shared
  ``GradientState``), when the step's gradient is complete; on an update step of a method that reads
  dense gradients (RigL) it first keeps a copy. ``on_pre_optimizer_step`` checks that every masked
  weight with a gradient was masked for the step, rather than training on. ``on_train_end`` removes
  the hooks.
* ``after_step`` runs in ``on_optimizer_step`` (l. 1981): right after ``optimizer.step()``, once per
  real optimizer step (not per micro-batch), so masks move on the scheduled steps and pruned weights
  are zero again before anything reads them. It receives ``state.global_step``: the optimizer steps
  already taken (incremented at l. 1992), the same 0-based step sparselm's loop passes, so a
  ``Schedule`` means the same steps in both.
* ``on_train_begin`` (l. 1668) comes after Trainer has built the optimizer and loaded a checkpoint's
  state, weights and optimizer state (l. 1712, 1579, 1854; the references handed to callbacks are
  updated at l. 1857). It attaches the sparsifier to the model when it is not attached yet (so
  ``model_init`` works: a new model each ``train``), hands it the optimizer (it zeroes AdamW moments
  where a mask changes) and restores masks on a resume.

Data parallel (DDP through accelerate): the hook fires before DDP's own hook on the same weight, which
copies the gradient into its bucket for the all-reduce, so each rank masks its local gradient and
DDP averages masked gradients. Masks are identical on every rank (the sparsifier broadcasts them from
rank 0), so the mean of masked gradients is the masked mean: exactly what masking after the reduce
would give. RigL's dense copy is then each rank's local gradient; on update steps ``on_optimizer_step``
averages the copies over ranks (one all-reduce of the masked weights' gradients, only then), so RigL
grows where the gradient of the whole global batch is largest, as in sparselm's own loop.

Resume: ``on_save`` (after ``_save_checkpoint``, l. 2323) writes ``masks.safetensors`` into
``checkpoint-N``, and a resumed run must hold exactly those masks (a moving method's masks differ from
its initial ones). Trainer gives callbacks the restored ``state`` but not the folder it came from, so
on a resume (``state.global_step > 0`` in ``on_train_begin``) the callback takes the path ``install``
saw given to ``train``, else the first of ``args.resume_from_checkpoint`` and
``output_dir/checkpoint-N`` (what ``resume_from_checkpoint=True`` picks) whose ``trainer_state.json``
equals that state (same step and log history), so a stale folder of another run is not taken. As a
guard, the loaded weights must be zero wherever those masks prune (weights RigL or SET grew on the
last update are zero too, so this alone would not tell masks apart). A resume it cannot place is
refused before training: set ``TrainingArguments(resume_from_checkpoint=...)`` to the path, use
``install``, or call ``callback.load(dir)`` first.

Not covered: DeepSpeed and FSDP (gradients live in sharded engines). Skipped fp16 steps (inf
gradients) still count as steps here.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..sparsity import Sparsifier
from ..sparsity.selection import select_targets

MASKS_FILE = "masks.safetensors"


class SparsityCallback(TrainerCallback):
    """Keeps a sparselm ``Sparsifier``'s masks exact through ``Trainer.train``; see the module doc."""

    def __init__(self, sparsifier: Sparsifier):
        self.sparsifier = sparsifier
        self.trainer = None  # set by install()
        self.resume_from: str | None = None  # the checkpoint the last train() resumed from (its masks)
        self._train_path: str | None = None  # the resume path install() saw given to train()
        self._loaded = False  # masks restored by load() for this train()
        self._attached_here = False  # attached in on_train_begin: re-attach if model_init builds a new model
        self._hooks: list = []
        self._state = None  # Trainer's TrainerState, read by the hooks for the step
        self._gradients = None  # accelerate's GradientState: sync_gradients marks the last micro-batch
        self._masked: set[str] = set()  # weights whose gradients were masked this step
        self._dense: dict[str, torch.Tensor] | None = None  # RigL's dense gradients on an update step

    def install(self, trainer) -> "SparsityCallback":
        """Attach the sparsifier to ``trainer.model`` now (if not attached yet), add this callback, and
        wrap ``trainer.train`` to see the resume path it is given (any path, also outside output_dir)."""
        if self.trainer is not None:
            raise RuntimeError("this SparsityCallback is already installed on a Trainer")
        if not self.sparsifier.targets:
            # Now, before train(): on a resume Trainer then loads the checkpoint's weights over the masked ones.
            self.sparsifier.attach(trainer.model)
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        train = trainer.train

        @functools.wraps(train)
        def train_seeing_resume(resume_from_checkpoint=None, *args, **kwargs):
            path = resume_from_checkpoint
            if path is True:
                path = get_last_checkpoint(trainer.args.output_dir)  # as Trainer resolves it (None: it raises)
            self._train_path = str(path) if path else None
            return train(resume_from_checkpoint, *args, **kwargs)

        trainer.train = train_seeing_resume
        self.trainer = trainer
        return self

    def load(self, checkpoint_dir: str | Path) -> None:
        """Restore the masks saved in a checkpoint folder (for a resume the callback cannot place); the
        sparsifier must be attached to the model Trainer trains."""
        if not self.sparsifier.targets:
            raise RuntimeError("callback.load needs an attached sparsifier: sparsifier.attach(model) first")
        self.sparsifier.load_state_dict(read_masks(checkpoint_dir))
        self._loaded = True

    # ---- events -------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        s, step = self.sparsifier, state.global_step
        resuming = step > 0  # Trainer starts a fresh TrainerState unless it restored a checkpoint's
        given, self._train_path, self.resume_from = self._train_path, None, None
        self._attach(model, keep_weights=resuming)
        s.optimizer = optimizer
        if resuming and not s.released(step):  # (in a dense tail the weights are no longer masked)
            if not self._loaded:
                self._restore_masks(given or self._find_checkpoint(args, state))
            s.check()  # the masks fit the weights Trainer loaded (also after a manual load())
        self._loaded = False  # a later train() on the same trainer loads again
        self._state = state
        self._add_hooks()

    def on_step_begin(self, args, state, control, **kwargs):
        self._masked.clear()
        self._dense = {} if self.sparsifier.dense_gradient_step(state.global_step) else None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.sparsifier.released(state.global_step):
            return
        missed = [t.name for t in self.sparsifier.targets if t.param.grad is not None and t.name not in self._masked]
        if missed:
            raise RuntimeError(f"step {state.global_step}: gradients of {missed[:3]} were not masked before "
                               "clipping (were the callback's gradient hooks removed, or .grad set outside backward?)")

    def on_optimizer_step(self, args, state, control, **kwargs):
        s = self.sparsifier
        if self._dense is not None:
            # What after_backward keeps for update_masks; the hooks took it weight by weight instead (_grad_hook).
            s.use_dense_grads(self._full_dense_grads())
            self._dense = None
        s.after_step(state.global_step)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from safetensors.torch import save_file

            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            save_file(self.sparsifier.state_dict(), str(folder / MASKS_FILE))

    def on_train_end(self, args, state, control, **kwargs):
        self._remove_hooks()
        if not self.sparsifier.released(state.global_step):
            self.sparsifier.check()  # fail loudly if anything outside the callback broke the invariant

    # ---- internals ----------------------------------------------------------------------------
    def _attach(self, model, keep_weights: bool) -> None:
        """Attach to Trainer's model if not attached (or attached here to an earlier ``model_init`` model);
        refuse a sparsifier attached to some other model. On a resume the checkpoint's weights are kept:
        attaching zeroes weights the *initial* masks prune, which the checkpoint's masks may keep."""
        s = self.sparsifier
        params = {id(p) for p in model.parameters()}
        if s.targets and all(id(t.param) in params for t in s.targets):
            return
        if s.targets and not self._attached_here:
            raise RuntimeError("the sparsifier is attached to a different model than the one Trainer trains "
                               "(model_init? a copy?): pass SparsityCallback an unattached sparsifier")
        kept = []
        if keep_weights:
            kept = [(t.param, t.param.detach().cpu().clone()) for t in select_targets(model, s.include, s.exclude)]
        s.attach(model)
        with torch.no_grad():
            for p, value in kept:
                p.copy_(value)
        self._attached_here = True

    def _restore_masks(self, folder: str) -> None:
        """Load the masks of the checkpoint this run resumed from, checked against the weights Trainer
        loaded from it."""
        masks = read_masks(folder)
        stray = []  # (missing masks and wrong shapes are load_state_dict's to report)
        for t in self.sparsifier.targets:
            mask = masks.get(t.name)
            if mask is not None and mask.shape == t.param.shape:
                if bool(t.param.detach().ne(0).logical_and_(~mask.to(t.param.device, torch.bool)).any()):
                    stray.append(t.name)
        if stray:
            raise RuntimeError(f"{Path(folder) / MASKS_FILE} prunes weights that the checkpoint Trainer resumed from "
                               f"holds as non-zero ({stray[:3]}): not this run's masks; call "
                               "callback.load(checkpoint_dir) before train()")
        self.sparsifier.load_state_dict(masks)
        self.resume_from = folder

    def _find_checkpoint(self, args, state) -> str:
        candidates = [args.resume_from_checkpoint] if isinstance(args.resume_from_checkpoint, str) else []
        candidates.append(str(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))
        for folder in candidates:
            saved = Path(folder) / TRAINER_STATE_NAME
            if saved.is_file():
                record = json.loads(saved.read_text())
                if record.get("global_step") == state.global_step and record.get("log_history") == state.log_history:
                    return folder
        raise RuntimeError(f"resuming at step {state.global_step}, but none of {candidates} holds the trainer state "
                           "Trainer restored, so the checkpoint's masks cannot be found: set "
                           "TrainingArguments(resume_from_checkpoint=<the path given to train()>), use "
                           "callback.install(trainer), or call callback.load(checkpoint_dir) before train()")

    def _add_hooks(self) -> None:
        from accelerate.state import GradientState

        self._remove_hooks()  # a train() that raised never reached on_train_end
        self._gradients = GradientState()
        self._hooks = [t.param.register_post_accumulate_grad_hook(self._grad_hook(t.name))
                       for t in self.sparsifier.targets if t.param.requires_grad]

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _grad_hook(self, name: str):
        """Mask ``name``'s gradient once it is complete: what ``Sparsifier.after_backward`` does for all
        weights at once, done per weight so that under DDP it happens before the weight's all-reduce."""
        s = self.sparsifier

        @torch.no_grad()
        def hook(param: torch.Tensor) -> None:
            if not self._gradients.sync_gradients or s.released(self._state.global_step):
                return  # a partial gradient (more micro-batches to come), or the dense tail
            if self._dense is not None:
                self._dense[name] = param.grad.detach().clone()
            param.grad.mul_(s.masks[name].view(torch.uint8))
            self._masked.add(name)

        return hook

    def _full_dense_grads(self) -> dict[str, torch.Tensor]:
        """The dense gradients kept on this update step, averaged over data-parallel ranks as DDP averages
        the gradients it reduces (see the module doc); a weight without a gradient reads zeros."""
        import torch.distributed as dist

        dense = {t.name: self._dense[t.name] if t.name in self._dense else torch.zeros_like(t.param)
                 for t in self.sparsifier.targets}
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for g in dense.values():
                dist.all_reduce(g)
                g.div_(dist.get_world_size())
        return dense


def read_masks(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """The masks a ``SparsityCallback`` saved in a checkpoint folder."""
    from safetensors.torch import load_file

    path = Path(checkpoint_dir) / MASKS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: was this checkpoint saved with a SparsityCallback?")
    return load_file(str(path))
