"""Tree records: edit distance, sibling merge, ids/depth/speaker, backpropagation, JSON round trip."""

from __future__ import annotations

import json
import random

import pytest
from pydantic import ValidationError

from dits.search.textdist import edit_distance, is_near, normalized_distance
from dits.search.tree import ROOT_ID, Tree, node_order


def _lev(a: str, b: str) -> int:
    """Textbook dynamic-programming Levenshtein, independent of rapidfuzz."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


@pytest.mark.parametrize(
    ("a", "b", "dist", "norm"),
    [
        ("kitten", "sitting", 3, 3 / 8),
        ("", "", 0, 0.0),
        ("abc", "", 3, 3 / 4),
        ("abc", "abc", 0, 0.0),
        ("flaw", "lawn", 2, 2 / 5),
        ("café", "cafe", 1, 1 / 5),
        ("Alice: I think it is 42.", "Alice: I think it is 42!", 1, 1 / 25),
        ("Bob: ok", "Bob: ok.", 1, 1 / 9),
    ],
)
def test_edit_distance_hand_worked(a: str, b: str, dist: int, norm: float) -> None:
    assert edit_distance(a, b) == dist
    assert normalized_distance(a, b) == pytest.approx(norm, abs=1e-15)
    assert normalized_distance(b, a) == pytest.approx(norm, abs=1e-15)


def test_edit_distance_matches_dynamic_programming() -> None:
    rng = random.Random(0)
    for _ in range(300):
        a = "".join(rng.choice("abcé ") for _ in range(rng.randint(0, 12)))
        b = "".join(rng.choice("abcé ") for _ in range(rng.randint(0, 12)))
        assert edit_distance(a, b) == _lev(a, b)
        assert normalized_distance(a, b) == _lev(a, b) / (max(len(a), len(b)) + 1)


def test_is_near_is_strict() -> None:
    assert normalized_distance("ab", "ac") == pytest.approx(1 / 3)
    assert not is_near("ab", "ac", 1 / 3)
    assert is_near("ab", "ac", 0.34)
    assert not is_near("x", "x", 0.0)


def test_ids_depth_speaker_and_prefix() -> None:
    tree = Tree.new("t", seed=3)
    ids = tree.add_path(ROOT_ID, ["a1", "b1", "a2"])
    assert ids == ["n1", "n2", "n3"]
    assert [tree.nodes[i].depth for i in ids] == [1, 2, 3]
    assert [tree.nodes[i].speaker for i in ids] == [0, 1, 0]
    assert tree.root.speaker is None and tree.root.utterance == "" and tree.root.depth == 0
    assert tree.prefix("n3") == ["a1", "b1", "a2"]
    assert tree.prefix(ROOT_ID) == []
    assert tree.path("n3") == ["n0", "n1", "n2", "n3"]
    assert tree.nodes["n2"].parent == "n1" and tree.nodes["n1"].children == ["n2"]
    assert node_order("n10") > node_order("n9")
    with pytest.raises(KeyError, match="no node"):
        tree.prefix("n99")


def test_add_path_merges_near_duplicates_only() -> None:
    tree = Tree.new("t")
    first = tree.add_path(ROOT_ID, ["Alice: I think it is 42.", "Bob: ok"])
    # 1/25 = 0.04 < 0.1 merges; "Bob: ok" vs "Bob: ok." is 1/9 = 0.111 > 0.1, a new sibling.
    second = tree.add_path(ROOT_ID, ["Alice: I think it is 42!", "Bob: ok."])
    assert second[0] == first[0]
    assert second[1] != first[1]
    assert tree.nodes[first[0]].children == [first[1], second[1]]
    # An exact repeat walks the same path and creates nothing.
    n_before = len(tree.nodes)
    assert tree.add_path(ROOT_ID, ["Alice: I think it is 42.", "Bob: ok"]) == first
    assert len(tree.nodes) == n_before
    # A distinct utterance is a new child of the root.
    third = tree.add_path(ROOT_ID, ["Alice: no idea, sorry"])
    assert third[0] not in first and tree.root.children == [first[0], third[0]]
    # merge_dist is honoured: with a larger threshold "Bob: ok.." merges into one of the Bob siblings.
    assert tree.add_path(first[0], ["Bob: ok.."], merge_dist=0.2) == [second[1]]  # nearest: "Bob: ok." (1/10)


def test_find_sibling_prefers_nearest_then_earliest() -> None:
    tree = Tree.new("t")
    a = tree.add_child(ROOT_ID, "abcdefghij")
    b = tree.add_child(ROOT_ID, "abcdefghik")
    c = tree.add_child(ROOT_ID, "abcdefghiz")
    assert tree.find_sibling(ROOT_ID, "abcdefghik", 0.5) == b  # exact match beats the earlier near one
    assert tree.find_sibling(ROOT_ID, "abcdefghiq", 0.5) == a  # all at 1/11: the earliest
    assert tree.find_sibling(ROOT_ID, "zzzzzzzzzz", 0.5) is None
    assert c == "n3"


def test_backpropagate_and_record_rollout() -> None:
    tree = Tree.new("t")
    r0 = tree.record_rollout(ROOT_ID, ["a", "b"], 1.0, metric=1.0, stop_reason="agree", tokens=5)
    r1 = tree.record_rollout("n1", ["c"], 0.25, step=1, seed=7)
    assert r0.path == ["n0", "n1", "n2"] and r1.path == ["n0", "n1", "n3"]
    assert tree.root.visits == 2 and tree.root.value_sum == 1.25 and tree.root.q == 0.625
    assert tree.nodes["n1"].rollouts == [0, 1] and tree.nodes["n3"].rollouts == [1]
    assert tree.nodes["n2"].terminal and tree.nodes["n3"].terminal and not tree.nodes["n1"].terminal
    assert tree.transcript(1) == ["a", "c"]
    assert tree.rollouts[1].start == "n1" and tree.rollouts[1].seed == 7
    # Empty continuation from the root: the root is visited but never marked terminal.
    tree.record_rollout(ROOT_ID, [], 0.0)
    assert not tree.root.terminal and tree.root.visits == 3
    with pytest.raises(ValueError, match="finite"):
        tree.backpropagate(["n0"], float("nan"))
    with pytest.raises(ValueError, match="not a child"):
        tree.backpropagate(["n0", "n2"], 1.0)
    with pytest.raises(ValueError, match="root"):
        tree.backpropagate(["n1"], 1.0)


def test_unvisited_q_is_zero() -> None:
    tree = Tree.new("t")
    nid = tree.add_child(ROOT_ID, "x")
    assert tree.nodes[nid].q == 0.0


def test_json_round_trip_is_exact() -> None:
    tree = Tree.new("task/ü 1", seed=11)
    tree.record_rollout(ROOT_ID, ["Alice: é\nline two", 'Bob: "quoted" <A>1</A>'], 0.1 + 0.2, metric=0.5)
    tree.record_rollout("n1", ["Bob: 1e-300"], 1 / 3, tokens=17, stop_reason="max_turns", step=1, seed=5)
    tree.record_rollout(ROOT_ID, ["Alice: é\nline two!"], -2.5e-17)
    tree.selected = ["n0", "n1"]
    text = tree.to_json()
    assert "\n" not in text  # one JSONL line
    back = Tree.from_json(text)
    assert back == tree
    assert back.to_json() == text
    assert back.nodes["n0"].value_sum == tree.nodes["n0"].value_sum  # exact float
    assert Tree.from_json(json.loads(text)) == tree
    assert list(back.nodes) == list(tree.nodes)


def test_corrupted_tree_is_rejected() -> None:
    tree = Tree.new("t")
    tree.add_path(ROOT_ID, ["a", "b"])
    data = json.loads(tree.to_json())
    data["nodes"]["n1"]["children"] = []
    with pytest.raises(ValidationError, match="not listed by its parent"):
        Tree.from_json(json.dumps(data))
    data = json.loads(tree.to_json())
    del data["nodes"]["n0"]
    with pytest.raises(ValidationError, match="root"):
        Tree.from_json(data)
