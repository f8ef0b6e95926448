"""Pair mining: thresholds, best/worst recomputed at mining time, top-fraction cut, against brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dits.records import PreferencePair
from dits.search.mcts import RolloutRequest, RolloutResult, SearchConfig, run_search
from dits.search.pairs import keep_count, mine_pairs, mine_tree_pairs
from dits.search.tree import ROOT_ID, Tree

LINES = {
    0: ["Alice: it is 42.", "Alice: it is 42!", "Alice: maybe 7", "Alice: <A>42</A>", "Alice: hmm"],
    1: ["Bob: sure?", "Bob: <A>42</A>", "Bob: <A>7</A>", "Bob: I agree, 42", "Bob: no"],
}


def _rollouter(requests: list[RolloutRequest]) -> list[RolloutResult]:
    """Random-length conversations; reward is a fixed function of the texts (so Q values spread out)."""
    out = []
    for req in requests:
        rng = np.random.default_rng(req.seed)
        conv = list(req.prefix)
        cont: list[str] = []
        stop = len(conv) >= 4 or (conv and "<A>" in conv[-1] and len(conv) >= 2)
        while not stop:
            u = LINES[len(conv) % 2][int(rng.integers(5))]
            conv.append(u)
            cont.append(u)
            stop = len(conv) >= 4 or ("<A>" in u and len(conv) >= 2)
        reward = sum(("42" in u) - 0.3 * ("7" in u) for u in conv) / len(conv)
        out.append(RolloutResult(continuation=cont, reward=reward))
    return out


def brute_force_pairs(tree: Tree, tau: float, min_gap: float, fraction: float) -> list[tuple[str, str, str]]:
    """(parent, chosen, rejected) from the rollouts alone: Q(child) = mean reward of rollouts through it."""

    def q(nid: str) -> float:
        rs = [r.reward for r in tree.rollouts if nid in r.path]
        return sum(rs) / len(rs) if rs else 0.0

    found = []
    for nid, node in tree.nodes.items():
        kids = node.children
        if len(kids) < 2:
            continue
        qs = {c: q(c) for c in kids}
        top = max(qs.values())
        low = min(qs.values())
        best = sorted((c for c in kids if qs[c] == top), key=lambda c: int(c[1:]))[0]
        worst = sorted((c for c in kids if qs[c] == low), key=lambda c: int(c[1:]))[0]
        if top > tau and top - low > min_gap:
            found.append((top, int(nid[1:]), nid, best, worst))
    found.sort(key=lambda t: (-t[0], t[1]))
    n = len(found)
    keep = 0 if n == 0 else max(1, math.floor(n * fraction))
    return [(p, b, w) for _, _, p, b, w in found[:keep]]


@pytest.mark.parametrize(("tau", "min_gap"), [(0.4, 0.2), (0.2, 0.1), (0.45, 0.2)])
def test_mined_pairs_equal_brute_force(tau: float, min_gap: float) -> None:
    trees = run_search([f"t{i}" for i in range(6)], _rollouter, SearchConfig(explore=8), seed=4)
    total = 0
    for tree in trees:
        pairs = mine_pairs(tree, tau=tau, min_gap=min_gap)
        assert [(p.node_id, p.chosen_id, p.rejected_id) for p in pairs] == brute_force_pairs(
            tree, tau, min_gap, 0.5
        )
        for p in pairs:
            assert p.q_chosen > tau and p.q_chosen - p.q_rejected > min_gap
            parent = tree.nodes[p.node_id]
            assert p.chosen_id in parent.children and p.rejected_id in parent.children
            assert p.prefix == tree.prefix(p.node_id)
            assert p.speaker == parent.depth % 2 == tree.nodes[p.chosen_id].speaker
            assert (
                p.chosen == tree.nodes[p.chosen_id].utterance
                and p.rejected == tree.nodes[p.rejected_id].utterance
            )
            assert (
                p.q_chosen == tree.nodes[p.chosen_id].q and p.visits_chosen == tree.nodes[p.chosen_id].visits
            )
            assert p.prompt is None
        total += len(pairs)
    assert total > 0


def test_top_half_cut_is_applied() -> None:
    trees = run_search([f"t{i}" for i in range(6)], _rollouter, SearchConfig(explore=8), seed=4)
    cut = False
    for tree in trees:
        everything = mine_pairs(tree, tau=0.0, min_gap=0.0, keep_top_fraction=1.0)
        half = mine_pairs(tree, tau=0.0, min_gap=0.0)
        assert half == everything[: keep_count(len(everything), 0.5)]
        assert [p.q_chosen for p in everything] == sorted((p.q_chosen for p in everything), reverse=True)
        cut = cut or len(half) < len(everything)
    assert cut


def _hand_tree() -> Tree:
    """root → {A: 0.9, B: 0.1, C: 0.5}; A → {Ab1: 1.0, Ab2: 0.8}; C → {Cb1: 0.9, Cb2: 0.1}."""
    tree = Tree.new("hand")
    tree.record_rollout(ROOT_ID, ["A", "Ab1"], 1.0)
    tree.record_rollout(ROOT_ID, ["A", "Ab2"], 0.8)
    tree.record_rollout(ROOT_ID, ["B is a different line"], 0.1)
    tree.record_rollout(ROOT_ID, ["C", "Cb1 long text"], 0.9)
    tree.record_rollout(ROOT_ID, ["C", "Cb2 other text"], 0.1)
    return tree


def test_hand_tree_pairs() -> None:
    tree = _hand_tree()
    ids = {n.utterance: n.id for n in tree.nodes.values()}
    # root: best A (0.9), worst B (0.1), gap 0.8 ✓; A: gap 0.2 not > 0.2 ✗; C: best 0.9, gap 0.8 ✓.
    # Two qualify, tie on Q(best) = 0.9 → parent creation order (root first); top half of 2 = 1.
    pairs = mine_pairs(tree, keep_top_fraction=1.0)
    assert [(p.node_id, p.chosen, p.rejected) for p in pairs] == [
        (ROOT_ID, "A", "B is a different line"),
        (ids["C"], "Cb1 long text", "Cb2 other text"),
    ]
    assert pairs[0].speaker == 0 and pairs[1].speaker == 1 and pairs[1].prefix == ["C"]
    assert pairs[0].q_chosen == pytest.approx(0.9) and pairs[0].visits_chosen == 2
    assert [p.node_id for p in mine_pairs(tree)] == [ROOT_ID]
    assert len(mine_pairs(tree, keep_top_fraction=0.5, rounding="ceil")) == 1
    assert mine_pairs(tree, tau=0.95) == []
    assert [p.node_id for p in mine_pairs(tree, min_gap=0.19, keep_top_fraction=1.0)] == [
        ids["A"],
        ROOT_ID,
        ids["C"],
    ]


def test_best_and_worst_are_recomputed_not_cached() -> None:
    tree = _hand_tree()
    first = mine_pairs(tree, keep_top_fraction=1.0)[0]
    assert first.chosen == "A"
    # B's branch now wins: five high rewards through B make it the best child of the root.
    for _ in range(5):
        tree.record_rollout(ROOT_ID, ["B is a different line", "Bob: fine"], 1.5)
    root_pair = next(p for p in mine_pairs(tree, keep_top_fraction=1.0) if p.node_id == ROOT_ID)
    assert root_pair.chosen == "B is a different line" and root_pair.rejected == "C"


def test_ties_break_by_creation_order() -> None:
    tree = Tree.new("ties")
    for text in ["first", "second option", "third variant", "fourth words"]:
        tree.record_rollout(ROOT_ID, [text], 1.0 if text in {"second option", "fourth words"} else 0.0)
    (pair,) = mine_pairs(tree)
    assert pair.chosen == "second option" and pair.rejected == "first"
    # creation order is numeric: n2 precedes n10 (a string sort would not)
    wide = Tree.new("wide")
    words = [
        "alpha",
        "bravo",
        "charlie",
        "delta",
        "echo",
        "foxtrot",
        "golf",
        "hotel",
        "india",
        "juliet",
        "kilo",
        "lima",
    ]
    for i, word in enumerate(words):
        wide.record_rollout(ROOT_ID, [word], 1.0 if i in {1, 9} else 0.0)
    assert [wide.root.children[i] for i in (1, 9)] == ["n2", "n10"]
    (pair,) = mine_pairs(wide)
    assert pair.chosen_id == "n2" and pair.rejected_id == "n1"


def test_mine_tree_pairs_renders_the_prompt_and_prefix_for_the_speaker() -> None:
    from dits.mas.protocol import ProtocolConfig, render_view
    from dits.search.pairs import PairConfig
    from tests.helpers import EXAMPLES

    tree = _hand_tree()
    example = EXAMPLES[0].model_copy(update={"id": "hand"})
    proto = ProtocolConfig(turn_prefix=True)
    pairs = mine_tree_pairs(tree, example, proto, PairConfig(tau=-10.0, min_gap=0.0, keep_top_fraction=1.0))
    plain = mine_pairs(tree, tau=-10.0, min_gap=0.0, keep_top_fraction=1.0)
    key = [(p.node_id, p.speaker, p.prefix) for p in plain]
    assert [(p.node_id, p.speaker, p.prefix) for p in pairs] == key
    assert {p.speaker for p in pairs} == {0, 1}  # both agents' views are rendered
    for p in pairs:
        assert p.prompt == render_view(example, p.prefix, p.speaker, proto)
        assert p.response_prefix == ("Alice:", "Bob:")[p.speaker]
        assert p.chosen_response == f"{p.response_prefix} {p.chosen}"
    back = PreferencePair.model_validate_json(pairs[1].model_dump_json())
    assert back == pairs[1]


@pytest.mark.parametrize(
    ("n", "reference", "ceil"),
    [(0, 0, 0), (1, 1, 1), (2, 1, 1), (3, 1, 2), (4, 2, 2), (5, 2, 3), (10, 5, 5)],
)
def test_keep_count(n: int, reference: int, ceil: int) -> None:
    assert keep_count(n, 0.5) == reference
    # the reference's literal rule: keep[: int(0.5 n)] if int(0.7 n) >= 1 else everything
    assert reference == (int(0.5 * n) if int(0.7 * n) >= 1 else n)
    assert keep_count(n, 0.5, "ceil") == ceil
    assert keep_count(n, 1.0) == n


def test_bad_fraction_is_refused() -> None:
    with pytest.raises(ValueError, match="keep_top_fraction"):
        mine_pairs(_hand_tree(), keep_top_fraction=0.0)
