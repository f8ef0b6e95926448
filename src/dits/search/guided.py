"""Influence-guided search (docs/design.md section 7): a tree picks the node to grow by ``Q + λ·Î``.

``Î(node)`` is the estimated influence of the preference pairs mined under the node: the mean score of the
candidate pairs whose *chosen* child lies in the node's subtree (the node itself included), 0 where there is
none. A pair is the conversation up to its chosen utterance (the prompt up to the parent, then the chosen
turn), so it lies under every node of that path: the chosen node, the parent, the parent's ancestors. A
tree's candidate pairs are, at any moment, each node's current (best, worst) child pair by Q, with no
thresholds: Q is still noisy during the search and a threshold would leave most of the tree at Î = 0.

Why the chosen node and not the parent: a pair sits at a node with two children, i.e. (rollouts merging
aside) at a node already selected, and the reference rule never selects a node twice, so a score credited
only to the parent and the parent's ancestors would reach almost no selectable node (in short
conversations, often none; ``benchmarks/guide_reach.py`` counts them). The chosen child is often
selectable (it has grandchildren unless its conversation is about to end), and growing it continues the
conversation a DPO step on that pair would make likelier. The rejected child gets no credit: growing under
the response the pair trains away from is not what a positive score argues for.

Every pair is scored on its own (a chunk of one) and cached by :func:`~dits.influence.base.pair_key`. The
key names the parent and both children, hence the prompt and both responses, which are all a DPO step
reads, so a cached score stays exact while θ is fixed; only pairs that appear (or whose best/worst child
changes) are scored. Per-pair scores also make Î additive over a subtree: the first-order (``gradient``)
score of a chunk is the mean of its pairs' scores.

The guide plugs into :func:`~dits.search.mcts.run_search` without touching it: the guide object is the
``value_fn`` and its :meth:`InfluenceGuide.on_step` the ``on_step`` hook, which re-estimates Î for all trees
after every ``every`` steps (before the next selection). Scoring charges the engine's ledger (the estimators
meter themselves) and is summed in :attr:`InfluenceGuide.cost`.

With λ = 0 the value is ``node.q`` itself and the estimator is never called (the search stage does not
even prepare one), so the search is exactly the Q-value search. The guide is handed a ready estimator: where
θ and the validation tasks come from is the search stage's business (:mod:`dits.stages.search`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Literal, Protocol

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from dits.influence.base import ESTIMATORS
from dits.mas.protocol import ProtocolConfig
from dits.records import Cost, InfluenceScore, PreferencePair, pair_key
from dits.search.pairs import mine_pairs, render_pair
from dits.search.tree import Node, Tree
from dits.tasks.example import Example

__all__ = ["ChunkScorer", "GuideConfig", "InfluenceGuide", "candidate_pairs", "subtree_influence"]


def _guiding(name: str) -> str:
    """A registered estimator cheap enough to score pairs inside the search."""
    if not ESTIMATORS[ESTIMATORS.check(name)].guides:
        allowed = ", ".join(repr(n) for n, est in ESTIMATORS.items() if est.guides)
        raise ValueError(f"{name!r} is too costly to guide a search; allowed values: {allowed}")
    return name


class GuideConfig(BaseModel):
    """Influence-guided search knobs; the defaults (λ = 0) are the plain Q-value search."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    lam: float = Field(0.0, allow_inf_nan=False, description="λ in Q + λ·Î; 0 is the Q-value search, exactly")
    estimator: Annotated[str, AfterValidator(_guiding)] = Field(
        "gradient", description="the cheap estimator that scores pairs during the search"
    )
    every: int = Field(1, ge=1, description="re-estimate Î after every this many selection steps")
    scale: Literal["tree", "none"] = Field(
        "tree",
        description="'tree': Î divided by the largest |score| of the tree's pairs, so Î is in [-1, 1] and λ "
        "is on the scale of Q; 'none': raw influence (a change in mean metric, often ~1e-4)",
    )


class ChunkScorer(Protocol):
    """What the guide needs of an estimator: a prepared :class:`~dits.influence.base.InfluenceEstimator`."""

    def score(self, chunks: Sequence[Sequence[PreferencePair]]) -> list[InfluenceScore]: ...


def candidate_pairs(tree: Tree) -> list[PreferencePair]:
    """Each node's current (best, worst) child pair by Q, unfiltered (see the module docstring)."""
    return mine_pairs(tree, tau=-math.inf, min_gap=0.0, keep_top_fraction=1.0)


def subtree_influence(tree: Tree, scores: Mapping[str, float]) -> dict[str, float]:
    """Mean of the pair scores (keyed by the pair's chosen node id) over each node's subtree, the node
    included. Nodes with no scored pair's chosen node at or below them are absent (Î = 0)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for nid, s in scores.items():
        for up in tree.path(nid):
            sums[up] = sums.get(up, 0.0) + s
            counts[up] = counts.get(up, 0) + 1
    return {nid: sums[nid] / counts[nid] for nid in sums}


class InfluenceGuide:
    """The value ``Q + λ·Î`` (call it as a ``value_fn``) and the hook that keeps Î current (``on_step``)."""

    def __init__(
        self,
        cfg: GuideConfig,
        estimator: ChunkScorer | None = None,
        *,
        examples: Mapping[str, Example] | None = None,
        protocol: ProtocolConfig | None = None,
        explore: int | None = None,
        prepare_cost: Cost | None = None,
    ) -> None:
        """``examples`` (by task id) and ``protocol`` render each pair for its DPO step before scoring
        (:func:`~dits.search.pairs.render_pair`); ``explore``, the search's step count, skips the refresh
        after the last step (nothing reads it); ``prepare_cost`` is the estimator's one-off cost, counted in
        :attr:`cost`."""
        if cfg.lam != 0 and estimator is None:
            raise ValueError("an influence-guided search with lam != 0 needs an estimator")
        self.cfg = cfg
        self.estimator = estimator
        self.examples = examples
        self.protocol = protocol or ProtocolConfig()
        self.explore = explore
        self.values: dict[str, dict[str, float]] = {}
        """Î by task id, then node id (absent: 0)."""
        self.cache: dict[str, float] = {}
        """Score of every pair scored so far, by pair key."""
        self.cost = (prepare_cost or Cost()).model_copy()
        self.refreshes = 0
        self.reads = 0
        """Values read by the search's selection (λ ≠ 0), and of those, ones that Î moved off Q."""
        self.moved = 0

    @property
    def pairs_scored(self) -> int:
        return len(self.cache)

    def influence(self, tree: Tree, node: Node) -> float:
        """Î(node) as of the last refresh (0 for a node created since, or with no pair under it)."""
        return self.values.get(tree.task_id, {}).get(node.id, 0.0)

    def __call__(self, tree: Tree, node: Node) -> float:
        if self.cfg.lam == 0:
            return node.q
        i = self.influence(tree, node)
        self.reads += 1
        self.moved += i != 0
        return node.q + self.cfg.lam * i

    def on_step(self, step: int, trees: list[Tree]) -> None:
        """After step ``step``'s insertions: refresh Î when one is due and a selection will read it."""
        if self.cfg.lam == 0 or (step + 1) % self.cfg.every:
            return
        if self.explore is not None and step + 1 >= self.explore:
            return
        self.refresh(trees)

    def refresh(self, trees: Sequence[Tree]) -> None:
        """Score the trees' pairs not seen before (one estimator call for all of them), recompute Î."""
        assert self.estimator is not None
        mined = [(tree, candidate_pairs(tree)) for tree in trees]
        new: dict[str, PreferencePair] = {}
        for tree, pairs in mined:
            for p in pairs:
                key = pair_key(p)
                if key in self.cache or key in new:
                    continue
                if self.examples is not None:
                    p = render_pair(p, self.examples[tree.task_id], self.protocol)
                new[key] = p
        if new:
            scores = self.estimator.score([[p] for p in new.values()])
            if len(scores) != len(new):
                raise ValueError(f"estimator returned {len(scores)} scores for {len(new)} pairs")
            for key, s in zip(new, scores, strict=True):
                if not math.isfinite(s.score):
                    raise ValueError(f"influence of pair {key} is {s.score!r}")
                self.cache[key] = s.score
                self.cost.flops += s.cost.flops
                self.cost.seconds += s.cost.seconds
        for tree, pairs in mined:
            by_node = {p.chosen_id: self.cache[pair_key(p)] for p in pairs}
            values = subtree_influence(tree, by_node)
            if self.cfg.scale == "tree":
                top = max((abs(v) for v in by_node.values()), default=0.0)
                values = {k: v / top for k, v in values.items()} if top > 0 else {}
            self.values[tree.task_id] = values
        self.refreshes += 1
