"""The one record every task becomes: :class:`Example`.

Loaders, the built-in generators, the protocol, the metrics and the stored artifacts all exchange this
record, so it validates its own invariants (two contexts, empty ones for debate, a gold choice letter that
names an option) instead of trusting every producer to get them right.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

Mode = Literal["exchange", "debate"]
"""``exchange``: each agent holds private context; ``debate``: no context, Alice solves and Bob checks."""

MetricName = Literal["f1", "numeric", "choice", "math"]

AGENTS: tuple[str, str] = ("Alice", "Bob")
"""Order of :attr:`Example.contexts`."""

SPLITS: tuple[str, ...] = ("train", "dev", "test")
"""Canonical split names: train-like, dev-like (validation, used for influence), test-like."""

_SPLIT_ALIASES = {"validation": "dev", "valid": "dev", "val": "dev"}


def canonical_split(split: str) -> str:
    """Map ``validation``/``valid``/``val`` to ``dev`` so configs may use either spelling."""
    name = _SPLIT_ALIASES.get(split.strip().lower(), split.strip().lower())
    if not name:
        raise ValueError("split name is empty")
    return name


def choice_letter(index: int) -> str:
    """Letter of the ``index``-th option (0 -> ``A``); options are labelled this way in every prompt."""
    if not 0 <= index < 26:
        raise ValueError(f"option index {index} out of range 0..25")
    return chr(ord("A") + index)


class Example(BaseModel):
    """One task: a question, its gold answer(s) and what each agent privately sees.

    ``answers`` holds the gold answer first, then aliases (for choice tasks: the gold letter, then the
    gold option text). ``contexts`` holds exactly one plain-text context per agent, in :data:`AGENTS`
    order; both are empty for debate tasks.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    dataset: str
    split: str
    question: str
    answers: list[str]
    contexts: list[str]
    choices: list[str] = []
    mode: Mode
    metric: MetricName

    @field_validator("id", "dataset", "split", "question")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("answers")
    @classmethod
    def _has_gold(cls, value: list[str]) -> list[str]:
        if not value or not value[0].strip():
            raise ValueError("needs a non-empty gold answer first")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Example:
        if len(self.contexts) != len(AGENTS):
            raise ValueError(f"contexts must hold one string per agent {AGENTS}, got {len(self.contexts)}")
        if self.mode == "debate" and any(self.contexts):
            raise ValueError("debate tasks carry no private context")
        if self.metric == "choice":
            if len(self.choices) < 2:
                raise ValueError("choice tasks need at least two choices")
            letters = [choice_letter(i) for i in range(len(self.choices))]
            if self.answers[0] not in letters:
                raise ValueError(f"gold answer {self.answers[0]!r} is not an option letter {letters}")
        return self

    @property
    def gold(self) -> str:
        """The gold answer (first of :attr:`answers`)."""
        return self.answers[0]


def examples_by_id(examples: Sequence[Example]) -> dict[str, Example]:
    """The examples keyed by id; a repeated id is an error (two tasks would share one tree or record)."""
    out: dict[str, Example] = {}
    for ex in examples:
        if ex.id in out:
            raise ValueError(f"duplicate example id {ex.id!r}")
        out[ex.id] = ex
    return out
