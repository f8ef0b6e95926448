"""Influence-guided search: λ = 0 is the Q-value search exactly; λ ≠ 0 moves selection as computed by hand.

The estimator is replaced by fixed per-pair scores (a function of the pair), so every Î is known; the
model side is the scripted rollouter of ``tests.helpers`` (and its seeded engine for the
``grow_pool`` path).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence

import numpy as np
import pytest

from dits.artifacts import StageChanged
from dits.config import parse_config
from dits.mas.protocol import ProtocolConfig, render_view, turn_prefix
from dits.records import Cost, InfluenceScore, PreferencePair, pair_key
from dits.search.guided import GuideConfig, InfluenceGuide, candidate_pairs, subtree_influence
from dits.search.mcts import SearchConfig, run_search, selection_distribution
from dits.search.tree import ROOT_ID, Tree
from dits.stages.context import ModelRef, StageContext
from dits.stages.search import SearchSummary, grow_pool, search_stage
from tests.helpers import (
    EXAMPLES,
    LOW,
    TASKS,
    ScriptedRollouter,
    SeededEngine,
    many_examples,
    search_config,
    tree_lines,
)
from tests.threads import one_torch_thread


class FixedScores:
    """A stand-in estimator: ``fn(pair)`` per single-pair chunk, 10 FLOPs and 0.5 s each; records calls."""

    def __init__(self, fn: Callable[[PreferencePair], float]) -> None:
        self.fn = fn
        self.calls: list[list[PreferencePair]] = []

    def score(self, chunks: Sequence[Sequence[PreferencePair]]) -> list[InfluenceScore]:
        assert all(len(c) == 1 for c in chunks)
        self.calls.append([c[0] for c in chunks])
        return [
            InfluenceScore(
                candidate=i,
                pair_ids=[pair_key(p) for p in c],
                score=self.fn(c[0]),
                estimator="fixed",
                cost=Cost(flops=10.0, seconds=0.5),
            )
            for i, c in enumerate(chunks)
        ]


class Forbidden:
    def score(self, chunks: Sequence[Sequence[PreferencePair]]) -> list[InfluenceScore]:
        raise AssertionError("λ = 0 must never call the estimator")


def hashed(pair: PreferencePair) -> float:
    """A fixed score in [-1, 1) per pair, unrelated to Q."""
    return int(hashlib.sha256(pair_key(pair).encode()).hexdigest()[:8], 16) / 2**31 - 1.0


def _json(trees: list[Tree]) -> list[str]:
    return [t.to_json() for t in trees]


# -- λ = 0 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["reference", "uct"])
@pytest.mark.parametrize("seed", [0, 3])
def test_lambda_zero_grows_the_plain_trees_and_never_scores(policy: str, seed: int) -> None:
    cfg = SearchConfig(explore=6, expand=2, policy=policy)
    plain = run_search(TASKS, ScriptedRollouter(), cfg, seed=seed)
    guide = InfluenceGuide(GuideConfig(lam=0.0), Forbidden(), explore=cfg.explore)
    guided = run_search(TASKS, ScriptedRollouter(), cfg, seed=seed, value_fn=guide, on_step=guide.on_step)
    assert _json(guided) == _json(plain)
    assert guide.refreshes == 0 and guide.pairs_scored == 0

    # The same comparison does see a guide that acts: a large λ changes some tree.
    acting = InfluenceGuide(GuideConfig(lam=5.0), FixedScores(hashed), explore=cfg.explore)
    moved = run_search(TASKS, ScriptedRollouter(), cfg, seed=seed, value_fn=acting, on_step=acting.on_step)
    assert acting.pairs_scored > 0
    if policy == "reference":
        assert _json(moved) != _json(plain)


def test_lambda_zero_synthesize_writes_the_plain_trees(tmp_path) -> None:
    examples = many_examples(4)
    cfg = search_config()
    grow_pool(SeededEngine(), examples, cfg, tmp_path / "plain", shard_size=2, progress=False, pairs=LOW)
    guide = InfluenceGuide(GuideConfig(lam=0.0), Forbidden())
    s = grow_pool(
        SeededEngine(),
        examples,
        cfg,
        tmp_path / "guided",
        shard_size=2,
        progress=False,
        pairs=LOW,
        guide=guide,
    )
    assert tree_lines(tmp_path / "guided" / "trees.jsonl") == tree_lines(tmp_path / "plain" / "trees.jsonl")
    assert s.guide_pairs_scored == 0


# -- λ ≠ 0, by hand ----------------------------------------------------------------------------------


def _hand_tree() -> Tree:
    """Root → A (Q .5) and Z (Q .4); A → A1 (1.0), A2 (0.0); Z → Z1 (.6), Z2 (.2); each with a leaf.

    Candidates: the root (Q .45), A (n1) and Z (n6); pairs at the root (A vs Z), at A and at Z."""
    tree = Tree.new("hand")
    for texts, reward in [
        (["Alice: apples are red", "Bob: yes they are red", "Alice: fine"], 1.0),
        (["Alice: apples are red", "Bob: the sky looks grey today", "Alice: ok then"], 0.0),
        (["Alice: Zorvath lives in Melbrook", "Bob: 17 plus 25 is 42", "Alice: right"], 0.6),
        (["Alice: Zorvath lives in Melbrook", "Bob: I am not sure at all", "Alice: hmm"], 0.2),
    ]:
        tree.record_rollout(ROOT_ID, texts, reward)
    return tree


HAND_SCORES = {"n0": 0.3, "n1": -0.2, "n6": 0.4}


def test_hand_tree_structure() -> None:
    tree = _hand_tree()
    assert [tree.nodes[n].utterance for n in ("n1", "n6")] == [
        "Alice: apples are red",
        "Alice: Zorvath lives in Melbrook",
    ]
    assert {p.node_id: (p.chosen_id, p.rejected_id) for p in candidate_pairs(tree)} == {
        "n0": ("n1", "n6"),
        "n1": ("n2", "n4"),
        "n6": ("n7", "n9"),
    }
    assert [tree.nodes[n].q for n in ("n0", "n1", "n6")] == pytest.approx([0.45, 0.5, 0.4])
    # Keyed by chosen node: the root's pair (chosen A) lies under A, A's (chosen A1) under A1, Z's under Z1.
    by_chosen = {"n1": 0.3, "n2": -0.2, "n7": 0.4}
    assert subtree_influence(tree, by_chosen) == pytest.approx(
        {"n0": 0.5 / 3, "n1": 0.05, "n2": -0.2, "n6": 0.4, "n7": 0.4}
    )


@pytest.mark.parametrize(
    ("scale", "lam", "expected"),
    [
        # none: Î = mean of the scores of the pairs under the node (their chosen child in its subtree):
        # n0 all three (.3 - .2 + .4) / 3; n1 the root's (chosen n1) and its own (chosen n2), (.3 - .2) / 2;
        # n6 its own (chosen n7) .4 (the root's pair rejected n6: no credit)
        ("none", 1.0, {"n0": 0.45 + 0.5 / 3, "n1": 0.5 + 0.05, "n6": 0.4 + 0.4}),
        # tree: divided by the largest |score| (.4): n0 .41667, n1 .125, n6 1
        ("tree", 0.5, {"n0": 0.45 + 0.5 * (0.5 / 3) / 0.4, "n1": 0.5 + 0.5 * 0.125, "n6": 0.4 + 0.5}),
    ],
)
def test_guided_selection_equals_the_hand_computation(scale: str, lam: float, expected: dict) -> None:
    tree = _hand_tree()
    example = EXAMPLES[0].model_copy(update={"id": "hand"})
    proto = ProtocolConfig(turn_prefix=True)
    est = FixedScores(lambda p: HAND_SCORES[p.node_id])
    guide = InfluenceGuide(GuideConfig(lam=lam, scale=scale), est, examples={"hand": example}, protocol=proto)
    guide.refresh([tree])
    # Rendered for their DPO step before scoring: the speaker's view and the forced turn prefix.
    assert sorted(len(p.prefix) for p in est.calls[0]) == [0, 1, 1]
    for p in est.calls[0]:
        assert p.prompt == render_view(example, p.prefix, p.speaker, proto)
        assert p.response_prefix == turn_prefix(p.speaker, proto) != ""

    cfg = SearchConfig(top_k=10)
    ids, probs = selection_distribution(tree, cfg, guide)
    order = sorted(expected, key=lambda n: -expected[n])
    assert ids == order == ["n6", "n0", "n1"]
    weights = np.exp([expected[n] for n in order])
    np.testing.assert_allclose(probs, weights / weights.sum(), rtol=1e-12)

    # With top_k = 1 the choice is deterministic: Q alone picks A (n1), the guided value picks Z (n6).
    assert selection_distribution(tree, SearchConfig(top_k=1))[0] == ["n1"]
    assert selection_distribution(tree, SearchConfig(top_k=1), guide)[0] == ["n6"]
    # A node with no pair's chosen child at or below it keeps its Q: A2, the rejected side of A's pair.
    assert guide(tree, tree.nodes["n4"]) == tree.nodes["n4"].q
    top = 0.4 if scale == "tree" else 1.0
    assert guide(tree, tree.nodes["n2"]) == pytest.approx(tree.nodes["n2"].q + lam * -0.2 / top)


def test_the_guide_steers_the_first_selection_after_the_root() -> None:
    """After step 0 the root's children are rollout chains and the only pair is the root's: its score must
    reach the selectable chosen child (credited to the root alone, it steered no selection), and Î must
    equal a brute-force recount over the pairs whose chosen child lies in each node's subtree."""
    cfg = SearchConfig(explore=1, expand=3)
    moved = 0
    for task in TASKS:
        (tree,) = run_search([task], ScriptedRollouter(), cfg, seed=1)
        pairs = candidate_pairs(tree)
        if not pairs:
            continue
        guide = InfluenceGuide(GuideConfig(lam=1.0, scale="none"), FixedScores(hashed))
        guide.refresh([tree])
        for node in tree.nodes.values():
            under = [hashed(p) for p in pairs if node.id in tree.path(p.chosen_id)]
            assert guide.influence(tree, node) == pytest.approx(np.mean(under) if under else 0.0)
        plain, _ = selection_distribution(tree, SearchConfig())
        ids, _ = selection_distribution(tree, SearchConfig(), guide)
        moved += guide.moved
        assert guide.reads == len(ids) == len(plain)
    assert moved > 0  # some selectable node's value moved off its Q


def test_refresh_schedule_scores_each_pair_once_and_charges_its_cost() -> None:
    est = FixedScores(hashed)
    cfg = SearchConfig(explore=6, expand=3)
    guide = InfluenceGuide(
        GuideConfig(lam=1.0, every=2), est, explore=cfg.explore, prepare_cost=Cost(flops=7.0)
    )
    refreshed_at: list[int] = []

    def on_step(step: int, trees: list[Tree]) -> None:
        before = guide.refreshes
        guide.on_step(step, trees)
        if guide.refreshes > before:
            refreshed_at.append(step)
            for tree in trees:  # Î now equals a recount from the tree's current pairs
                by_node = {p.chosen_id: hashed(p) for p in candidate_pairs(tree)}
                top = max((abs(v) for v in by_node.values()), default=0.0)
                expect = {k: v / top for k, v in subtree_influence(tree, by_node).items()} if top else {}
                assert guide.values[tree.task_id] == pytest.approx(expect)

    run_search(TASKS, ScriptedRollouter(), cfg, seed=2, value_fn=guide, on_step=on_step)
    assert refreshed_at == [1, 3]  # every 2 steps, but not after the last step (5): no selection reads it
    assert len(est.calls) == 2
    keys = [pair_key(p) for call in est.calls for p in call]
    assert len(keys) == len(set(keys)) == guide.pairs_scored > 0
    assert guide.cost.flops == 7.0 + 10.0 * len(keys)
    assert guide.cost.seconds == pytest.approx(0.5 * len(keys))


def test_synthesize_with_a_guide_counts_its_scoring_and_keys_the_manifest(tmp_path) -> None:
    examples = many_examples(2)
    cfg = search_config()
    guided_cfg = parse_config({**json.loads(cfg.model_dump_json()), "guide": {"lam": 2.0}})
    guide = InfluenceGuide(guided_cfg.guide, FixedScores(hashed), explore=cfg.search.explore)
    s = grow_pool(
        SeededEngine(), examples, guided_cfg, tmp_path / "g", progress=False, pairs=LOW, guide=guide
    )
    assert s.guide_pairs_scored == guide.pairs_scored > 0
    assert s.guide_flops == 10.0 * guide.pairs_scored
    assert guide.reads > 0 and s.guide_moved == guide.moved / guide.reads

    # A search stage grown without the guide refuses a guided rerun, naming the key.
    def stage(run_cfg):  # type: ignore[no-untyped-def]
        ctx = StageContext.single(run_cfg, tmp_path / "plain", engine=SeededEngine(), progress=False)
        search_stage(ctx, 0, None, ModelRef.base(run_cfg), examples, pairs=LOW)

    stage(cfg)
    with pytest.raises(StageChanged, match=r"guide\.lam: 0\.0 -> 2\.0"):
        stage(guided_cfg)
    with pytest.raises(ValueError, match="needs a guide"):  # grow_pool alone cannot make one
        grow_pool(SeededEngine(), examples, guided_cfg, tmp_path / "bare", progress=False)


def test_a_nonzero_lambda_needs_an_estimator() -> None:
    with pytest.raises(ValueError, match="estimator"):
        InfluenceGuide(GuideConfig(lam=0.5))
    with pytest.raises(ValueError):
        GuideConfig(lam=float("inf"))


# -- the real estimator, end to end -------------------------------------------------------------------


@pytest.mark.slow
def test_guided_synthesize_on_the_embedded_model(engine, tmp_path) -> None:
    """λ ≠ 0 through the search stage: θ is the base model, probed by a fresh LoRA that is added beside
    it (inactive, so rollouts still run on the base) and removed at the end; pairs are rendered and scored
    by the gradient estimator on the run's validation tasks, and its cost lands in the ledger."""
    from dits.influence.inputs import PROBE_ADAPTER
    from dits.tasks.builtin import make_builtin

    cfg = parse_config(
        {
            "engine": {"dtype": "float32"},  # the shared engine's
            "search": {"explore": 3, "expand": 2},
            "protocol": {"max_turns": 2, "max_new_tokens": 12, "worked_example": False},
            "task": {"dataset": "facts", "dev": 1},
            "influence": {"samples_per_task": 2, "optimizer": "sgd", "lr": 1e-3},
            "train": {"lora": {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}},
            "guide": {"lam": 1.0, "estimator": "gradient"},
        }
    )
    examples = make_builtin("facts", "train", 1, seed=0)
    seen: set[tuple[str | None, bool]] = set()  # (active adapter, a rollout of the searched task?)
    original = engine.generate

    def generate(views, sampling, seeds=None):  # type: ignore[no-untyped-def]
        for view in views:
            searched = any(examples[0].question in m["content"] for m in view)
            seen.add((engine.active_adapter, searched))
        return original(views, sampling, seeds)

    before = engine.ledger.snapshot()
    try:
        engine.generate = generate  # type: ignore[method-assign]
        ctx = StageContext.single(cfg, tmp_path, engine=engine, progress=False)
        with one_torch_thread():
            product = search_stage(ctx, 0, None, ModelRef.base(cfg), examples, pairs=LOW)
        s = SearchSummary.model_validate_json(product.file("summary.json").read_text())
    finally:
        del engine.generate
    assert s.guide_pairs_scored >= 1  # after steps 0 and 1 the root has two children of different Q
    assert 0 < s.guide_flops <= engine.ledger.flops(engine.ledger.snapshot() - before)
    # Rollouts ran on the base; the validation samples under θ, the probe (the same function, B = 0).
    assert seen == {(None, True), (PROBE_ADAPTER, False)}
    assert PROBE_ADAPTER not in engine.adapter_names()
    assert engine.active_adapter is None
