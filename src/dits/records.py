"""The records stages hand each other on disk: one class each, defined here and nowhere else.

A module that produces a record and a module that reads it both import it from here, so no reader has to
import its producer (the search does not know influence, training does not know the search). Records that
only one module reads and writes stay with that module (:class:`~dits.search.tree.Tree`,
:class:`~dits.mas.dialogue.Transcript`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from dits.mas.protocol import prefixed

__all__ = ["Cost", "InfluenceScore", "PreferencePair", "SftRow", "pair_key"]


class PreferencePair(BaseModel):
    """One preference pair: two sibling utterances after the same prefix; ``chosen`` has the higher Q.

    ``prompt`` is the renderer's view for the speaker of the two utterances, and ``response_prefix`` the
    protocol's forced turn prefix (``"Alice:"``) when it uses one: generation put it in the prompt and the
    renderer writes an agent's own turns as prefix + text, so the DPO responses are prefix + text too (the
    layout of the SFT completions). Both are filled when the pair is mined from a tree of a known task.
    """

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
    response_prefix: str = ""

    @property
    def gap(self) -> float:
        return self.q_chosen - self.q_rejected

    @property
    def chosen_response(self) -> str:
        return prefixed(self.response_prefix, self.chosen)

    @property
    def rejected_response(self) -> str:
        return prefixed(self.response_prefix, self.rejected)

    @property
    def label(self) -> str:
        return f"tree {self.tree_task_id} node {self.node_id}"


def pair_key(pair: PreferencePair) -> str:
    """A pair's identity across files: tree, parent node and the two children."""
    return f"{pair.tree_task_id}:{pair.node_id}:{pair.chosen_id}:{pair.rejected_id}"


class Cost(BaseModel):
    """What a piece of work cost: ledger FLOPs (delta) and wall seconds."""

    model_config = ConfigDict(extra="forbid")

    flops: float = 0.0
    seconds: float = 0.0


class InfluenceScore(BaseModel):
    """The estimated influence of one candidate (a chunk of pairs)."""

    model_config = ConfigDict(extra="forbid")

    candidate: int
    """Index of the chunk in its pool's chunk list."""
    pair_ids: list[str]
    """:func:`pair_key` of every pair of the chunk: the score applies to each of them."""
    score: float
    estimator: str
    cost: Cost
    diagnostics: dict[str, float] = Field(default_factory=dict)
    """Estimator-specific numbers, e.g. the importance weights' effective sample size."""


class SftRow(BaseModel):
    """One SFT row (TRL conversational prompt-completion), with where it came from."""

    model_config = ConfigDict(extra="forbid")

    prompt: list[dict[str, str]]
    completion: list[dict[str, str]]
    example_id: str
    sample: int
    turn: int
    speaker: int
    reward: float
