"""Tasks: datasets -> :class:`Example` records, answer parsing, metrics, built-in offline tasks.

Modules: ``example`` (the record), ``files`` (reading helpers, :class:`DatasetFormatError`), ``qa`` /
``choice`` / ``math_data`` (per-dataset record parsing), ``loaders`` (registry and :func:`load_examples`),
``answers`` (reading an answer out of an utterance), ``metrics`` (scoring it), ``builtin`` (generated
``facts`` and ``arith`` tasks).
"""

from dits.tasks.answers import extract_boxed, extract_tagged, fallback_answer, parse_answer
from dits.tasks.builtin import BUILTIN_DATASETS, ArithKnobs, FactsKnobs, make_builtin
from dits.tasks.example import AGENTS, SPLITS, Example, MetricName, Mode, canonical_split, choice_letter
from dits.tasks.files import DatasetFormatError
from dits.tasks.loaders import (
    DATASETS,
    DatasetSpec,
    dataset_spec,
    default_data_root,
    default_heldout_root,
    load_examples,
)
from dits.tasks.metrics import (
    answers_agree,
    choice_match,
    exact_match,
    f1_score,
    math_equiv,
    normalize_answer,
    numeric_match,
    score_answer,
)

__all__ = [
    "AGENTS",
    "BUILTIN_DATASETS",
    "DATASETS",
    "SPLITS",
    "ArithKnobs",
    "DatasetFormatError",
    "DatasetSpec",
    "Example",
    "FactsKnobs",
    "MetricName",
    "Mode",
    "answers_agree",
    "canonical_split",
    "choice_letter",
    "choice_match",
    "dataset_spec",
    "default_data_root",
    "default_heldout_root",
    "exact_match",
    "extract_boxed",
    "extract_tagged",
    "f1_score",
    "fallback_answer",
    "load_examples",
    "make_builtin",
    "math_equiv",
    "normalize_answer",
    "numeric_match",
    "parse_answer",
    "score_answer",
]
