"""Built-in offline tasks: determinism, disjoint splits, the knobs doing what they say."""

from __future__ import annotations

import re

import pytest

from dits.tasks.builtin import ArithKnobs, FactsKnobs, make_builtin
from dits.tasks.loaders import load_examples
from dits.tasks.metrics import score_answer

_CAPITALISED = re.compile(r"\b[A-Z][a-z]+\b")
_COMMON_WORDS = {"In", "How", "Then", "A"}


def _names(texts: list[str]) -> set[str]:
    return {word for text in texts for word in _CAPITALISED.findall(text)} - _COMMON_WORDS


def _all_text(examples: list) -> list[str]:
    return [e.question for e in examples] + [c for e in examples for c in e.contexts]


@pytest.mark.parametrize("dataset", ["facts", "arith"])
def test_deterministic_prefix_stable_and_seeded(dataset: str) -> None:
    first = make_builtin(dataset, "train", 30, seed=4)
    assert first == make_builtin(dataset, "train", 30, seed=4)
    assert make_builtin(dataset, "train", 10, seed=4) == first[:10]
    other = make_builtin(dataset, "train", 30, seed=5)
    assert sum(a.question != b.question for a, b in zip(first, other, strict=True)) > 25
    assert len({e.id for e in first}) == 30
    assert load_examples(dataset, "train", seed=4, limit=10) == first[:10]


@pytest.mark.parametrize("dataset", ["facts", "arith"])
def test_splits_share_no_name_and_no_question(dataset: str) -> None:
    splits = {split: make_builtin(dataset, split, 150, seed=0) for split in ("train", "validation", "test")}
    assert all(e.split == "dev" for e in splits["validation"])
    names = {split: _names(_all_text(examples)) for split, examples in splits.items()}
    assert all(len(n) > 100 for n in names.values())
    assert names["train"].isdisjoint(names["validation"])
    assert names["train"].isdisjoint(names["test"])
    assert names["validation"].isdisjoint(names["test"])
    # names belong to one split whatever the seeds: another seed for test still avoids train's names
    assert _names(_all_text(make_builtin(dataset, "test", 150, seed=7))).isdisjoint(names["train"])
    questions = [{e.question for e in examples} for examples in splits.values()]
    assert not (questions[0] & questions[1] or questions[0] & questions[2] or questions[1] & questions[2])


def test_facts_one_hop_fact_is_with_exactly_one_agent() -> None:
    holders = set()
    for example in make_builtin("facts", "train", 40, seed=1, hops=1, n_distractor=3):
        person = re.fullmatch(r"In which city does (\w+) live\?", example.question).group(1)
        fact = f"{person} lives in {example.answers[0]}."
        holding = [i for i, context in enumerate(example.contexts) if fact in context.split("\n")]
        assert len(holding) == 1
        holders.add(holding[0])
        other = example.contexts[1 - holding[0]]
        assert example.answers[0] not in other and person not in other
        lines = [len(c.split("\n")) for c in example.contexts]
        assert lines[holding[0]] == 4 and lines[1 - holding[0]] == 3  # 1 fact + 3 distractors vs 3
        assert example.metric == "f1" and example.mode == "exchange"
    assert holders == {0, 1}


def test_facts_two_hops_cross_the_agents() -> None:
    for example in make_builtin("facts", "dev", 40, seed=2, hops=2, n_distractor=2):
        person = re.fullmatch(r"In which country does (\w+) live\?", example.question).group(1)
        country = example.answers[0]
        lives = [
            i for i, c in enumerate(example.contexts) if re.search(rf"^{person} lives in \w+\.$", c, re.M)
        ]
        assert len(lives) == 1
        city = re.search(rf"^{person} lives in (\w+)\.$", example.contexts[lives[0]], re.M).group(1)
        located = [
            i for i, c in enumerate(example.contexts) if f"{city} is in the country of {country}." in c
        ]
        assert located == [1 - lives[0]], "the two facts of the chain must sit with different agents"
        assert country not in example.contexts[lives[0]]
        assert [len(c.split("\n")) for c in example.contexts] == [3, 3]
        assert score_answer(example, country) == 1.0
        assert score_answer(example, city) == 0.0


def test_facts_three_hops_chain_is_complete() -> None:
    for example in make_builtin("facts", "test", 20, seed=3, hops=3, n_distractor=0):
        person = re.fullmatch(r"In which country does the spouse of (\w+) live\?", example.question).group(1)
        notes = "\n".join(example.contexts)
        spouse = re.search(rf"^{person} is married to (\w+)\.$", notes, re.M).group(1)
        city = re.search(rf"^{spouse} lives in (\w+)\.$", notes, re.M).group(1)
        assert f"{city} is in the country of {example.answers[0]}." in notes
        assert all(example.contexts)  # three facts alternate, so both agents hold some


def _evaluate(question: str) -> tuple[int, list[int], list[str]]:
    """Re-derive an arith answer from the text alone; returns (value, operands, operations)."""
    sentences = re.findall(r"[^.?]+[.?]", question)
    value = int(re.search(r"has (\d+) ", sentences[0]).group(1))
    operands, operations = [value], []
    for sentence in sentences[1:-1]:
        x = int(re.search(r"(\d+)", sentence).group(1))
        if "more" in sentence:
            op = "+"
        elif re.search(r"gives \d+ \w+ to a friend|loses|sells", sentence):
            op = "-"
        elif "times as many" in sentence:
            op = "*"
        elif "equal groups" in sentence:
            op = "/"
        else:
            raise AssertionError(f"unknown step: {sentence}")
        assert op != "/" or value % x == 0, "division must be exact"
        value = {"+": value + x, "-": value - x, "*": value * x, "/": value // x}[op]
        operands.append(x)
        operations.append(op)
    assert sentences[-1].strip().startswith("How many")
    return value, operands, operations


@pytest.mark.parametrize(
    "knobs",
    [
        {"n_operands": 2, "max_value": 9, "operations": ("+",)},
        {"n_operands": 3, "max_value": 20, "operations": ("+", "-")},
        {"n_operands": 5, "max_value": 12, "operations": ("+", "-", "*", "/")},
        {"n_operands": 4, "max_value": 30, "operations": ("/", "-")},
    ],
)
def test_arith_answers_and_knobs(knobs: dict) -> None:
    seen_ops: set[str] = set()
    for example in make_builtin("arith", "train", 60, seed=9, **knobs):
        value, operands, operations = _evaluate(example.question)
        assert example.answers == [str(value)]
        assert value >= 0
        assert len(operands) == knobs["n_operands"]
        assert all(1 <= x <= knobs["max_value"] for x in operands)
        assert set(operations) <= set(knobs["operations"])
        seen_ops |= set(operations)
        assert example.metric == "numeric" and example.contexts == ["", ""]
        assert score_answer(example, f"{value:,}") == 1.0
        assert score_answer(example, str(value + 1)) == 0.0
    assert seen_ops == set(knobs["operations"])


def test_arith_singular_plural() -> None:
    questions = " ".join(e.question for e in make_builtin("arith", "train", 200, seed=0))
    assert not re.search(r"\b1 \w+s\b", questions)
    assert not re.search(r"\b(?:[02-9]|\d\d+) (?:apple|coin|book)\b(?!s)", questions)


def test_knob_validation() -> None:
    with pytest.raises(ValueError, match="hops must be 1, 2 or 3"):
        FactsKnobs(hops=4)
    with pytest.raises(ValueError, match="n_operands must be >= 2"):
        ArithKnobs(n_operands=1)
    with pytest.raises(ValueError, match=r"subset of \('\+', '-', '\*', '/'\)"):
        ArithKnobs(operations=("^",))
    with pytest.raises(ValueError, match=r"unknown knob\(s\) \['hop'\]"):
        make_builtin("facts", "train", 1, hop=2)
    with pytest.raises(ValueError, match="split must be one of"):
        make_builtin("facts", "holdout", 1)
    with pytest.raises(KeyError, match="unknown built-in dataset"):
        make_builtin("riddles", "train", 1)
