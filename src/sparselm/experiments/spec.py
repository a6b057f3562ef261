"""Experiment specs: the SPDF grid (sparsity x method x seed pre-training, then task x mode
fine-tuning and evaluation) as plain YAML, validated up front with errors that say what to fix."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path

import yaml

from ..data.tasks import TASKS
from ..models.presets import PRESETS
from ..sparsity.methods import METHODS
from ..training.config import PretrainConfig
from ..training.finetuning import MODES, FinetuneConfig


class SpecError(ValueError):
    """An experiment spec that cannot run; the message names the field."""


@dataclass
class ExperimentSpec:
    name: str = "custom"
    preset: str = "tiny"
    model: dict = field(default_factory=dict)
    corpus: str | None = None
    tokens: float | None = None  # pre-training token budget; sets max_steps (else pretrain.max_steps / preset)
    pretrain: dict = field(default_factory=dict)  # any PretrainConfig field
    sparsities: list = field(default_factory=lambda: [0.0, 0.5, 0.75])
    methods: list = field(default_factory=lambda: ["static"])
    distribution: str = "uniform"
    tasks: list = field(default_factory=lambda: ["e2e", "webnlg", "dart"])
    modes: list = field(default_factory=lambda: ["dense", "sparse"])
    seeds: list = field(default_factory=lambda: [1337])
    finetune: dict = field(default_factory=dict)  # any FinetuneConfig field
    eval_split: str = "test"
    eval_limit: int | None = 200
    decoding: dict = field(default_factory=dict)  # DecodingConfig fields
    description: str = ""

    def __post_init__(self):
        self.validate()

    # ---- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        if self.preset not in PRESETS:
            raise SpecError(f"preset: unknown {self.preset!r}; choose one of {sorted(PRESETS)}")
        for name, allowed, values in (("tasks", TASKS, self.tasks), ("modes", MODES, self.modes), ("methods", METHODS, self.methods)):
            if not values:
                raise SpecError(f"{name}: must list at least one")
            bad = [v for v in values if v not in allowed]
            if bad:
                raise SpecError(f"{name}: unknown {bad}; choose from {sorted(allowed)}")
        if "jsonl" in self.tasks and not self.finetune.get("data_dir"):
            raise SpecError("tasks: 'jsonl' needs finetune.data_dir (a folder with train/validation/test.jsonl)")
        for s in self.sparsities:
            if not isinstance(s, (int, float)) or not 0 <= s < 1:
                raise SpecError(f"sparsities: {s!r} is not a fraction in [0, 1)")
        if not self.seeds or not all(isinstance(s, int) for s in self.seeds):
            raise SpecError("seeds: must be a non-empty list of integers")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise SpecError(f"eval_limit: must be >= 1 or null (all), got {self.eval_limit}")
        if self.eval_split not in ("validation", "test"):
            raise SpecError(f"eval_split: must be 'validation' or 'test', got {self.eval_split!r}")
        for key in ("sparsity", "method", "seed", "out", "preset"):
            if key in self.pretrain:
                raise SpecError(f"pretrain.{key}: set it with the spec's top-level grid fields instead")
        cfg = self.pretrain_config(self.sparsities[0], self.methods[0], self.seeds[0], "x")  # validates fields
        if self.tokens is not None:
            if cfg.max_steps < 1 or self.tokens < cfg.tokens_per_step:
                raise SpecError(f"tokens: a budget of {self.tokens:.3g} tokens is less than one step of "
                                f"{cfg.tokens_per_step} tokens (batch_size x grad_accum x block_size)")
        if cfg.warmup_steps >= cfg.max_steps:
            raise SpecError(f"pretrain: warmup_steps={cfg.warmup_steps} must be below the {cfg.max_steps} training steps")
        unknown = set(self.finetune) - {f.name for f in fields(FinetuneConfig)}
        if unknown:
            raise SpecError(f"finetune: unknown field(s) {sorted(unknown)}")
        for key in ("from_run", "task", "mode", "out"):
            if key in self.finetune:
                raise SpecError(f"finetune.{key}: set by the grid; remove it from the spec")

    # ---- the grid ---------------------------------------------------------------------------
    def pretrain_config(self, sparsity: float, method: str, seed: int, out: str) -> PretrainConfig:
        values = dict(self.pretrain)
        values.update(preset=self.preset, model=dict(self.model), corpus=self.corpus, sparsity=float(sparsity),
                      method=method, distribution=self.distribution, seed=seed, out=out)
        try:
            cfg = PretrainConfig.from_dict(values)
            if self.tokens is not None:
                cfg.max_steps = max(0, int(self.tokens // cfg.tokens_per_step))
                values["max_steps"] = cfg.max_steps
                cfg = PretrainConfig.from_dict(values) if cfg.max_steps >= 1 else cfg
        except ValueError as e:
            raise SpecError(f"pretrain: {e}") from None
        return cfg

    def finetune_config(self, from_run: str, task: str, mode: str, seed: int, out: str) -> FinetuneConfig:
        return FinetuneConfig(from_run=from_run, task=task, mode=mode, out=out, seed=seed, **self.finetune)

    def to_dict(self) -> dict:
        return asdict(self)


BUILTIN_DIR = "specs"


def builtin_specs() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(__package__).joinpath(BUILTIN_DIR).iterdir() if p.name.endswith(".yaml"))


def load_spec(name_or_path: str) -> ExperimentSpec:
    """A built-in spec by name (``cpu-demo`` ...) or a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise SpecError(f"spec file {path} does not exist")
        text = path.read_text()
    else:
        res = resources.files(__package__).joinpath(BUILTIN_DIR, f"{name_or_path}.yaml")
        if not res.is_file():
            raise SpecError(f"unknown spec {name_or_path!r}; built-in specs: {builtin_specs()}, or pass a YAML file")
        text = res.read_text()
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise SpecError(f"{name_or_path}: a spec must be a YAML mapping")
    known = {f.name for f in fields(ExperimentSpec)}
    unknown = set(data) - known
    if unknown:
        raise SpecError(f"{name_or_path}: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
    data.setdefault("name", path.stem if path.suffix else name_or_path)
    return ExperimentSpec(**data)


__all__ = ["ExperimentSpec", "SpecError", "builtin_specs", "load_spec"]
