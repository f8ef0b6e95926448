"""The ``influence`` stage: score a pool's pairs, chunk by chunk, into ``scores.jsonl`` (resumable).

The pool is cut into chunks of ``influence.chunk_size`` pairs (:func:`~dits.influence.base.chunk_pairs`,
shuffled with ``influence.seed``, so the same pool always gives the same chunks). Each chunk's
:class:`~dits.records.InfluenceScore` is appended (flushed, fsynced) as soon as it is computed, with
its chunk index as ``candidate``; a rerun reads the file back (a torn last line is cut off), checks every
stored chunk against the pool, and scores only the missing ones.

θ is a :class:`~dits.stages.context.Theta` (the lineage's adapter, or the seeded probe LoRA) that any
process can materialise, so chunks can be scored on Ray actors;
the validation tasks come from :func:`~dits.stages.context.validation_tasks`, as they do for the
influence-guided search (with ``influence.warmup_steps``, θ is first trained on the pool, as in the
reference; the guided search, which has no pool yet, does not). ``dits influence`` and the pipeline's
influence stage give the same scores for the same config and pool.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from dits.artifacts import SCORES_FILE, TRAIN_RESULT_FILE, CostJournal, StageIncomplete, read_jsonl
from dits.config import RunConfig
from dits.engine.base import Engine
from dits.executor import Executor, Workbench
from dits.influence import MetricFn, chunk_pairs, make_estimator
from dits.influence.base import InfluenceEstimator
from dits.records import InfluenceScore, PreferencePair, pair_key
from dits.stages.context import (
    ModelRef,
    Product,
    StageContext,
    Theta,
    example_ids,
    probe_shape,
    validation_tasks,
)
from dits.stages.units import Unit, UnitMap
from dits.tasks.example import Example

__all__ = ["InfluenceRun", "ScoreChunk", "influence_stage", "score_pool"]

log = logging.getLogger(__name__)

WARMUP_DIR = "warmup"
"""Where the stage keeps θ's warm-up adapter (``influence.warmup_steps > 0``)."""


def _chunk_check(path: Path, chunks: list[list[PreferencePair]]) -> Callable[[InfluenceScore], None]:
    """Refuses a score read back that is not for this pool's chunk of its index."""

    def check(s: InfluenceScore) -> None:
        i = s.candidate
        if not 0 <= i < len(chunks) or s.pair_ids != [pair_key(p) for p in chunks[i]]:
            raise ValueError(f"{path}: the score of chunk {i} is not for this pool's chunk {i}")

    return check


def _candidate(score: InfluenceScore) -> str:
    return str(score.candidate)


class InfluenceRun(BaseModel):
    """What a scoring call left on disk and what it cost."""

    scores: list[InfluenceScore]
    """Every chunk scored so far (this call's and earlier ones'), in chunk order."""
    chunks: int
    scored_now: int
    flops: float
    """Ledger FLOPs of all the scores on disk plus this call's estimator preparation."""
    seconds: float
    scores_path: str

    @property
    def complete(self) -> bool:
        return len(self.scores) == self.chunks

    def line(self) -> str:
        return (
            f"{len(self.scores)} of {self.chunks} chunks scored ({self.scored_now} now; "
            f"{self.flops:.3g} FLOPs, {self.seconds:.1f}s of estimation); scores: {self.scores_path}"
        )


@dataclass
class ScoreChunk:
    """The influence stage's work unit: one chunk ``(index, pairs)`` scored with an estimator prepared once
    per process on θ (plain data until prepared, so it can be sent to a Ray actor)."""

    run_cfg: RunConfig
    theta: Theta
    val_examples: list[Example]
    metric_fn: MetricFn | None = None
    _est: InfluenceEstimator | None = field(default=None, repr=False)
    _added: str | None = field(default=None, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_est": None, "_added": None}

    def setup(self, bench: Workbench) -> None:
        policy = bench.policy()
        name, added = self.theta.make(policy)
        self._added = name if added else None
        self._est = make_estimator(self.run_cfg.influence, self.metric_fn)
        self._est.prepare(policy, name, self.val_examples, self.run_cfg.protocol)

    def __call__(self, bench: Workbench, unit: tuple[int, list[PreferencePair]]) -> list[InfluenceScore]:
        assert self._est is not None, "setup() prepares the estimator"
        i, chunk = unit
        return [self._est.score([chunk])[0].model_copy(update={"candidate": i})]

    def teardown(self, bench: Workbench) -> None:
        if self._added is not None:
            bench.policy().delete_adapter(self._added)
        self._est = self._added = None


def score_pool(
    engine: Engine,
    pairs: str | Path | Sequence[PreferencePair],
    run_cfg: RunConfig,
    out_dir: str | Path,
    *,
    theta: Theta | str,
    val_examples: Sequence[Example],
    metric_fn: MetricFn | None = None,
    limit: int | None = None,
    progress: bool = True,
    executor: Executor | None = None,
    model: ModelRef | None = None,
) -> InfluenceRun:
    """Score every chunk of ``pairs`` (a ``pairs.jsonl`` or the pairs themselves) with
    ``run_cfg.influence.estimator`` on θ (an adapter name on ``engine``, or a :class:`Theta`) over
    ``val_examples`` into ``out_dir/scores.jsonl``. Safe to call again after a crash: scored chunks are kept
    (each checked against the chunk it claims to score), and the estimator is prepared only if a chunk is
    left. ``limit`` caps the chunks scored by this call. ``executor`` runs the chunks with ``model`` active
    (default: here, on ``engine``, a :class:`TrainablePolicy`); ``engine``'s ledger receives their cost.
    What decides the scores is the caller's to guard (:func:`influence_stage` records it in the stage's
    inputs)."""
    if isinstance(theta, str):
        theta = Theta(name=theta)
    if not val_examples:
        raise ValueError("influence needs at least one validation example")
    icfg = run_cfg.influence
    pool = read_jsonl(pairs, PreferencePair) if isinstance(pairs, str | Path) else list(pairs)
    chunks = chunk_pairs(pool, icfg.chunk_size, icfg.seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / SCORES_FILE
    units = [Unit((i, chunk), (str(i),)) for i, chunk in enumerate(chunks)]
    scores = UnitMap(units, path, InfluenceScore, _candidate, check=_chunk_check(path, chunks), limit=limit)
    found = scores.records()
    on_disk = sum(s.cost.flops for s in found)
    seconds = sum(s.cost.seconds for s in found)
    t0 = time.perf_counter()

    def flops() -> float:  # the scores on disk, and this call's (estimator preparation included)
        return on_disk + engine.ledger.flops(scores.spent)

    work = ScoreChunk(run_cfg, theta, list(val_examples), metric_fn)
    run = scores.run(work, executor, model, engine=engine,
                     desc=f"influence/{icfg.estimator}", unit="chunk", progress=progress)  # fmt: skip
    for _ in run:
        scores.postfix(flops=f"{flops():.3g}")
    result = InfluenceRun(
        scores=scores.records(),
        chunks=len(chunks),
        scored_now=len(scores.pending),
        flops=flops(),
        seconds=round(seconds + time.perf_counter() - t0, 3),
        scores_path=str(path),
    )
    log.info("influence: %s", result.line())
    return result


def _theta(ctx: StageContext, model: ModelRef, pairs: Path, out: Path) -> Theta:
    """θ of the stage: :meth:`Theta.of` (the lineage's adapter, or the seeded probe LoRA), or with
    ``influence.warmup_steps`` the reference's warm-up model: LoRA DPO from ``model`` on the whole pool for
    that many steps, trained here, saved under ``out/warmup`` (a resumed stage uses it instead of training
    again) and charged to the stage; every process loads it from there."""
    cfg = ctx.cfg
    steps = cfg.influence.warmup_steps
    if steps == 0:
        return Theta.of(cfg, model)
    warm, name = out / WARMUP_DIR, "influence-warmup"
    if not (warm / TRAIN_RESULT_FILE).is_file():
        from dits.train import train_dpo

        dpo = cfg.train.dpo.model_copy(update={"max_steps": steps})
        train_cfg = cfg.train.model_copy(update={"full_finetune": False, "dpo": dpo})
        pool = read_jsonl(pairs, PreferencePair)
        init = model.path if model.kind == "adapter" else None
        policy = ctx.policy(model)
        with CostJournal(out).measure("warmup", policy.ledger):
            train_dpo(policy, pool, train_cfg, warm, init_adapter=init, adapter_name=name)
        policy.delete_adapter(name)  # scoring loads the saved one, here as on any worker
    return Theta(name=name, path=str(warm))


def influence_stage(
    ctx: StageContext,
    iteration: int,
    owner: str | None,
    model: ModelRef,
    pairs: Path,
    pairs_digest: str,
    *,
    limit: int | None = None,
) -> Product:
    """The influence stage: every chunk of the pool at ``pairs`` (whose producer's digest is
    ``pairs_digest``) scored on θ of ``model`` over the run's validation tasks."""
    cfg = ctx.cfg
    val = validation_tasks(cfg)
    inputs = {"model": model.digest, "pairs": pairs_digest, "val": example_ids(val),
              **cfg.sections("protocol", "influence"), "probe": probe_shape(cfg, model)}  # fmt: skip
    if cfg.influence.warmup_steps:  # the warm-up θ is trained with the run's LoRA and DPO settings
        inputs["warmup"] = cfg.sections("train")["train"]

    def body(out: Path) -> dict[str, float]:
        theta = _theta(ctx, model, pairs, out)
        run = score_pool(ctx.holder.engine, pairs, cfg, out, theta=theta, val_examples=val, limit=limit,
                         progress=ctx.progress, executor=ctx.executor, model=model)  # fmt: skip
        if not run.complete:  # a --limit cut: the stage is not finished, so no manifest is written
            raise StageIncomplete(run.line())
        scores = run.scores
        mean = sum(s.score for s in scores) / len(scores) if scores else 0.0
        return {"chunks": len(scores), "pairs": sum(len(s.pair_ids) for s in scores), "mean_score": mean}

    return ctx.run("influence", iteration, owner, inputs, body)[0]
