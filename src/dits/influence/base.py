"""What every influence estimator shares (docs/design.md section 7).

The quantity is ``I(z) = M(θ_z) − M(θ)``: ``θ_z`` is the adapter θ after ONE optimizer step of DPO on the
candidate z (a chunk of pairs, a fresh optimizer: :func:`dits.train.step.one_step`), and ``M`` is the mean
task metric on validation tasks disjoint from search and training. The estimators differ only in how they
evaluate ``M(θ_z)``; each restores the adapter bit for bit after every candidate, and each charges what it
costs (ledger FLOPs, seconds) to the score it returns, so "same budget" comparisons are measured.
"""

from __future__ import annotations

import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from dits.engine.policy import TrainablePolicy
from dits.mas.dialogue import Transcript
from dits.mas.protocol import ProtocolConfig
from dits.records import Cost, InfluenceScore, PreferencePair, pair_key
from dits.registry import Registry
from dits.tasks.example import Example

__all__ = [
    "ESTIMATORS",
    "EstimatorName",
    "InfluenceConfig",
    "InfluenceEstimator",
    "MetricFn",
    "chunk_pairs",
    "default_metric",
]

ESTIMATORS: Registry[type[InfluenceEstimator]] = Registry("influence.estimator")
"""Every influence estimator by name (filled as their modules are imported: :mod:`dits.influence` imports
the built-in ones)."""
EstimatorName = Annotated[str, AfterValidator(ESTIMATORS.check)]
"""A config value naming a registered estimator."""

MetricFn = Callable[[Example, Transcript], float]
"""The task metric of one finished conversation (default: the transcript's own ``metric``)."""


def default_metric(example: Example, transcript: Transcript) -> float:
    return transcript.metric


class InfluenceConfig(BaseModel):
    """Influence knobs; the defaults are the reference code's probe (AdamW, lr 5e-5, c 5, V 20)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    estimator: EstimatorName = "rollout"
    chunk_size: int = Field(5, ge=1, description="c: pairs per candidate (one DPO step on the whole chunk)")
    lr: float = Field(5e-5, ge=0)
    beta: float = Field(0.1, gt=0, description="the probe step's DPO β (run config: train.dpo.beta if unset)")
    optimizer: Literal["adamw", "sgd"] = "adamw"
    val_tasks: int = Field(20, ge=1, description="V: validation tasks M averages over")
    samples_per_task: int = Field(
        4,
        ge=1,
        description="K: sampled conversations per task (likelihood, gradient; retention uses the one greedy)",
    )
    temperature: float = Field(0.7, gt=0, description="sampling temperature of the K cached conversations")
    projection_dim: int | None = Field(
        None, ge=1, description="gradient estimator: random Gaussian projection of both gradients to this dim"
    )
    step_geometry: Literal["sgd", "optimizer"] = Field(
        "sgd",
        description="gradient estimator: the first-order step is -lr·∇L ('sgd'), or the configured "
        "optimizer's first step ('optimizer': for a fresh AdamW, -lr·∇L/(|∇L|+ε) per entry)",
    )
    warmup_steps: int = Field(
        0,
        ge=0,
        description="θ of the influence stage: the lineage's model after this many LoRA DPO steps on the "
        "whole pool (the reference probes from such a warm-up model, 50 steps); 0: the lineage's model",
    )
    seed: int = 0


def chunk_pairs(pairs: Sequence[PreferencePair], c: int, seed: int | None = 0) -> list[list[PreferencePair]]:
    """Candidates of ``c`` pairs each (the last may be shorter). With a seed the pairs are shuffled first
    (seeded, so the same call gives the same chunks), so a chunk does not hold one tree's pairs only;
    ``seed=None`` keeps the given order."""
    if c < 1:
        raise ValueError(f"chunk size must be >= 1, got {c}")
    order = list(pairs)
    if seed is not None:
        random.Random(seed).shuffle(order)
    return [order[i : i + c] for i in range(0, len(order), c)]


@contextmanager
def metered(engine: TrainablePolicy) -> Iterator[Cost]:
    """Fill a :class:`Cost` with the ledger FLOPs and seconds spent inside the block."""
    cost = Cost()
    before = engine.ledger.snapshot()
    t0 = time.perf_counter()
    try:
        yield cost
    finally:
        cost.seconds = time.perf_counter() - t0
        cost.flops = float(engine.ledger.flops(engine.ledger.snapshot() - before))


@contextmanager
def active_adapter(engine: TrainablePolicy, name: str) -> Iterator[None]:
    """Run with adapter ``name`` active, then put back whatever was active before."""
    previous = engine.active_adapter
    engine.set_adapter(name)
    try:
        yield
    finally:
        engine.set_adapter(previous)


class InfluenceEstimator(ABC):
    """One interface for every estimator: baseline work once in :meth:`prepare`, then :meth:`score`.

    A subclass registers itself under the name it is defined with, ``class Mine(InfluenceEstimator,
    name="mine")``: that name is then an allowed ``influence.estimator`` (and, unless ``guides=False``, an
    allowed ``guide.estimator``) and a choice of the command line."""

    name: ClassVar[str] = ""
    guides: ClassVar[bool] = True
    """Cheap enough to score pairs inside the search (influence-guided search)."""

    def __init_subclass__(cls, name: str | None = None, guides: bool = True, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if name is not None:
            cls.name, cls.guides = name, guides
            ESTIMATORS.add(name, cls)

    def __init__(self, cfg: InfluenceConfig, metric_fn: MetricFn | None = None) -> None:
        self.cfg = cfg
        self.metric_fn: MetricFn = metric_fn or default_metric
        self.engine: TrainablePolicy = None  # type: ignore[assignment]
        """The :class:`~dits.engine.policy.TrainablePolicy` θ lives on (set by :meth:`prepare`)."""
        self.adapter: str = ""
        self.examples: list[Example] = []
        self.protocol = ProtocolConfig()
        self.prepare_cost = Cost()

    def prepare(
        self,
        engine: TrainablePolicy,
        adapter_name: str,
        val_examples: Sequence[Example],
        protocol_cfg: ProtocolConfig | None = None,
    ) -> None:
        """Do the once-per-θ work (baseline metric, cached conversations, validation gradient)."""
        if not val_examples:
            raise ValueError("influence needs at least one validation example")
        self.engine, self.adapter = engine, adapter_name
        self.examples = list(val_examples)
        self.protocol = protocol_cfg or ProtocolConfig()
        with metered(engine) as cost, active_adapter(engine, adapter_name):
            self._prepare()
        self.prepare_cost = cost

    def score(self, chunks: Sequence[Sequence[PreferencePair]]) -> list[InfluenceScore]:
        """One score per chunk, in order; the adapter is exactly θ again after each."""
        if self.engine is None:
            raise RuntimeError("call prepare() before score()")
        out = []
        for i, chunk in enumerate(chunks):
            if not chunk:
                raise ValueError(f"chunk {i} is empty")
            with metered(self.engine) as cost:
                value, diag = self._score_chunk(list(chunk))
            out.append(
                InfluenceScore(
                    candidate=i,
                    pair_ids=[pair_key(p) for p in chunk],
                    score=float(value),
                    estimator=self.name,
                    cost=cost,
                    diagnostics=diag,
                )
            )
        return out

    def step(self, chunk: list[PreferencePair]) -> Any:
        """θ_z: one DPO step on the chunk (a handle that restores θ on exit)."""
        from dits.train.step import one_step

        return one_step(
            self.engine,
            self.adapter,
            chunk,
            lr=self.cfg.lr,
            beta=self.cfg.beta,
            optimizer=self.cfg.optimizer,
        )

    @abstractmethod
    def _prepare(self) -> None: ...

    @abstractmethod
    def _score_chunk(self, chunk: list[PreferencePair]) -> tuple[float, dict[str, float]]: ...
