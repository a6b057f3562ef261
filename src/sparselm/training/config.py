"""Pre-training configuration: plain values, resolved as dataclass defaults <- preset <- YAML <- CLI."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from ..models.presets import ModelShape, get_preset

# Training defaults that depend on model size. Tokens per step = batch_size * grad_accum * block_size.
PRESET_TRAINING: dict[str, dict] = {
    "tiny": dict(max_steps=500, batch_size=32, grad_accum=1, lr=3e-3, warmup_steps=50, eval_every=100, ckpt_every=100),
    "small": dict(max_steps=3000, batch_size=32, grad_accum=1, lr=1e-3, warmup_steps=200, eval_every=250, ckpt_every=500),
    "gpt2-small": dict(max_steps=20000, batch_size=16, grad_accum=32, lr=6e-4, warmup_steps=700, eval_every=500, ckpt_every=1000),
    "gpt2-medium": dict(max_steps=40000, batch_size=8, grad_accum=64, lr=3e-4, warmup_steps=1000, eval_every=1000, ckpt_every=1000),
    "gpt3-xl": dict(max_steps=60000, batch_size=4, grad_accum=128, lr=2e-4, warmup_steps=1000, eval_every=1000, ckpt_every=1000),
}

# Fields that may change between a run and its resume without changing the trajectory.
RESUMABLE_CHANGES = {"max_steps", "eval_every", "ckpt_every", "log_every", "device", "compile", "out", "progress"}


@dataclass
class PretrainConfig:
    preset: str = "tiny"
    model: dict = field(default_factory=dict)  # overrides of ModelShape fields, e.g. {"n_layer": 2}
    corpus: str | None = None  # default: shared/data/corpus
    out: str = "runs/pretrain"
    cache_dir: str | None = None
    val_fraction: float = 0.02
    # sparsity
    sparsity: float = 0.0
    method: str = "static"  # static | magnitude | gmp | set | rigl
    distribution: str = "uniform"  # uniform | erk
    n_m: str | None = None  # e.g. "2:4"
    include: list | None = None  # glob filters over parameter names; None = all block linears
    exclude: list | None = None
    update_every: int = 100
    sparsity_start: float = 0.25  # fraction of training (float in [0,1]) or step (int)
    sparsity_end: float = 0.75
    schedule: str = "cubic"
    drop_fraction: float = 0.3
    # optimisation (None = preset default)
    max_steps: int | None = None
    batch_size: int | None = None
    grad_accum: int | None = None
    lr: float | None = None
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # bookkeeping
    eval_every: int | None = None
    eval_batches: int = 20
    ckpt_every: int | None = None
    log_every: int = 10
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16
    compile: bool = False

    def __post_init__(self):
        defaults = PRESET_TRAINING.get(self.preset, PRESET_TRAINING["small"])
        get_preset(self.preset)  # fails early on an unknown preset
        for key, value in defaults.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        self.shape()  # validates model overrides
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "ckpt_every", "log_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def shape(self) -> ModelShape:
        return get_preset(self.preset).override(**self.model)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.shape().block_size

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def from_dict(cls, data: dict) -> "PretrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown config key(s) {sorted(unknown)}; known keys: {sorted(known)}")
        return cls(**data)


def load_config(yaml_path: str | Path | None = None, **overrides) -> PretrainConfig:
    """YAML file values, then explicit overrides (None means 'not given')."""
    data: dict = {}
    if yaml_path:
        path = Path(yaml_path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a config file must be a mapping of key: value")
    model = dict(data.pop("model", {}) or {})
    model.update(overrides.pop("model", {}) or {})
    data.update({k: v for k, v in overrides.items() if v is not None})
    data["model"] = model
    return PretrainConfig.from_dict(data)
