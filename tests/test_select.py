"""Pair selection: hand-computed mixes, ties, a single candidate, chunk scores spread to their pairs."""

from __future__ import annotations

import pytest

from dits.influence.base import chunk_pairs
from dits.records import Cost, InfluenceScore, PreferencePair, pair_key
from dits.select import SelectConfig, minmax, pair_influence, select_pairs


def _pair(i: int, q: float) -> PreferencePair:
    return PreferencePair(
        tree_task_id=f"t{i % 2}",
        node_id=f"n{i}",
        prefix=[],
        speaker=0,
        chosen=f"good {i}",
        rejected=f"bad {i}",
        chosen_id=f"c{i}",
        rejected_id=f"r{i}",
        q_chosen=q,
        q_rejected=0.0,
        visits_chosen=1,
        visits_rejected=1,
    )


def _ids(pairs: list[PreferencePair]) -> list[str]:
    return [p.node_id for p in pairs]


def test_minmax_ties_and_single():
    assert minmax([]) == []
    assert minmax([3.0]) == [0.0]
    assert minmax([2.0, 2.0, 2.0]) == [0.0, 0.0, 0.0]
    assert minmax([1.0, 3.0, 2.0]) == [0.0, 1.0, 0.5]
    with pytest.raises(ValueError):
        minmax([0.0, float("nan")])


def test_mix_picks_hand_computed_set():
    # q:    0.9  0.5  0.7  0.1   -> norm 1.0  0.5  0.75 0.0
    # infl: -1   3    1    2     -> norm 0.0  1.0  0.5  0.75
    # mix (w=1):                    1.0  1.5  1.25 0.75  -> top 2: n1, n2
    pairs = [_pair(0, 0.9), _pair(1, 0.5), _pair(2, 0.7), _pair(3, 0.1)]
    infl = [-1.0, 3.0, 1.0, 2.0]
    assert _ids(select_pairs(pairs, infl, SelectConfig())) == ["n1", "n2"]
    # Q alone would keep n0, n2; influence alone n1, n3.
    assert _ids(select_pairs(pairs, None, SelectConfig(strategy="q"))) == ["n0", "n2"]
    assert _ids(select_pairs(pairs, infl, SelectConfig(strategy="influence"))) == ["n1", "n3"]
    # w = 0.2: 1.0, 0.7, 0.85, 0.15 -> n0, n2
    assert _ids(select_pairs(pairs, infl, SelectConfig(weight=0.2))) == ["n0", "n2"]
    # ratio 0.75 of 4 -> 3 kept: n1, n2, n0
    assert _ids(select_pairs(pairs, infl, SelectConfig(ratio=0.75))) == ["n0", "n1", "n2"]


def test_chunk_scores_apply_to_every_pair_of_the_chunk():
    pairs = [_pair(i, 0.5) for i in range(5)]
    chunks = chunk_pairs(pairs, 2, seed=3)
    assert sorted(_ids([p for c in chunks for p in c])) == _ids(pairs)
    assert [len(c) for c in chunks] == [2, 2, 1]
    scores = [
        InfluenceScore(
            candidate=i, pair_ids=[pair_key(p) for p in c], score=float(i), estimator="x", cost=Cost()
        )
        for i, c in enumerate(chunks)
    ]
    per_pair = pair_influence(pairs, scores)
    for i, c in enumerate(chunks):
        for p in c:
            assert per_pair[pairs.index(p)] == float(i)
    # Q all tied: mix = norm(I) only. 2 of 5 kept: the lone pair of chunk 2 (score 2), then of chunk 1's
    # two pairs (score 1, tied) the one that comes first in ``pairs``.
    kept = select_pairs(pairs, scores, SelectConfig(ratio=0.4))
    first_of_chunk1 = min(chunks[1], key=pairs.index)
    assert sorted(_ids(kept)) == sorted(_ids([chunks[2][0], first_of_chunk1]))
    with pytest.raises(KeyError):
        pair_influence([*pairs, _pair(9, 0.1)], scores)


def test_ties_break_by_pair_order_and_single_candidate():
    pairs = [_pair(i, 0.5) for i in range(4)]
    for strategy in ("q", "influence", "mix"):
        kept = select_pairs(pairs, [1.0] * 4, SelectConfig(strategy=strategy))
        assert _ids(kept) == ["n0", "n1"]
    one = [_pair(0, 0.3)]
    for strategy in ("all", "random", "q", "influence", "mix"):
        assert _ids(select_pairs(one, [7.0], SelectConfig(strategy=strategy, ratio=0.1))) == ["n0"]
    assert select_pairs([], None, SelectConfig(strategy="q")) == []


def test_random_is_seeded_and_all_keeps_everything():
    pairs = [_pair(i, 0.1 * i) for i in range(10)]
    a = select_pairs(pairs, None, SelectConfig(strategy="random", seed=1))
    assert a == select_pairs(pairs, None, SelectConfig(strategy="random", seed=1))
    assert len(a) == 5
    others = [_ids(select_pairs(pairs, None, SelectConfig(strategy="random", seed=s))) for s in range(2, 8)]
    assert any(o != _ids(a) for o in others)
    assert select_pairs(pairs, None, SelectConfig(strategy="all")) == pairs
    with pytest.raises(ValueError):
        select_pairs(pairs, None, SelectConfig(strategy="mix"))


def test_q_budget_ranks_by_q_and_keeps_the_count_it_is_given():
    pairs = [_pair(0, 0.9), _pair(1, 0.5), _pair(2, 0.7), _pair(3, 0.1), _pair(4, 0.8), _pair(5, 0.2)]
    # the ratio alone keeps 3 of 6 (n0, n4, n2); matched to mix's count of a 4-pair pool it keeps 2
    assert _ids(select_pairs(pairs, None, SelectConfig(strategy="q-budget"))) == ["n0", "n2", "n4"]
    assert _ids(select_pairs(pairs, None, SelectConfig(strategy="q-budget"), keep=2)) == ["n0", "n4"]
    assert len(select_pairs(pairs, None, SelectConfig(strategy="q"), keep=9)) == 6


def test_q_budget_without_a_scored_method_is_a_config_error():
    from dits.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="q-budget matches the compute of a method that reads influence"):
        parse_config({"pipeline": {"methods": ["q", "q-budget"]}})
    methods = ["q-budget", "mix"]
    assert parse_config({"pipeline": {"methods": methods}}).pipeline.methods == methods
