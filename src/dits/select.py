"""Which mined pairs to train on (DESIGN.md section 7, "Selection").

Strategies: ``all``; ``random`` (seeded); ``q`` (Optima: by Q of the chosen utterance); ``q-budget`` (as
``q``, from a pool grown at DITS's compute, :mod:`dits.stages.budget`); ``influence`` (by the
estimated influence of the pair's chunk); ``mix`` (default: ``norm(Q_best) + w · norm(I)``); and the DITS
reference's ablations ``mixHILQ`` (high influence, low Q: ``w · norm(I) − norm(Q)``) and ``mixLIHQ`` (low
influence, high Q: ``norm(Q) − w · norm(I)``). All but ``all``
keep ``max(1, floor(n · ratio))`` of n pairs (the reference rounding, so one pair is never dropped). A chunk's
score applies to every pair in it. Ranking ties go to the earlier pair, and the kept pairs come back in
their given order, so the same inputs always select the same training set.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from dits.records import InfluenceScore, PreferencePair, pair_key
from dits.search.pairs import keep_count

__all__ = [
    "BUDGET_MATCHED",
    "SelectConfig",
    "Strategy",
    "budget_matched",
    "minmax",
    "needs_scores",
    "pair_influence",
    "select_pairs",
    "selection_values",
]

Strategy = Literal["all", "random", "q", "q-budget", "influence", "mix", "mixHILQ", "mixLIHQ"]
"""A new strategy is added here, to :func:`selection_values` and, if it reads influence, to
:data:`SCORED`."""
SCORED: frozenset[str] = frozenset({"influence", "mix", "mixHILQ", "mixLIHQ"})
"""The strategies that read influence scores (so an influence stage must run before them)."""
BUDGET_MATCHED: frozenset[str] = frozenset({"q-budget"})
"""Optima given DITS's compute: ranks by Q like ``q``, from a pool grown with the extra search that costs
what a scored method's influence stage cost (:mod:`dits.stages.budget`)."""


def needs_scores(strategy: str) -> bool:
    return strategy in SCORED


def budget_matched(strategy: str) -> bool:
    return strategy in BUDGET_MATCHED


class SelectConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: Strategy = "mix"
    ratio: float = Field(0.5, gt=0, le=1, description="fraction of the pairs kept (at least one)")
    weight: float = Field(1.0, ge=0, description="w, the weight of norm(I) in mix, mixHILQ and mixLIHQ")
    seed: int = 0


def minmax(values: Sequence[float]) -> list[float]:
    """Min–max normalisation to [0, 1]; when every value is the same (or there is one) all map to 0, so a
    flat signal adds nothing to a mix instead of dividing by zero."""
    if not values:
        return []
    if not all(math.isfinite(v) for v in values):
        raise ValueError("selection values must be finite")
    lo, hi = min(values), max(values)
    if hi == lo:
        return [0.0] * len(values)
    return [(v - lo) / (hi - lo) for v in values]


def pair_influence(
    pairs: Sequence[PreferencePair], scores: Sequence[InfluenceScore] | Sequence[float]
) -> list[float]:
    """Influence per pair: chunk scores spread to each pair of their chunk (matched by :func:`pair_key`),
    or plain floats already aligned with ``pairs``."""
    if all(isinstance(s, InfluenceScore) for s in scores):
        by_key: dict[str, float] = {}
        for s in scores:
            assert isinstance(s, InfluenceScore)
            for key in s.pair_ids:
                if key in by_key:
                    raise ValueError(f"pair {key} is in more than one scored chunk")
                by_key[key] = s.score
        missing = [pair_key(p) for p in pairs if pair_key(p) not in by_key]
        if missing:
            raise KeyError(f"{len(missing)} pairs have no influence score, e.g. {missing[0]}")
        return [by_key[pair_key(p)] for p in pairs]
    if len(scores) != len(pairs):
        raise ValueError(f"got {len(scores)} scores for {len(pairs)} pairs")
    return [float(s) for s in scores]  # type: ignore[arg-type]


def selection_values(
    pairs: Sequence[PreferencePair],
    scores: Sequence[InfluenceScore] | Sequence[float] | None,
    cfg: SelectConfig,
) -> list[float]:
    """The value each pair is ranked by under ``cfg.strategy`` (every strategy but ``all`` and ``random``)."""
    q = [p.q_chosen for p in pairs]
    if cfg.strategy in ("q", "q-budget"):
        return q
    if scores is None:
        raise ValueError(f"strategy {cfg.strategy!r} needs influence scores")
    infl = pair_influence(pairs, scores)
    if cfg.strategy == "influence":
        return infl
    nq, ni = minmax(q), minmax(infl)
    if cfg.strategy == "mix":
        return [a + cfg.weight * b for a, b in zip(nq, ni, strict=True)]
    if cfg.strategy == "mixHILQ":
        return [cfg.weight * b - a for a, b in zip(nq, ni, strict=True)]
    if cfg.strategy == "mixLIHQ":
        return [a - cfg.weight * b for a, b in zip(nq, ni, strict=True)]
    raise ValueError(f"strategy {cfg.strategy!r} does not rank pairs")


def select_pairs(
    pairs: Sequence[PreferencePair],
    scores: Sequence[InfluenceScore] | Sequence[float] | None,
    cfg: SelectConfig | None = None,
    *,
    keep: int | None = None,
) -> list[PreferencePair]:
    """The pairs to train on, in their given order; ``keep`` overrides the ratio's count (``q-budget``
    keeps as many as ``mix`` keeps from the smaller pool)."""
    cfg = cfg or SelectConfig()
    pairs = list(pairs)
    if cfg.strategy == "all" or not pairs:
        return pairs
    k = keep_count(len(pairs), cfg.ratio) if keep is None else min(keep, len(pairs))
    if cfg.strategy == "random":
        chosen = random.Random(cfg.seed).sample(range(len(pairs)), k)
    else:
        values = selection_values(pairs, scores, cfg)
        chosen = sorted(range(len(pairs)), key=lambda i: (-values[i], i))[:k]
    return [pairs[i] for i in sorted(chosen)]
