"""Monte Carlo tree search over conversations, batched across the trees of a shard.

Reference semantics (Optima's ``MonteCarloTreeDeploy.search``/``expand``, reused by DITS), per explore step:

1. **select** one node per tree. Candidates are the root and every non-terminal node with at least one
   grandchild. A candidate whose utterance is within normalised edit distance ``select_dist`` (strict) of
   the utterance of a node already selected in an earlier step is dropped; in particular no node is
   selected twice. The survivors are sorted by value (ties: creation order), the top ``top_k`` kept, and one
   is sampled with probability ∝ exp(value). If nothing survives, the root is selected (as the reference).
2. **expand**: ``expand`` full rollouts continue the selected node's conversation. Every rollout of every
   tree of the shard goes into ONE rollouter call, so the engine sees a single batch per step.
3. **insert** each continuation under the selected node, reusing a sibling within ``merge_dist``, and
   **backpropagate** its reward along the full path, root included.

There is no separate initialisation: at step 0 the root is the only candidate, exactly as in the
reference, where the first of the 8 selections picks the root.

Comparisons in the filter use the utterance text, as the reference does (``node.content``), not the
whole prefix. The root stands for the empty conversation and is compared by identity only: in the
reference its text is the system prompt, which no utterance comes near.

Values are read only through ``value_fn`` (default Q), so influence-guided search can pass ``Q + λ·Î``.
A cheap way to keep Î current is to refresh it for all trees in ``on_step``, which runs after each
step's insertions and before the next selection.

Randomness: each tree samples its selections from its own generator, seeded from (seed, task_id) through
SHA-256, and each rollout request carries a seed derived from (seed, task_id, step, k). A tree therefore
comes out the same whichever other trees share its shard, provided the rollouter is deterministic in the
request seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from dits.search.textdist import normalized_distance
from dits.search.tree import ROOT_ID, Node, Tree, node_order
from dits.seeding import derive_seed

__all__ = [
    "OnStep",
    "RolloutRequest",
    "RolloutResult",
    "Rollouter",
    "SearchConfig",
    "ValueFn",
    "derive_seed",
    "q_value",
    "reference_candidates",
    "request_seed",
    "run_search",
    "select_node",
    "select_reference",
    "select_uct",
    "selection_distribution",
    "tree_rng",
]


class RolloutRequest(BaseModel):
    """Continue the conversation ``prefix`` of task ``task_id`` to its end, sampling with ``seed``."""

    model_config = ConfigDict(extra="forbid")

    task_id: str
    node_id: str
    prefix: list[str]
    seed: int
    step: int = 0
    k: int = 0
    """Index of this rollout among those of the same node and step."""


class RolloutResult(BaseModel):
    """What a rollout produced: the utterances after the prefix (empty if the prefix had already ended)."""

    model_config = ConfigDict(extra="forbid")

    continuation: list[str]
    reward: float
    terms: dict[str, float] = Field(default_factory=dict)
    """The reward's terms by name (``task``, ``token``, ``read``), kept so a reward can be audited."""
    metric: float = 0.0
    stop_reason: str = ""
    tokens: int = 0


Rollouter = Callable[[list[RolloutRequest]], list[RolloutResult]]
"""Serves every request of every tree of a shard in one call; results in request order."""

ValueFn = Callable[[Tree, Node], float]
OnStep = Callable[[int, list[Tree]], None]


def q_value(tree: Tree, node: Node) -> float:
    """The default node value: its Q (mean rollout reward)."""
    return node.q


class SearchConfig(BaseModel):
    """Search knobs; the defaults are Optima's."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    explore: int = Field(8, ge=0, description="selection steps per tree")
    expand: int = Field(3, ge=1, description="rollouts from each selected node")
    initial_rollouts: int | None = Field(
        None, ge=1, description="rollouts at step 0 (from the root); None = expand, as in Optima"
    )
    select_dist: float = Field(0.25, ge=0, le=1)
    merge_dist: float = Field(0.1, ge=0, le=1)
    top_k: int = Field(10, ge=1)
    policy: Literal["reference", "uct"] = "reference"
    uct_c: float = Field(1.0, ge=0)
    uct_width: int = Field(3, ge=1, description="UCT: a node with fewer children than this is expanded")

    def rollouts_at(self, step: int) -> int:
        """Number of rollouts each tree runs at ``step``."""
        if step == 0 and self.initial_rollouts is not None:
            return self.initial_rollouts
        return self.expand


# -- seeds -------------------------------------------------------------------------------------------


def tree_rng(seed: int, task_id: str) -> np.random.Generator:
    """The generator a tree's selections draw from; it depends on nothing but (seed, task_id)."""
    return np.random.default_rng(derive_seed("dits.search.tree", seed, task_id, bits=64))


def request_seed(seed: int, task_id: str, step: int, k: int) -> int:
    """Sampling seed of the k-th rollout of ``task_id`` at ``step``."""
    return derive_seed("dits.search.rollout", seed, task_id, step, k)


# -- selection ---------------------------------------------------------------------------------------


def _value(value_fn: ValueFn, tree: Tree, node: Node) -> float:
    v = float(value_fn(tree, node))
    if not math.isfinite(v):
        raise ValueError(f"value_fn gave {v!r} for node {node.id!r} of tree {tree.task_id!r}")
    return v


def _is_candidate(tree: Tree, node: Node) -> bool:
    if node.id == ROOT_ID:
        return True
    return not node.terminal and any(tree.nodes[c].children for c in node.children)


def _near_selected(tree: Tree, node: Node, select_dist: float) -> bool:
    for sid in tree.selected:
        if sid == ROOT_ID or node.id == ROOT_ID:  # the root is at distance 0 from itself, far from the rest
            if sid == node.id and select_dist > 0:
                return True
            continue
        if normalized_distance(node.utterance, tree.nodes[sid].utterance) < select_dist:
            return True
    return False


def reference_candidates(tree: Tree, select_dist: float) -> list[str]:
    """Node ids eligible for reference selection now, in creation order (before the top-k cut)."""
    nodes = tree.nodes.values()
    return [n.id for n in nodes if _is_candidate(tree, n) and not _near_selected(tree, n, select_dist)]


def selection_distribution(
    tree: Tree, cfg: SearchConfig, value_fn: ValueFn = q_value
) -> tuple[list[str], np.ndarray]:
    """The reference policy's choice set and probabilities: top ``top_k`` candidates by value (ties by
    creation order), p ∝ exp(value). Falls back to the root with probability 1 when nothing is eligible."""
    cands = reference_candidates(tree, cfg.select_dist)
    if not cands:
        return [ROOT_ID], np.ones(1)
    scored = sorted(
        ((_value(value_fn, tree, tree.nodes[c]), c) for c in cands), key=lambda t: (-t[0], node_order(t[1]))
    )
    top = scored[: cfg.top_k]
    values = np.array([v for v, _ in top], dtype=np.float64)
    weights = np.exp(values - values.max())
    return [c for _, c in top], weights / weights.sum()


def select_reference(
    tree: Tree, cfg: SearchConfig, rng: np.random.Generator, value_fn: ValueFn = q_value
) -> str:
    """Sample one node by the reference (Optima) rule; see the module docstring."""
    ids, probs = selection_distribution(tree, cfg, value_fn)
    return ids[int(rng.choice(len(ids), p=probs))]


def select_uct(tree: Tree, cfg: SearchConfig, value_fn: ValueFn = q_value) -> str:
    """UCT descent from the root.

    At each node: if it has fewer than ``uct_width`` children, or no non-terminal child, it is selected
    (it still has room to branch). Otherwise descend into the non-terminal child maximising
    ``value_fn(child) + uct_c * sqrt(ln(N_parent) / N_child)`` (an unvisited child scores +inf; ties by
    creation order). Terminal nodes are never entered, hence never selected.
    """
    node = tree.root
    while True:
        open_children = [tree.nodes[c] for c in node.children if not tree.nodes[c].terminal]
        if len(node.children) < cfg.uct_width or not open_children:
            return node.id
        log_n = math.log(max(node.visits, 1))

        def score(child: Node, log_n: float = log_n) -> float:
            if child.visits == 0:
                return math.inf
            return _value(value_fn, tree, child) + cfg.uct_c * math.sqrt(log_n / child.visits)

        node = max(open_children, key=lambda c: (score(c), -node_order(c.id)))


def select_node(tree: Tree, cfg: SearchConfig, rng: np.random.Generator, value_fn: ValueFn = q_value) -> str:
    """Select the node to expand under ``cfg.policy``."""
    if cfg.policy == "uct":
        return select_uct(tree, cfg, value_fn)
    return select_reference(tree, cfg, rng, value_fn)


# -- driver ------------------------------------------------------------------------------------------


def run_search(
    tasks: Sequence[str],
    rollouter: Rollouter,
    cfg: SearchConfig | None = None,
    *,
    seed: int,
    value_fn: ValueFn = q_value,
    on_step: OnStep | None = None,
    n_agents: int = 2,
) -> list[Tree]:
    """Grow one tree per task id, all in lockstep; the rollouter is called exactly once per explore step
    (never per tree or per rollout). Returns the trees in task order."""
    cfg = cfg or SearchConfig()
    task_ids = list(tasks)
    if len(set(task_ids)) != len(task_ids):
        dupes = sorted({t for t in task_ids if task_ids.count(t) > 1})
        raise ValueError(f"duplicate task ids in one shard: {dupes}")
    trees = [Tree.new(t, seed=seed, n_agents=n_agents) for t in task_ids]
    rngs = [tree_rng(seed, t) for t in task_ids]
    if not trees:
        return trees

    for step in range(cfg.explore):
        n_roll = cfg.rollouts_at(step)
        chosen: list[str] = []
        requests: list[RolloutRequest] = []
        for tree, rng in zip(trees, rngs, strict=True):
            nid = select_node(tree, cfg, rng, value_fn)
            tree.selected.append(nid)
            chosen.append(nid)
            prefix = tree.prefix(nid)
            requests.extend(
                RolloutRequest(
                    task_id=tree.task_id,
                    node_id=nid,
                    prefix=list(prefix),
                    seed=request_seed(seed, tree.task_id, step, k),
                    step=step,
                    k=k,
                )
                for k in range(n_roll)
            )

        results = list(rollouter(requests))
        if len(results) != len(requests):
            raise ValueError(f"rollouter returned {len(results)} results for {len(requests)} requests")

        for i, (tree, nid) in enumerate(zip(trees, chosen, strict=True)):
            for k in range(n_roll):
                j = i * n_roll + k
                req = requests[j]
                res = results[j]
                if not isinstance(res, RolloutResult):
                    res = RolloutResult.model_validate(res)
                tree.record_rollout(
                    nid,
                    res.continuation,
                    res.reward,
                    terms=res.terms,
                    metric=res.metric,
                    stop_reason=res.stop_reason,
                    tokens=res.tokens,
                    merge_dist=cfg.merge_dist,
                    step=step,
                    seed=req.seed,
                )
        if on_step is not None:
            on_step(step, trees)
    return trees
