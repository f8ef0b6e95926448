"""``executor.kind: ray``: work units on long-lived Ray actors, one engine each (docs/design.md section 9).

Each actor holds an engine holder built from the run's config (so the same model, and any lineage adapter
or full fine-tuned weights loaded from the path in the stage's model reference: the run directory must be
readable by every node, e.g. a shared filesystem). The driver sends each actor the stage's work object
once per map, then units one at a time, keeps every actor busy, and yields the results in unit order, so
the stage appends exactly what a ``local`` run appends. Nothing is written by an actor.

Compute stays on the run's one ledger: each unit's ledger delta comes back with its result and is added
to the driver's ledger. A work object's per-process setup (an estimator's preparation) is charged once, as
a local run charges it; its repetitions on the other actors are execution overhead, logged but not
charged, so an equal-compute comparison (``q-budget``) does not depend on the number of workers.

An actor that dies mid-unit (killed process, lost node) is replaced by a fresh one and its unit is sent
again (``executor.max_retries`` times at most); results are keyed by unit, so nothing is duplicated.
Ray moves work objects and results between processes with its own (cloud)pickle transport; that is
process-to-process traffic of this run only, never an artifact on disk.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from dits.executor import ExecutorConfig, Work, Workbench, setup, teardown
from dits.ledger import Ledger, LedgerCounts

__all__ = ["RayExecutor"]

log = logging.getLogger(__name__)

U = TypeVar("U")
R = TypeVar("R")

PASSED_ENV = ("DITS_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
"""Environment variables the driver passes on to the actors (model caches and offline switches)."""


class _Worker:
    """The actor: one engine holder, the current map's work object and workbench."""

    def __init__(self, holder: Callable[[], Any], threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self._holder = holder()
        self._key: int | None = None
        self._work: Any = None
        self._bench: Workbench | None = None

    def pid(self) -> int:
        return os.getpid()

    def begin(self, key: int, work: Any, model: Any, bench: Callable[[Any, Any], Workbench]) -> LedgerCounts:
        """Take the map ``key``'s work and run its setup; returns what the setup charged."""
        self.end(self._key)
        b = bench(self._holder, model)
        before = b.ledger.snapshot()
        setup(work, b)
        self._key, self._work, self._bench = key, work, b
        return b.ledger.snapshot() - before

    def run(self, key: int, unit: Any) -> tuple[Any, LedgerCounts]:
        assert key == self._key and self._bench is not None, "begin() the map first"
        before = self._bench.ledger.snapshot()
        result = self._work(self._bench, unit)
        return result, self._bench.ledger.snapshot() - before

    def end(self, key: int | None) -> None:
        if key is not None and key == self._key and self._bench is not None:
            teardown(self._work, self._bench)
            self._key = self._work = self._bench = None


class RayExecutor:
    """Units on ``settings.workers`` Ray actors. ``holder()`` builds an actor's engine holder, ``bench(holder,
    model)`` its workbench with a stage's model active; ``ledger()`` is the driver's ledger. Ray starts (or
    joins ``settings.address``) on the first map."""

    def __init__(
        self,
        settings: ExecutorConfig,
        *,
        holder: Callable[[], Any],
        bench: Callable[[Any, Any], Workbench],
        ledger: Callable[[], Ledger],
    ) -> None:
        self.settings = settings
        self._holder, self._bench, self._ledger = holder, bench, ledger
        self._actors: list[Any] = []
        self._pids: list[int] = []
        self._busy: dict[int, int] = {}
        """Actor slot -> the unit it is running."""
        self._owns_ray = False
        self._keys = itertools.count()
        self.replaced = 0
        """Actors replaced after dying (the run's count)."""
        self.setup_overhead_flops = 0.0
        self.setup_spent = LedgerCounts()
        """FLOPs of setups repeated on more than one actor (run, not charged to any stage)."""

    # -- the actors ---------------------------------------------------------------------------------

    def _start(self) -> None:
        if self._actors:
            return
        import ray

        s = self.settings
        if not ray.is_initialized():
            if s.address is None:
                ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
            else:
                ray.init(address=s.address, log_to_driver=False, logging_level=logging.WARNING)
            self._owns_ray = True
        have = ray.cluster_resources()
        for key, need in (("CPU", s.num_cpus), ("GPU", s.num_gpus)):
            if need and have.get(key, 0.0) < need * s.workers:
                raise ValueError(
                    f"executor: {s.workers} workers x {need} {key}s (executor.workers, executor.num_"
                    f"{key.lower()}s) do not fit the Ray cluster's {have.get(key, 0.0):g} {key}s"
                )
        self._actors = [self._new_actor() for _ in range(s.workers)]
        self._pids = ray.get([a.pid.remote() for a in self._actors])
        log.info("ray executor: %d actors (pids %s) on %s", s.workers, self._pids, s.address or "a local Ray")

    def _new_actor(self) -> Any:
        import ray

        s = self.settings
        threads = s.threads or max(1, int(s.num_cpus))
        env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        env |= {"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        actor = ray.remote(_Worker).options(
            num_cpus=s.num_cpus, num_gpus=s.num_gpus, max_restarts=0, runtime_env={"env_vars": env}
        )
        return actor.remote(self._holder, threads)

    def _replace(self, slot: int) -> None:
        import ray

        ray.kill(self._actors[slot], no_restart=True)
        self._actors[slot] = self._new_actor()
        self._pids[slot] = ray.get(self._actors[slot].pid.remote())
        self.replaced += 1

    def in_flight(self) -> dict[int, int]:
        """Process id -> the unit it is running now (for monitoring, and tests that kill a worker)."""
        return {self._pids[slot]: unit for slot, unit in list(self._busy.items())}

    # -- the map ------------------------------------------------------------------------------------

    def map(self, work: Work[U, R], units: Sequence[U], model: Any = None) -> Iterator[R]:
        if not units:
            return
        import ray
        from ray.exceptions import RayActorError

        self._start()
        key = next(self._keys)
        work_ref = ray.put(work)
        pending = deque(range(len(units)))
        tries = dict.fromkeys(range(len(units)), 0)
        results: dict[int, R] = {}
        begun: set[int] = set()
        setups: dict[Any, int] = {}
        running: dict[Any, tuple[int, int]] = {}
        charged = False
        nxt = 0
        try:
            while nxt < len(units):
                for slot in range(len(self._actors)):
                    if slot in self._busy or not pending:
                        continue
                    i = pending.popleft()
                    actor = self._actors[slot]
                    if slot not in begun:  # calls to one actor run in order: begin, then the unit
                        setups[actor.begin.remote(key, work_ref, model, self._bench)] = slot
                        begun.add(slot)
                    running[actor.run.remote(key, units[i])] = (slot, i)
                    self._busy[slot] = i
                (ref,), _ = ray.wait([*setups, *running], num_returns=1)
                if ref in setups:
                    slot = setups.pop(ref)
                    try:
                        spent: LedgerCounts = ray.get(ref)
                    except RayActorError:
                        continue  # its unit fails too, and is re-sent there
                    if charged:
                        self.setup_overhead_flops += self._ledger().flops(spent)
                    else:
                        self._ledger().add(spent)
                        self.setup_spent = self.setup_spent + spent
                        charged = True
                    continue
                slot, i = running.pop(ref)
                del self._busy[slot]
                try:
                    result, spent = ray.get(ref)
                except RayActorError as err:
                    tries[i] += 1
                    if tries[i] > self.settings.max_retries:
                        raise RuntimeError(f"unit {i} lost its worker {tries[i]} times; giving up") from err
                    log.warning("ray executor: the worker running unit %d died (%s); re-running it on a "
                                "new worker", i, type(err).__name__)  # fmt: skip
                    for r in [r for r, s in setups.items() if s == slot]:
                        del setups[r]
                    begun.discard(slot)
                    self._replace(slot)
                    pending.appendleft(i)
                    continue
                self._ledger().add(spent)
                results[i] = result
                while nxt in results:
                    yield results.pop(nxt)
                    nxt += 1
        finally:
            self._busy.clear()
            for slot in begun:
                self._actors[slot].end.remote(key)  # after whatever it still runs; nothing waits on it

    def close(self) -> None:
        if not self._actors:
            return
        import ray

        for actor in self._actors:
            ray.kill(actor, no_restart=True)
        self._actors, self._pids = [], []
        if self.setup_overhead_flops:
            log.info("ray executor: %.3g FLOPs of setup repeated on other workers (not charged to stages)",
                     self.setup_overhead_flops)  # fmt: skip
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False
