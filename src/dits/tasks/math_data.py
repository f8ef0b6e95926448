"""Math debate datasets: GSM8K (JSONL) and MATH (one JSON file per problem).

The gold answer is the final answer only: GSM8K's text after ``####`` with thousands separators removed,
MATH's last balanced ``\\boxed{...}`` of the solution (the same extraction the protocol applies to model
output, :func:`dits.tasks.answers.extract_boxed`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from dits.tasks.answers import extract_boxed
from dits.tasks.example import Example
from dits.tasks.files import DatasetFormatError, RecordError, content_id, read_json, require_text

_GSM8K_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?:\D|$))")


def gsm8k_final_answer(solution: str) -> str:
    """The number after the last ``####``: ``"... #### 1,080"`` -> ``"1080"``."""
    if "####" not in solution:
        raise RecordError("no '####' in answer")
    final = _THOUSANDS.sub("", solution.rsplit("####", 1)[1].strip())
    if not _GSM8K_NUMBER.fullmatch(final):
        raise RecordError(f"final answer {final!r} after '####' is not a number")
    return final


def gsm8k_example(record: Mapping[str, Any], split: str) -> Example:
    """A GSM8K record ``{"question", "answer"}``; its id is a digest of the question."""
    question = require_text(record, "question")
    final = gsm8k_final_answer(require_text(record, "answer"))
    return Example(
        id=content_id("gsm8k", question),
        dataset="gsm8k",
        split=split,
        question=question.strip(),
        answers=[final],
        contexts=["", ""],
        mode="debate",
        metric="numeric",
    )


def _file_number(path: Path) -> tuple[int, str]:
    return (int(path.stem), path.stem) if path.stem.isdigit() else (1 << 62, path.stem)


def iter_math_dir(split_dir: Path) -> Iterator[tuple[Path, str, Any]]:
    """``(file, "problem subject/n", record)`` for every ``<subject>/<n>.json``, by subject then number.

    A split folder without any problem file is a :class:`DatasetFormatError`.
    """
    if not split_dir.is_dir():
        raise DatasetFormatError(
            split_dir, "top level", "expected a split folder of <subject>/<n>.json files"
        )
    problems = 0
    for subject_dir in sorted(path for path in split_dir.iterdir() if path.is_dir()):
        for file in sorted(subject_dir.glob("*.json"), key=_file_number):
            problems += 1
            yield file, f"problem {subject_dir.name}/{file.stem}", read_json(file)
    if not problems:
        raise DatasetFormatError(split_dir, "top level", "no problems (no <subject>/<n>.json files)")


def math_example(record: Mapping[str, Any], split: str) -> Example:
    """A MATH record ``{"problem", "level", "type", "solution"}``; gold: the solution's last box."""
    problem = require_text(record, "problem")
    answer = extract_boxed(require_text(record, "solution"))
    if answer is None:
        raise RecordError("no \\boxed{...} answer in field 'solution'")
    return Example(
        id=content_id("math", problem),
        dataset="math",
        split=split,
        question=problem.strip(),
        answers=[answer],
        contexts=["", ""],
        mode="debate",
        metric="math",
    )
