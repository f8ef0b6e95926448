"""Where a stage's work units run: the seam between "what to compute" and "on which engine".

A stage cuts its work into units (search shards, influence chunks, evaluation chunks), hands the executor a
function ``work(engine, unit)`` and the units, and appends the results in unit order as they come back;
the driver alone writes artifacts. :class:`LocalExecutor` runs the units one after another on the run's
engine (the default). A distributed executor (one engine per worker, DESIGN.md section 9) implements the
same :class:`Executor` protocol and yields the results in the same order, so the artifacts do not depend
on where the units ran.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol, TypeVar

from dits.engine.base import Engine

__all__ = ["Executor", "LocalExecutor"]

U = TypeVar("U")
R = TypeVar("R")


class Executor(Protocol):
    def map(self, work: Callable[[Engine, U], R], units: Sequence[U]) -> Iterator[R]:
        """``work(engine, unit)`` for every unit; results in unit order, each as soon as it and every unit
        before it are done (so a consumer that appends them loses nothing finished when it is killed)."""
        ...


class LocalExecutor:
    """Every unit in this process, in order, on the run's engine (``engine()`` is asked per unit: a full
    fine-tune may have replaced it)."""

    def __init__(self, engine: Callable[[], Engine]) -> None:
        self._engine = engine

    def map(self, work: Callable[[Engine, U], R], units: Sequence[U]) -> Iterator[R]:
        for unit in units:
            yield work(self._engine(), unit)
