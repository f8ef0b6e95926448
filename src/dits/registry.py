"""Named implementations of one kind, each registered once: the config's allowed values and the command
line's choices are read from the registry, so a new one is its module plus its registration, and nothing
else restates its name.

The registries: :data:`dits.influence.base.ESTIMATORS` (an estimator registers itself by its class
definition), :data:`dits.select.STRATEGIES`, :data:`dits.engine.config.BACKENDS` (filled in
:mod:`dits.engine`), :data:`dits.config.RECIPES`, and :data:`dits.tasks.loaders.DATASETS` (the real
datasets, then the built-in tasks of :data:`dits.tasks.builtin.BUILTIN_DATASETS`).

A config field takes a registered name as ``Annotated[str, AfterValidator(REGISTRY.check)]``: checked when a
config is validated, so an entry a plugin registers after the config class was defined is allowed too."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """``name -> item`` for the config key ``key`` (e.g. ``influence.estimator``). Iterating gives the
    names in registration order, so a registry can be given as argparse ``choices``."""

    def __init__(self, key: str) -> None:
        self.key = key
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register("name")`` on a class or function registers it under ``name``."""

        def add(item: T) -> T:
            self.add(name, item)
            return item

        return add

    def add(self, name: str, item: T) -> None:
        if name in self._items:
            raise ValueError(f"{self.key}: {name!r} is registered twice")
        self._items[name] = item

    def remove(self, name: str) -> None:
        """Unregister ``name`` (a plugin's or a test's temporary entry)."""
        del self._items[name]

    def __getitem__(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"unknown {self.key} {name!r}; known: {', '.join(self._items)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def names(self) -> tuple[str, ...]:
        return tuple(self._items)

    def items(self) -> list[tuple[str, T]]:
        return list(self._items.items())

    def check(self, name: str) -> str:
        """The pydantic check of a config value: ``name`` if registered, else an error with the allowed."""
        if name not in self._items:
            raise ValueError(f"{name!r} is not allowed; allowed values: {', '.join(map(repr, self._items))}")
        return name
