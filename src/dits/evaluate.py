"""Test-set evaluation of a model (or adapter) with one method; transcripts and a summary on disk.

Methods: ``mas`` (the two-agent protocol, greedy), ``cot`` (one agent, greedy), ``sc`` (self-consistency
over k samples), ``debate`` (untrained multi-agent debate). Transcripts are appended in chunks, so a
killed evaluation resumes where it stopped; the summary is recomputed from the transcript file alone.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel
from scipy import stats
from tqdm import tqdm

from dits.baselines import run_cot, run_debate
from dits.engine.base import Engine
from dits.jsonl import append_jsonl, read_jsonl, write_json_atomic
from dits.mas.dialogue import Transcript, run_dialogues
from dits.mas.protocol import ProtocolConfig
from dits.tasks.example import Example

log = logging.getLogger(__name__)

Method = Literal["mas", "cot", "sc", "debate"]
METHODS: tuple[str, ...] = ("mas", "cot", "sc", "debate")


class EvalRecord(BaseModel):
    """One evaluated example: what was asked, by which method, and the transcript."""

    method: str
    dataset: str
    split: str
    transcript: Transcript


class Interval(BaseModel):
    mean: float
    low: float
    high: float


class EvalSummary(BaseModel):
    method: str
    dataset: str
    split: str
    n: int
    metric: Interval
    comm_tokens: float
    """Mean communication tokens per task."""
    stop_reasons: dict[str, int]


def bootstrap_ci(values: Sequence[float], *, confidence: float = 0.95, seed: int = 0) -> Interval:
    """Mean with a percentile bootstrap interval (scipy); a constant sample gives a zero-width interval."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("no values to summarise")
    mean = float(x.mean())
    if x.size == 1 or np.all(x == x[0]):
        return Interval(mean=mean, low=mean, high=mean)
    res = stats.bootstrap(
        (x,), np.mean, confidence_level=confidence, n_resamples=2000, method="percentile", random_state=seed
    )
    return Interval(
        mean=mean, low=float(res.confidence_interval.low), high=float(res.confidence_interval.high)
    )


def summarize(records: Sequence[EvalRecord]) -> EvalSummary:
    if not records:
        raise ValueError("no transcripts to summarise")
    r0 = records[0]
    trs = [r.transcript for r in records]
    return EvalSummary(
        method=r0.method,
        dataset=r0.dataset,
        split=r0.split,
        n=len(trs),
        metric=bootstrap_ci([t.metric for t in trs]),
        comm_tokens=float(np.mean([t.comm_tokens for t in trs])),
        stop_reasons=dict(Counter(t.stop_reason for t in trs)),
    )


def run_method(
    engine: Engine,
    examples: Sequence[Example],
    method: str,
    cfg: ProtocolConfig,
    *,
    k: int = 5,
    seed: int = 0,
) -> list[Transcript]:
    if method == "mas":
        return run_dialogues(engine, examples, cfg, seeds=[seed] * len(examples))
    if method == "cot":
        return run_cot(engine, examples, cfg, seed=seed)
    if method == "sc":
        return run_cot(engine, examples, cfg, k=k, temperature=0.7, seed=seed)
    if method == "debate":
        return run_debate(engine, examples, cfg, seed=seed)
    raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")


def evaluate(
    engine: Engine,
    examples: Sequence[Example],
    method: str,
    cfg: ProtocolConfig,
    out_dir: str | Path,
    *,
    k: int = 5,
    seed: int = 0,
    chunk: int = 16,
    progress: bool = True,
) -> EvalSummary:
    """Evaluate, appending ``transcripts.jsonl`` chunk by chunk (resumable), then write ``summary.json``."""
    out = Path(out_dir)
    path = out / "transcripts.jsonl"
    done = {r.transcript.example_id for r in read_jsonl(path, EvalRecord)}
    todo = [ex for ex in examples if ex.id not in done]
    t0 = time.perf_counter()
    bar = tqdm(
        total=len(examples),
        initial=len(examples) - len(todo),
        desc=f"evaluate {method}",
        disable=not progress,
    )
    for i in range(0, len(todo), chunk):
        part = todo[i : i + chunk]
        trs = run_method(engine, part, method, cfg, k=k, seed=seed)
        append_jsonl(
            path,
            [
                EvalRecord(method=method, dataset=ex.dataset, split=ex.split, transcript=tr)
                for ex, tr in zip(part, trs, strict=True)
            ],
        )
        bar.update(len(part))
    bar.close()
    wanted = {ex.id for ex in examples}
    records = [r for r in read_jsonl(path, EvalRecord) if r.transcript.example_id in wanted]
    summary = summarize(records)
    write_json_atomic(out / "summary.json", summary.model_dump())
    log.info(
        "%s on %s/%s: metric %.3f [%.3f, %.3f], %.1f comm tokens, %d tasks in %.0fs -> %s",
        method, summary.dataset, summary.split, summary.metric.mean, summary.metric.low, summary.metric.high,
        summary.comm_tokens, summary.n, time.perf_counter() - t0, out,
    )  # fmt: skip
    return summary


def format_table(summaries: Sequence[EvalSummary]) -> str:
    """A markdown table, one row per method."""
    rows = [
        "| method | dataset | split | n | metric | 95% CI | comm tokens | stop reasons |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(s.stop_reasons.items()))
        rows.append(
            f"| {s.method} | {s.dataset} | {s.split} | {s.n} | {s.metric.mean:.3f} | "
            f"[{s.metric.low:.3f}, {s.metric.high:.3f}] | {s.comm_tokens:.1f} | {reasons} |"
        )
    return "\n".join(rows)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="evaluate a model on a task split with one or more methods")
    p.add_argument("--model", default="smollm2-135m", help="hub id, local HF dir, .gguf, or smollm2-135m")
    p.add_argument("--adapter", default=None, help="a PEFT LoRA adapter directory to apply")
    p.add_argument("--backend", default="hf", choices=["hf", "vllm"])
    p.add_argument(
        "--dataset", default="facts", help="facts, arith, hotpotqa, 2wiki, triviaqa, cbt, gsm8k, ..."
    )
    p.add_argument("--path", default=None, help="local file or directory in the dataset's original format")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=32, help="number of tasks")
    p.add_argument("--method", action="append", choices=list(METHODS), help="repeatable; default: mas")
    p.add_argument("--k", type=int, default=5, help="samples for sc")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-turns", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--out", default="runs/evaluate", help="output directory (one subdirectory per method)")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from dits.config import TaskConfig
    from dits.engine import make_engine
    from dits.tasks.source import examples_for

    task = TaskConfig(dataset=args.dataset, path=args.path, seed=args.seed)
    examples = examples_for(task, args.split, args.limit)
    overrides = {
        k: v for k, v in (("max_turns", args.max_turns), ("max_new_tokens", args.max_new_tokens)) if v
    }
    cfg = ProtocolConfig(**overrides)
    engine = make_engine(args.backend, args.model)
    if args.adapter:
        engine.load_adapter("eval", args.adapter)
        engine.set_adapter("eval")
    summaries = []
    for method in args.method or ["mas"]:
        out = Path(args.out) / f"{args.dataset}-{args.split}-{method}"
        summaries.append(evaluate(engine, examples, method, cfg, out, k=args.k, seed=args.seed))
    print(format_table(summaries))
    print(f"transcripts and summaries under {args.out}/")
    return 0
