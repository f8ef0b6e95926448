"""One stage of a run: a directory, what produced it, and the skip / resume / refuse rules.

A stage directory ``runs/<name>/iter_<i>/<stage>/`` holds the stage's artifacts, ``stage.json`` (written when
the stage starts: the config values and input digests that decide its output) and ``manifest.json``
(written last, atomically: the stage finished). On a rerun:

- a finished stage with the same inputs is skipped;
- a started, unfinished stage with the same inputs is run again, and the stage's own resume logic
  continues from the records it had appended (trees, transcripts, scores);
- a stage whose inputs changed is refused with the keys that differ, unless ``force`` (then it is wiped and
  redone, and so is every stage after it, since their inputs include its digest).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from dits.jsonl import write_json_atomic

log = logging.getLogger(__name__)

STARTED_FILE = "stage.json"
MANIFEST_FILE = "manifest.json"


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


def digest_of(inputs: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
    ledger: Callable[[], Any],
    force: bool = False,
) -> StageManifest:
    """Run ``body(stage_dir)`` unless the stage already finished with the same ``inputs``.

    ``ledger()`` returns the engine's ledger at the time of the call (the engine can be rebuilt between
    stages, e.g. after full fine-tuning); the stage is charged the difference across ``body``.
    """
    inputs = json.loads(json.dumps(dict(inputs), default=str))
    digest = digest_of(inputs)
    for path in (stage_dir / MANIFEST_FILE, stage_dir / STARTED_FILE):
        if not path.exists():
            continue
        old = json.loads(path.read_text(encoding="utf-8"))
        if old["digest"] == digest:
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
    if done is not None and done.digest == digest:
        log.info("%s: finished earlier, skipped", stage_dir)
        return done
    resumed = (stage_dir / STARTED_FILE).exists()
    stage_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(stage_dir / STARTED_FILE, {"digest": digest, "inputs": inputs})
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
        digest=digest,
        inputs=inputs,
        counts={k: float(v) for k, v in counts.items()},
        ledger={k: float(v) for k, v in book.to_dict(spent).items() if k != "params"},
        seconds=round(time.perf_counter() - t0, 3),
        finished=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    write_json_atomic(stage_dir / MANIFEST_FILE, manifest.model_dump(mode="json"))
    return manifest
