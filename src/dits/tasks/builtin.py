"""Built-in offline tasks, generated from a seed: ``facts`` (information exchange), ``arith`` (debate).

They let the whole pipeline run with no download, and their difficulty knobs let the embedded model start
neither at zero nor near perfect (calibration happens elsewhere). Entities are invented, pronounceable
names from a syllable generator, so no answer can come from the model's world knowledge.

Splits are disjoint by construction: every name belongs to exactly one split (a stable hash of the name
picks it), and each split draws from its own RNG stream. For a fixed (dataset, split, seed, knobs), the
first ``n`` examples do not depend on ``n``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from dits.registry import Registry
from dits.tasks.example import SPLITS, Example, canonical_split
from dits.tasks.files import content_id, stable_hash


@dataclass(frozen=True)
class BuiltinTask:
    """A generated task: its knobs (a frozen dataclass of defaults), one example from the split's RNG and
    names, the protocol mode and metric, and the real dataset whose published defaults it takes."""

    knobs: type
    example: Callable[[random.Random, NameGenerator, str, Any], Example]
    mode: str
    metric: str
    like: str


BUILTIN_DATASETS: Registry[BuiltinTask] = Registry("built-in task")
"""Every built-in task by name (registered below, each next to its generator); the dataset registry
(:data:`dits.tasks.loaders.DATASETS`) lists them with the real ones."""

_ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "r", "s", "t", "th",
           "v", "z", "zh", "sk", "qu", "j")  # fmt: skip
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ae", "ei", "ou", "y")
_CODAS = ("", "", "", "n", "r", "l", "s", "th", "x", "m", "v")
_CITY_SUFFIXES = ("brook", "ford", "holm", "wick", "dale", "mere", "stead", "moor", "gate", "haven")
_COUNTRY_SUFFIXES = ("ia", "and", "ora", "istan", "esh", "avia", "aria", "onia")
_ITEMS = ("apple", "marble", "sticker", "coin", "book", "shell", "pencil", "card", "stamp", "bead")
_MAX_ATTEMPTS = 10_000


class NameGenerator:
    """Unique invented names of one split: persons, cities, countries.

    A candidate name is kept only if it is new and its stable hash assigns it to this split, so two
    splits can never share a name, whatever their seeds.
    """

    def __init__(self, rng: random.Random, split: str) -> None:
        self._rng = rng
        self._bucket = SPLITS.index(split)
        self._used: set[str] = set()

    def _syllables(self, count: int) -> str:
        return "".join(self._rng.choice(_ONSETS) + self._rng.choice(_VOWELS) for _ in range(count))

    def _fresh(self, build: Callable[[], str]) -> str:
        for _ in range(_MAX_ATTEMPTS):
            name = build()
            name = name[0].upper() + name[1:]
            key = name.lower()
            if (
                len(name) >= 5
                and key not in self._used
                and stable_hash("dits-name", key) % len(SPLITS) == self._bucket
            ):
                self._used.add(key)
                return name
        raise RuntimeError("name space exhausted; generate fewer examples per call")

    def person(self) -> str:
        """``Zorvath``-like: two or three syllables and a closing consonant."""
        return self._fresh(lambda: self._syllables(self._rng.choice((2, 2, 3))) + self._rng.choice(_CODAS))

    def _place(self, suffixes: tuple[str, ...]) -> str:
        stem, suffix = self._syllables(self._rng.choice((1, 2))), self._rng.choice(suffixes)
        return (stem.rstrip("aeiouy") or stem) + suffix if suffix[0] in "aeiou" else stem + suffix

    def city(self) -> str:
        """``Melbrook``-like: a syllable or two and a place suffix."""
        return self._fresh(lambda: self._place(_CITY_SUFFIXES))

    def country(self) -> str:
        """``Tarsia``-like: a syllable or two and a country suffix."""
        return self._fresh(lambda: self._place(_COUNTRY_SUFFIXES))


# ------------------------------------------------------------------------------------------------ facts


@dataclass(frozen=True)
class FactsKnobs:
    """Difficulty of ``facts``.

    ``hops``: 1 = one fact, held by one agent, must be reported; 2 = person -> city -> country, one fact
    per agent; 3 = person -> spouse -> city -> country, facts alternating between the agents.
    ``n_distractor``: unrelated facts about other invented entities added to each agent's notes.
    The defaults (2 hops, 1 distractor) are calibrated on SmolLM2-135M (benchmarks/task_calibration.py).
    """

    hops: int = 2
    n_distractor: int = 1

    def __post_init__(self) -> None:
        if self.hops not in (1, 2, 3):
            raise ValueError(f"facts: hops must be 1, 2 or 3, got {self.hops}")
        if self.n_distractor < 0:
            raise ValueError(f"facts: n_distractor must be >= 0, got {self.n_distractor}")


def _chain(names: NameGenerator, hops: int) -> tuple[list[str], str, str]:
    """The facts of one question's reasoning chain, the question and its answer."""
    person, city = names.person(), names.city()
    if hops == 1:
        return [f"{person} lives in {city}."], f"In which city does {person} live?", city
    country = names.country()
    if hops == 2:
        facts = [f"{person} lives in {city}.", f"{city} is in the country of {country}."]
        return facts, f"In which country does {person} live?", country
    spouse = names.person()
    facts = [
        f"{person} is married to {spouse}.",
        f"{spouse} lives in {city}.",
        f"{city} is in the country of {country}.",
    ]
    return facts, f"In which country does the spouse of {person} live?", country


def _distractor(names: NameGenerator, rng: random.Random) -> str:
    """A fact of the same shapes as the chain's, about entities that appear nowhere else."""
    kind = rng.randrange(3)
    if kind == 0:
        return f"{names.person()} lives in {names.city()}."
    if kind == 1:
        return f"{names.city()} is in the country of {names.country()}."
    return f"{names.person()} is married to {names.person()}."


def _facts_example(rng: random.Random, names: NameGenerator, split: str, knobs: FactsKnobs) -> Example:
    chain, question, answer = _chain(names, knobs.hops)
    first = rng.randrange(2)
    notes: tuple[list[str], list[str]] = ([], [])
    for index, fact in enumerate(chain):
        notes[(first + index) % 2].append(fact)
    for hand in notes:
        hand.extend(_distractor(names, rng) for _ in range(knobs.n_distractor))
        rng.shuffle(hand)
    contexts = ["\n".join(notes[0]), "\n".join(notes[1])]
    return Example(
        id=content_id(f"facts-{split}", question, *contexts),
        dataset="facts",
        split=split,
        question=question,
        answers=[answer],
        contexts=contexts,
        mode="exchange",
        metric="f1",
    )


# ------------------------------------------------------------------------------------------------ arith

OPERATIONS = ("+", "-", "*", "/")


@dataclass(frozen=True)
class ArithKnobs:
    """Difficulty of ``arith``: how many numbers a problem has, how large, and which operations occur.

    Steps apply in story order (no precedence). Operands are drawn from 1..``max_value`` (multipliers and
    divisors from 2..``max_value``); subtraction never goes below zero and division is always exact.
    The defaults (two numbers up to 10, addition) are calibrated on SmolLM2-135M.
    """

    n_operands: int = 2
    max_value: int = 10
    operations: tuple[str, ...] = ("+",)

    def __post_init__(self) -> None:
        if self.n_operands < 2:
            raise ValueError(f"arith: n_operands must be >= 2, got {self.n_operands}")
        if self.max_value < 2:
            raise ValueError(f"arith: max_value must be >= 2, got {self.max_value}")
        ops = tuple(self.operations)
        if not ops or any(op not in OPERATIONS for op in ops):
            raise ValueError(f"arith: operations must be a non-empty subset of {OPERATIONS}, got {ops}")
        object.__setattr__(self, "operations", ops)


_STEP_TEXT = {
    "+": (
        "{name} finds {x} more {items}.",
        "{name} buys {x} more {items}.",
        "A friend gives {name} {x} more {items}.",
    ),
    "-": ("{name} gives {x} {items} to a friend.", "{name} loses {x} {items}.", "{name} sells {x} {items}."),
    "*": ("{name} ends up with {x} times as many {item}s as before.",),
    "/": ("{name} splits the {item}s into {x} equal groups and keeps only one group.",),
}


def _count(number: int, item: str) -> str:
    return item if number == 1 else f"{item}s"


def _step(op: str, value: int, rng: random.Random, knobs: ArithKnobs) -> int | None:
    """An operand for ``op`` applied to ``value``, or ``None`` if ``op`` cannot apply to it."""
    if op == "+":
        return rng.randint(1, knobs.max_value)
    if op == "-":
        return rng.randint(1, min(knobs.max_value, value)) if value >= 1 else None
    if op == "*":
        return rng.randint(2, knobs.max_value)
    divisors = [d for d in range(2, min(knobs.max_value, value) + 1) if value % d == 0]
    return rng.choice(divisors) if divisors else None


def _arith_problem(rng: random.Random, names: NameGenerator, knobs: ArithKnobs) -> tuple[str, int]:
    for _ in range(_MAX_ATTEMPTS):
        name, item = names.person(), rng.choice(_ITEMS)
        value = rng.randint(1, knobs.max_value)
        sentences = [f"{name} has {value} {_count(value, item)}."]
        for _ in range(knobs.n_operands - 1):
            options = [(op, x) for op in knobs.operations if (x := _step(op, value, rng, knobs)) is not None]
            if not options:
                break
            op, x = rng.choice(options)
            value = {"+": value + x, "-": value - x, "*": value * x, "/": value // x}[op]
            text = rng.choice(_STEP_TEXT[op])
            sentences.append(text.format(name=name, x=x, item=item, items=_count(x, item)))
        else:
            sentences.append(f"How many {item}s does {name} have now?")
            return " ".join(sentences), value
    raise RuntimeError(f"arith: could not build a problem with operations {knobs.operations}")


def _arith_example(rng: random.Random, names: NameGenerator, split: str, knobs: ArithKnobs) -> Example:
    question, value = _arith_problem(rng, names, knobs)
    return Example(
        id=content_id(f"arith-{split}", question),
        dataset="arith",
        split=split,
        question=question,
        answers=[str(value)],
        contexts=["", ""],
        mode="debate",
        metric="numeric",
    )


# ---------------------------------------------------------------------------------------------- entry


BUILTIN_DATASETS.add("facts", BuiltinTask(FactsKnobs, _facts_example, "exchange", "f1", like="hotpotqa"))
BUILTIN_DATASETS.add("arith", BuiltinTask(ArithKnobs, _arith_example, "debate", "numeric", like="gsm8k"))


def _knobs(cls: type, dataset: str, knobs: dict[str, object]) -> object:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(knobs) - known)
    if unknown:
        raise ValueError(f"{dataset}: unknown knob(s) {unknown}; known: {sorted(known)}")
    return cls(**knobs)  # type: ignore[arg-type]


def make_builtin(dataset: str, split: str, n: int, seed: int = 0, **knobs: object) -> list[Example]:
    """``n`` examples of a built-in task.

    ``facts`` knobs: see :class:`FactsKnobs`; ``arith`` knobs: see :class:`ArithKnobs`. The same
    arguments always give the same examples; different splits never share a name or a question.
    """
    split = canonical_split(split)
    if split not in SPLITS:
        raise ValueError(f"{dataset}: split must be one of {SPLITS} (or 'validation'), got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(stable_hash("dits-builtin", dataset, split, seed))
    names = NameGenerator(rng, split)
    if dataset not in BUILTIN_DATASETS:
        raise KeyError(f"unknown built-in dataset {dataset!r}; known: {list(BUILTIN_DATASETS)}")
    task = BUILTIN_DATASETS[dataset]
    task_knobs = _knobs(task.knobs, dataset, knobs)
    return [task.example(rng, names, split, task_knobs) for _ in range(n)]
