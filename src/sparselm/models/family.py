"""Model families: what sparselm needs to know about one Hugging Face causal-LM architecture.

A family builds a model from a ``ModelShape``, reads a shape back from a config, and lists the block
linears: the one declaration of the weights that get masked by default, that FLOP accounting counts
and that LoRA adapts, so no other module hard-codes parameter names. Adding an architecture is one
module in ``families/`` (imported without being listed anywhere) with a ``ModelFamily`` subclass, one
``register_family(...)`` call and its presets (``register_preset``).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from ..registry import Registry

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

    from .presets import ModelShape


@dataclass(frozen=True)
class BlockLinear:
    """One maskable weight inside a transformer block, as FLOP accounting sees it."""

    component: str  # e.g. "mlp.fc": FLOPs are summed over layers per component
    param_name: str  # the HF parameter name, e.g. "transformer.h.3.mlp.c_fc.weight"
    n_in: int
    n_out: int


class ModelFamily(ABC):
    """One architecture. Subclasses set the class attributes and the three abstract methods;
    ``layer_linears`` is the single list of the maskable weights (masks, FLOPs and LoRA read it)."""

    name: ClassVar[str]  # the ModelShape.family value
    model_type: ClassVar[str]  # the HF config.model_type it loads
    model_class: ClassVar[type[PreTrainedModel]]
    layer_prefix: ClassVar[str]  # parameter-name prefix of block i, with an {i} field
    lora_fan_in_fan_out: ClassVar[bool] = False  # True where weights are stored (in, out), as GPT-2's Conv1D
    harmless_keys: ClassVar[tuple[str, ...]] = ()  # globs of checkpoint keys (old buffers) safe to miss or ignore

    @abstractmethod
    def hf_config(self, shape: ModelShape, eos_token_id: int | None = None) -> PretrainedConfig:
        """The HF config for ``shape``; BOS, EOS and padding all use the EOS id (default: the last token)."""

    @abstractmethod
    def shape_of(self, config: PretrainedConfig) -> ModelShape:
        """The shape of a config of this family; raises where the config has no ModelShape equivalent."""

    @abstractmethod
    def layer_linears(self, shape: ModelShape) -> list[tuple[str, str, int, int]]:
        """(component, name within the block, n_in, n_out) of each maskable weight of one block."""

    def build(self, shape: ModelShape, eos_token_id: int | None = None) -> PreTrainedModel:
        """A freshly initialised model with SDPA attention."""
        return self.model_class._from_config(self.hf_config(shape, eos_token_id), attn_implementation="sdpa")

    def block_linears(self, shape: ModelShape) -> list[BlockLinear]:
        return [
            BlockLinear(component, self.layer_prefix.format(i=i) + suffix, n_in, n_out)
            for i in range(shape.n_layer)
            for component, suffix, n_in, n_out in self.layer_linears(shape)
        ]

    def lora_targets(self, shape: ModelShape) -> list[str]:
        """peft ``target_modules``: the block linears' module names within a block (peft matches suffixes)."""
        return list(dict.fromkeys(suffix.removesuffix(".weight") for _, suffix, _, _ in self.layer_linears(shape)))

    def context_length(self, config: PretrainedConfig) -> int:
        return config.max_position_embeddings


def eos_id(shape: ModelShape, eos_token_id: int | None) -> int:
    """The tokenizer's EOS id, or the last vocabulary entry for a model built without one."""
    return shape.vocab_size - 1 if eos_token_id is None else eos_token_id


FAMILIES: Registry[ModelFamily] = Registry("model family", "families", entry_points="sparselm.families")


@FAMILIES.registrar
def register_family(family: ModelFamily, replace: bool = False) -> ModelFamily:
    """Make ``family`` available by name and by the model_type of saved configs."""
    for other in FAMILIES.declared.values():  # not FAMILIES: no plugins while built-ins register
        if other.model_type == family.model_type and other.name != family.name:
            raise ValueError(f"model_type {family.model_type!r} is already loaded by family {other.name!r}")
    return FAMILIES.register(family.name, family, replace)


get_family = FAMILIES.lookup


def _family_for_model_type(model_type: str | None, architectures, where: str) -> ModelFamily:
    for family in FAMILIES.values():
        if family.model_type == model_type:
            return family
    raise ValueError(
        f"{where}architecture {architectures or '?'} (model_type {model_type!r}) is not supported; "
        f"supported families: {', '.join(f'{f.name} (model_type {f.model_type!r})' for f in FAMILIES.values())}"
    )


def family_for_config(config: PretrainedConfig) -> ModelFamily:
    return _family_for_model_type(config.model_type, getattr(config, "architectures", None), "")


def build_model(shape: ModelShape, eos_token_id: int | None = None) -> PreTrainedModel:
    """A freshly initialised model of ``shape.family``."""
    return get_family(shape.family).build(shape, eos_token_id)


def shape_of(config: PretrainedConfig) -> ModelShape:
    return family_for_config(config).shape_of(config)


def context_length(model_or_config) -> int:
    """Positions the model can attend over (a model, peft-wrapped or not, or its config)."""
    config = getattr(model_or_config, "config", model_or_config)
    return family_for_config(config).context_length(config)


def block_linear_names(model) -> list[str]:
    """The parameter names of ``model``'s block linears: what a sparse run masks unless told otherwise
    (``include=`` for ``sparselm.sparsity``, which knows no model). Whatever else is linear (an LM head
    under any name, a classifier) stays dense."""
    family = family_for_config(model.config)
    return [b.param_name for b in family.block_linears(family.shape_of(model.config))]


def lora_config_kwargs(model) -> dict:
    """``target_modules`` and ``fan_in_fan_out`` for ``peft.LoraConfig`` on this model's family."""
    family = family_for_config(model.config)
    return {"target_modules": family.lora_targets(family.shape_of(model.config)),
            "fan_in_fan_out": family.lora_fan_in_fan_out}


def _read_config(path: Path) -> tuple[dict, ModelFamily]:
    """The raw config.json of a model directory and the family that loads it (errors name the file)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json)")
    try:
        raw = json.loads(config_file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{config_file}: expected a JSON object")
    return raw, _family_for_model_type(raw.get("model_type"), raw.get("architectures"), f"{path}: ")


def shape_of_dir(path: str | Path) -> ModelShape:
    """The ModelShape of a saved model directory, from its config alone (no weights are read)."""
    from transformers import AutoConfig

    path = Path(path)
    family = _read_config(path)[1]
    return family.shape_of(AutoConfig.from_pretrained(str(path)))


def load_model(path: str | Path) -> PreTrainedModel:
    """A causal LM saved with ``save_pretrained`` (a sparselm run or any HF directory of a registered
    family). Every weight must come from the checkpoint: a model with freshly initialised holes would
    train or evaluate silently wrong, so missing or unexpected weights raise."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    family = _read_config(path)[1]
    model, info = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="sdpa", output_loading_info=True)

    # transformers already accounts for tied weights (an LM head saved once) and its own known buffers
    problems = [
        f"{kind} {key}"
        for kind in ("missing", "unexpected")
        for key in sorted(info[f"{kind}_keys"])
        if not any(fnmatch(key, glob) for glob in family.harmless_keys)
    ]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(f"{path}: checkpoint does not match the {family.name} model: {', '.join(problems[:5])}{more}")
    return model

