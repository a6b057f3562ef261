"""One config system for every command: nested dataclasses, one loader, one strictness.

A config is a dataclass whose fields are plain values or other config dataclasses (one per concern:
model, data, sparsity, optim, run). Values come from the defaults, then a YAML file, then
``--set a.b=value`` overrides, then explicit CLI flags. Every value is checked the same way: an
unknown key, a wrong type or an out-of-range value is a ``ConfigError`` naming the key, what is
allowed and where the value came from. Numbers are numbers (``1e-3`` in YAML or ``--set`` is a
float, not PyYAML's string), and a float field never takes a step count by accident: an int in a
float field is the same number as a float.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the key, the fix and the source."""


def option(default: Any = dataclasses.MISSING, help: str = "", *, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False, hi_open: bool = False, choices: typing.Iterable | None = None,
           default_factory: Any = dataclasses.MISSING) -> Any:
    """A config field with its help text and allowed values (a range ``[lo, hi]``, ends optionally
    open, or ``choices``), checked by ``from_dict``. ``choices`` may be a callable returning the
    allowed names, so a registry filled later (sparsity methods, tasks) is read at check time."""
    meta = {"help": help, "lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open, "choices": choices}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ---- YAML and --set parsing ------------------------------------------------------------------
_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def parse_value(text: str) -> Any:
    """A ``--set`` value: YAML scalars and lists, with ``1e-3`` read as a number (YAML 1.1 needs a dot)."""
    text = text.strip()
    if _FLOAT.match(text):
        return float(text) if any(c in text for c in ".eE") else int(text)
    try:
        return parse_numbers(yaml.safe_load(text))
    except yaml.YAMLError:
        return text


def parse_numbers(value: Any) -> Any:
    """Strings that look like numbers (PyYAML leaves ``1e-3`` a string) become numbers."""
    if isinstance(value, str) and _FLOAT.match(value.strip()):
        return parse_value(value)
    if isinstance(value, dict):
        return {k: parse_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [parse_numbers(v) for v in value]
    return value


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from a file; syntax errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of key: value, got {type(data).__name__}")
    return parse_numbers(data)


def parse_overrides(items: typing.Iterable[str]) -> dict:
    """``["optim.lr=1e-3", "model.n_layer=2"]`` -> ``{"optim": {"lr": 0.001}, "model": {"n_layer": 2}}``."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set optim.lr=3e-4")
        key, value = item.split("=", 1)
        set_path(out, key.strip(), parse_value(value))
    return out


def set_path(data: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {p} is a value, not a section")
    node[leaf] = value


def merge(base: dict, update: dict) -> dict:
    """Deep merge: sections merge, values replace."""
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ---- building and checking -------------------------------------------------------------------
def from_dict(cls: type, data: dict | None, source: str = "config", prefix: str = "") -> Any:
    """Build config dataclass ``cls`` from a nested dict, checking every key and value."""
    data = dict(data or {})
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys ({source})")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key ({source}){_did_you_mean(cls, unknown[0], prefix)}; keys of "
                          f"{prefix.rstrip('.') or 'the config'}: {', '.join(sorted(known)) or '(none)'}")
    values = {}
    for name, value in data.items():
        key = prefix + name
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            if isinstance(value, typ):
                values[name] = value
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a section (a mapping of keys), got {value!r} ({source})")
            values[name] = from_dict(typ, value, source, key + ".")
            continue
        values[name] = coerce(value, typ, key, source)
        check_value(known[name], values[name], key, source)
    try:
        obj = cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e} ({source})") from None
    return obj


def _leaf_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key under ``cls``, sections included ("optim", "optim.lr", ...)."""
    keys = []
    for name, typ in typing.get_type_hints(cls).items():
        keys.append(prefix + name)
        if dataclasses.is_dataclass(typ):
            keys += _leaf_keys(typ, f"{prefix}{name}.")
    return keys


def _did_you_mean(cls: type, name: str, prefix: str) -> str:
    """'; did you mean optim.lr?' for a key that a section below (or a near spelling) has."""
    keys = _leaf_keys(cls, prefix)
    exact = [k for k in keys if k.rsplit(".", 1)[-1] == name and k != prefix + name]
    close = exact or difflib.get_close_matches(prefix + name, keys, n=3, cutoff=0.75)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def coerce(value: Any, typ: Any, key: str, source: str) -> Any:
    """``value`` as type ``typ`` (int, float, bool, str, list, dict, Optional of these)."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        errors = []
        for a in args:
            try:
                return coerce(value, a, key, source)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    want = origin or typ
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        list: lambda v: isinstance(v, (list, tuple)),
        dict: lambda v: isinstance(v, dict),
    }.get(want)
    if ok is None or typ is Any:
        return value
    if not ok(value):
        if want is int and isinstance(value, float) and value.is_integer():
            return int(value)  # 1e3 written for 1000
        raise ConfigError(f"{key}: expected {_type_name(typ)}, got {value!r} ({source})")
    if want is float:
        return float(value)
    if want is list:
        return list(value)
    return value


def _type_name(typ) -> str:
    return getattr(typ, "__name__", str(typ)).replace("typing.", "")


def check_value(f: dataclasses.Field, value: Any, key: str, source: str) -> None:
    """The range or choices declared with ``option`` for field ``f``."""
    meta = f.metadata
    if value is not None and meta:
        choices = meta.get("choices")
        if choices is not None:
            allowed = list(choices() if callable(choices) else choices)
            if value not in allowed:
                raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))} ({source})")
        lo, hi = meta.get("lo"), meta.get("hi")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (lo is not None or hi is not None):
            below = lo is not None and (value <= lo if meta["lo_open"] else value < lo)
            above = hi is not None and (value >= hi if meta["hi_open"] else value > hi)
            if below or above:
                raise ConfigError(f"{key}: {value!r} is out of range; allowed {_range(meta)} ({source})")


def _range(meta) -> str:
    lo, hi = meta["lo"], meta["hi"]
    if hi is None:
        return f"{'>' if meta['lo_open'] else '>='} {lo}"
    if lo is None:
        return f"{'<' if meta['hi_open'] else '<='} {hi}"
    return f"{'(' if meta['lo_open'] else '['}{lo}, {hi}{')' if meta['hi_open'] else ']'}"


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def load(cls: type, yaml_path: str | Path | None = None, overrides: typing.Iterable[str] = (),
         flags: dict | None = None, base: dict | None = None) -> Any:
    """Defaults <- ``base`` <- YAML file <- ``--set`` overrides <- CLI flags (dotted keys; None = not given)."""
    data = dict(base or {})
    source = "defaults"
    if yaml_path:
        data = merge(data, read_yaml(yaml_path))
        source = str(yaml_path)
    sets = parse_overrides(overrides)
    if sets:
        data = merge(data, sets)
        source = f"{source} + --set" if yaml_path else "--set"
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    if given:
        for key, value in given.items():
            set_path(data, key, value)
        source = f"{source} + flags" if source != "defaults" else "flags"
    return from_dict(cls, data, source)


def help_lines(cls: type, prefix: str = "") -> list[str]:
    """``key (type, default): help`` for every field, for ``--help`` epilogs and docs."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            lines += help_lines(typ, prefix + f.name + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        meta = f.metadata or {}
        extra = f"; allowed {_range(meta)}" if meta.get("lo") is not None or meta.get("hi") is not None else ""
        lines.append(f"{prefix}{f.name} = {json.dumps(default)}: {meta.get('help', '')}{extra}")
    return lines
