"""Per-family test shapes read from the registries: a family added under ``src/`` is tested by every
test parametrized over ``FAMILY_NAMES`` without editing a test."""

from sparselm.models import FAMILIES, PRESETS

FAMILY_NAMES = sorted(FAMILIES)


def family_preset(family: str):
    """The first preset registered for ``family`` (its smallest by convention, e.g. 'llama-tiny')."""
    presets = [p for p in PRESETS.values() if p.shape.family == family]
    assert presets, f"family {family!r} has no preset: register one (e.g. '{family}-tiny') beside the family"
    return presets[0]


def micro_shape(family: str, **changes):
    """The family's first preset at a size a test builds in milliseconds (its head layout kept)."""
    preset = family_preset(family).shape
    micro = dict(n_layer=2, n_embd=16 * preset.n_head, block_size=16, vocab_size=100,
                 d_ff=None if preset.d_ff is None else 96)
    return preset.override(**{**micro, **changes})
