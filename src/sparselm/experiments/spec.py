"""Experiment specs: the SPDF grid (sparsity x method x seed pre-training, optionally one-shot
pruning of the dense run, then task x mode fine-tuning and evaluation) as plain YAML, validated up
front with errors that say what to fix."""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path

import yaml

from .. import config
from ..config import ConfigError
from ..data.tasks import TASKS, get_task
from ..models.presets import PRESETS
from ..pruning import PRUNERS
from ..sparsity.methods import METHODS, parse_n_m
from ..training.config import FINETUNE_MODES as MODES
from ..training.config import FinetuneConfig, PretrainConfig, PruneConfig


class SpecError(ValueError):
    """An experiment spec that cannot run; the message names the field."""


# keys the grid sets per cell: a spec's pretrain/finetune sections may not set them
GRID_PRETRAIN_KEYS = {"sparsity": ("target", "method", "distribution", "options"), "run": ("seed", "out"), "model": ("preset",)}
GRID_FINETUNE_KEYS = {"model": ("from_run",), "data": ("task",), "tuning": ("mode",), "run": ("seed", "out")}
GRID_PRUNE_KEYS = ("from_run", "out", "device", "progress")  # a prune row may set every other PruneConfig key


@dataclass(frozen=True)
class PruneRow:
    """One prune-then-fine-tune row: each seed's dense run pruned one-shot to ``sparsity`` with
    ``settings`` (PruneConfig keys; ``target`` is the sparsity), labelled ``label`` like a method."""

    label: str
    sparsity: float
    settings: dict
    index: int  # its entry in the spec's prune list, for error messages

    @property
    def display(self) -> str:
        """'75% pruned: wanda', '2:4 pruned: sparsegpt+dsnot' (and the label, if the spec named the row)."""
        s = self.settings
        how = s["method"] + (f"+{s['refine']}" if s.get("refine") else "")
        level = s["n_m"] if s.get("n_m") else f"{round(100 * self.sparsity)}%"
        return f"{level} pruned: {how}" + ("" if self.label == default_prune_label(s) else f" [{self.label}]")


def default_prune_label(settings: dict) -> str:
    """'pruned-wanda', 'pruned-wanda-dsnot', 'pruned-sparsegpt-2of4': the method, refinement and N:M."""
    parts = ["pruned", settings["method"]] + ([settings["refine"]] if settings.get("refine") else [])
    if settings.get("n_m"):
        parts.append(settings["n_m"].replace(":", "of"))
    return "-".join(parts)


@dataclass
class ExperimentSpec:
    name: str = "custom"
    preset: str = "tiny"
    model: dict = field(default_factory=dict)  # shape overrides, e.g. {"n_layer": 2}
    corpus: str | None = None
    tokens: float | None = None  # pre-training token budget; sets optim.max_steps (else pretrain.optim.max_steps / preset)
    pretrain: dict = field(default_factory=dict)  # any pre-training config keys, nested: {optim: {lr: ...}, run: {...}}
    sparsities: list = field(default_factory=lambda: [0.0, 0.5, 0.75])
    methods: list = field(default_factory=lambda: ["static"])  # names, or {name, method, <sparsity keys>} variants
    method_options: dict = field(default_factory=dict)  # per method: {set: {drop_fraction: 0.3}}
    distribution: str = "uniform"
    tasks: list = field(default_factory=lambda: ["e2e", "webnlg", "dart"])
    modes: list = field(default_factory=lambda: ["dense", "sparse"])
    seeds: list = field(default_factory=lambda: [1337])
    finetune: dict = field(default_factory=dict)  # any fine-tuning config keys, nested: {optim: {epochs: 2}}
    eval_split: str = "test"
    eval_limit: int | None = 200
    decoding: dict = field(default_factory=dict)  # DecodingConfig fields
    prune: list = field(default_factory=list)  # prune-then-fine-tune rows: {method, sparsity or n_m, <PruneConfig keys>}
    description: str = ""

    def __post_init__(self):
        self.validate()

    # ---- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        if self.preset not in PRESETS:
            raise SpecError(f"preset: unknown {self.preset!r}; choose one of {sorted(PRESETS)}")
        for name, allowed, values in (("tasks", TASKS, self.tasks), ("modes", MODES, self.modes),
                                      ("methods", METHODS, [self.variant(m)["method"] for m in self.method_names])):
            if not values:
                raise SpecError(f"{name}: must list at least one")
            bad = [v for v in values if v not in allowed]
            if bad:
                raise SpecError(f"{name}: unknown {bad}; choose from {sorted(allowed)}")
        for task in self.tasks:
            if get_task(task).folder is None and not self.data_dir:
                raise SpecError(f"tasks: {task!r} needs finetune.data.data_dir (a folder with its files)")
        for s in self.sparsities:
            if not isinstance(s, (int, float)) or not 0 <= s < 1:
                raise SpecError(f"sparsities: {s!r} is not a fraction in [0, 1)")
        if not self.seeds or not all(isinstance(s, int) for s in self.seeds):
            raise SpecError("seeds: must be a non-empty list of integers")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise SpecError(f"eval_limit: must be >= 1 or null (all), got {self.eval_limit}")
        if self.eval_split not in ("validation", "test"):
            raise SpecError(f"eval_split: must be 'validation' or 'test', got {self.eval_split!r}")
        unknown = sorted(set(self.method_options) - set(self.method_names) - {self.variant(m)["method"] for m in self.method_names})
        if unknown:
            raise SpecError(f"method_options: {unknown} are not among the spec's methods {self.method_names}")
        for section, grid_keys in (("pretrain", GRID_PRETRAIN_KEYS), ("finetune", GRID_FINETUNE_KEYS)):
            values = getattr(self, section)
            for sub, keys in grid_keys.items():
                for key in keys:
                    if key in (values.get(sub) or {}):
                        raise SpecError(f"{section}.{sub}.{key}: set by the grid; use the spec's top-level fields instead")
        for m in self.methods:
            if isinstance(m, dict) and not set(m.get("sparsities", [])) <= set(self.sparsities):
                raise SpecError(f"methods: {m['name']}'s sparsities {m['sparsities']} are not all in the spec's {self.sparsities}")
        for method in self.method_names:  # every cell's config must be valid before anything runs
            cfg = self.pretrain_config(self.sparsities[-1], method, self.seeds[0], "x")
        if self.tokens is not None and self.tokens < cfg.tokens_per_step:
            raise SpecError(f"tokens: a budget of {self.tokens:.3g} tokens is less than one step of "
                            f"{cfg.tokens_per_step} tokens (batch_size x grad_accum x block_size)")
        self.finetune_config("x", self.tasks[0], self.modes[0], self.seeds[0], "x")
        for row in self.prune_rows:
            self.prune_config(row, self.seeds[0], "x", "x")

    @property
    def method_names(self) -> list[str]:
        """Cell labels: a method's name, or a variant's ``name`` (e.g. Variable SPDF, Sparse-Wide)."""
        names = []
        for m in self.methods:
            if isinstance(m, dict):
                if not isinstance(m.get("name"), str) or not isinstance(m.get("method"), str):
                    raise SpecError(f"methods: a variant needs a name and a method, e.g. "
                                    f"{{name: vspdf, method: static, dense_tail: 0.13}}; got {m!r}")
                names.append(m["name"])
            elif isinstance(m, str):
                names.append(m)
            else:
                raise SpecError(f"methods: {m!r} is neither a method name nor a {{name, method, ...}} variant")
        if len(set(names)) != len(names):
            raise SpecError(f"methods: names must be unique, got {names}")
        return names

    def variant(self, name: str) -> dict:
        """``{"method": ..., <sparsity keys>}`` of a cell label."""
        for m in self.methods:
            if isinstance(m, dict) and m.get("name") == name:
                return {k: v for k, v in m.items() if k not in ("name", "sparsities")}
        return {"method": name}

    def ends_sparse(self, sparsity: float, method: str) -> bool:
        """Whether a pre-training cell ends with masks (dense runs and Variable SPDF's dense tail do not),
        i.e. whether sparse fine-tuning of it means anything."""
        return sparsity > 0 and not self.variant(method).get("dense_tail")

    def methods_at(self, sparsity: float) -> list[str]:
        """The cell labels run at a sparsity: all, except variants limited by their own ``sparsities``."""
        return [name for name, m in zip(self.method_names, self.methods)
                if not (isinstance(m, dict) and "sparsities" in m) or sparsity in m["sparsities"]]

    @property
    def prune_rows(self) -> list[PruneRow]:
        """The ``prune`` section, one row per (entry, sparsity): an entry without ``sparsity`` or ``n_m``
        prunes to each of the spec's non-zero sparsities; one with ``n_m`` to its sparsity (2:4 -> 50%)."""
        if not isinstance(self.prune, list):
            raise SpecError(f"prune: expected a list of rows, e.g. [{{method: wanda, sparsity: 0.75}}], got {self.prune!r}")
        if self.prune and 0 not in self.sparsities:
            raise SpecError("prune: prune rows start from the dense pre-training run; add 0.0 to sparsities")
        rows, seen = [], {}
        for i, entry in enumerate(self.prune):
            where = f"prune[{i}]"
            entry = {"method": entry} if isinstance(entry, str) else entry
            if not isinstance(entry, dict) or not isinstance(entry.get("method"), str):
                raise SpecError(f"{where}: a row needs a method (one of {sorted(PRUNERS)}), e.g. "
                                f"{{method: wanda, sparsity: 0.75}}; got {entry!r}")
            settings = {k: v for k, v in entry.items() if k not in ("name", "sparsity")}
            for key in GRID_PRUNE_KEYS:
                if key in settings:
                    raise SpecError(f"{where}.{key}: set by the grid (the dense run of each seed, the grid's --out, "
                                    "--device, --no-progress); remove it")
            if "target" in settings:
                raise SpecError(f"{where}.target: write sparsity (as in the spec's sparsities)")
            for key in ("eval_data", "eval_seqlen"):  # sparselm prune's own evaluation: a grid would ignore them
                if key in settings:
                    raise SpecError(f"{where}.{key}: not used by a grid (it scores each row after fine-tuning); remove it")
            if settings.get("method") not in PRUNERS:
                raise SpecError(f"{where}.method: unknown {settings['method']!r}; choose from {sorted(PRUNERS)}")
            n_m = settings.get("n_m")
            if n_m is not None and not isinstance(n_m, str):
                raise SpecError(f"{where}.n_m: expected a string like '2:4', got {n_m!r} (quote it: YAML reads 2:4 as a number)")
            try:
                n_m = parse_n_m(n_m)
            except ValueError as e:
                raise SpecError(f"{where}.n_m: {e}") from None
            given = entry.get("sparsity")
            if "sparsity" in entry and (isinstance(given, bool) or not isinstance(given, (int, float)) or not 0 < given < 1):
                raise SpecError(f"{where}.sparsity: {given!r} is not a fraction in (0, 1)")
            if n_m is not None and not 0 < n_m[0] < n_m[1]:
                raise SpecError(f"{where}.n_m: {settings['n_m']!r} must keep 0 < N < M of every M weights")
            if n_m is not None:
                levels = [1.0 - n_m[0] / n_m[1]]
                if "sparsity" in entry and not math.isclose(given, levels[0]):
                    raise SpecError(f"{where}.sparsity: {given} contradicts n_m {settings['n_m']!r} "
                                    f"({levels[0]:g}); give one of them")
            else:
                levels = [given] if "sparsity" in entry else [s for s in self.sparsities if s > 0]
            label = entry.get("name") or default_prune_label(settings)
            if not isinstance(label, str) or not label.replace("-", "").replace("_", "").replace(".", "").isalnum():
                raise SpecError(f"{where}.name: {label!r} must be letters, digits, '-', '_' or '.' (it names directories)")
            if label in self.method_names or label == "dense":
                raise SpecError(f"{where}: its label {label!r} is a pre-training method's; give the row another name")
            for s in levels:
                if (label, float(s)) in seen:
                    raise SpecError(f"{where}: same label {label!r} and sparsity {s} as prune[{seen[label, float(s)]}]; "
                                    "give one of them a name")
                seen[label, float(s)] = i
                rows.append(PruneRow(label, float(s), settings, i))
        return rows

    @property
    def data_dir(self) -> str | None:
        return (self.finetune.get("data") or {}).get("data_dir")

    # ---- the grid ---------------------------------------------------------------------------
    def pretrain_config(self, sparsity: float, method: str, seed: int, out: str) -> PretrainConfig:
        cell = {"model": dict(self.model, preset=self.preset), "data": {"corpus": self.corpus},
                "sparsity": {**self.variant(method), "target": float(sparsity), "distribution": self.distribution,
                             "options": dict(self.method_options.get(method)
                                             or self.method_options.get(self.variant(method)["method"]) or {})},
                "run": {"seed": seed, "out": out}}
        data = config.merge(self.pretrain, cell)
        source = f"spec {self.name}"
        try:
            cfg = config.from_dict(PretrainConfig, data, source)
            if self.tokens is not None:
                steps = int(self.tokens // cfg.tokens_per_step)
                if steps >= 1:
                    config.set_path(data, "optim.max_steps", steps)
                    cfg = config.from_dict(PretrainConfig, data, source)
        except ConfigError as e:
            raise SpecError(f"pretrain: {e}") from None
        return cfg

    def finetune_config(self, from_run: str, task: str, mode: str, seed: int, out: str) -> FinetuneConfig:
        cell = {"model": {"from_run": from_run}, "data": {"task": task}, "tuning": {"mode": mode}, "run": {"seed": seed, "out": out}}
        try:
            return config.from_dict(FinetuneConfig, config.merge(self.finetune, cell), f"spec {self.name}")
        except ConfigError as e:
            raise SpecError(f"finetune: {e}") from None

    def prune_config(self, row: PruneRow, seed: int, from_run: str, out: str) -> PruneConfig:
        """A row's PruneConfig for one seed's dense run (calibration windows seeded by the grid's seed
        unless the row sets ``seed``)."""
        data = {"seed": seed, **row.settings, "target": row.sparsity, "from_run": from_run, "out": out}
        where = f"prune[{row.index}]"
        try:
            return config.from_dict(PruneConfig, data, f"spec {self.name}", prefix=f"{where}.")
        except ConfigError as e:
            message = str(e)
            raise SpecError(message if message.startswith(where) else f"{where}.{message}") from None

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def defaults() -> dict:
        """Every field's default value (without validating a default spec)."""
        return {f.name: f.default_factory() if f.default_factory is not MISSING else f.default for f in fields(ExperimentSpec)}


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
    try:
        data = config.parse_numbers(yaml.safe_load(text) or {})
    except yaml.YAMLError as e:
        raise SpecError(f"{name_or_path}: invalid YAML ({e})") from None
    if not isinstance(data, dict):
        raise SpecError(f"{name_or_path}: a spec must be a YAML mapping")
    known = {f.name for f in fields(ExperimentSpec)}
    unknown = set(data) - known
    if unknown:
        raise SpecError(f"{name_or_path}: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
    data.setdefault("name", path.stem if path.suffix else name_or_path)
    return ExperimentSpec(**data)


__all__ = ["ExperimentSpec", "PruneRow", "SpecError", "builtin_specs", "load_spec"]
