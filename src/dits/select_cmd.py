"""``dits select``: keep the pairs to train on (DESIGN.md section 7, "Selection") and write them for TRL.

Writes ``selected.jsonl`` (the kept :class:`~dits.synthesize.PreferencePair` records, in pool order) and
``dataset/``, the same pairs as a ``datasets`` dataset in TRL's conversational preference format
(``prompt`` / ``chosen`` / ``rejected`` plus metadata; :func:`~dits.synthesize.pairs_to_dataset`), which
``datasets.load_from_disk`` gives back ready for ``DPOTrainer``. Strategies ``influence`` and ``mix`` need
the ``scores.jsonl`` of ``dits influence`` on the same pool; every pair must have a score.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel

from dits.influence.base import InfluenceScore
from dits.jsonl import read_jsonl, write_text_atomic
from dits.search.pairs import PairCandidate
from dits.select import SelectConfig, Strategy, select_pairs
from dits.synthesize import pairs_to_dataset, read_pairs

__all__ = ["DATASET_DIR", "SELECTED_FILE", "SelectSummary", "add_parser", "select_to_dir"]

SELECTED_FILE = "selected.jsonl"
DATASET_DIR = "dataset"
NEEDS_SCORES = frozenset({"influence", "mix"})


class SelectSummary(BaseModel):
    """What a selection kept."""

    strategy: str
    total: int
    kept: int
    mean_q_kept: float
    """Mean Q(chosen) of the kept pairs (0 when none)."""
    mean_q_pool: float
    selected_path: str
    dataset_path: str

    def line(self) -> str:
        return (
            f"select/{self.strategy}: kept {self.kept} of {self.total} pairs, mean Q(chosen) "
            f"{self.mean_q_kept:.3f} (pool {self.mean_q_pool:.3f}); pairs: {self.selected_path}, "
            f"dataset: {self.dataset_path}"
        )


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def select_to_dir(
    pairs: str | Path | Sequence[PairCandidate],
    scores: str | Path | Sequence[InfluenceScore] | None,
    cfg: SelectConfig,
    out_dir: str | Path,
) -> SelectSummary:
    """Select from ``pairs`` (a ``pairs.jsonl`` or the pairs) with ``cfg`` and write ``selected.jsonl`` and
    ``dataset/`` under ``out_dir``. ``scores``: a ``scores.jsonl`` or the scores (``influence``/``mix``)."""
    pool = read_pairs(pairs) if isinstance(pairs, str | Path) else list(pairs)
    if isinstance(scores, str | Path):
        scores = read_jsonl(scores, InfluenceScore, repair=False)
    if cfg.strategy in NEEDS_SCORES and scores is None:
        raise ValueError(
            f"strategy {cfg.strategy!r} needs influence scores: pass the scores.jsonl of `dits influence` "
            "run on the same pairs"
        )
    try:
        kept = select_pairs(pool, scores, cfg)
    except KeyError as err:  # pairs without a score: a partial or foreign scores file
        raise ValueError(
            f"{err.args[0]}; were the scores computed on these pairs, and did `dits influence` finish?"
        ) from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    selected = out / SELECTED_FILE
    write_text_atomic(selected, "".join(p.model_dump_json() + "\n" for p in kept))
    dataset = out / DATASET_DIR
    pairs_to_dataset(kept).save_to_disk(str(dataset))
    return SelectSummary(
        strategy=cfg.strategy,
        total=len(pool),
        kept=len(kept),
        mean_q_kept=_mean([p.q_chosen for p in kept]),
        mean_q_pool=_mean([p.q_chosen for p in pool]),
        selected_path=str(selected),
        dataset_path=str(dataset),
    )


# -- command line ----------------------------------------------------------------------------------


def cmd_select(args: argparse.Namespace) -> int:
    """Handler of ``dits select``."""
    if args.scores is not None and not Path(args.scores).is_file():
        raise SystemExit(f"dits select: no scores file {args.scores}")
    try:
        cfg = SelectConfig(strategy=args.strategy, ratio=args.ratio, weight=args.weight, seed=args.seed)
        summary = select_to_dir(args.pairs, args.scores, cfg, args.out)
    except ValueError as err:
        raise SystemExit(f"dits select: {err}") from None
    print(summary.line())
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``select`` on an ``argparse`` sub-parser collection."""
    defaults = SelectConfig()
    p = subparsers.add_parser(
        "select",
        help="keep a share of the pairs by Q, influence or both, and write the DPO dataset",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--pairs", required=True, help="pairs.jsonl (from dits synthesize)")
    p.add_argument("--scores", help="scores.jsonl (from dits influence); needed by influence and mix")
    p.add_argument("--strategy", choices=get_args(Strategy), default=defaults.strategy)
    p.add_argument("--ratio", type=float, default=defaults.ratio, help="fraction of the pairs kept")
    p.add_argument("--weight", type=float, default=defaults.weight, help="w in norm(Q) + w·norm(I) (mix)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of the random strategy")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_select)
    return p
