"""``dits influence``: score a pool of preference pairs, chunk by chunk, into ``scores.jsonl`` (resumable).

The pool is cut into chunks of ``influence.chunk_size`` pairs (:func:`~dits.influence.base.chunk_pairs`,
shuffled with ``influence.seed``, so the same pool always gives the same chunks). Each chunk's
:class:`~dits.influence.base.InfluenceScore` is appended (flushed, fsynced) as soon as it is computed, with
its chunk index as ``candidate``; a rerun reads the file back (a torn last line is cut off), checks every
stored chunk against the pool, and scores only the missing ones. ``influence.json`` holds the digest of what
decides the scores (the influence and protocol sections, the model, the pool, θ's exact tensors, the
validation task ids); a rerun under anything else is refused rather than mixing scores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from tqdm.auto import tqdm

from dits.config import RunConfig, load_config, parse_overrides
from dits.influence import InfluenceScore, MetricFn, chunk_pairs, make_estimator, pair_key
from dits.influence.inputs import adapter_digest, load_theta, probe_adapter, validation_examples
from dits.jsonl import append_jsonl, check_manifest, read_jsonl
from dits.search.pairs import PairCandidate
from dits.synthesize import engine_from_config, read_pairs
from dits.tasks.example import Example

__all__ = [
    "MANIFEST_FILE",
    "SCORES_FILE",
    "InfluenceRun",
    "add_parser",
    "read_scores",
    "run_influence",
    "score_pairs_file",
]

log = logging.getLogger(__name__)

SCORES_FILE = "scores.jsonl"
MANIFEST_FILE = "influence.json"


def read_scores(path: str | Path, *, repair: bool = False) -> list[InfluenceScore]:
    """The scores of a ``scores.jsonl`` in file order (``repair`` cuts a torn last line off the file)."""
    return read_jsonl(path, InfluenceScore, repair=repair)


def _pool_digest(pairs: Sequence[PairCandidate]) -> str:
    h = hashlib.sha256()
    for p in pairs:
        h.update(p.model_dump_json().encode() + b"\n")
    return h.hexdigest()[:16]


def _scored_chunks(path: Path, chunks: list[list[PairCandidate]]) -> dict[int, InfluenceScore]:
    """Scores already on disk by chunk index, each checked against the chunk it claims to score."""
    done: dict[int, InfluenceScore] = {}
    for s in read_scores(path, repair=True):
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


def run_influence(
    engine: Any,
    pairs: str | Path | Sequence[PairCandidate],
    run_cfg: RunConfig,
    out_dir: str | Path,
    *,
    adapter: str,
    val_examples: Sequence[Example] | None = None,
    metric_fn: MetricFn | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> InfluenceRun:
    """Score every chunk of ``pairs`` (a ``pairs.jsonl`` or the pairs themselves) with
    ``run_cfg.influence.estimator`` on θ = adapter ``adapter`` into ``out_dir/scores.jsonl``. Safe to call
    again after a crash: scored chunks are kept, and the estimator is prepared only if a chunk is left.
    ``val_examples`` defaults to the ``task.dev`` split; ``limit`` caps the chunks scored by this call."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    icfg = run_cfg.influence
    pool = read_pairs(pairs) if isinstance(pairs, str | Path) else list(pairs)
    chunks = chunk_pairs(pool, icfg.chunk_size, icfg.seed)
    val = list(val_examples) if val_examples is not None else validation_examples(run_cfg.task)
    if not val:
        raise ValueError("influence needs at least one validation example")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    inputs = {
        "influence": icfg.model_dump(mode="json"),
        "protocol": run_cfg.protocol.model_dump(mode="json"),
        "engine": run_cfg.engine.model_dump(mode="json", include={"backend", "model", "dtype"}),
        "pool": _pool_digest(pool),
        "theta": adapter_digest(engine, adapter),
        "validation": [ex.id for ex in val],
        "metric": "task" if metric_fn is None else getattr(metric_fn, "__qualname__", repr(metric_fn)),
    }
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    check_manifest(out / MANIFEST_FILE, digest, inputs, "influence scores")

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
            est.prepare(engine, adapter, val, run_cfg.protocol)
            flops += est.prepare_cost.flops
            seconds += est.prepare_cost.seconds
            show()
            for i in todo:
                s = est.score([chunks[i]])[0].model_copy(update={"candidate": i})
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


def score_pairs_file(
    engine: Any,
    pairs: str | Path | Sequence[PairCandidate],
    run_cfg: RunConfig,
    out_dir: str | Path,
    *,
    adapter: str,
    val_examples: Sequence[Example] | None = None,
    metric_fn: MetricFn | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> list[InfluenceScore]:
    """:func:`run_influence`, returning the scores only (every chunk's, in chunk order)."""
    return run_influence(
        engine, pairs, run_cfg, out_dir, adapter=adapter, val_examples=val_examples, metric_fn=metric_fn,
        limit=limit, progress=progress,
    ).scores  # fmt: skip


# -- command line ----------------------------------------------------------------------------------


def cmd_influence(args: argparse.Namespace) -> int:
    """Handler of ``dits influence``."""
    cfg = load_config(args.config, parse_overrides(args.set or []))
    pairs = read_pairs(args.pairs)
    engine = engine_from_config(cfg.engine)
    if args.adapter:
        adapter = load_theta(engine, args.adapter)
    else:  # θ = the base model: probe it through a fresh LoRA (B = 0), seeded so a rerun builds the same
        adapter = probe_adapter(engine, cfg.train.lora, seed=cfg.influence.seed)
    out = Path(args.out) if args.out else Path("runs") / cfg.name / "influence"
    run = run_influence(engine, pairs, cfg, out, adapter=adapter, limit=args.limit,
                        progress=not args.no_progress)  # fmt: skip
    print(f"influence ({cfg.influence.estimator}): {run.line()}")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``influence`` on an ``argparse`` sub-parser collection."""
    p = subparsers.add_parser(
        "influence",
        help="score preference pairs by their estimated influence on the validation metric (resumable)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--pairs", required=True, help="pairs.jsonl (from dits synthesize)")
    p.add_argument("--config", help="run config YAML (defaults if omitted); its influence section applies")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="dotted config override, value parsed as YAML (repeatable), e.g. --set influence.chunk_size=2",
    )
    p.add_argument(
        "--adapter", help="θ: a saved LoRA adapter directory (default: the base model, via a fresh LoRA)"
    )
    p.add_argument("--out", help="output directory (default runs/<name>/influence)")
    p.add_argument("--limit", type=int, help="score at most this many chunks now (rerun to continue)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_influence)
    return p
