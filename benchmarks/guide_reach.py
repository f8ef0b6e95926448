"""How often can influence-guided search steer a selection at all? Model-free, in seconds.

The guide's value ``Q + λ·Î`` only changes a selection if some *selectable* node (the reference rule's
candidates after its near-selected filter) has Î ≠ 0. Which nodes get Î ≠ 0 depends only on the tree's
shape and on where a pair's score is credited, not on the scores, so a synthetic rollouter suffices: each
rollout ends its conversation at a length drawn in [1, ``--max-turns``] (at least one more utterance),
with random utterances (far apart: no merges, no near-selected exclusion by likeness) and a random
reward. After each step, with every candidate pair given a nonzero score, it counts the selectable nodes
with Î ≠ 0 under two credit rules:

- ``parent``: a pair's score credited to its parent and the parent's ancestors (dits before 2026-12-05);
- ``chosen``: credited to its chosen child's path (the chosen node, the parent, its ancestors; dits now).

Prints one JSON object: per ``--max-turns`` and step, the mean count of selectable nodes, of those with
Î ≠ 0 under each rule, and the share of trees where at least one has.

    .venv/bin/python benchmarks/guide_reach.py --max-turns 4 --max-turns 10
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np

from dits.search.guided import candidate_pairs, subtree_influence
from dits.search.mcts import (
    Rollouter,
    RolloutRequest,
    RolloutResult,
    SearchConfig,
    reference_candidates,
    run_search,
)
from dits.search.tree import Tree


def rollouter(max_turns: int) -> Rollouter:
    def roll(requests: list[RolloutRequest]) -> list[RolloutResult]:
        out = []
        for r in requests:
            rng = np.random.default_rng(r.seed)
            end = max(len(r.prefix) + 1, int(rng.integers(1, max_turns + 1)))
            # Random words: any two utterances are far apart, so no filter or merge acts on text likeness.
            cont = [f"{'AB'[i % 2]}: " + rng.bytes(12).hex() for i in range(len(r.prefix), end)]
            out.append(RolloutResult(continuation=cont, reward=float(rng.random()), stop_reason="agree"))
        return out

    return roll


def reach(max_turns: int, trees: int, explore: int, expand: int, seed: int) -> list[dict[str, float]]:
    cfg = SearchConfig(explore=explore, expand=expand)
    rows: dict[int, list[tuple[int, int, int]]] = {}

    def on_step(step: int, grown: list[Tree]) -> None:
        for tree in grown:
            cands = reference_candidates(tree, cfg.select_dist)
            pairs = candidate_pairs(tree)
            by_parent = subtree_influence(tree, {p.node_id: 1.0 for p in pairs})
            by_chosen = subtree_influence(tree, {p.chosen_id: 1.0 for p in pairs})
            counts = (len(cands), sum(c in by_parent for c in cands), sum(c in by_chosen for c in cands))
            rows.setdefault(step + 1, []).append(counts)

    run_search([f"t{i}" for i in range(trees)], rollouter(max_turns), cfg, seed=seed, on_step=on_step)
    return [
        {
            "step": step,
            "selectable": statistics.fmean(c for c, _, _ in v),
            "reached_parent": statistics.fmean(p for _, p, _ in v),
            "trees_reached_parent": statistics.fmean(p > 0 for _, p, _ in v),
            "reached_chosen": statistics.fmean(h for _, _, h in v),
            "trees_reached_chosen": statistics.fmean(h > 0 for _, _, h in v),
        }
        for step, v in sorted(rows.items())
        if step < explore  # the selection after the last step never happens
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-turns", type=int, action="append", default=[], help="repeatable (default 4, 10)")
    ap.add_argument("--trees", type=int, default=200)
    ap.add_argument("--explore", type=int, default=8)
    ap.add_argument("--expand", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = {
        "benchmark": "guide_reach",
        "settings": {"trees": args.trees, "explore": args.explore, "expand": args.expand, "seed": args.seed},
        "by_max_turns": {
            str(m): reach(m, args.trees, args.explore, args.expand, args.seed)
            for m in args.max_turns or [4, 10]
        },
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
