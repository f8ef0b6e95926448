"""Registries are the one source of names: an estimator or a strategy registered once (its module and its
entry) is accepted by the config and offered by the command line, and gone from both once removed."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from dits.cli import build_parser
from dits.config import ConfigError, load_config
from dits.influence import ESTIMATORS, InfluenceEstimator, make_estimator
from dits.records import PreferencePair
from dits.registry import Registry
from dits.select import STRATEGIES, SelectConfig, register_strategy, select_pairs
from tests.helpers import DPO_PAIRS


@pytest.fixture
def dummy_estimator() -> Iterator[type[InfluenceEstimator]]:
    class Dummy(InfluenceEstimator, name="dummy-estimator"):
        def _prepare(self) -> None:
            pass

        def _score_chunk(self, chunk: list[PreferencePair]) -> tuple[float, dict[str, float]]:
            return float(len(chunk)), {}

    yield Dummy
    ESTIMATORS.remove("dummy-estimator")


@pytest.fixture
def lowest_q() -> Iterator[str]:
    @register_strategy("lowest-q")
    def rank(q: list[float], infl: list[float], cfg: SelectConfig) -> list[float]:
        return [-v for v in q]

    yield "lowest-q"
    STRATEGIES.remove("lowest-q")


def _parses(argv: list[str]) -> bool:
    try:
        build_parser().parse_args(argv)
    except SystemExit:
        return False
    return True


def test_a_registered_estimator_is_in_the_config_and_the_cli(dummy_estimator) -> None:
    cfg = load_config(None, {"influence.estimator": "dummy-estimator", "guide.estimator": "dummy-estimator"})
    assert isinstance(make_estimator(cfg.influence), dummy_estimator)
    assert dummy_estimator.name == "dummy-estimator" and dummy_estimator.guides
    assert _parses(["influence", "--pairs", "p.jsonl", "--estimator", "dummy-estimator"])


def test_an_unregistered_estimator_is_refused_by_both(capsys) -> None:
    refused = re.escape("influence.estimator: 'dummy-estimator' is not allowed; allowed")
    with pytest.raises(ConfigError, match=refused):
        load_config(None, {"influence.estimator": "dummy-estimator"})
    assert not _parses(["influence", "--pairs", "p.jsonl", "--estimator", "dummy-estimator"])
    assert "invalid choice: 'dummy-estimator'" in capsys.readouterr().err
    # rollout is registered but too costly to score pairs inside a search
    with pytest.raises(ConfigError, match=re.escape("guide.estimator: 'rollout' is too costly")):
        load_config(None, {"guide.estimator": "rollout"})


def test_a_registered_strategy_selects_in_the_config_and_the_cli(lowest_q) -> None:
    cfg = load_config(None, {"pipeline.methods": ["q", lowest_q], "select.strategy": lowest_q})
    qs = [0.9, 0.1, 0.5, 0.3]
    # four pairs with distinct keys and these Q values
    pairs = [DPO_PAIRS[i % 2].model_copy(update={"q_chosen": q, "node_id": f"n{i}"})
             for i, q in enumerate(qs)]  # fmt: skip
    kept = select_pairs(pairs, None, cfg.select.model_copy(update={"ratio": 0.5}))
    assert kept == [pairs[1], pairs[3]]  # the two lowest Q, in pool order
    assert _parses(["select", "--pairs", "p.jsonl", "--out", "o", "--strategy", lowest_q])
    STRATEGIES.remove(lowest_q)
    try:
        with pytest.raises(ConfigError, match=re.escape("pipeline.methods.1: 'lowest-q' is not allowed")):
            load_config(None, {"pipeline.methods": ["q", lowest_q]})
        assert not _parses(["select", "--pairs", "p.jsonl", "--out", "o", "--strategy", lowest_q])
    finally:
        register_strategy(lowest_q)(lambda q, infl, cfg: q)


def test_registry_refuses_a_name_twice_and_names_the_known_ones() -> None:
    reg: Registry[int] = Registry("thing.kind")
    reg.add("a", 1)
    reg.register("b")(2)
    with pytest.raises(ValueError, match=re.escape("thing.kind: 'a' is registered twice")):
        reg.add("a", 3)
    with pytest.raises(KeyError, match=re.escape("unknown thing.kind 'c'; known: a, b")):
        reg["c"]
    assert list(reg) == ["a", "b"] and "b" in reg and reg.check("a") == "a"
