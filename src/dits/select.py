"""Which mined pairs to train on (docs/design.md section 7, "Selection").

Strategies: ``all``; ``random`` (seeded); ``q`` (Optima: by Q of the chosen utterance); ``q-budget`` (as
``q``, from a pool grown at DITS's compute, :mod:`dits.stages.budget`); ``influence`` (by the
estimated influence of the pair's chunk); ``mix`` (default: ``norm(Q_best) + w · norm(I)``); and the DITS
reference's ablations ``mixHILQ`` (high influence, low Q: ``w · norm(I) − norm(Q)``) and ``mixLIHQ`` (low
influence, high Q: ``norm(Q) − w · norm(I)``). All but ``all``
keep ``max(1, floor(n · ratio))`` of n pairs (the reference rounding, so one pair is never dropped). A chunk's
score applies to every pair in it. Ranking ties go to the earlier pair, and the kept pairs come back in
their given order, so the same inputs always select the same training set.

Every strategy is registered once in :data:`STRATEGIES`; a new one is a rank function decorated with
:func:`register_strategy` (the config and the command line take the allowed names from the registry).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from dits.records import InfluenceScore, PreferencePair, pair_key
from dits.registry import Registry
from dits.search.pairs import keep_count

__all__ = [
    "STRATEGIES",
    "SelectConfig",
    "Strategy",
    "StrategyRule",
    "budget_matched",
    "minmax",
    "needs_scores",
    "pair_influence",
    "register_strategy",
    "select_pairs",
    "selection_values",
]

Rank = Callable[[list[float], list[float], "SelectConfig"], list[float]]
"""``(Q of each pair, influence of each pair (empty unless the strategy reads it), cfg) -> value``: pairs
are kept by value, highest first."""


Pick = Callable[[int, int, "SelectConfig"], Sequence[int]]
"""``(n pairs, k to keep, cfg) -> indices kept``: a strategy that keeps pairs without ranking them."""


@dataclass(frozen=True)
class StrategyRule:
    """A selection strategy: how it ranks (``rank``) or else which pairs it keeps (``pick``), whether it
    reads influence scores (an influence stage must run before it), and whether it is Optima given DITS's
    compute (its pool grown with the extra search that costs what a scored method's influence stage cost,
    :mod:`dits.stages.budget`)."""

    rank: Rank | None = None
    pick: Pick | None = None
    reads_influence: bool = False
    budget_matched: bool = False

    def __post_init__(self) -> None:
        if (self.rank is None) == (self.pick is None):
            raise ValueError("a strategy either ranks pairs or picks them: give rank or pick")


STRATEGIES: Registry[StrategyRule] = Registry("select.strategy")
"""Every selection strategy by name; ``select.strategy``, ``pipeline.methods`` and the command line take
their allowed values from it."""
Strategy = Annotated[str, AfterValidator(STRATEGIES.check)]
"""A config value naming a registered strategy."""


def register_strategy(
    name: str, *, reads_influence: bool = False, budget_matched: bool = False
) -> Callable[[Rank], Rank]:
    """Decorator: ``@register_strategy("mine", reads_influence=True)`` on a :data:`Rank` function."""

    def add(rank: Rank) -> Rank:
        STRATEGIES.add(name, StrategyRule(rank, None, reads_influence, budget_matched))
        return rank

    return add


STRATEGIES.add("all", StrategyRule(pick=lambda n, k, cfg: range(n)))
STRATEGIES.add("random", StrategyRule(pick=lambda n, k, cfg: random.Random(cfg.seed).sample(range(n), k)))


@register_strategy("q")
def _q(q: list[float], infl: list[float], cfg: SelectConfig) -> list[float]:
    return q


register_strategy("q-budget", budget_matched=True)(_q)  # ranks as q does, from the budget-matched pool


@register_strategy("influence", reads_influence=True)
def _influence(q: list[float], infl: list[float], cfg: SelectConfig) -> list[float]:
    return infl


@register_strategy("mix", reads_influence=True)
def _mix(q: list[float], infl: list[float], cfg: SelectConfig) -> list[float]:
    return [a + cfg.weight * b for a, b in zip(minmax(q), minmax(infl), strict=True)]


@register_strategy("mixHILQ", reads_influence=True)
def _mix_hilq(q: list[float], infl: list[float], cfg: SelectConfig) -> list[float]:
    return [cfg.weight * b - a for a, b in zip(minmax(q), minmax(infl), strict=True)]


@register_strategy("mixLIHQ", reads_influence=True)
def _mix_lihq(q: list[float], infl: list[float], cfg: SelectConfig) -> list[float]:
    return [a - cfg.weight * b for a, b in zip(minmax(q), minmax(infl), strict=True)]


def needs_scores(strategy: str) -> bool:
    """Whether ``strategy`` reads influence scores (False for a name not registered)."""
    return strategy in STRATEGIES and STRATEGIES[strategy].reads_influence


def budget_matched(strategy: str) -> bool:
    return strategy in STRATEGIES and STRATEGIES[strategy].budget_matched


class SelectConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

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
    """The value each pair is ranked by under ``cfg.strategy`` (every strategy that ranks)."""
    rule = STRATEGIES[cfg.strategy]
    if rule.rank is None:
        raise ValueError(f"strategy {cfg.strategy!r} does not rank pairs")
    infl: list[float] = []
    if rule.reads_influence:
        if scores is None:
            raise ValueError(f"strategy {cfg.strategy!r} needs influence scores")
        infl = pair_influence(pairs, scores)
    return rule.rank([p.q_chosen for p in pairs], infl, cfg)


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
    if not pairs:
        return pairs
    k = keep_count(len(pairs), cfg.ratio) if keep is None else min(keep, len(pairs))
    rule = STRATEGIES[cfg.strategy]
    if rule.pick is not None:
        chosen = list(rule.pick(len(pairs), k, cfg))
    else:
        values = selection_values(pairs, scores, cfg)
        chosen = sorted(range(len(pairs)), key=lambda i: (-values[i], i))[:k]
    return [pairs[i] for i in sorted(chosen)]
