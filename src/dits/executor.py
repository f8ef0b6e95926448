"""Where a stage's work units run: the seam between "what to compute" and "on which engine".

A stage cuts its work into units (search shards, influence chunks, evaluation chunks, iSFT sampling
parts), hands the executor a :class:`Work` and the units, and appends the results in unit order as they
come back; the driver alone writes artifacts. A work object is plain data (a dataclass of configs and
records, no engine), so it can be sent to another process; it finds its engines on the
:class:`Workbench` it is called with, where the stage's model is active.

:class:`LocalExecutor` (``executor.kind: local``, the default) runs the units one after another on the
run's engines. :class:`dits.ray_executor.RayExecutor` (``executor.kind: ray``) runs them on long-lived
Ray actors, one engine each, and yields the results in the same order, so the artifacts do not depend on
where the units ran.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from dits.engine.base import Engine
from dits.engine.policy import TrainablePolicy
from dits.ledger import Ledger, LedgerCounts

__all__ = ["EngineBench", "Executor", "ExecutorConfig", "LocalExecutor", "Work", "Workbench"]

U = TypeVar("U")
R = TypeVar("R")


class ExecutorConfig(BaseModel):
    """Where work units run. Not part of any stage's inputs: a run may be resumed under another executor."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    kind: Literal["local", "ray"] = "local"
    workers: int = Field(2, ge=1, description="ray: actors, each holding one engine")
    num_cpus: float = Field(1, ge=0, description="ray: CPUs reserved per actor")
    num_gpus: float = Field(0, ge=0, description="ray: GPUs reserved per actor (vLLM's tensor_parallel_size)")
    threads: int | None = Field(None, ge=1, description="ray: torch threads per actor (default: num_cpus)")
    address: str | None = Field(
        None, description="ray: the cluster to join ('auto', 'ray://host:10001'); None starts a local one"
    )
    max_retries: int = Field(3, ge=0, description="ray: re-runs of a unit whose actor died")


@runtime_checkable
class Workbench(Protocol):
    """The engines of one process, with the stage's model active."""

    def engine(self) -> Engine:
        """Generates and scores."""
        ...

    def initial(self) -> Engine:
        """The initial model (the reward's readability NLLs)."""
        ...

    def policy(self) -> TrainablePolicy:
        """The trainable side (influence estimators)."""
        ...

    @property
    def ledger(self) -> Ledger: ...


class Work(Protocol[U, R]):
    """``work(bench, unit)``; optional ``setup(bench)`` / ``teardown(bench)`` run once per process and map
    (an estimator's preparation, θ's probe adapter) before its first unit and after its last."""

    def __call__(self, bench: Workbench, unit: U, /) -> R: ...


class Executor(Protocol):
    setup_spent: LedgerCounts
    """What the works' per-process setups charged to the run's ledger so far (a setup repeated on further
    workers is not charged): lets a caller tell a unit's own cost from its setup's."""

    def map(self, work: Work[U, R], units: Sequence[U], model: Any = None) -> Iterator[R]:
        """``work(bench, unit)`` for every unit, on a bench with ``model`` (a
        :class:`~dits.stages.context.ModelRef`) active; results in unit order, each as soon as it and
        every unit before it are done (so a consumer that appends them loses nothing finished when it is
        killed)."""
        ...

    def close(self) -> None: ...


class EngineBench:
    """A workbench of engines a caller already holds (the model is whatever they have active)."""

    def __init__(
        self, engine: Engine, *, initial: Engine | None = None, policy: TrainablePolicy | None = None
    ) -> None:
        self._engine, self._initial, self._policy = engine, initial, policy

    def engine(self) -> Engine:
        return self._engine

    def initial(self) -> Engine:
        return self._initial or self._engine

    def policy(self) -> TrainablePolicy:
        policy = self._policy or self._engine
        if not isinstance(policy, TrainablePolicy):
            raise TypeError(f"{type(policy).__name__} cannot train: pass a TrainablePolicy")
        return policy

    @property
    def ledger(self) -> Ledger:
        return self._engine.ledger


def setup(work: Work[Any, Any], bench: Workbench) -> None:
    if hasattr(work, "setup"):
        work.setup(bench)


def teardown(work: Work[Any, Any], bench: Workbench) -> None:
    if hasattr(work, "teardown"):
        work.teardown(bench)


class LocalExecutor:
    """Every unit in this process, in order. ``bench(model)`` is asked once per map (a full fine-tune may
    have replaced the engine between stages)."""

    def __init__(self, bench: Callable[[Any], Workbench]) -> None:
        self._bench = bench
        self.setup_spent = LedgerCounts()

    @classmethod
    def on(cls, engine: Engine, **kw: Any) -> LocalExecutor:
        """Units on ``engine`` (and the ``initial`` / ``policy`` engines of :class:`EngineBench`)."""
        bench = EngineBench(engine, **kw)
        return cls(lambda _model: bench)

    def map(self, work: Work[U, R], units: Sequence[U], model: Any = None) -> Iterator[R]:
        if not units:
            return
        bench = self._bench(model)
        before = bench.ledger.snapshot()
        setup(work, bench)
        self.setup_spent = self.setup_spent + (bench.ledger.snapshot() - before)
        try:
            for unit in units:
                yield work(bench, unit)
        finally:
            teardown(work, bench)

    def close(self) -> None:
        pass
