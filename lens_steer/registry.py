"""Named extension points: backends, position rules, labellers, steering methods, datasets.

A registry maps a name to a factory. Adding a backend, labeller or method is its own module plus
one `@REGISTRY.register("name")`; CLI choices read `REGISTRY.names()`, so a registration shows
up in `--help` and in error messages without touching anything else.

    from lens_steer.registry import LABELLERS

    @LABELLERS.register("mine")
    def my_labeller(text: str) -> str: ...

`register_lazy("name", "package.module:attr")` registers an object without importing its
module: the import happens at the first `get`. The package's registering module can then name
every extension module in one line each, with no import cycle and no import cost until used
(see docs/architecture.md).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from lens_steer.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class _Lazy:
    """A registered "package.module:attr", imported on first use."""

    target: str

    def load(self) -> Any:
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)


class Registry(Generic[T]):
    """A name -> object table with loud errors for unknown or duplicate names."""

    def __init__(self, kind: str, hint: str = "") -> None:
        self.kind = kind
        self.hint = hint
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None, *, overwrite: bool = False
                 ) -> Callable[[T], T] | T:
        """Register `obj` under `name`; without `obj`, a decorator."""
        def add(o: T) -> T:
            old = self._items.get(name)
            if (name in self._items and not overwrite and old is not o
                    and not isinstance(old, _Lazy)):  # the lazy entry's module registering
                raise ConfigError(f"{self.kind} {name!r} is already registered; pass "
                                  "overwrite=True to replace it")
            self._items[name] = o
            return o
        return add if obj is None else add(obj)

    def register_lazy(self, name: str, target: str, *, overwrite: bool = False) -> None:
        """Register the object at `target` ("package.module:attr") under `name`, imported on
        the first `get(name)`."""
        module, colon, attr = target.partition(":")
        if not (module and colon and attr):
            raise ConfigError(f"lazy {self.kind} {name!r}: target {target!r} must be "
                              "'package.module:attr'")
        if name in self._items and not overwrite:
            raise ConfigError(f"{self.kind} {name!r} is already registered; pass "
                              "overwrite=True to replace it")
        self._items[name] = _Lazy(target)  # type: ignore[assignment]

    def unregister(self, name: str) -> None:
        self._items.pop(name, None)

    def get(self, name: str) -> T:
        if name not in self._items:
            raise ConfigError(f"unknown {self.kind} {name!r}; choose one of {self.names()}"
                              + (f" ({self.hint})" if self.hint else ""))
        item = self._items[name]
        if isinstance(item, _Lazy):
            item = self._items[name] = item.load()
        return item

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


BACKENDS: Registry[Any] = Registry("backend", "register one in lens_steer.backends")
POSITION_RULES: Registry[Any] = Registry("position rule", "see lens_steer.interventions")
LABELLERS: Registry[Any] = Registry("labeller", "see lens_steer.thoughts")
STEERING_METHODS: Registry[Any] = Registry("steering method", "see lens_steer.steering")
DATASETS: Registry[Any] = Registry("dataset", "see lens_steer.eval.datasets")
GRADERS: Registry[Any] = Registry("grader", "a dataset whose answers are not graded by "
                                                  "answer matching, e.g. lens_steer.eval.code")
