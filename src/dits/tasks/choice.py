"""Multiple-choice debate datasets: ARC-Challenge (JSONL) and MMLU (header-less CSV).

Options are stored as texts in their file order and addressed by letters A, B, C, ... everywhere
downstream; the gold answer is stored as that letter (then the option text as an alias). ARC labels can
be digits, so ``answerKey`` is mapped through the record's own labels, never assumed to be a letter.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dits.tasks.example import Example, choice_letter
from dits.tasks.files import (
    DatasetFormatError,
    RecordError,
    check_utf8,
    clean_text,
    content_id,
    open_text,
    require,
    require_id,
    require_text,
)

MMLU_LETTERS = ("A", "B", "C", "D")
MAX_CHOICES = 26
"""Options are addressed by the letters A-Z (:func:`dits.tasks.example.choice_letter`)."""


def arc_example(record: Mapping[str, Any], split: str) -> Example:
    """An ARC record ``{"id", "question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}``."""
    example_id = require_id(record, "id")
    question = require(record, "question", Mapping)
    stem = clean_text(require_text(question, "stem")).strip()
    if not stem:
        raise RecordError("field 'stem' has no text besides control characters")
    raw_choices = require(question, "choices", list)
    if len(raw_choices) < 2:
        raise RecordError(f"needs at least 2 choices, got {len(raw_choices)}")
    if len(raw_choices) > MAX_CHOICES:
        raise RecordError(
            f"has {len(raw_choices)} choices; at most {MAX_CHOICES} (letters A-Z) are supported"
        )
    labels: list[str] = []
    texts: list[str] = []
    for index, choice in enumerate(raw_choices):
        if not isinstance(choice, Mapping):
            raise RecordError(f"choices[{index}] should be an object")
        labels.append(require_text(choice, "label").strip())
        texts.append(clean_text(require(choice, "text", str)).strip())
    if len(set(labels)) != len(labels):
        raise RecordError(f"duplicate choice labels {labels}")
    key = require_text(record, "answerKey").strip()
    if key not in labels:
        raise RecordError(f"answerKey {key!r} not among labels {labels}")
    gold = labels.index(key)
    return Example(
        id=example_id,
        dataset="arc",
        split=split,
        question=stem,
        answers=[choice_letter(gold), texts[gold]],
        contexts=["", ""],
        choices=texts,
        mode="debate",
        metric="choice",
    )


@dataclass(frozen=True)
class MmluRow:
    """One MMLU question; the subject comes from the file name (``<subject>_<split>.csv``)."""

    subject: str
    question: str
    options: tuple[str, str, str, str]
    answer: str


def mmlu_subject(path: Path) -> str:
    """``abstract_algebra_val.csv`` -> ``abstract_algebra``."""
    stem = path.stem
    return stem.rsplit("_", 1)[0] if "_" in stem else stem


def _csv_problem(exc: csv.Error) -> str:
    if "field larger than field limit" in str(exc):
        return (
            f"a field is longer than {csv.field_size_limit()} characters (the csv module's field size limit)"
        )
    return f"invalid CSV ({exc})"


def read_mmlu_csv(path: Path) -> Iterator[tuple[str, MmluRow]]:
    """``("line N", row)`` for each CSV record (N: the record's first physical line).

    Opened with ``newline=''`` so quoted fields keep their embedded newlines and CRLF files parse alike.
    An empty file, bytes that are not UTF-8 and CSV errors are :class:`DatasetFormatError` naming the line.
    """
    subject = mmlu_subject(path)
    with open_text(path, newline="") as fh:

        def lines() -> Iterator[str]:
            for number, line in enumerate(fh, start=1):
                check_utf8(path, number, line)
                yield line

        reader = csv.reader(lines())
        previous_end = 0
        rows = 0
        while True:
            label = f"line {previous_end + 1}"
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                raise DatasetFormatError(path, label, _csv_problem(exc)) from exc
            previous_end = reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != 6:
                raise DatasetFormatError(
                    path, label, f"expected 6 columns (question, A, B, C, D, answer), got {len(row)}"
                )
            answer = row[5].strip()
            if answer not in MMLU_LETTERS:
                raise DatasetFormatError(path, label, f"answer {row[5]!r} is not one of {list(MMLU_LETTERS)}")
            if not row[0].strip():
                raise DatasetFormatError(path, label, "empty question")
            rows += 1
            yield label, MmluRow(subject, row[0], (row[1], row[2], row[3], row[4]), answer)
    if not rows:
        raise DatasetFormatError(path, "line 1", "no rows (the file is empty)")


def mmlu_example(row: MmluRow, split: str) -> Example:
    """An MMLU row as a four-option choice task."""
    gold = MMLU_LETTERS.index(row.answer)
    question = clean_text(row.question).strip()
    if not question:
        raise RecordError("the question has no text besides control characters")
    return Example(
        id=content_id(f"mmlu-{row.subject}", row.question, *row.options),
        dataset="mmlu",
        split=split,
        question=question,
        answers=[row.answer, clean_text(row.options[gold]).strip()],
        contexts=["", ""],
        choices=[clean_text(option).strip() for option in row.options],
        mode="debate",
        metric="choice",
    )
