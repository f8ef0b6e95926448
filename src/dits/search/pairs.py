"""Preference pairs from a finished tree: sibling utterances whose values differ.

Every node with at least two children gives one candidate: (its prefix, best child, worst child) by Q,
recomputed here from the node statistics. The reference kept running min/max child pointers that went
stale as values changed after the pointer was set; nothing here is cached.

A candidate is kept when ``Q(best) > tau`` and ``Q(best) - Q(worst) > min_gap``; then, per tree, the
candidates are ranked by ``Q(best)`` and the top fraction kept. The reference code reads
``if int(0.7 * n) >= 1: keep[: int(0.5 * n)]``, i.e. ``max(1, floor(n / 2))`` for ``n >= 1`` — a single
qualifying pair is kept, and odd counts round down. ``rounding="reference"`` (the default) generalises this
as ``max(1, floor(n * fraction))``; ``rounding="ceil"`` keeps ``ceil(n * fraction)``.

Unlike the reference, every node of the tree is mined: the reference dropped nodes that the selection
filter had discarded (they were removed from its node list) unless they had been selected themselves.

:func:`mine_tree_pairs` mines a tree of a known task and renders each pair for training
(:func:`render_pair`: the speaker's view as the prompt, the forced turn prefix of its responses).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from dits.mas.protocol import ProtocolConfig, render_view, turn_prefix
from dits.records import PreferencePair
from dits.search.tree import Tree, node_order
from dits.tasks.example import Example
from dits.tasks.loaders import method_defaults

__all__ = [
    "PairConfig",
    "best_and_worst",
    "count_tree_pairs",
    "default_tau",
    "keep_count",
    "mine_pairs",
    "mine_tree_pairs",
    "render_pair",
]


def default_tau(dataset: str) -> float:
    """The published pair threshold for a dataset (its registry entry, :mod:`dits.tasks.defaults`)."""
    return method_defaults(dataset).tau


class PairConfig(BaseModel):
    """Pair mining knobs (docs/design.md section 6); ``tau=None`` takes the dataset's published τ."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    tau: float | None = None
    min_gap: float = Field(0.2, ge=0)
    keep_top_fraction: float = Field(0.5, gt=0, le=1)
    rounding: Literal["reference", "ceil"] = "reference"

    def tau_for(self, dataset: str) -> float:
        return self.tau if self.tau is not None else default_tau(dataset)


def best_and_worst(tree: Tree, node_id: str) -> tuple[str, str] | None:
    """(best, worst) child ids of a node by current Q, ties to the earliest created; None if < 2 children
    or all children tie (no preference to learn)."""
    children = tree.node(node_id).children
    if len(children) < 2:
        return None
    best = min(children, key=lambda c: (-tree.nodes[c].q, node_order(c)))
    worst = min(children, key=lambda c: (tree.nodes[c].q, node_order(c)))
    if best == worst or tree.nodes[best].q == tree.nodes[worst].q:
        return None
    return best, worst


def keep_count(n: int, fraction: float, rounding: Literal["reference", "ceil"] = "reference") -> int:
    """How many of ``n`` ranked candidates a tree keeps (see the module docstring)."""
    if n <= 0:
        return 0
    if rounding == "ceil":
        return min(n, math.ceil(n * fraction - 1e-12))
    return min(n, max(1, math.floor(n * fraction + 1e-12)))


def mine_pairs(
    tree: Tree,
    *,
    tau: float = 0.4,
    min_gap: float = 0.2,
    keep_top_fraction: float = 0.5,
    rounding: Literal["reference", "ceil"] = "reference",
) -> list[PreferencePair]:
    """Mine one tree's preference pairs, ranked by Q(chosen) descending (ties: parent creation order);
    not rendered (:func:`render_pair` fills the prompt)."""
    if not 0 < keep_top_fraction <= 1:
        raise ValueError(f"keep_top_fraction must be in (0, 1], got {keep_top_fraction}")
    found: list[PreferencePair] = []
    for nid in tree.nodes:
        bw = best_and_worst(tree, nid)
        if bw is None:
            continue
        best, worst = (tree.nodes[i] for i in bw)
        if not (best.q > tau and best.q - worst.q > min_gap):
            continue
        if best.speaker is None:  # only the root has no speaker, and it is never a child
            raise ValueError(f"tree {tree.task_id!r}: child {best.id!r} has no speaker")
        found.append(
            PreferencePair(
                tree_task_id=tree.task_id,
                node_id=nid,
                prefix=tree.prefix(nid),
                speaker=best.speaker,
                chosen=best.utterance,
                rejected=worst.utterance,
                chosen_id=best.id,
                rejected_id=worst.id,
                q_chosen=best.q,
                q_rejected=worst.q,
                visits_chosen=best.visits,
                visits_rejected=worst.visits,
            )
        )
    found.sort(key=lambda p: (-p.q_chosen, node_order(p.node_id)))
    return found[: keep_count(len(found), keep_top_fraction, rounding)]


def render_pair(pair: PreferencePair, example: Example, protocol: ProtocolConfig) -> PreferencePair:
    """The pair with its DPO prompt (the renderer's view for the speaker after the prefix) and the forced
    turn prefix of its responses filled in."""
    view = render_view(example, list(pair.prefix), pair.speaker, protocol)
    return pair.model_copy(
        update={"prompt": [dict(m) for m in view], "response_prefix": turn_prefix(pair.speaker, protocol)}
    )


def _mine(tree: Tree, example: Example, cfg: PairConfig) -> list[PreferencePair]:
    return mine_pairs(
        tree,
        tau=cfg.tau_for(example.dataset),
        min_gap=cfg.min_gap,
        keep_top_fraction=cfg.keep_top_fraction,
        rounding=cfg.rounding,
    )


def mine_tree_pairs(
    tree: Tree, example: Example, protocol: ProtocolConfig, cfg: PairConfig | None = None
) -> list[PreferencePair]:
    """One tree's pairs under ``cfg`` (τ by the example's dataset), rendered for training."""
    return [render_pair(p, example, protocol) for p in _mine(tree, example, cfg or PairConfig())]


def count_tree_pairs(tree: Tree, example: Example, cfg: PairConfig) -> int:
    """How many pairs :func:`mine_tree_pairs` gives (nothing rendered)."""
    return len(_mine(tree, example, cfg))
