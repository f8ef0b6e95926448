"""Append-only JSONL files that survive a kill: whole lines or nothing, torn tails repaired on read."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)


def append_jsonl(path: str | Path, records: Iterable[BaseModel]) -> None:
    """Append records as one line each, then fsync: a finished append survives a crash."""
    lines = "".join(r.model_dump_json() + "\n" for r in records)
    if not lines:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("a", encoding="utf-8") as f:
        f.write(lines)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | Path, model: type[M], *, repair: bool = True) -> list[M]:
    """Read records; a torn last line (a kill mid-write) is cut off the file when ``repair`` is set.

    A malformed line anywhere else is an error naming the file and line: that is corruption, not a kill.
    """
    p = Path(path)
    if not p.exists():
        return []
    data = p.read_bytes()
    out: list[M] = []
    good_end = 0
    pos = 0
    for lineno, raw in enumerate(data.splitlines(keepends=True), start=1):
        pos += len(raw)
        complete = raw.endswith(b"\n")
        try:
            out.append(model.model_validate_json(raw))
        except ValueError as err:
            if not complete:
                break
            raise ValueError(f"{p}:{lineno}: malformed {model.__name__} record: {err}") from None
        if not complete:  # parsed, but the newline never made it: rewrite it on repair
            good_end = -1
            break
        good_end = pos
    if repair and good_end != len(data):
        with p.open("r+b") as f:
            if good_end == -1:
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
            else:
                f.truncate(good_end)
    return out


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write to a temporary name, fsync, rename: a reader sees the old or the new file, never half."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
    with contextlib.suppress(OSError):  # make the rename itself durable where directories can be fsynced
        fd = os.open(p.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json_atomic(path: str | Path, obj: object) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))


def check_manifest(path: str | Path, digest: str, body: Mapping[str, Any], what: str) -> None:
    """Guard an output directory against mixing artifacts of two configs.

    The first call writes ``{"config_digest": digest, **body}``; a later call with another digest raises,
    naming the keys of ``body`` whose stored values differ. ``what`` names the artifacts in the message.
    """
    p = Path(path)
    if p.exists():
        old = json.loads(p.read_text(encoding="utf-8"))
        if old.get("config_digest") == digest:
            return
        new = json.loads(json.dumps(dict(body), default=str))
        changed = [k for k in new if k in old and old[k] != new[k]]
        detail = f"; changed: {', '.join(changed)}" if changed else ""
        raise ValueError(
            f"{p.parent} holds {what} made under another config (digest {old.get('config_digest')}, now "
            f"{digest}{detail}); use a new output directory or delete the old one"
        )
    write_text_atomic(p, json.dumps({"config_digest": digest, **body}, indent=2, default=str))
