"""Name -> declaration registries (sparsity methods, model families, tasks, metrics): what makes
adding one a module plus one ``register`` call, with the same errors everywhere."""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(dict, Generic[T]):
    """A dict of declarations by name that refuses silent replacement and names what exists."""

    def __init__(self, kind: str, plural: str | None = None):
        super().__init__()
        self.kind, self.plural = kind, plural or f"{kind}s"

    def register(self, name: str, item: T, replace: bool = False) -> T:
        if name in self and self[name] is not item and not replace:
            raise ValueError(f"{self.kind} {name!r} is already registered; pass replace=True to replace it")
        self[name] = item
        return item

    def lookup(self, name: str) -> T:
        try:
            return self[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; registered {self.plural}: {sorted(self)}") from None
