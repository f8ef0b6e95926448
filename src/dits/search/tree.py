"""Conversation trees: one per task, a node per utterance, plain JSON on disk.

A tree is the only state the search keeps, and it is written to JSONL as soon as it is finished, so every
statistic that pair mining or influence estimation will need lives in the records themselves: visit counts,
value sums (Q is derived, never stored, so it cannot go stale), which rollouts passed through a node, and
the exact transcript each reward was computed on.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dits.search.textdist import normalized_distance

__all__ = ["ROOT_ID", "Node", "Rollout", "Tree", "node_order"]

ROOT_ID = "n0"
"""Id of the root (the empty conversation) in every tree."""


def node_order(node_id: str) -> int:
    """Creation index of a node id ``"n<k>"``, the deterministic tie-breaker (``"n10"`` after ``"n9"``)."""
    if not node_id.startswith("n") or not node_id[1:].isdigit():
        raise ValueError(f"node id must look like 'n<int>', got {node_id!r}")
    return int(node_id[1:])


class Node(BaseModel):
    """One utterance of a conversation; the root (depth 0) is the empty conversation.

    The utterance at depth ``d >= 1`` is turn ``d - 1`` and was spoken by agent ``(d - 1) % n_agents``.
    """

    model_config = ConfigDict(extra="forbid")

    id: str
    parent: str | None = None
    depth: int = 0
    speaker: int | None = None
    utterance: str = ""
    visits: int = 0
    value_sum: float = 0.0
    children: list[str] = Field(default_factory=list)
    rollouts: list[int] = Field(default_factory=list)
    terminal: bool = False
    """Some rollout's conversation ended at this utterance. A node can be terminal and still have children
    when a continuing utterance merged into it (near-duplicate text); it is never selected for expansion."""

    @property
    def q(self) -> float:
        """Mean reward of the rollouts through this node (0 when unvisited)."""
        return self.value_sum / self.visits if self.visits else 0.0


class Rollout(BaseModel):
    """One full conversation sampled during the search, and where it sits in the tree."""

    model_config = ConfigDict(extra="forbid")

    index: int
    path: list[str]
    """Node ids root → leaf. Because of sibling merging, node texts may differ slightly from the generated
    ones; ``continuation`` keeps the generated text the reward was computed on."""
    reward: float
    terms: dict[str, float] = Field(default_factory=dict)
    """The reward's terms (``task``, ``token``, ``read``; empty in trees grown before they were kept)."""
    metric: float = 0.0
    stop_reason: str = ""
    tokens: int = 0
    step: int = 0
    start: str = ROOT_ID
    """The selected node the rollout continued from (its prefix was given to the rollouter)."""
    seed: int = 0
    continuation: list[str] = Field(default_factory=list)
    """The utterances generated after the start node's prefix, as generated (before merging)."""


class Tree(BaseModel):
    """The search tree of one task. Node ids are ``"n0"`` (root), ``"n1"``, ... in creation order."""

    model_config = ConfigDict(extra="forbid")

    task_id: str
    seed: int = 0
    n_agents: int = 2
    nodes: dict[str, Node] = Field(default_factory=lambda: {ROOT_ID: Node(id=ROOT_ID)})
    rollouts: list[Rollout] = Field(default_factory=list)
    selected: list[str] = Field(default_factory=list)
    """The node selected at each explore step, in step order (the reference filter reads it)."""
    flops: float = 0.0
    """What growing it cost: the ledger FLOPs of its shard, split evenly over the shard's trees. Stored
    with the tree, so a resumed search still knows what its earlier trees cost (``q-budget`` prices extra
    trees with it)."""

    @model_validator(mode="after")
    def _check_structure(self) -> Tree:
        """Refuse a tree whose links disagree (a hand-edited or truncated file), rather than mine nonsense."""
        if self.n_agents < 1:
            raise ValueError(f"n_agents must be >= 1, got {self.n_agents}")
        root = self.nodes.get(ROOT_ID)
        if root is None or root.parent is not None or root.depth != 0:
            raise ValueError(f"tree {self.task_id!r}: missing or malformed root {ROOT_ID!r}")
        for nid, node in self.nodes.items():
            if node.id != nid:
                raise ValueError(f"tree {self.task_id!r}: node keyed {nid!r} has id {node.id!r}")
            node_order(nid)
            if node.parent is not None:
                parent = self.nodes.get(node.parent)
                if parent is None or nid not in parent.children:
                    raise ValueError(f"tree {self.task_id!r}: node {nid!r} not listed by its parent")
                if node.depth != parent.depth + 1:
                    raise ValueError(f"tree {self.task_id!r}: node {nid!r} has depth {node.depth}")
            for cid in node.children:
                child = self.nodes.get(cid)
                if child is None or child.parent != nid:
                    raise ValueError(f"tree {self.task_id!r}: bad child {cid!r} of {nid!r}")
        for sid in self.selected:
            if sid not in self.nodes:
                raise ValueError(f"tree {self.task_id!r}: selected node {sid!r} does not exist")
        return self

    # -- construction -------------------------------------------------------------------------------

    @classmethod
    def new(cls, task_id: str, seed: int = 0, n_agents: int = 2) -> Tree:
        """A tree holding only the root."""
        return cls(task_id=task_id, seed=seed, n_agents=n_agents)

    @property
    def root(self) -> Node:
        return self.nodes[ROOT_ID]

    def node(self, node_id: str) -> Node:
        """The node with this id; a KeyError that names the tree otherwise."""
        try:
            return self.nodes[node_id]
        except KeyError:
            raise KeyError(f"tree {self.task_id!r} has no node {node_id!r}") from None

    def add_child(self, parent_id: str, utterance: str) -> str:
        """Append a new child (no merging) and return its id."""
        parent = self.node(parent_id)
        nid = f"n{len(self.nodes)}"
        depth = parent.depth + 1
        self.nodes[nid] = Node(
            id=nid, parent=parent_id, depth=depth, speaker=(depth - 1) % self.n_agents, utterance=utterance
        )
        parent.children.append(nid)
        return nid

    def find_sibling(self, parent_id: str, utterance: str, merge_dist: float) -> str | None:
        """The child of ``parent_id`` nearest to ``utterance`` if it is within ``merge_dist`` (strict).

        Nearest, ties to the earliest created; the reference took the first child under the threshold, which
        can only differ when two existing siblings are both within the threshold of the new text.
        """
        best: tuple[float, int, str] | None = None
        for cid in self.node(parent_id).children:
            d = normalized_distance(self.nodes[cid].utterance, utterance)
            if d < merge_dist and (best is None or (d, node_order(cid)) < best[:2]):
                best = (d, node_order(cid), cid)
        return None if best is None else best[2]

    def add_path(self, parent_id: str, utterances: list[str], merge_dist: float = 0.1) -> list[str]:
        """Walk down from ``parent_id`` one utterance at a time, reusing a near-duplicate sibling where one
        exists and creating a node otherwise. Returns the ids walked (``parent_id`` excluded)."""
        ids: list[str] = []
        current = parent_id
        for text in utterances:
            found = self.find_sibling(current, text, merge_dist)
            current = found if found is not None else self.add_child(current, text)
            ids.append(current)
        return ids

    # -- statistics ---------------------------------------------------------------------------------

    def path(self, node_id: str) -> list[str]:
        """Node ids root → ``node_id`` (both included)."""
        ids = [node_id]
        node = self.node(node_id)
        while node.parent is not None:
            ids.append(node.parent)
            node = self.nodes[node.parent]
        return ids[::-1]

    def prefix(self, node_id: str) -> list[str]:
        """The conversation up to and including ``node_id``: utterances root → node, the root excluded."""
        return [self.nodes[i].utterance for i in self.path(node_id)[1:]]

    def backpropagate(self, path: list[str], reward: float) -> None:
        """Add one visit and ``reward`` to every node of ``path`` (which must run from the root down)."""
        if not math.isfinite(reward):
            raise ValueError(f"tree {self.task_id!r}: reward must be finite, got {reward!r}")
        if not path or path[0] != ROOT_ID:
            raise ValueError(f"tree {self.task_id!r}: a backpropagated path must start at the root")
        for up, down in itertools.pairwise(path):
            if self.node(down).parent != up:
                raise ValueError(f"tree {self.task_id!r}: {down!r} is not a child of {up!r}")
        for nid in path:
            node = self.nodes[nid]
            node.visits += 1
            node.value_sum += reward

    def record_rollout(
        self,
        start_id: str,
        continuation: list[str],
        reward: float,
        *,
        metric: float = 0.0,
        terms: dict[str, float] | None = None,
        stop_reason: str = "",
        tokens: int = 0,
        merge_dist: float = 0.1,
        step: int = 0,
        seed: int = 0,
    ) -> Rollout:
        """Insert one finished conversation that continued from ``start_id``: merge its utterances into the
        tree, mark where it ended, backpropagate its reward along the whole path (root included)."""
        path = self.path(start_id) + self.add_path(start_id, continuation, merge_dist)
        self.backpropagate(path, reward)
        if len(path) > 1:
            self.nodes[path[-1]].terminal = True
        rollout = Rollout(
            index=len(self.rollouts),
            path=path,
            reward=reward,
            terms=dict(terms or {}),
            metric=metric,
            stop_reason=stop_reason,
            tokens=tokens,
            step=step,
            start=start_id,
            seed=seed,
            continuation=list(continuation),
        )
        for nid in path:
            self.nodes[nid].rollouts.append(rollout.index)
        self.rollouts.append(rollout)
        return rollout

    def transcript(self, rollout_index: int) -> list[str]:
        """The conversation a rollout's reward was computed on: start node prefix + generated text."""
        rollout = self.rollouts[rollout_index]
        return self.prefix(rollout.start) + rollout.continuation

    # -- JSON ---------------------------------------------------------------------------------------

    def to_json(self) -> str:
        """One line of JSON (JSONL-ready); floats round-trip exactly."""
        return self.model_dump_json()

    @classmethod
    def from_json(cls, data: str | bytes | dict[str, Any]) -> Tree:
        """Inverse of :meth:`to_json` (also takes an already parsed dict)."""
        if isinstance(data, dict):
            return cls.model_validate(data)
        return cls.model_validate_json(data)
