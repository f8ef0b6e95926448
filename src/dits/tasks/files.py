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
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO, TypeVar

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


class SplitTooShortError(DatasetFormatError):
    """A split that holds fewer examples than were asked for (``file`` is the file or folder read)."""

    def __init__(
        self, file: str | Path, split: str, requested: int, available: int, detail: str = ""
    ) -> None:
        self.requested = requested
        self.available = available
        self.detail = detail
        problem = f"{requested} examples requested but the split has only {available}{detail}"
        super().__init__(file, f"{split} split", problem)


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


_UNDECODABLE = re.compile("[\udc80-\udcff]")
"""Bytes that are not UTF-8, as ``errors="surrogateescape"`` decodes them (valid UTF-8 never gives these)."""


def open_text(path: Path, newline: str | None = None) -> TextIO:
    """``path`` opened as UTF-8 text; bytes that are not UTF-8 come through as lone surrogates, so the
    reader can name their line (:func:`check_utf8`) instead of failing somewhere in a decoded chunk."""
    return path.open(encoding="utf-8", errors="surrogateescape", newline=newline)


def _not_utf8(text: str, position: int) -> str:
    column = position - text.rfind("\n", 0, position)
    return f"not valid UTF-8 (byte 0x{ord(text[position]) - 0xDC00:02x} at column {column})"


def check_utf8(path: Path, number: int, line: str) -> None:
    """A :class:`DatasetFormatError` naming line ``number`` if ``line`` (from :func:`open_text`) held
    bytes that are not UTF-8."""
    match = _UNDECODABLE.search(line)
    if match:
        raise DatasetFormatError(path, f"line {number}", _not_utf8(line, match.start()))


def read_text(path: Path) -> str:
    """The whole file as text (newlines translated as text mode does); bytes that are not UTF-8 are a
    :class:`DatasetFormatError` naming the line and column."""
    with open_text(path) as fh:
        text = fh.read()
    match = _UNDECODABLE.search(text)
    if match:
        raise DatasetFormatError(
            path, f"line {_line_at(text, match.start())}", _not_utf8(text, match.start())
        )
    return text


_JSON_NESTING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


def _nesting(text: str) -> tuple[int, int]:
    """The deepest ``[``/``{`` nesting of a JSON text and the offset where it first passes the parser's
    reach (the recursion limit), else where it is deepest. Only run once parsing has failed."""
    depth = deepest = 0
    where = 0
    limit = sys.getrecursionlimit()
    passed = False
    for match in _JSON_NESTING.finditer(text):
        char = match.group()
        if char in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if not passed:
                    where = match.start()
                    passed = depth > limit
        elif char in "]}":
            depth -= 1
    return deepest, where


def _line_at(text: str, position: int) -> int:
    return text.count("\n", 0, position) + 1


def parse_json(path: Path, text: str, line: int | None = None) -> Any:
    """``text`` parsed as JSON; ``line`` is its line in ``path`` (JSON Lines), else ``text`` is the whole
    file and positions are counted in it. Every failure is a :class:`DatasetFormatError` naming the line:
    syntax errors, nesting too deep for Python's parser, integers too long for ``int``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        where = line if line is not None else exc.lineno
        raise DatasetFormatError(path, f"line {where}", f"invalid JSON ({exc.msg})") from exc
    except RecursionError:
        deepest, position = _nesting(text)
        where = line if line is not None else _line_at(text, position)
        problem = (
            f"JSON nested {deepest} levels deep ([ and {{), deeper than Python's parser can read "
            f"(about {sys.getrecursionlimit()})"
        )
        raise DatasetFormatError(path, f"line {where}", problem) from None
    except ValueError as exc:
        if "integer string conversion" not in str(exc):
            where = line if line is not None else 1
            raise DatasetFormatError(path, f"line {where}", f"invalid JSON ({exc})") from exc
        limit = sys.get_int_max_str_digits()
        number = re.search(rf"(?<![\w.])-?\d{{{limit + 1},}}(?![\w.])", text)
        where = line if line is not None else (_line_at(text, number.start()) if number else 1)
        size = f"{len(number.group().lstrip('-'))} digits" if number else f"more than {limit} digits"
        problem = f"an integer of {size}; Python reads integers of at most {limit} digits"
        raise DatasetFormatError(path, f"line {where}", problem) from exc


def iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """``("line N", object)`` for every non-blank line of a JSON Lines file (an empty file is an error)."""
    records = 0
    with open_text(path) as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            check_utf8(path, number, line)
            record = parse_json(path, line, number)
            records += 1
            yield f"line {number}", record
    if not records:
        raise DatasetFormatError(path, "line 1", "no records (the file is empty)")


def read_json(path: Path) -> Any:
    """A whole JSON document; any error names the file and the line."""
    text = read_text(path)
    if not text.strip():
        raise DatasetFormatError(path, "line 1", "no JSON document (the file is empty)")
    return parse_json(path, text)


def iter_json_array(path: Path, key: str | None = None) -> Iterator[tuple[str, Any]]:
    """``("record I", object)`` for each element of a JSON array (or of ``document[key]``)."""
    document = read_json(path)
    if key is not None:
        if not isinstance(document, dict) or key not in document:
            raise DatasetFormatError(path, "top level", f"expected an object with a {key!r} list")
        document = document[key]
    if not isinstance(document, list):
        raise DatasetFormatError(path, "top level", f"expected a JSON array, got {type(document).__name__}")
    if not document:
        where = "the JSON array" if key is None else f"the {key!r} list"
        raise DatasetFormatError(path, "top level", f"no records ({where} is empty)")
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
