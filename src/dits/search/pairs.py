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
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dits.search.tree import Tree, node_order

__all__ = [
    "HIGH_TAU_DATASETS",
    "PairCandidate",
    "PairConfig",
    "Renderer",
    "best_and_worst",
    "default_tau",
    "keep_count",
    "mine_pairs",
]

HIGH_TAU_DATASETS = frozenset({"math", "arc", "mmlu", "arith"})
"""Datasets whose pairs need ``Q(best) > 0.45`` instead of 0.4 (DESIGN.md section 6; ``arith``, the built-in
debate task, is treated like them)."""


def default_tau(dataset: str) -> float:
    """The published pair threshold for a dataset."""
    return 0.45 if dataset in HIGH_TAU_DATASETS else 0.4


class PairConfig(BaseModel):
    """Pair mining knobs (DESIGN.md section 6); ``tau=None`` takes :func:`default_tau` per dataset."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tau: float | None = None
    min_gap: float = Field(0.2, ge=0)
    keep_top_fraction: float = Field(0.5, gt=0, le=1)
    rounding: Literal["reference", "ceil"] = "reference"

    def tau_for(self, dataset: str) -> float:
        return self.tau if self.tau is not None else default_tau(dataset)


Renderer = Callable[[str, list[str], int], list[dict[str, Any]]]
"""``render(task_id, prefix, speaker)`` → the chat messages the speaker sees before speaking."""


class PairCandidate(BaseModel):
    """One preference pair: two sibling utterances after the same prefix, chosen has the higher Q."""

    model_config = ConfigDict(extra="forbid")

    tree_task_id: str
    node_id: str
    """The parent of both utterances (their shared prefix ends here)."""
    prefix: list[str]
    speaker: int
    """The agent who speaks the chosen / rejected utterance."""
    chosen: str
    rejected: str
    chosen_id: str
    rejected_id: str
    q_chosen: float
    q_rejected: float
    visits_chosen: int
    visits_rejected: int
    prompt: list[dict[str, Any]] | None = None

    @property
    def gap(self) -> float:
        return self.q_chosen - self.q_rejected


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
    render: Renderer | None = None,
) -> list[PairCandidate]:
    """Mine one tree's preference pairs, ranked by Q(chosen) descending (ties: parent creation order).

    ``render``, when given, fills ``prompt`` with the renderer's view for the speaker of the children.
    """
    if not 0 < keep_top_fraction <= 1:
        raise ValueError(f"keep_top_fraction must be in (0, 1], got {keep_top_fraction}")
    found: list[PairCandidate] = []
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
            PairCandidate(
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
    kept = found[: keep_count(len(found), keep_top_fraction, rounding)]
    if render is not None:
        for pair in kept:
            pair.prompt = render(tree.task_id, list(pair.prefix), pair.speaker)
    return kept
