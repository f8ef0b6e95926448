"""The ``evaluate`` stage: a model on the test split with one method; transcripts and a summary on disk.

Transcripts are appended in chunks (:mod:`dits.stages.units`), so a killed evaluation resumes where it
stopped; the summary is recomputed from the transcripts on disk.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dits.artifacts import EVAL_SUMMARY_FILE, TRANSCRIPTS_FILE, write_json_atomic
from dits.engine.base import Engine
from dits.evaluate import SAMPLED, EvalRecord, EvalSummary, run_method, summarize
from dits.executor import Executor, Workbench
from dits.mas.protocol import ProtocolConfig
from dits.stages.context import ModelRef, StageContext, example_ids
from dits.stages.units import Unit, UnitMap
from dits.tasks.example import Example

__all__ = ["EvaluateChunk", "evaluate_stage", "evaluate_to_dir"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateChunk:
    """The evaluation's work unit: one chunk of test tasks with one method."""

    method: str
    protocol: ProtocolConfig
    k: int
    seed: int

    def __call__(self, bench: Workbench, part: list[Example]) -> list[EvalRecord]:
        trs = run_method(bench.engine(), part, self.method, self.protocol, k=self.k, seed=self.seed)
        return [EvalRecord(method=self.method, dataset=ex.dataset, split=ex.split, transcript=tr)
                for ex, tr in zip(part, trs, strict=True)]  # fmt: skip


def _example_id(record: EvalRecord) -> str:
    return record.transcript.example_id


def evaluate_to_dir(
    engine: Engine,
    examples: Sequence[Example],
    method: str,
    cfg: ProtocolConfig,
    out_dir: str | Path,
    *,
    k: int = 5,
    seed: int = 0,
    chunk: int = 64,
    progress: bool = True,
    executor: Executor | None = None,
    model: ModelRef | None = None,
) -> EvalSummary:
    """Evaluate, appending ``transcripts.jsonl`` chunk by chunk (resumable; chunks of ``chunk`` tasks cut
    at fixed positions), then write ``summary.json``. ``executor`` runs the chunks with ``model`` active
    (default: here, on ``engine``)."""
    out = Path(out_dir)
    path = out / TRANSCRIPTS_FILE
    parts = [examples[i : i + chunk] for i in range(0, len(examples), chunk)]
    units = [Unit(list(part), tuple(example_ids(part))) for part in parts]
    transcripts = UnitMap(units, path, EvalRecord, _example_id)
    t0 = time.perf_counter()
    for _ in transcripts.run(EvaluateChunk(method, cfg, k, seed), executor, model, engine=engine,
                      desc=f"evaluate {method}", unit="task", progress=progress):  # fmt: skip
        pass
    records = transcripts.records()
    summary = summarize(records)
    write_json_atomic(out / EVAL_SUMMARY_FILE, summary.model_dump())
    log.info(
        "%s on %s/%s: metric %.3f [%.3f, %.3f], %.1f comm tokens, %d tasks in %.0fs -> %s",
        method, summary.dataset, summary.split, summary.metric.mean, summary.metric.low, summary.metric.high,
        summary.comm_tokens, summary.n, time.perf_counter() - t0, out,
    )  # fmt: skip
    return summary


def evaluate_stage(
    ctx: StageContext,
    iteration: int | None,
    owner: str | None,
    model: ModelRef,
    test: Sequence[Example],
    *,
    method: str = "mas",
    k: int = 1,
    stage: str = "evaluate",
) -> None:
    """The evaluate stage: ``model`` on ``test`` with the two-agent protocol (``iteration`` None: the
    untrained model), or with another evaluation ``method`` (``k`` samples for ``sc`` / ``mas-sc``) as a
    ``baseline`` or ``scaling`` stage."""
    cfg = ctx.cfg
    inputs = {"model": model.digest, "tasks": example_ids(test), **cfg.sections("protocol")}
    if method != "mas":
        inputs |= {"method": method, "k": k}

    def body(out: Path) -> dict[str, float]:
        engine = ctx.activate(model)
        s = evaluate_to_dir(engine, test, method, cfg.protocol, out, k=k, progress=ctx.progress,
                            executor=ctx.executor, model=model)  # fmt: skip
        counts = {"metric": s.metric.mean, "low": s.metric.low, "high": s.metric.high,
                  "comm_tokens": s.comm_tokens, "n": s.n}  # fmt: skip
        return counts | ({"k": k} if method in SAMPLED else {})

    ctx.run(stage, iteration, owner, inputs, body)
