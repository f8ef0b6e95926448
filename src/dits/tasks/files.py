"""Reading raw records from dataset files, with errors that say where the bad record is.

Record parsers raise :class:`RecordError` with *what* is wrong; the reading loop, which knows the file and
the record's position, turns it into a :class:`DatasetFormatError` naming all three. A malformed record in
a 100k-line file is then found in seconds instead of by bisection.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class DatasetFormatError(ValueError):
    """A record that does not have the dataset's original format."""

    def __init__(self, file: str | Path, record: str, problem: str) -> None:
        self.file = str(file)
        self.record = record
        self.problem = problem
        super().__init__(f"{self.file}, {record}: {problem}")


class RecordError(ValueError):
    """What is wrong with one record; the caller adds file and position (see :class:`DatasetFormatError`)."""


def require(record: Mapping[str, Any], key: str, kind: type[T]) -> T:
    """``record[key]`` checked to be of ``kind``, else a :class:`RecordError` that names the field."""
    if not isinstance(record, Mapping):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}")
    if key not in record:
        raise RecordError(f"missing field {key!r}")
    value = record[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RecordError(f"field {key!r} should be {kind.__name__}, got {type(value).__name__}")
    return value


def require_text(record: Mapping[str, Any], key: str) -> str:
    """A string field that must not be blank."""
    value = require(record, key, str)
    if not value.strip():
        raise RecordError(f"field {key!r} is empty")
    return value


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def clean_text(text: str) -> str:
    """``text`` without control characters (ARC has a stray ``\x02``); newlines and tabs are kept."""
    return _CONTROL.sub("", text)


def require_id(record: Mapping[str, Any], key: str) -> str:
    """An id field as a string; integer ids (found in some re-distributed copies) are accepted."""
    value = require(record, key, object)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        raise RecordError(f"field {key!r} should be a non-empty string or an integer, got {value!r}")
    return value


def iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """``("line N", object)`` for every non-blank line of a JSON Lines file."""
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield f"line {number}", json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetFormatError(path, f"line {number}", f"invalid JSON ({exc.msg})") from exc


def read_json(path: Path) -> Any:
    """A whole JSON document; a syntax error names the file and the line."""
    with path.open(encoding="utf-8") as fh:
        try:
            return json.load(fh)
        except json.JSONDecodeError as exc:
            raise DatasetFormatError(path, f"line {exc.lineno}", f"invalid JSON ({exc.msg})") from exc


def iter_json_array(path: Path, key: str | None = None) -> Iterator[tuple[str, Any]]:
    """``("record I", object)`` for each element of a JSON array (or of ``document[key]``)."""
    document = read_json(path)
    if key is not None:
        if not isinstance(document, dict) or key not in document:
            raise DatasetFormatError(path, "top level", f"expected an object with a {key!r} list")
        document = document[key]
    if not isinstance(document, list):
        raise DatasetFormatError(path, "top level", f"expected a JSON array, got {type(document).__name__}")
    for index, record in enumerate(document):
        yield f"record {index}", record


def stable_hash(*parts: object) -> int:
    """A 64-bit hash that is the same in every process (unlike ``hash()``, which is salted per run)."""
    text = "\x1f".join(str(part) for part in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def example_rng(seed: int, example_id: str) -> random.Random:
    """The RNG that deals one example's context: depends on (seed, id) only, not on load order or limit."""
    return random.Random(stable_hash("dits-example", seed, example_id))


def content_id(prefix: str, *parts: str) -> str:
    """A stable id for datasets without one (GSM8K, MATH, MMLU): a digest of the record's text."""
    digest = hashlib.sha1("\x1f".join(parts).encode("utf-8")).hexdigest()[:12]
    return f"{prefix}-{digest}"
