"""The ``select`` stage: keep the pairs to train on (docs/design.md section 7, "Selection").

Writes ``selected.jsonl``: the kept :class:`~dits.records.PreferencePair` records, in pool order. The DPO
stage reads it; :func:`dits.train.rows.preference_dataset` turns it into the ``datasets.Dataset`` TRL's
``DPOTrainer`` trains on. A strategy registered as reading influence (``influence``, ``mix``, ``mixHILQ``,
``mixLIHQ``, :data:`dits.select.STRATEGIES`) needs the ``scores.jsonl`` of an influence stage on the same
pool; every pair must have a score.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel

from dits.artifacts import SCORES_FILE, SELECTED_FILE, read_jsonl, write_jsonl_atomic
from dits.records import InfluenceScore, PreferencePair
from dits.select import SelectConfig, needs_scores, select_pairs
from dits.stages.context import Product, StageContext

__all__ = ["SelectSummary", "select_stage", "select_to_dir"]


class SelectSummary(BaseModel):
    """What a selection kept."""

    strategy: str
    total: int
    kept: int
    mean_q_kept: float
    """Mean Q(chosen) of the kept pairs (0 when none)."""
    mean_q_pool: float
    selected_path: str

    def line(self) -> str:
        return (
            f"select/{self.strategy}: kept {self.kept} of {self.total} pairs, mean Q(chosen) "
            f"{self.mean_q_kept:.3f} (pool {self.mean_q_pool:.3f}); pairs: {self.selected_path}"
        )


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def select_to_dir(
    pairs: str | Path | Sequence[PreferencePair],
    scores: str | Path | Sequence[InfluenceScore] | None,
    cfg: SelectConfig,
    out_dir: str | Path,
    *,
    keep: int | None = None,
) -> SelectSummary:
    """Select from ``pairs`` (a ``pairs.jsonl`` or the pairs) with ``cfg`` and write ``selected.jsonl``
    under ``out_dir``. ``scores``: a ``scores.jsonl`` or the scores (for a strategy that reads influence);
    ``keep``: how many to keep instead of the ratio's count."""
    pool = read_jsonl(pairs, PreferencePair) if isinstance(pairs, str | Path) else list(pairs)
    if isinstance(scores, str | Path):
        scores = read_jsonl(scores, InfluenceScore)
    if needs_scores(cfg.strategy) and scores is None:
        raise ValueError(
            f"strategy {cfg.strategy!r} needs influence scores: pass the scores.jsonl of `dits influence` "
            "run on the same pairs"
        )
    try:
        kept = select_pairs(pool, scores, cfg, keep=keep)
    except KeyError as err:  # pairs without a score: a partial or foreign scores file
        raise ValueError(
            f"{err.args[0]}; were the scores computed on these pairs, and did `dits influence` finish?"
        ) from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    selected = out / SELECTED_FILE
    write_jsonl_atomic(selected, kept)
    return SelectSummary(
        strategy=cfg.strategy,
        total=len(pool),
        kept=len(kept),
        mean_q_kept=_mean([p.q_chosen for p in kept]),
        mean_q_pool=_mean([p.q_chosen for p in pool]),
        selected_path=str(selected),
    )


def select_stage(
    ctx: StageContext,
    iteration: int,
    method: str,
    pairs: Path,
    pairs_digest: str,
    scores: Product | None,
    cfg: SelectConfig | None = None,
    *,
    keep: int | None = None,
) -> Product:
    """The select stage of ``method`` (the strategy it names, with ``select``'s ratio and weight; ``keep``
    pairs instead of the ratio's count when given)."""
    sel = cfg or ctx.cfg.select.model_copy(update={"strategy": method})
    needs = needs_scores(sel.strategy)
    if needs and scores is None:
        raise ValueError(f"strategy {sel.strategy!r} needs an influence stage before select")
    inputs = {"pairs": pairs_digest, "scores": scores.digest if needs and scores else None,
              "select": sel.model_dump(mode="json")}  # fmt: skip
    if keep is not None:
        inputs["keep"] = keep

    def body(out: Path) -> dict[str, float]:
        s = select_to_dir(pairs, scores.file(SCORES_FILE) if needs and scores else None, sel, out, keep=keep)
        return {"pool": s.total, "kept": s.kept, "mean_q_kept": s.mean_q_kept}

    return ctx.run("select", iteration, method, inputs, body)[0]
