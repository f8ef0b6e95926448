"""What several benchmarks share that is not statistics (those are :mod:`dits.stats`): resumable
checkpoints of a run's finished parts, the ``--seed`` list, ledger FLOPs, the greedy test evaluation, and
the JSON figures of pooled and paired evaluations.

The benchmarks are scripts (``python benchmarks/NAME.py``): they import this module as ``common``, their
own directory being first on ``sys.path``.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dits.artifacts import write_json_atomic
from dits.config import RunConfig
from dits.engine.hf import HFEngine
from dits.evaluate import EvalRecord, run_method, summarize
from dits.ledger import LedgerCounts
from dits.stats import pooled_ci, pooled_paired_ci
from dits.tasks.example import Example

__all__ = ["Checkpoints", "evaluate", "flops", "paired_difference", "parse_seeds", "pooled_metric", "public"]

log = logging.getLogger("checkpoints")


def parse_seeds(values: list[str]) -> list[int]:
    """``--seed 0 --seed 1`` or ``--seed 0,1,2``: one list, order kept, no repeats."""
    out: list[int] = []
    for v in values:
        for part in v.split(","):
            if part.strip() and int(part) not in out:
                out.append(int(part))
    return out or [0]


def flops(engine: HFEngine, before: LedgerCounts) -> float:
    """The ledger FLOPs the engine spent since ``before`` (a snapshot)."""
    return float(engine.ledger.flops(engine.ledger.snapshot() - before))


def evaluate(engine: HFEngine, test: list[Example], cfg: RunConfig, adapter: str | None) -> dict[str, Any]:
    """Greedy two-agent evaluation with ``adapter`` active (None: the untrained model). The per-task
    metrics and ids are kept under ``_values`` and ``_ids`` for pooled and paired intervals (:func:`public`
    leaves them out of what is printed)."""
    before = engine.ledger.snapshot()
    engine.set_adapter(adapter)
    try:
        transcripts = run_method(engine, test, "mas", cfg.protocol, seed=cfg.seed)
    finally:
        engine.set_adapter(None)
    records = [
        EvalRecord(method="mas", dataset=ex.dataset, split="test", transcript=tr)
        for ex, tr in zip(test, transcripts, strict=True)
    ]
    s = summarize(records)
    return {
        "metric": s.metric.mean,
        "ci95": [s.metric.low, s.metric.high],
        "comm_tokens": s.comm_tokens,
        "n": s.n,
        "stop_reasons": s.stop_reasons,
        "eval_flops": flops(engine, before),
        "_values": [tr.metric for tr in transcripts],
        "_ids": [tr.example_id for tr in transcripts],
    }


def public(entry: dict[str, Any]) -> dict[str, Any]:
    """``entry`` without its private (``_``-prefixed) keys: what a report prints."""
    return {k: v for k, v in entry.items() if not k.startswith("_")}


def pooled_metric(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Across seeds' evaluations (:func:`evaluate`) of one method: the metric and its bootstrap interval
    over every (seed, test task)."""
    ci = pooled_ci([e["_values"] for e in entries])
    return {"metric": ci.mean, "ci95": [ci.low, ci.high]}


def paired_difference(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, Any]:
    """``a − b`` per (seed, test task) of two methods' evaluations: the same test tasks in the same order
    under both, pooled over seeds, with a bootstrap interval, and the per-seed differences of the means."""
    for ea, eb in zip(a, b, strict=True):
        assert ea["_ids"] == eb["_ids"]
    ci = pooled_paired_ci([e["_values"] for e in a], [e["_values"] for e in b])
    return {
        "mean": ci.mean,
        "ci95": [ci.low, ci.high],
        "per_seed": [ea["metric"] - eb["metric"] for ea, eb in zip(a, b, strict=True)],
    }


class Checkpoints:
    """Finished parts of a run as JSON files in ``--work-dir``: a run of hours cut off, or rerun with more
    seeds, redoes only what is missing. Without ``--work-dir`` nothing is kept. A work dir written under
    other result-changing arguments (all but ``not_results``) is refused, naming them."""

    def __init__(
        self, root: Path, args: argparse.Namespace, keep: bool, *, not_results: frozenset[str]
    ) -> None:
        self.root, self.keep = root, keep
        if not keep:
            return
        settings = {k: v for k, v in vars(args).items() if k not in not_results}
        path = root / "settings.json"
        if path.exists():
            old = json.loads(path.read_text())
            old.setdefault("dtype", "float32")  # work dirs from before --dtype ran in float32
            changed = sorted(k for k in settings.keys() | old.keys() if settings.get(k) != old.get(k))
            if changed:
                raise SystemExit(
                    f"{root} holds a run with other settings ({', '.join(changed)}); use another --work-dir"
                )
        else:
            write_json_atomic(path, settings)

    def get(self, name: str, compute: Callable[..., Any], *args: Any) -> Any:
        """The JSON stored under ``name``, or ``compute(*args)``, stored when ``--work-dir`` is kept."""
        path = self.root / "checkpoints" / f"{name}.json"
        if self.keep and path.exists():
            log.info("checkpoint %s: done before, reused", name)
            return json.loads(path.read_text())
        result = compute(*args)
        if self.keep:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, result)
        return result
