"""The ``influence`` stage: score a pool's pairs, chunk by chunk, into ``scores.jsonl`` (resumable).

The pool is cut into chunks of ``influence.chunk_size`` pairs (:func:`~dits.influence.base.chunk_pairs`,
shuffled with ``influence.seed``, so the same pool always gives the same chunks). Each chunk's
:class:`~dits.records.InfluenceScore` is appended (flushed, fsynced) as soon as it is computed, with
its chunk index as ``candidate``; a rerun reads the file back (a torn last line is cut off), checks every
stored chunk against the pool, and scores only the missing ones.

θ and the validation tasks come from :mod:`dits.stages.context` (:func:`influence_theta`,
:func:`validation_tasks`), as they do for the influence-guided search (with ``influence.warmup_steps``,
θ is first trained on the pool, as in the reference; the guided search, which has no pool yet, does not):
``dits influence`` and the pipeline's influence stage give the same scores for the same config and pool.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel
from tqdm.auto import tqdm

from dits.artifacts import SCORES_FILE, TRAIN_RESULT_FILE, StageIncomplete, append_jsonl, read_jsonl
from dits.config import RunConfig
from dits.engine.base import Engine
from dits.engine.policy import TrainablePolicy
from dits.executor import Executor, LocalExecutor
from dits.influence import MetricFn, chunk_pairs, make_estimator
from dits.records import InfluenceScore, PreferencePair, pair_key
from dits.stages.context import (
    ModelRef,
    Product,
    StageContext,
    example_ids,
    influence_theta,
    probe_shape,
    validation_tasks,
)
from dits.tasks.example import Example

__all__ = ["InfluenceRun", "influence_stage", "score_pool"]

log = logging.getLogger(__name__)

WARMUP_DIR = "warmup"
"""Where the stage keeps θ's warm-up adapter (``influence.warmup_steps > 0``)."""


def _scored_chunks(path: Path, chunks: list[list[PreferencePair]]) -> dict[int, InfluenceScore]:
    """Scores already on disk by chunk index, each checked against the chunk it claims to score."""
    done: dict[int, InfluenceScore] = {}
    for s in read_jsonl(path, InfluenceScore):
        i = s.candidate
        if not 0 <= i < len(chunks) or s.pair_ids != [pair_key(p) for p in chunks[i]]:
            raise ValueError(f"{path}: the score of chunk {i} is not for this pool's chunk {i}")
        if i in done:
            raise ValueError(f"{path} holds chunk {i} twice")
        done[i] = s
    return done


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


def score_pool(
    engine: TrainablePolicy,
    pairs: str | Path | Sequence[PreferencePair],
    run_cfg: RunConfig,
    out_dir: str | Path,
    *,
    adapter: str,
    val_examples: Sequence[Example],
    metric_fn: MetricFn | None = None,
    limit: int | None = None,
    progress: bool = True,
    executor: Executor | None = None,
) -> InfluenceRun:
    """Score every chunk of ``pairs`` (a ``pairs.jsonl`` or the pairs themselves) with
    ``run_cfg.influence.estimator`` on θ = adapter ``adapter`` over ``val_examples`` into
    ``out_dir/scores.jsonl``. Safe to call again after a crash: scored chunks are kept (each checked against
    the chunk it claims to score), and the estimator is prepared only if a chunk is left. ``limit`` caps
    the chunks scored by this call. What decides the scores is the caller's to guard
    (:func:`influence_stage` records it in the stage's inputs)."""
    executor = executor or LocalExecutor(lambda: engine)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if not val_examples:
        raise ValueError("influence needs at least one validation example")
    icfg = run_cfg.influence
    pool = read_jsonl(pairs, PreferencePair, repair=False) if isinstance(pairs, str | Path) else list(pairs)
    chunks = chunk_pairs(pool, icfg.chunk_size, icfg.seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / SCORES_FILE
    done = _scored_chunks(path, chunks)
    todo = [i for i in range(len(chunks)) if i not in done]
    if limit is not None:
        todo = todo[:limit]
    flops = sum(s.cost.flops for s in done.values())
    seconds = sum(s.cost.seconds for s in done.values())
    bar = tqdm(
        total=len(chunks), initial=len(done), unit="chunk", desc=f"influence/{icfg.estimator}",
        disable=not progress,
    )  # fmt: skip

    def show() -> None:
        bar.set_postfix(flops=f"{flops:.3g}", seconds=f"{seconds:.1f}", refresh=True)

    show()
    try:
        if todo:
            est = make_estimator(icfg, metric_fn)
            est.prepare(engine, adapter, val_examples, run_cfg.protocol)
            flops += est.prepare_cost.flops
            seconds += est.prepare_cost.seconds
            show()

            def work(_engine: Engine, i: int) -> InfluenceScore:  # θ lives on the driver's engine
                return est.score([chunks[i]])[0].model_copy(update={"candidate": i})

            for i, s in zip(todo, executor.map(work, todo), strict=True):
                append_jsonl(path, [s])
                done[i] = s
                flops += s.cost.flops
                seconds += s.cost.seconds
                bar.update(1)
                show()
    finally:
        bar.close()
    run = InfluenceRun(
        scores=[done[i] for i in sorted(done)],
        chunks=len(chunks),
        scored_now=len(todo),
        flops=flops,
        seconds=round(seconds, 3),
        scores_path=str(path),
    )
    log.info("influence: %s", run.line())
    return run


@contextmanager
def _theta(engine: TrainablePolicy, cfg: RunConfig, model: ModelRef, pairs: Path, out: Path) -> Iterator[str]:
    """θ of the stage: :func:`influence_theta`, or with ``influence.warmup_steps`` the reference's warm-up
    model: LoRA DPO from ``model`` on the whole pool for that many steps, saved under ``out/warmup`` (a
    resumed stage loads it instead of training again) and charged to the stage."""
    steps = cfg.influence.warmup_steps
    if steps == 0:
        with influence_theta(engine, cfg, model) as theta:
            yield theta
        return
    from dits.train import train_dpo

    warm, name = out / WARMUP_DIR, "influence-warmup"
    if (warm / TRAIN_RESULT_FILE).is_file():
        engine.load_adapter(name, str(warm))
    else:
        dpo = cfg.train.dpo.model_copy(update={"max_steps": steps})
        train_cfg = cfg.train.model_copy(update={"full_finetune": False, "dpo": dpo})
        pool = read_jsonl(pairs, PreferencePair, repair=False)
        init = model.path if model.kind == "adapter" else None
        train_dpo(engine, pool, train_cfg, warm, init_adapter=init, adapter_name=name)
    try:
        yield name
    finally:
        engine.delete_adapter(name)


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
        engine = ctx.policy(model)  # the estimators train θ one step or differentiate through it
        with _theta(engine, cfg, model, pairs, out) as theta:
            run = score_pool(engine, pairs, cfg, out, adapter=theta, val_examples=val, limit=limit,
                             progress=ctx.progress, executor=ctx.executor)  # fmt: skip
        if not run.complete:  # a --limit cut: the stage is not finished, so no manifest is written
            raise StageIncomplete(run.line())
        scores = run.scores
        mean = sum(s.score for s in scores) / len(scores) if scores else 0.0
        return {"chunks": len(scores), "pairs": sum(len(s.pair_ids) for s in scores), "mean_score": mean}

    return ctx.run("influence", iteration, owner, inputs, body)[0]
