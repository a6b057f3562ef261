"""Name -> declaration registries (sparsity methods, model families, tasks, metrics, pruners): what makes
adding one a module plus one ``register`` call, with the same errors everywhere.

Installed packages add to them through entry points (plugins), one group per registry:
``sparselm.methods`` (a ``Sparsifier`` subclass), ``sparselm.families`` (a ``ModelFamily``
instance), ``sparselm.tasks`` (a ``Task``), ``sparselm.metrics`` (a ``Metric``), ``sparselm.pruners``
and ``sparselm.refiners`` (a ``Pruner`` / ``Refiner`` subclass). An entry point's
object is passed to the registry's register function (``register_method``, ``register_family``,
...) and is registered under the object's own ``name``; an entry point naming a module instead
(``mod`` rather than ``mod:obj``) is imported, and its import registers whatever it declares.

Plugins load once per registry, on its first read (a lookup, ``in``, a listing such as the CLI's
``--method`` choices), never at import, so ``import sparselm`` stays cheap and a broken plugin
only matters where it is used. A plugin that fails to import or to register, or that would replace
a name already registered (built-in, or registered by the program before plugins load), is named
in one warning on the ``sparselm`` logger and skipped: nothing it registered here stays, and the other
plugins and the CLI work as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from importlib.metadata import EntryPoint, entry_points
from types import MappingProxyType, ModuleType
from typing import Generic, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


class Registry(MutableMapping, Generic[T]):
    """A mapping of declarations by name that refuses silent replacement, names what exists, and
    loads the plugins of its entry-point group before its first read."""

    def __init__(self, kind: str, plural: str | None = None, entry_points: str | None = None):
        self.kind, self.plural = kind, plural or f"{kind}s"
        self.group = entry_points
        self._items: dict[str, T] = {}
        self._register: Callable[[T], object] = lambda item: self.register(item.name, item)
        self._plugins_loaded = entry_points is None
        self._loading: EntryPoint | None = None  # the plugin being loaded, if any

    def registrar(self, fn: Callable[..., T]) -> Callable[..., T]:
        """Decorator: ``fn(item)`` is how a plugin's object gets registered (default: by ``item.name``)."""
        self._register = fn
        return fn

    def register(self, name: str, item: T, replace: bool = False) -> T:
        if not replace and self._loading is None and self._taken(name, item):
            raise ValueError(f"{self.kind} {name!r} is already registered; pass replace=True to replace it")
        self[name] = item
        return item

    def _taken(self, name: str, item: T) -> bool:
        return name in self._items and self._items[name] is not item

    def lookup(self, name: str) -> T:
        try:
            return self[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; registered {self.plural}: {sorted(self)}") from None

    @property
    def declared(self) -> Mapping[str, T]:
        """What is registered so far, without loading plugins: for register functions' own checks,
        which run while the built-ins are being declared."""
        return MappingProxyType(self._items)

    # ---- reads load the plugins first; writes do not ------------------------------------------
    def __getitem__(self, name: str) -> T:
        self.load_plugins()
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        self.load_plugins()
        return iter(self._items)

    def __len__(self) -> int:
        self.load_plugins()
        return len(self._items)

    def __contains__(self, name: object) -> bool:
        self.load_plugins()
        return name in self._items

    def __setitem__(self, name: str, item: T) -> None:
        if self._loading is not None and self._taken(name, item):  # replace=True or not
            raise ValueError(f"{self.kind} {name!r} is already registered; a plugin cannot replace it: give it another name")
        self._items[name] = item

    def __delitem__(self, name: str) -> None:
        del self._items[name]

    def clear(self) -> None:
        self._items.clear()

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self._items!r})"

    # ---- plugins ---------------------------------------------------------------------------
    def load_plugins(self) -> None:
        """Register the objects of this registry's entry points (once; later calls do nothing)."""
        if self._plugins_loaded:
            return
        self._plugins_loaded = True  # first, so that a plugin reading this registry does not recurse
        for ep in entry_points(group=self.group):
            self._load_plugin(ep)

    def _load_plugin(self, ep: EntryPoint) -> None:
        before = dict(self._items)
        self._loading = ep
        try:
            obj = ep.load()
            if not isinstance(obj, ModuleType):
                self._register(obj)
        except Exception as e:  # a broken plugin must not break sparselm
            self._items.clear()
            self._items.update(before)
            dist = f"{ep.dist.name} {ep.dist.version}" if getattr(ep, "dist", None) else "unknown"
            log.warning("plugin %r (entry point %s: %s = %s, of distribution %s) failed to load: %s: %s; skipped",
                        ep.name, ep.group, ep.name, ep.value, dist, type(e).__name__, e)
        finally:
            self._loading = None
