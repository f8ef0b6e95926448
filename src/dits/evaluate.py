"""Test-set evaluation: the methods, the per-task record, and the summary with a bootstrap interval.

Methods: ``mas`` (the two-agent protocol, greedy), ``mas-sc`` (inference scaling of the two-agent system as
in Optima: k conversations sampled at temperature 0.5, majority vote over their agreed answers), ``cot`` (one
agent, greedy), ``sc`` (self-consistency over k samples), ``debate`` (untrained multi-agent debate).
:mod:`dits.stages.evaluate` runs them into a directory (resumable).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel

from dits.baselines import majority, run_cot, run_debate
from dits.engine.base import Engine
from dits.mas.dialogue import Transcript, run_dialogues
from dits.mas.protocol import ProtocolConfig
from dits.seeding import derive_seed
from dits.stats import Interval, bootstrap_ci
from dits.tasks.example import Example
from dits.tasks.metrics import score_answer

METHODS: tuple[str, ...] = ("mas", "mas-sc", "cot", "sc", "debate")
SAMPLED: frozenset[str] = frozenset({"sc", "mas-sc"})
"""Methods that draw k samples per task (their results depend on k)."""
MAS_SC_TEMPERATURE = 0.5
"""Optima's sampling temperature for the multi-agent self-consistency curve."""


class EvalRecord(BaseModel):
    """One evaluated example: what was asked, by which method, and the transcript."""

    method: str
    dataset: str
    split: str
    transcript: Transcript


class EvalSummary(BaseModel):
    method: str
    dataset: str
    split: str
    n: int
    metric: Interval
    comm_tokens: float
    """Mean communication tokens per task."""
    stop_reasons: dict[str, int]


def paired_metrics(a: Sequence[EvalRecord], b: Sequence[EvalRecord]) -> tuple[list[float], list[float]]:
    """The per-task metrics of two evaluations, aligned by example id; both must cover the same tasks."""
    ma = {r.transcript.example_id: r.transcript.metric for r in a}
    mb = {r.transcript.example_id: r.transcript.metric for r in b}
    if ma.keys() != mb.keys():
        only = sorted(ma.keys() ^ mb.keys())
        raise ValueError(f"the evaluations cover different tasks ({len(only)} not in both, e.g. {only[0]})")
    ids = sorted(ma)
    return [ma[i] for i in ids], [mb[i] for i in ids]


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
    if method == "mas-sc":
        return run_mas_sc(engine, examples, cfg, k=k, seed=seed)
    if method == "cot":
        return run_cot(engine, examples, cfg, seed=seed)
    if method == "sc":
        return run_cot(engine, examples, cfg, k=k, temperature=0.7, seed=seed)
    if method == "debate":
        return run_debate(engine, examples, cfg, seed=seed)
    raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")


def run_mas_sc(
    engine: Engine, examples: Sequence[Example], cfg: ProtocolConfig, *, k: int, seed: int = 0
) -> list[Transcript]:
    """``k`` two-agent conversations per task at temperature 0.5 (one batched dialogue run, each with its
    own seed), the answer the most of them agreed on (a conversation that hit the turn limit has no vote).
    The record's turns are all k conversations' turns in order, so its tokens are what the answer cost."""
    if k < 1:
        raise ValueError(f"mas-sc needs k >= 1 conversations per task, got {k}")
    flat = [ex for ex in examples for _ in range(k)]
    seeds = [derive_seed(seed, "mas-sc", ex.id, j) for ex in examples for j in range(k)]
    convs = run_dialogues(engine, flat, cfg, temperature=MAS_SC_TEMPERATURE, seeds=seeds)
    out = []
    for i, ex in enumerate(examples):
        group = convs[i * k : (i + 1) * k]
        answer = majority(ex, [c.answer if c.stop_reason == "agreed" else None for c in group])
        out.append(
            Transcript(
                example_id=ex.id,
                turns=[t for c in group for t in c.turns],
                stop_reason="answered" if answer is not None else "no_answer",
                answer=answer,
                metric=score_answer(ex, answer),
            )
        )
    return out


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
