"""Where stage artifacts live and how they are written: file names, append-only JSONL, atomic writes, the
one digest, and the stage manifest with its skip / resume / refuse rules.

Every stage directory (``runs/<name>/iter_<i>/<stage>/``, or the ``--out`` of a single-stage command)
holds its artifacts, ``stage.json`` (written when the stage starts: the config values and input digests
that decide its output) and ``manifest.json`` (written last, atomically: the stage finished). On a rerun:

- a finished stage with the same inputs is skipped;
- a started, unfinished stage with the same inputs is run again, and the stage's own resume logic
  continues from the records it had appended (trees, transcripts, scores);
- a stage whose inputs changed is refused with the keys that differ, unless ``force`` (then it is wiped and
  redone, and so is every stage after it, since their inputs include its digest).

JSONL files survive a kill: whole lines or nothing, a torn tail repaired on read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from dits.ledger import Ledger

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

# -- file names ------------------------------------------------------------------------------------

STARTED_FILE = "stage.json"
MANIFEST_FILE = "manifest.json"
TREES_FILE = "trees.jsonl"
"""search: one :class:`~dits.search.tree.Tree` per line, appended shard by shard."""
PAIRS_FILE = "pairs.jsonl"
"""search: the mined :class:`~dits.records.PreferencePair` records."""
T_NORM_FILE = "t_norm.json"
"""search: the reward's token normaliser and the sample it was calibrated on."""
SEARCH_SUMMARY_FILE = "summary.json"
SCORES_FILE = "scores.jsonl"
"""influence: one :class:`~dits.records.InfluenceScore` per chunk, appended as computed."""
SELECTED_FILE = "selected.jsonl"
"""select: the kept pairs, in pool order."""
SAMPLES_FILE = "samples.jsonl"
"""sft-data: every sampled conversation and its reward."""
DIALOGUES_FILE = "dialogues.jsonl"
"""sft-data: each sampled conversation as it comes back, before any reward (what a resumed stage keeps)."""
SFT_FILE = "sft.jsonl"
"""sft-data: the :class:`~dits.records.SftRow` records."""
SFT_SUMMARY_FILE = "sft_data.json"
TRANSCRIPTS_FILE = "transcripts.jsonl"
"""evaluate: one record per test task, appended in chunks."""
EVAL_SUMMARY_FILE = "summary.json"
TRAIN_RESULT_FILE = "train_result.json"
"""sft / dpo: what the training did, beside the saved adapter or model."""


def digest(data: Any) -> str:
    """A short hash of JSON-able data (keys sorted): what decides whether an artifact is stale."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(*paths: str | Path) -> str:
    """A short hash of files' bytes (a pool given as a file, a saved adapter): their identity as an input."""
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()[:16]


# -- JSONL and atomic writes -----------------------------------------------------------------------


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


def write_jsonl_atomic(path: str | Path, records: Iterable[BaseModel]) -> None:
    """Replace ``path`` with one line per record, atomically."""
    write_text_atomic(path, "".join(r.model_dump_json() + "\n" for r in records))


# -- stage manifests -------------------------------------------------------------------------------


class StageIncomplete(RuntimeError):
    """A stage body that stopped on purpose before the end (e.g. a ``--limit``): no manifest is written,
    and a rerun continues it."""


class StageChanged(RuntimeError):
    """A stage already holds artifacts made from other inputs; the message names the keys that differ."""


class StageManifest(BaseModel):
    """What a finished stage produced and what it cost."""

    model_config = ConfigDict(extra="forbid")

    stage: str
    iteration: int | None
    method: str | None
    digest: str
    inputs: dict[str, Any]
    """The config values and upstream digests this stage's output depends on."""
    counts: dict[str, float] = Field(default_factory=dict)
    """Stage-specific figures (pairs, rows, metric, ...)."""
    ledger: dict[str, float] = Field(default_factory=dict)
    """This stage's own share of the run's ledger (token counts by kind and FLOPs)."""
    seconds: float = 0.0
    finished: str = ""


def _flatten(data: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(data, Mapping):
        for key in sorted(data):
            yield from _flatten(data[key], f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, data


def differences(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 8) -> list[str]:
    """``key: old -> new`` for every leaf that differs (at most ``limit``, then a count)."""
    a, b = dict(_flatten(old)), dict(_flatten(new))
    out = [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}" for k in sorted(a.keys() | b.keys())
           if a.get(k, "(absent)") != b.get(k, "(absent)")]  # fmt: skip
    return out[:limit] + ([f"... and {len(out) - limit} more"] if len(out) > limit else [])


def read_manifest(stage_dir: Path) -> StageManifest | None:
    path = stage_dir / MANIFEST_FILE
    return StageManifest.model_validate_json(path.read_text(encoding="utf-8")) if path.exists() else None


def run_stage(
    stage_dir: Path,
    *,
    stage: str,
    iteration: int | None,
    method: str | None,
    inputs: Mapping[str, Any],
    body: Callable[[Path], Mapping[str, float]],
    ledger: Callable[[], Ledger],
    force: bool = False,
) -> StageManifest:
    """Run ``body(stage_dir)`` unless the stage already finished with the same ``inputs``.

    ``ledger()`` returns the engine's ledger at the time of the call (the engine can be rebuilt between
    stages, e.g. after full fine-tuning); the stage is charged the difference across ``body``.
    """
    inputs = json.loads(json.dumps(dict(inputs), default=str))
    key = digest(inputs)
    for path in (stage_dir / MANIFEST_FILE, stage_dir / STARTED_FILE):
        if not path.exists():
            continue
        old = json.loads(path.read_text(encoding="utf-8"))
        if old["digest"] == key:
            break
        diff = "; ".join(differences(old["inputs"], inputs))
        if not force:
            raise StageChanged(
                f"{stage_dir} was made from other inputs ({diff}). Use a new run name, or --force to redo "
                "this stage and the ones after it."
            )
        log.warning("%s: inputs changed (%s); --force: redoing it", stage_dir, diff)
        shutil.rmtree(stage_dir)
        break
    done = read_manifest(stage_dir)
    if done is not None and done.digest == key:
        log.info("%s: finished earlier, skipped", stage_dir)
        return done
    resumed = (stage_dir / STARTED_FILE).exists()
    stage_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(stage_dir / STARTED_FILE, {"digest": key, "inputs": inputs})
    log.info("%s: %s", stage_dir, "resuming" if resumed else "starting")
    t0 = time.perf_counter()
    book = ledger()
    before = book.snapshot()
    counts = dict(body(stage_dir))
    book = ledger()
    spent = book.snapshot() - before
    manifest = StageManifest(
        stage=stage,
        iteration=iteration,
        method=method,
        digest=key,
        inputs=inputs,
        counts={k: float(v) for k, v in counts.items()},
        ledger={k: float(v) for k, v in book.to_dict(spent).items() if k != "params"},
        seconds=round(time.perf_counter() - t0, 3),
        finished=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    write_json_atomic(stage_dir / MANIFEST_FILE, manifest.model_dump(mode="json"))
    return manifest
