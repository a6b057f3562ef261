"""Experiments: specs, the grid runner, results and reports. Orchestrates; never computes."""

from .spec import ExperimentSpec, SpecError, builtin_specs, load_spec

__all__ = ["ExperimentSpec", "SpecError", "builtin_specs", "load_spec"]
