"""One resumable map over work units: the loop the search, influence, evaluate and sft-data stages share.

A stage cuts its work into :class:`Unit` s at fixed positions (so a resumed run batches every unit exactly
as an uninterrupted one: batched float arithmetic depends, in the last bits, on what shares a batch). Each
unit names the records it produces; :class:`UnitMap` reads the records already in the stage's JSONL file
(a torn last line is cut off), maps the units that still miss one through the executor, and appends each
unit's new records in unit order as soon as it and every unit before it are done (flushed and fsynced, so a
kill loses at most the units in flight). Progress and cost are kept here, once: each unit's cost (apart
from its process's setup, entered once) goes to the stage's :class:`~dits.artifacts.CostJournal` before its
records, so a stage resumed by another process is charged what an uninterrupted one is.

This is the skip/resume layer that datatrove keeps per pipeline step; it is written here because it has
to speak our executors (:mod:`dits.executor`), ledger and typed records.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel
from tqdm.auto import tqdm

from dits.artifacts import CostJournal, append_jsonl, read_jsonl
from dits.engine.base import Engine
from dits.engine.policy import TrainablePolicy
from dits.executor import Executor, LocalExecutor, Work
from dits.ledger import Ledger, LedgerCounts

__all__ = ["Unit", "UnitMap"]

log = logging.getLogger(__name__)

P = TypeVar("P")
R = TypeVar("R", bound=BaseModel)


@dataclass(frozen=True)
class Unit(Generic[P]):
    """One piece of a stage's work: what its work object is given, and the keys of the records it returns
    (in the order it returns them)."""

    payload: P
    keys: tuple[str, ...]


class UnitMap(Generic[P, R]):
    """The units of a stage against what its file ``path`` already holds (``path`` None: nothing is kept,
    every unit runs).

    ``key(record)`` names a record; ``check(record)`` may refuse one read back (a record for another pool).
    A record on disk that no unit names is kept in the file, ignored and reported once. ``limit`` caps the
    units run by this map (a partial stage, continued by the next call)."""

    def __init__(
        self,
        units: Sequence[Unit[P]],
        path: Path | None,
        record: type[R],
        key: Callable[[R], str],
        *,
        check: Callable[[R], None] | None = None,
        limit: int | None = None,
    ) -> None:
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        self.units, self.path, self.key = list(units), path, key
        self.done: dict[str, R] = {}
        for rec in read_jsonl(path, record, repair=True) if path is not None else []:
            k = key(rec)
            if k in self.done:
                raise ValueError(f"{path} holds {record.__name__} {k!r} twice")
            if check is not None:
                check(rec)
            self.done[k] = rec
        wanted = {k for u in self.units for k in u.keys}
        if len(wanted) != sum(len(u.keys) for u in self.units):
            raise ValueError("two units name the same record")
        extra = len(set(self.done) - wanted)
        if extra:
            log.warning("%s: %d records are for units not in this run; ignored", path, extra)
        self.total = len(wanted)
        self.found = sum(1 for k in wanted if k in self.done)
        self.pending = [u for u in self.units if any(k not in self.done for k in u.keys)]
        if limit is not None:
            self.pending = self.pending[:limit]
        self.spent = LedgerCounts()
        """What the units run by :meth:`run` cost (the ledger's delta across it)."""
        self._bar: Any = None

    def run(
        self,
        work: Work[P, list[R]],
        executor: Executor | None,
        model: Any,
        *,
        engine: Engine,
        initial: Engine | None = None,
        policy: TrainablePolicy | None = None,
        desc: str,
        unit: str,
        progress: bool = True,
    ) -> Iterator[tuple[Unit[P], list[R]]]:
        """Map the pending units through ``executor`` with ``model`` active (``executor`` None: here, on
        ``engine``, ``initial`` and ``policy`` as they are); append each unit's records that are not yet on
        disk; yield ``(unit, new records)`` after each append. ``engine``'s ledger receives every unit's
        cost (a Ray executor adds its workers' to it)."""
        if executor is None:
            executor, model = LocalExecutor.on(engine, initial=initial, policy=policy), None
        ledger: Ledger = engine.ledger
        journal = CostJournal(self.path.parent) if self.path is not None else None
        before = last = ledger.snapshot()
        setup_seen = executor.setup_spent
        bar = self._bar = tqdm(
            total=self.total, initial=self.found, unit=unit, desc=desc, disable=not progress
        )
        try:
            units = self.pending
            for u, records in zip(units, executor.map(work, [u.payload for u in units], model), strict=True):
                if [self.key(r) for r in records] != list(u.keys):
                    raise ValueError(f"{desc}: a unit returned records other than the ones it names")
                new = [r for r in records if self.key(r) not in self.done]
                now, setup = ledger.snapshot(), executor.setup_spent - setup_seen
                setup_seen = executor.setup_spent
                if journal is not None and self.path is not None:  # the cost first: kept with the records
                    if setup != LedgerCounts():
                        journal.offer(f"{self.path.name}:setup", setup)
                    journal.offer(f"{self.path.name}:{u.keys[0]}", now - last - setup)
                    append_jsonl(self.path, new)
                last = now
                for r in new:
                    self.done[self.key(r)] = r
                self.spent = now - before
                bar.update(len(new))
                yield u, new
        finally:
            self.spent = ledger.snapshot() - before
            bar.close()
            self._bar = None

    def postfix(self, **values: Any) -> None:
        """Figures beside the progress bar while :meth:`run` runs."""
        if self._bar is not None:
            self._bar.set_postfix(refresh=True, **values)

    def records(self) -> list[R]:
        """Every unit's records found or made so far, in unit order (a unit not done contributes none)."""
        return [self.done[k] for u in self.units for k in u.keys if k in self.done]

    @property
    def complete(self) -> bool:
        return all(k in self.done for u in self.units for k in u.keys)
