"""Training configs, nested by concern (model, data, sparsity, optim, run), loaded and checked by
``sparselm.config``: defaults <- preset <- YAML <- ``--set`` <- CLI flags.

``sparsity.start``/``sparsity.end`` are fractions of training (floats in [0, 1]);
``sparsity.start_step``/``sparsity.end_step`` are steps. Method-specific settings go in
``sparsity.options`` and are checked against the chosen method's declared ``Options``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields
from pathlib import Path

from .. import config
from ..config import ConfigError, option
from ..files import write_json
from ..models.presets import PRESETS, ModelShape, get_preset, nearest_preset
from ..sparsity import METHODS, Schedule, Sparsifier, get_method, parse_n_m
from ..sparsity.distributions import DISTRIBUTIONS

# Keys that may change between a run and its resume without changing the trajectory (or, for the
# step budget, changing it on purpose: the LR schedule follows the new value).
RESUMABLE_CHANGES = {"optim.max_steps", "optim.epochs", "run.eval_every", "run.ckpt_every", "run.log_every",
                     "run.device", "run.compile", "run.out", "run.progress", "run.keep_checkpoint", "run.report_to",
                     "run.parallel", "run.activation_checkpointing", "run.loss_chunk", "run.kernel", "run.peak_tflops",
                     "data.workers"}


def fit_budget_defaults(optim: "OptimConfig", defaults: dict, defaulted: set) -> list[str]:
    """Scale the preset's warm-up to a smaller step budget the user gave, so a preset default never
    refuses the user's own ``--max-steps``: the warm-up keeps the preset's fraction of its budget
    (tiny: 50 of 500 steps, so ``--max-steps 30`` warms up over 3). Returns the notes to print.
    Values the user set are never changed; only two of those can conflict."""
    if "warmup_steps" not in defaulted or "max_steps" in defaulted:
        return []
    fraction = defaults["warmup_steps"] / defaults["max_steps"]
    scaled = min(defaults["warmup_steps"], int(round(fraction * optim.max_steps)))
    if scaled == optim.warmup_steps:
        return []
    optim.warmup_steps = scaled
    return [f"note: optim.warmup_steps scaled to {scaled} ({fraction:.0%} of optim.max_steps={optim.max_steps}, as "
            f"in the preset's {defaults['warmup_steps']} of {defaults['max_steps']}); set it to choose another"]


@dataclass
class ModelConfig:
    """A named shape, with any field overridden (None keeps the preset's value)."""

    preset: str = option("tiny", "named model shape", choices=lambda: sorted(PRESETS))
    init_from: str | None = option(None, "local Hugging Face model directory to continue pre-training from: its weights, "
                                         "shape and tokenizer are used (shape fields and data.tokenizer must be unset)")
    family: str | None = option(None, "model family (gpt2, llama, ...)")
    n_layer: int | None = option(None, "transformer blocks", lo=1)
    n_head: int | None = option(None, "attention heads", lo=1)
    n_kv_head: int | None = option(None, "key/value heads (grouped-query attention; llama)", lo=1)
    n_embd: int | None = option(None, "model width d", lo=1)
    d_ff: int | None = option(None, "MLP hidden width (default 4d for gpt2)", lo=1)
    block_size: int | None = option(None, "context length T", lo=8)
    vocab_size: int | None = option(None, "vocabulary size V", lo=16)
    dropout: float | None = option(None, "dropout probability", lo=0.0, hi=1.0, hi_open=True)
    tie_embeddings: bool | None = option(None, "share the input embedding with the LM head")

    def shape(self) -> ModelShape:
        overrides = {f.name: getattr(self, f.name) for f in fields(self)
                     if f.name not in ("preset", "init_from") and getattr(self, f.name) is not None}
        if self.init_from is None:
            return get_preset(self.preset).override(**overrides)
        if overrides:
            raise ConfigError(f"model.init_from={self.init_from} fixes the shape; unset model.{', model.'.join(overrides)}")
        return _shape_of_dir(self.init_from)

    def training_preset(self) -> str:
        """The preset whose training defaults apply: the named one, or for ``init_from`` the preset
        nearest the directory's model in size (the same family first on a tie)."""
        if self.init_from is None:
            return self.preset
        return nearest_preset(self.shape()).name


@functools.lru_cache(maxsize=8)
def _shape_of_dir(path: str) -> ModelShape:
    from ..models import shape_of_dir

    try:
        return shape_of_dir(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.init_from: {e}") from None


@dataclass
class DataConfig:
    corpus: str | None = option(None, "corpus file or folder (.txt, .jsonl[.gz|.zst], .parquet, .arrow / a datasets "
                                      "save_to_disk folder), or a prepared shard folder (default: $SPARSELM_DATA/corpus)")
    cache_dir: str | None = option(None, "tokenized-corpus cache (default $SPARSELM_CACHE or ~/.cache/sparselm)")
    val_fraction: float = option(0.02, "fraction of documents held out for validation", lo=0.0, hi=0.5, lo_open=True, hi_open=True)
    tokenizer: str | None = option(None, "bpe (train a byte-level BPE of model.vocab_size on the corpus; the default), "
                                         "gpt2 ($SPARSELM_DATA/tokenizers/gpt2), a tokenizer.json or an HF tokenizer folder")
    text_field: str = option("text", "the field (JSONL) or column (parquet, arrow) holding each document's text")
    workers: int | None = option(None, "tokenizing processes (default: all cores)", lo=1)
    skip_bad_rows: bool = option(False, "skip (and count) rows without text instead of failing")
    shard_tokens: int = option(100_000_000, "tokens per shard file", lo=1024)
    dtype: str = option("auto", "token file dtype (auto: uint16 for vocabularies up to 65,536, else uint32)",
                        choices=("auto", "uint16", "uint32"))
    eos_token: str | None = option(None, "end-of-document token of a pretrained tokenizer (default: the one it declares, "
                                         "else <|endoftext|>, </s>, <|end_of_text|> or <eos>)")
    tokenizer_sample_mb: float = option(512.0, "a trained BPE learns from at most about this many MB of text", lo=0.0, lo_open=True)

    def prepare_options(self) -> dict:
        """The keyword arguments of ``sparselm.data.prepare_corpus`` these settings give."""
        return {k: getattr(self, k) for k in ("tokenizer", "text_field", "workers", "skip_bad_rows", "shard_tokens",
                                              "dtype", "eos_token", "tokenizer_sample_mb")}


@dataclass
class SparsityConfig:
    target: float = option(0.0, "fraction of zeros in the masked weights (0 = dense)", lo=0.0, hi=1.0, hi_open=True)
    method: str = option("static", "sparse-training method", choices=lambda: sorted(METHODS))
    distribution: str = option("uniform", "per-layer sparsity distribution", choices=lambda: sorted(DISTRIBUTIONS))
    n_m: str | None = option(None, "N:M structured masks, e.g. '2:4' (overrides target)")
    include: list | None = option(None, "glob patterns of parameter names to mask (default: every block linear)")
    exclude: list | None = option(None, "glob patterns of parameter names never masked (default: embeddings, LM head)")
    update_every: int = option(100, "steps between mask updates (dynamic methods)", lo=1)
    start: float | None = option(None, "schedule start as a fraction of training (default: the method's)", lo=0.0, hi=1.0)
    end: float | None = option(None, "schedule end as a fraction of training (default: the method's)", lo=0.0, hi=1.0)
    start_step: int | None = option(None, "schedule start as a step (instead of start)", lo=0)
    end_step: int | None = option(None, "schedule end as a step (instead of end)", lo=1)
    options: dict = option(help="method-specific options (see the method's Options)", default_factory=dict)
    dense_tail: float = option(0.0, "fraction of pre-training at the end run dense, masks dropped (Variable SPDF; "
                                     "Cerebras used 0.13)", lo=0.0, hi=1.0, hi_open=True)
    iso_flop: str = option("none", "'wide': Sparse-IFT Sparse-Wide, widths x 1/sqrt(1 - target) so the sparse block "
                                   "linears cost what the dense ones did", choices=("none", "wide"))

    def __post_init__(self):
        cls = get_method(self.method)
        config.from_dict(cls.Options, self.options, source="config", prefix="sparsity.options.")
        parse_n_m(self.n_m)
        for name in ("start", "end"):
            if getattr(self, name) is not None and getattr(self, f"{name}_step") is not None:
                raise ConfigError(f"sparsity.{name} and sparsity.{name}_step both given; keep one "
                                  f"({name} is a fraction of training, {name}_step a step)")

    @property
    def enabled(self) -> bool:
        return self.target > 0 or self.n_m is not None

    def schedule(self, total_steps: int) -> Schedule | None:
        cls = get_method(self.method)
        if not cls.needs_schedule:
            return None
        start = self.start if self.start is not None or self.start_step is not None else cls.default_start
        end = self.end if self.end is not None or self.end_step is not None else cls.default_end
        try:
            return Schedule.of(total_steps, self.update_every, start=start, end=end,
                               start_step=self.start_step, end_step=self.end_step)
        except ValueError as e:
            raise ConfigError(f"sparsity schedule: {e}") from None

    def dense_from(self, total_steps: int) -> int | None:
        """The first step of the dense tail, or None without one."""
        return int(round((1.0 - self.dense_tail) * total_steps)) if self.dense_tail > 0 else None

    def build(self, total_steps: int, seed: int, default_include: list[str] | None = None) -> Sparsifier | None:
        """The configured method, or None for a dense run. ``default_include``: the weights to mask when
        ``include`` is unset (the model family's block linears; None: the engine's name globs)."""
        if not self.enabled:
            return None
        include = self.include if self.include is not None else default_include
        kw = dict(sparsity=self.target, distribution=self.distribution, include=include, seed=seed,
                  n_m=parse_n_m(self.n_m), schedule=self.schedule(total_steps), dense_from=self.dense_from(total_steps),
                  **self.options)
        if self.exclude is not None:
            kw["exclude"] = self.exclude
        return get_method(self.method)(**kw)


@dataclass
class OptimConfig:
    max_steps: int | None = option(None, "optimizer steps (default: the preset's)", lo=1)
    batch_size: int | None = option(None, "sequences per micro-batch and rank", lo=1)
    grad_accum: int | None = option(None, "micro-batches per step", lo=1)
    lr: float | None = option(None, "peak learning rate", lo=0.0, hi=1.0, lo_open=True)
    min_lr_ratio: float = option(0.1, "final LR as a fraction of the peak (cosine)", lo=0.0, hi=1.0)
    warmup_steps: int | None = option(None, "linear warmup steps", lo=0)
    weight_decay: float = option(0.1, "AdamW weight decay on matrices", lo=0.0, hi=10.0)
    beta1: float = option(0.9, "AdamW beta1", lo=0.0, hi=1.0, hi_open=True)
    beta2: float = option(0.95, "AdamW beta2", lo=0.0, hi=1.0, hi_open=True)
    grad_clip: float = option(1.0, "clip the global gradient norm (0 = off)", lo=0.0)


@dataclass
class RunConfig:
    out: str | None = option(None, "run directory")
    seed: int = option(1337, "seed of the weights, masks and data order")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    dtype: str = option("auto", "autocast dtype (auto: bf16 on CUDA, fp32 on CPU)",
                        choices=("auto", "float32", "bfloat16", "float16"))
    compile: bool = option(False, "torch.compile the model for training")
    parallel: str = option("ddp", "data parallelism under torchrun: ddp (replicated weights) or fsdp (FSDP2: weights, "
                                  "gradients, optimizer state and masks sharded across ranks)", choices=("ddp", "fsdp"))
    activation_checkpointing: bool = option(False, "recompute each block's activations in the backward (less memory, "
                                                   "about a third more compute)")
    loss_chunk: int = option(4096, "tokens per chunk of the cross-entropy: logits are upcast to fp32 one chunk at a "
                                   "time, never all at once (0 = one chunk)", lo=0)
    kernel: str = option("dense", "kernels of the masked linears: dense (masked dense weights) or semi-structured "
                                  "(PyTorch's 2:4 sparse kernels; sparsity.n_m=2:4 on a CUDA GPU with sm80+, else "
                                  "dense with a warning)", choices=("dense", "semi-structured"))
    peak_tflops: float | None = option(None, "the device's peak TFLOP/s for MFU (default: looked up for known GPUs; "
                                             "MFU is not logged without one)", lo=0.0, lo_open=True)
    log_every: int = option(10, "steps between training-loss log rows", lo=1)
    eval_every: int | None = option(None, "steps between validation evaluations", lo=1)
    eval_batches: int = option(20, "validation batches per evaluation (pre-training)", lo=1)
    ckpt_every: int | None = option(None, "steps between checkpoints", lo=1)
    progress: bool = option(True, "show a progress bar")
    report_to: str = option("jsonl", "where metrics go, comma-separated: jsonl (metrics.jsonl, always), tensorboard "
                                     "(<run>/tensorboard; sparselm[log]), wandb (when installed and configured)")
    keep_checkpoint: bool = option(False, "keep checkpoint/ (weights, optimizer state: about 3x the model) after the run "
                                          "finishes; it is always kept when a run fails or is interrupted")

    def __post_init__(self):
        from .reporting import parse_report_to

        try:
            parse_report_to(self.report_to)
        except ValueError as e:
            raise ConfigError(f"run.report_to: {e}") from None


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        if self.model.init_from is not None:
            if self.data.tokenizer not in (None, self.model.init_from):
                raise ConfigError(f"model.init_from={self.model.init_from} brings its own tokenizer; data.tokenizer="
                                  f"{self.data.tokenizer} would feed the model other token ids: leave data.tokenizer unset")
            if self.sparsity.iso_flop != "none":
                raise ConfigError("sparsity.iso_flop=wide builds a wider model; it cannot start from model.init_from")
        defaults = PRESETS[self.model.training_preset()].training
        defaulted = set()
        for key, value in defaults.items():
            section = self.run if key in ("eval_every", "ckpt_every") else self.optim
            if getattr(section, key) is None:
                setattr(section, key, value)
                defaulted.add(key)
        self.notes = fit_budget_defaults(self.optim, defaults, defaulted)
        if self.run.out is None:
            self.run.out = "runs/pretrain"
        try:
            self.shape()
        except ValueError as e:
            raise ConfigError(f"model: {e}") from None
        if self.optim.warmup_steps >= self.optim.max_steps:
            raise ConfigError(f"optim.warmup_steps={self.optim.warmup_steps} must be below optim.max_steps={self.optim.max_steps}"
                              f"{' (the preset default; set --max-steps above the warm-up)' if 'max_steps' in defaulted else ''}")
        self.sparsity.schedule(self.optim.max_steps)  # a schedule that cannot run is an error now, not later
        if (self.sparsity.dense_tail > 0 or self.sparsity.iso_flop != "none") and not self.sparsity.enabled:
            raise ConfigError("sparsity.dense_tail and sparsity.iso_flop need a sparse run (sparsity.target > 0)")

    def shape(self) -> ModelShape:
        """The model's shape; Sparse-Wide widens it so its sparse block linears cost the dense FLOPs."""
        shape = self.model.shape()
        return shape.widened(self.sparsity.target) if self.sparsity.iso_flop == "wide" else shape

    def planned_shape(self) -> ModelShape:
        """``shape()`` with the vocabulary ``pretrain`` will give it once the corpus is tokenized: the
        trained BPE's or a pretrained tokenizer's size, padded to a multiple of 64 (for FLOPs and
        the plan printed before any work)."""
        shape = self.shape()
        if self.model.init_from is not None:
            return shape
        from ..data.corpus import pad_vocab
        from ..data.paths import data_root
        from ..data.tokenizer import TRAINED, load_pretrained, vocab_size_of

        size = self.model.vocab_size
        if size is None and self.data.tokenizer not in (None, TRAINED):
            size = vocab_size_of(load_pretrained(self.data.tokenizer, data_root)[0])
        return shape.override(vocab_size=pad_vocab(size or shape.vocab_size))

    @property
    def tokens_per_step(self) -> int:
        return self.optim.batch_size * self.optim.grad_accum * self.shape().block_size

    def to_dict(self) -> dict:
        return config.to_dict(self)

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())


FINETUNE_MODES = ("dense", "sparse", "lora")


def _tasks():
    from ..data.tasks import TASKS

    return TASKS


@dataclass
class FinetuneModelConfig:
    from_run: str | None = option(None, "pre-trained run directory (or any local HF model directory of a supported family)")


@dataclass
class FinetuneDataConfig:
    task: str = option("e2e", "task name", choices=lambda: sorted(_tasks()))
    data_dir: str | None = option(None, "task folder (default: its folder in $SPARSELM_DATA / shared/data)")
    skip_bad_rows: bool = option(False, "skip (and count) malformed rows instead of failing")
    limit_train: int | None = option(None, "use only the first N training pairs", lo=1)
    val_limit: int = option(256, "validation pairs for loss/perplexity", lo=1)


@dataclass
class TuningConfig:
    mode: str = option("dense", "dense (SPDF: masks dropped), sparse (masks kept), lora (adapters on the frozen base)",
                       choices=FINETUNE_MODES)
    lora_r: int = option(4, "LoRA rank", lo=1)
    lora_alpha: int = option(32, "LoRA alpha", lo=1)
    lora_dropout: float = option(0.1, "LoRA dropout", lo=0.0, hi=1.0, hi_open=True)


@dataclass
class FinetuneOptimConfig:
    epochs: float = option(2.0, "passes over the training pairs (unless max_steps)", lo=0.0, lo_open=True)
    max_steps: int | None = option(None, "optimizer steps (overrides epochs)", lo=1)
    batch_size: int = option(16, "pairs per step", lo=1)
    lr: float = option(1e-3, "peak learning rate (linear warmup and decay)", lo=0.0, hi=1.0, lo_open=True)
    warmup_ratio: float = option(0.06, "fraction of steps of linear warmup", lo=0.0, hi=1.0, hi_open=True)
    weight_decay: float = option(0.01, "AdamW weight decay on matrices", lo=0.0, hi=10.0)
    grad_clip: float = option(1.0, "clip the global gradient norm (0 = off)", lo=0.0)


@dataclass
class FinetuneConfig:
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    tuning: TuningConfig = field(default_factory=TuningConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        if not self.model.from_run:
            raise ConfigError("model.from_run: required (the pre-trained run to fine-tune; --from DIR)")
        if self.run.out is None:
            self.run.out = "runs/finetune"
        for key, value in (("eval_every", 100), ("ckpt_every", 200)):
            if getattr(self.run, key) is None:
                setattr(self.run, key, value)

    def to_dict(self) -> dict:
        return config.to_dict(self)

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())


def load_pretrain_config(yaml_path=None, overrides=(), flags: dict | None = None, base: dict | None = None) -> PretrainConfig:
    return config.load(PretrainConfig, yaml_path, overrides, flags, base)


def load_finetune_config(yaml_path=None, overrides=(), flags: dict | None = None, base: dict | None = None) -> FinetuneConfig:
    return config.load(FinetuneConfig, yaml_path, overrides, flags, base)


@dataclass
class PruneConfig:
    """One-shot pruning of a trained run or HF model directory (``sparselm prune``)."""

    from_run: str | None = option(None, "trained run directory (or local HF model directory) to prune")
    out: str | None = option(None, "run directory to write")
    method: str = option("magnitude", "one-shot pruner", choices=lambda: sorted(_pruners()))
    target: float = option(0.75, "fraction of zeros in the block linears", lo=0.0, hi=1.0, hi_open=True)
    distribution: str = option("uniform", "per-layer sparsity distribution", choices=lambda: sorted(DISTRIBUTIONS))
    n_m: str | None = option(None, "N:M structured masks, e.g. '2:4' (overrides target)")
    refine: str | None = option(None, "mask refinement after pruning (DSnoT)",
                                choices=lambda: sorted(_refiners()))
    calibration: str = option("corpus", "calibration data: 'corpus' (the run's pre-training corpus), a prepared "
                                        "corpus DIR, 'task:NAME' (a task's training pairs) or FILE.npy ([n, seqlen] ids)")
    nsamples: int | None = option(None, "calibration sequences (default 128, or the .npy file's rows)", lo=1)
    seqlen: int | None = option(None, "tokens per calibration sequence (default: the model's context)", lo=2)
    seed: int = option(0, "seed of the calibration windows")
    true_sequential: bool = option(False, "calibrate each group of linears after pruning the ones before it in the block")
    offload: bool = option(False, "keep every block on the CPU except the one being pruned")
    batch_size: int = option(1, "calibration sequences per forward pass (1, as the references)", lo=1)
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    progress: bool = option(True, "show a progress bar")
    options: dict = option(help="the pruner's options (e.g. damp for sparsegpt)", default_factory=dict)
    refine_options: dict = option(help="the refinement's options", default_factory=dict)
    eval_data: str | None = option(None, "held-out text FILE.txt or prepared corpus DIR: the perplexity of the pruned "
                                         "run (required for a sweep)")
    eval_seqlen: int | None = option(None, "tokens per perplexity window (default: the model's context)", lo=2)

    def __post_init__(self):
        for key in ("from_run", "out"):
            if not getattr(self, key):
                raise ConfigError(f"{key}: required (--{'from' if key == 'from_run' else key} DIR)")
        parse_n_m(self.n_m)
        config.from_dict(_pruners()[self.method].Options, self.options, source="config", prefix="options.")
        if self.refine:
            config.from_dict(_refiners()[self.refine].Options, self.refine_options, source="config",
                             prefix="refine_options.")
        elif self.refine_options:
            raise ConfigError("refine_options: given without refine (--refine NAME)")


def _pruners():
    from ..pruning import PRUNERS

    return PRUNERS


def _refiners():
    from ..pruning import REFINERS

    return REFINERS
