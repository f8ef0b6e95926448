"""MCTS driver: batching, statistics, the reference selection rule, UCT, and shard independence.

The model is replaced by a scripted policy whose choices depend only on the request seed and whose reward
is a known function of the transcript, so every statistic can be recounted by brute force.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from dits.search.mcts import (
    RolloutRequest,
    RolloutResult,
    SearchConfig,
    reference_candidates,
    request_seed,
    run_search,
    select_reference,
    select_uct,
    selection_distribution,
)
from dits.search.tree import ROOT_ID, Node, Tree
from tests.helpers import TASKS, ScriptedRollouter, reward_of

# -- independent brute-force helpers ------------------------------------------------------------------


def _lev(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _nd(a: str, b: str) -> float:
    return _lev(a, b) / (max(len(a), len(b)) + 1)


def brute_eligible(tree: Tree, selected: list[str], select_dist: float) -> tuple[list[str], int]:
    """Eligible node ids under the reference rule, and how many structural candidates the filter dropped."""
    out, dropped = [], 0
    for nid, node in tree.nodes.items():
        if nid != ROOT_ID:
            if node.terminal:
                continue
            if not any(tree.nodes[g].children for g in node.children):
                continue
        near = False
        for s in selected:
            if s == ROOT_ID or nid == ROOT_ID:
                near = near or (s == nid and select_dist > 0)
            elif _nd(node.utterance, tree.nodes[s].utterance) < select_dist:
                near = True
        if near:
            dropped += 1
        else:
            out.append(nid)
    return out, dropped


def check_stats(tree: Tree) -> None:
    """Every node's statistics equal a recount over the recorded rollouts."""
    for nid, node in tree.nodes.items():
        through = [r for r in tree.rollouts if nid in r.path]
        assert node.visits == len(through), nid
        assert node.value_sum == pytest.approx(sum(r.reward for r in through), abs=1e-12), nid
        assert node.rollouts == [r.index for r in through], nid
        if node.visits:
            assert node.q == pytest.approx(np.mean([r.reward for r in through]))
    for r in tree.rollouts:
        assert r.path[0] == ROOT_ID
        for up, down in zip(r.path, r.path[1:], strict=False):
            assert tree.nodes[down].parent == up
        assert r.path[: len(tree.path(r.start))] == tree.path(r.start)
        assert len(r.path) == len(tree.path(r.start)) + len(r.continuation)
        for nid, text in zip(r.path[len(tree.path(r.start)) :], r.continuation, strict=True):
            assert _nd(tree.nodes[nid].utterance, text) < 0.1
        transcript = tree.transcript(r.index)
        assert r.reward == reward_of(transcript)
        if len(r.path) > 1:
            assert tree.nodes[r.path[-1]].terminal


# -- driver ---------------------------------------------------------------------------------------------


def test_rollouter_called_once_per_step_with_all_trees() -> None:
    roll = ScriptedRollouter()
    cfg = SearchConfig(explore=5, expand=3)
    trees = run_search(TASKS, roll, cfg, seed=1)
    assert len(roll.calls) == cfg.explore
    for step, call in enumerate(roll.calls):
        assert len(call) == len(TASKS) * cfg.expand
        assert [r.task_id for r in call] == [t for t in TASKS for _ in range(cfg.expand)]
        for req in call:
            assert req.step == step
            assert req.seed == request_seed(1, req.task_id, step, req.k)
            tree = trees[TASKS.index(req.task_id)]
            assert tree.selected[step] == req.node_id
    seeds = [r.seed for call in roll.calls for r in call]
    assert len(set(seeds)) == len(seeds)  # every (task, step, k) samples differently
    assert [t.task_id for t in trees] == TASKS
    assert all(len(t.rollouts) == cfg.explore * cfg.expand for t in trees)
    assert all(len(t.selected) == cfg.explore for t in trees)


def test_initial_rollouts_apply_to_step_zero_only() -> None:
    roll = ScriptedRollouter()
    run_search(TASKS[:2], roll, SearchConfig(explore=3, expand=2, initial_rollouts=5), seed=0)
    assert [len(c) for c in roll.calls] == [10, 4, 4]


@pytest.mark.parametrize("policy", ["reference", "uct"])
def test_node_statistics_equal_brute_force_recount(policy: str) -> None:
    trees = run_search(TASKS, ScriptedRollouter(), SearchConfig(explore=8, policy=policy), seed=7)
    for tree in trees:
        check_stats(tree)
        assert tree.root.visits == 24


def test_near_duplicates_merge_in_search() -> None:
    trees = run_search(TASKS, ScriptedRollouter(), SearchConfig(explore=8), seed=3)
    merged = 0
    for tree in trees:
        for node in tree.nodes.values():
            texts = [tree.nodes[c].utterance for c in node.children]
            # siblings are pairwise at least merge_dist apart, so "42." and "42!" never coexist
            for i in range(len(texts)):
                for j in range(i + 1, len(texts)):
                    assert _nd(texts[i], texts[j]) >= 0.1
        for r in tree.rollouts:
            start = len(tree.path(r.start))
            merged += sum(
                tree.nodes[nid].utterance != text
                for nid, text in zip(r.path[start:], r.continuation, strict=True)
            )
    assert merged > 0  # the scripted vocabulary really exercises merging


@pytest.mark.parametrize("top_k", [10, 2])
def test_selection_never_picks_a_filtered_node(top_k: int) -> None:
    cfg = SearchConfig(explore=8, top_k=top_k)
    snapshots: dict[int, list[str]] = {}
    trees = run_search(
        TASKS,
        ScriptedRollouter(),
        cfg,
        seed=5,
        on_step=lambda step, ts: snapshots.__setitem__(step, [t.to_json() for t in ts]),
    )
    total_dropped = 0
    for ti, tree in enumerate(trees):
        assert tree.selected[0] == ROOT_ID
        for step in range(1, cfg.explore):
            before = Tree.from_json(snapshots[step - 1][ti])
            chosen = tree.selected[step]
            eligible, dropped = brute_eligible(before, tree.selected[:step], cfg.select_dist)
            total_dropped += dropped
            if not eligible:
                assert chosen == ROOT_ID
                continue
            assert chosen in eligible
            assert chosen == ROOT_ID or not before.nodes[chosen].terminal
            ranked = sorted(eligible, key=lambda n: (-before.nodes[n].q, int(n[1:])))
            assert ranked.index(chosen) < top_k
            assert sorted(reference_candidates(before, cfg.select_dist), key=lambda n: int(n[1:])) == sorted(
                eligible, key=lambda n: int(n[1:])
            )
    assert total_dropped > 0  # the filter did bite somewhere


def _chain_tree(values: list[float], texts: list[str]) -> Tree:
    """Root → X_i → Y_i → Z_i chains; each X_i has a grandchild, so each is a candidate with Q = values[i]."""
    tree = Tree.new("hand")
    for v, text in zip(values, texts, strict=True):
        tree.record_rollout(ROOT_ID, [text, f"Bob: reply to {text}", f"Alice: end of {text}"], v)
    tree.selected = [ROOT_ID]
    return tree


FAR_TEXTS = [
    "Alice: apples are red",
    "Alice: the sky looks grey today",
    "Alice: 17 plus 25 is 42",
    "Alice: Zorvath lives in Melbrook",
    "Alice: I am not sure at all",
]


def test_sampling_follows_softmax_of_top_k() -> None:
    values = [0.1, 0.9, 0.5, 1.4, -0.3]
    tree = _chain_tree(values, FAR_TEXTS)
    xs = tree.root.children
    assert sorted(reference_candidates(tree, 0.25)) == sorted(xs)
    cfg = SearchConfig(top_k=3)
    ids, probs = selection_distribution(tree, cfg)
    top = sorted(range(5), key=lambda i: -values[i])[:3]
    expect = np.exp([values[i] for i in top])
    expect /= expect.sum()
    assert ids == [xs[i] for i in top]
    np.testing.assert_allclose(probs, expect, rtol=1e-12)
    rng = np.random.default_rng(0)
    n = 20000
    counts = Counter(select_reference(tree, cfg, rng) for _ in range(n))
    assert set(counts) == set(ids)
    for nid, p in zip(ids, expect, strict=True):
        assert abs(counts[nid] / n - p) < 0.015


def test_selection_reads_values_only_through_value_fn() -> None:
    values = [0.1, 0.9, 0.5, 1.4, -0.3]
    tree = _chain_tree(values, FAR_TEXTS)
    xs = tree.root.children
    calls: list[str] = []

    def flipped(t: Tree, node: Node) -> float:
        calls.append(node.id)
        return -node.q

    ids, probs = selection_distribution(tree, SearchConfig(top_k=2), flipped)
    assert ids == [xs[4], xs[0]]  # the two lowest Q now rank first
    np.testing.assert_allclose(probs, np.exp([0.3, -0.1]) / np.exp([0.3, -0.1]).sum())
    assert sorted(calls) == sorted(xs)
    boosted = selection_distribution(tree, SearchConfig(), lambda t, n: 500.0 if n.id == xs[2] else n.q)
    assert boosted[0][0] == xs[2] and boosted[1][0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="value_fn"):
        selection_distribution(tree, SearchConfig(), lambda t, n: float("nan"))


def test_filter_terminal_and_structure_by_hand() -> None:
    texts = [
        "Alice: I think it is 42.",
        "Alice: I think it is 42!",  # 1/25 from the selected one: filtered
        "Alice: I think it is 43.",  # 1/25: filtered
        "Alice: apples are red",  # far: kept
        "Alice: Zorvath lives in Melbrook",  # far, but made terminal below: excluded
    ]
    tree = Tree.new("hand")
    ids = []
    for i, text in enumerate(texts):
        # distinct Bob replies so that every X has a grandchild, and merge_dist 0 keeps near-duplicates apart
        path = tree.add_path(ROOT_ID, [text, f"Bob: reply {i}", "Alice: end"], merge_dist=0.0)
        tree.backpropagate([ROOT_ID, *path], 0.5)
        ids.append(path[0])
    tree.nodes[ids[4]].terminal = True
    only_child = tree.add_path(ROOT_ID, ["Alice: a lonely line", "Bob: and no grandchild"])[0]
    tree.selected = [ROOT_ID, ids[0]]
    assert reference_candidates(tree, 0.25) == [ids[3]]
    assert only_child not in reference_candidates(tree, 0.0)
    assert ids[4] not in reference_candidates(tree, 0.0)
    # with no filtering threshold, even the selected node is eligible again (reference semantics: d < 0)
    assert reference_candidates(tree, 0.0) == [ROOT_ID, *ids[:4]]
    # everything filtered → the root is selected, as in the reference
    tree.selected.append(ids[3])
    assert reference_candidates(tree, 0.25) == []
    assert select_reference(tree, SearchConfig(), np.random.default_rng(0)) == ROOT_ID


def test_uct_matches_brute_force_argmax() -> None:
    tree = Tree.new("uct")
    rewards = {"Alice: a": [1.0, 0.0], "Alice: b": [0.6], "Alice: c": [0.2, 0.2, 0.2]}
    for text, rs in rewards.items():
        for r in rs:
            tree.record_rollout(ROOT_ID, [text, "Bob: x"], r)
    cfg = SearchConfig(policy="uct", uct_c=1.0, uct_width=3)
    n = tree.root.visits
    scores = {c: tree.nodes[c].q + math.sqrt(math.log(n) / tree.nodes[c].visits) for c in tree.root.children}
    best = max(scores, key=lambda c: scores[c])
    assert select_uct(tree, cfg) == best  # root is full (3 children), descend; best has 1 child < 3
    assert select_uct(tree, cfg.model_copy(update={"uct_width": 4})) == ROOT_ID
    # the exploitation term is read through value_fn: a large bonus on "Alice: c" wins the descent
    c_id = tree.root.children[2]
    assert select_uct(tree, cfg, lambda t, node: 10.0 if node.id == c_id else node.q) == c_id
    # a terminal child is never entered
    tree.nodes[best].terminal = True
    second = max((c for c in scores if c != best), key=lambda c: scores[c])
    assert select_uct(tree, cfg) == second


def test_uct_search_never_selects_terminal() -> None:
    snapshots: dict[int, list[str]] = {}
    cfg = SearchConfig(explore=8, policy="uct")
    trees = run_search(
        TASKS,
        ScriptedRollouter(),
        cfg,
        seed=2,
        on_step=lambda step, ts: snapshots.__setitem__(step, [t.to_json() for t in ts]),
    )
    deeper = 0
    for ti, tree in enumerate(trees):
        for step in range(1, cfg.explore):
            before = Tree.from_json(snapshots[step - 1][ti])
            chosen = tree.selected[step]
            assert chosen == select_uct(before, cfg)  # UCT is deterministic given the tree
            assert chosen == ROOT_ID or not before.nodes[chosen].terminal
            deeper += chosen != ROOT_ID
    assert deeper > 0


def test_per_tree_results_do_not_depend_on_the_shard() -> None:
    cfg = SearchConfig(explore=6)
    together = {t.task_id: t.to_json() for t in run_search(TASKS, ScriptedRollouter(), cfg, seed=9)}
    shuffled = run_search(TASKS[::-1], ScriptedRollouter(), cfg, seed=9)
    for tree in shuffled:
        assert tree.to_json() == together[tree.task_id]
    for task in TASKS:
        (alone,) = run_search([task], ScriptedRollouter(), cfg, seed=9)
        assert alone.to_json() == together[task]
    other = run_search(TASKS[:1], ScriptedRollouter(), cfg, seed=10)[0]
    assert other.to_json() != together[TASKS[0]]


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        run_search(["a", "a"], ScriptedRollouter(), SearchConfig(explore=1), seed=0)

    def short(reqs: list[RolloutRequest]) -> list[RolloutResult]:
        return [ScriptedRollouter.one(reqs[0])]

    with pytest.raises(ValueError, match="results for"):
        run_search(["a", "b"], short, SearchConfig(explore=1), seed=0)
    assert run_search([], ScriptedRollouter(), seed=0) == []
    with pytest.raises(ValueError):
        SearchConfig(expand=0)
    with pytest.raises(ValueError):
        SearchConfig(policy="greedy")  # type: ignore[arg-type]
