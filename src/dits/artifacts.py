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

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dits.ledger import Ledger, LedgerCounts

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
COSTS_FILE = "costs.jsonl"
"""Every stage: what each piece of its work cost, kept with the work (:class:`CostJournal`)."""


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


def read_jsonl(path: str | Path, model: type[M], *, repair: bool = False) -> list[M]:
    """Read records; a missing file has none.

    A torn last line (no newline: a write cut short by a kill) is cut off the file with ``repair`` (a
    stage's own append-only file, read back to resume it) and is an error otherwise (a finished artifact
    or a user's input is never silently shortened). A malformed line anywhere is an error naming the file
    and line: that is corruption, not a kill.
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
        if not complete and not repair:
            raise ValueError(f"{p}:{lineno}: torn last line (a write cut short); the file is incomplete")
        try:
            out.append(model.model_validate_json(raw))
        except ValueError as err:
            if not complete:
                break
            raise ValueError(f"{p}:{lineno}: malformed {model.__name__} record ({_reason(err)})") from None
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


def _reason(err: ValueError) -> str:
    """One line on what is wrong with a record (pydantic's first complaint, with its field)."""
    if isinstance(err, ValidationError):
        first = err.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        return f"{where}: {first['msg']}" if where else first["msg"]
    return str(err).splitlines()[0] if str(err) else type(err).__name__


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


# -- one process per run directory ------------------------------------------------------------------

LOCK_FILE = ".lock"


class RunLocked(RuntimeError):
    """Another process is working in this run directory; the message names it."""


_LOCKS: dict[Path, tuple[int, int]] = {}
"""Run directories this process holds: the lock file's descriptor and how many holders share it."""


def lock_dir(folder: str | Path) -> Path:
    """Take the run directory ``folder`` for this process (an exclusive ``flock`` on ``folder/.lock``,
    which the system releases when the process ends, however it ends), or raise :class:`RunLocked` naming
    the process that holds it. Re-entrant within a process; :func:`unlock_dir` gives it back."""
    import fcntl
    import socket

    key = Path(folder).resolve()
    if key in _LOCKS:
        fd, n = _LOCKS[key]
        _LOCKS[key] = (fd, n + 1)
        return key
    key.mkdir(parents=True, exist_ok=True)
    fd = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise RunLocked(f"{key} is in use by {holder}; wait for it to finish (or stop it)") from None
    since = datetime.now(UTC).isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} (since {since})\n".encode(), 0)
    _LOCKS[key] = (fd, 1)
    _remove_temp_files(key, recursive=False)  # e.g. a config.yaml a killed run was writing
    return key


def unlock_dir(folder: str | Path) -> None:
    key = Path(folder).resolve()
    fd, n = _LOCKS[key]
    if n > 1:
        _LOCKS[key] = (fd, n - 1)
        return
    del _LOCKS[key]
    os.ftruncate(fd, 0)
    os.close(fd)  # closing the descriptor releases the flock


# -- cost journal ----------------------------------------------------------------------------------


class CostEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tag: str
    counts: dict[str, int]


_OFFERED: dict[Path, LedgerCounts] = {}
"""Per stage directory, what this process has offered its journal (see :attr:`CostJournal.offered`)."""


class CostJournal:
    """What a stage's work cost, kept in ``costs.jsonl`` beside that work, so the stage's ledger is the same
    however many processes (killed, resumed) did it: the cost of an uninterrupted run.

    Each piece of work that leaves something on disk (a unit's records, a calibrated ``T_norm``, a warm-up
    adapter, an estimator's preparation) is entered under a tag once, when it is kept; work redone by a
    later process (a unit cut short, a preparation repeated after a restart) is *offered* again and not
    entered twice. :func:`run_stage` enters what the finishing process spent outside any tag as ``rest``
    and writes the journal's total as the stage's ledger."""

    def __init__(self, stage_dir: str | Path) -> None:
        self.path = Path(stage_dir) / COSTS_FILE
        self._key = Path(stage_dir).resolve()

    def entries(self) -> dict[str, LedgerCounts]:
        return {e.tag: LedgerCounts(**e.counts) for e in read_jsonl(self.path, CostEntry, repair=True)}

    @property
    def offered(self) -> LedgerCounts:
        """Everything this process offered for this stage (entered or already there): the part of its
        spending the journal accounts for."""
        return _OFFERED.get(self._key, LedgerCounts())

    def offer(self, tag: str, counts: LedgerCounts) -> None:
        """Enter ``counts`` under ``tag`` unless an earlier process (or this one) already did."""
        _OFFERED[self._key] = self.offered + counts
        if tag not in self.entries():
            append_jsonl(self.path, [CostEntry(tag=tag, counts=dict(counts.__dict__))])

    @contextlib.contextmanager
    def measure(self, tag: str, ledger: Ledger) -> Iterator[None]:
        """Offer what ``ledger`` is charged inside the block under ``tag``."""
        before = ledger.snapshot()
        yield
        self.offer(tag, ledger.snapshot() - before)

    def total(self) -> LedgerCounts:
        out = LedgerCounts()
        for counts in self.entries().values():
            out = out + counts
        return out


# -- stage manifests -------------------------------------------------------------------------------


class StageIncomplete(RuntimeError):
    """A stage body that stopped on purpose before the end (e.g. a ``--limit``): no manifest is written,
    and a rerun continues it."""


class StageChanged(RuntimeError):
    """A stage already holds artifacts made from other inputs; the message names the keys that differ."""


class StageCorrupt(RuntimeError):
    """A stage's bookkeeping or finished files are not what it recorded; the message names the path and
    the way out."""


class StageFile(BaseModel):
    """A finished stage's file: its size, and its SHA-256 where reading it back is cheap."""

    model_config = ConfigDict(extra="forbid")

    size: int
    sha256: str | None = None


class StageStart(BaseModel):
    """``stage.json``: the inputs a stage was started with."""

    digest: str
    inputs: dict[str, Any]


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
    """This stage's own share of the run's ledger (token counts by kind and FLOPs): its work's cost as an
    uninterrupted run would spend it (:class:`CostJournal`), however many processes did it."""
    seconds: float = 0.0
    finished: str = ""
    files: dict[str, StageFile] = Field(default_factory=dict)
    """Every file the stage left (path relative to its folder): what a skip checks is still there."""


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


DIGEST_LIMIT = 64 * 2**20
"""Files up to this size get a digest in the manifest (a full fine-tune's weights only a size)."""
_BOOKKEEPING = frozenset({MANIFEST_FILE, STARTED_FILE, LOCK_FILE})


def _is_temp(path: Path) -> bool:
    """A half-written file of :func:`write_text_atomic` (``.name.tmp<pid>``)."""
    return path.name.startswith(".") and ".tmp" in path.name


def _work_files(stage_dir: Path) -> Iterator[Path]:
    """The files a stage holds besides its bookkeeping and half-written ones, in path order."""
    for p in sorted(stage_dir.rglob("*")):
        if p.is_file() and p.name not in _BOOKKEEPING and not _is_temp(p):
            yield p


def stage_files(stage_dir: Path) -> dict[str, StageFile]:
    """The files a stage holds besides its bookkeeping, with sizes and (small ones) digests."""
    out: dict[str, StageFile] = {}
    for p in _work_files(stage_dir):
        size = p.stat().st_size
        sha = hashlib.sha256(p.read_bytes()).hexdigest() if size <= DIGEST_LIMIT else None
        out[p.relative_to(stage_dir).as_posix()] = StageFile(size=size, sha256=sha)
    return out


def changed_files(stage_dir: Path, manifest: StageManifest) -> list[str]:
    """What differs from the files ``manifest`` recorded: ``path: missing`` or ``path: changed``."""
    problems = []
    for rel, want in manifest.files.items():
        p = stage_dir / rel
        if not p.is_file():
            problems.append(f"{p}: missing")
        elif p.stat().st_size != want.size or (
            want.sha256 is not None and hashlib.sha256(p.read_bytes()).hexdigest() != want.sha256
        ):
            problems.append(f"{p}: changed")
    return problems


def _remove_temp_files(stage_dir: Path, *, recursive: bool = True) -> None:
    """Half-written files a killed process left (the run's lock says none is being written now)."""
    found = (stage_dir.rglob if recursive else stage_dir.glob)("*") if stage_dir.is_dir() else []
    for p in found:
        if p.is_file() and _is_temp(p):
            p.unlink()
            log.info("removed %s, a file a stopped process did not finish writing", p)


def _read_record(path: Path, model: type[M]) -> M | None:
    """A stage's ``manifest.json`` / ``stage.json``, None if absent; unreadable: :class:`StageCorrupt`."""
    if not path.exists():
        return None
    try:
        return model.model_validate_json(path.read_bytes())
    except ValueError as err:
        raise StageCorrupt(
            f"{path} is not a valid {path.name} ({_reason(err)}); rerun with --force to redo the stage "
            f"{path.parent.name}, or delete {path.parent}"
        ) from None


def read_manifest(stage_dir: Path) -> StageManifest | None:
    return _read_record(stage_dir / MANIFEST_FILE, StageManifest)


def _has_outputs(stage_dir: Path) -> bool:
    """Whether a started stage left anything of its work (not only its bookkeeping and cost journal)."""
    return any(p.name != COSTS_FILE for p in _work_files(stage_dir))


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
    stages, e.g. after full fine-tuning); the stage is charged its :class:`CostJournal`'s total: the work
    earlier processes kept, and what this one spent besides.
    """
    inputs = json.loads(json.dumps(dict(inputs), default=str))
    key = digest(inputs)
    _remove_temp_files(stage_dir)
    try:
        done, started = read_manifest(stage_dir), _read_record(stage_dir / STARTED_FILE, StageStart)
    except StageCorrupt:
        if not force:
            raise
        log.warning("%s: unreadable bookkeeping; --force: redoing the stage", stage_dir)
        shutil.rmtree(stage_dir)
        done = started = None
    for old in (done, started):
        if old is None:
            continue
        if old.digest == key:
            break
        diff = "; ".join(differences(old.inputs, inputs))
        if done is None and not _has_outputs(stage_dir):  # a start that failed before writing anything
            log.info(
                "%s: an earlier start under other inputs left nothing (%s); starting anew", stage_dir, diff
            )
        elif not force:
            raise StageChanged(
                f"{stage_dir} was made from other inputs ({diff}). Use a new run name, or --force to redo "
                "this stage and the ones after it."
            )
        else:
            log.warning("%s: inputs changed (%s); --force: redoing it", stage_dir, diff)
        shutil.rmtree(stage_dir)
        done = None
        break
    if done is not None and done.digest == key:
        problems = changed_files(stage_dir, done)
        if not problems:
            log.info("%s: finished earlier, skipped", stage_dir)
            return done
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        if not force:
            raise StageCorrupt(
                f"{problems[0]}{more} since the stage finished; rerun with --force to redo {stage_dir}"
            )
        log.warning("%s: %s%s; --force: redoing it", stage_dir, problems[0], more)
        shutil.rmtree(stage_dir)
    resumed = (stage_dir / STARTED_FILE).exists()
    stage_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(stage_dir / STARTED_FILE, {"digest": key, "inputs": inputs})
    log.info("%s: %s", stage_dir, "resuming" if resumed else "starting")
    t0 = time.perf_counter()
    journal = CostJournal(stage_dir)
    book, offered = ledger(), journal.offered
    before = book.snapshot()
    counts = dict(body(stage_dir))
    book = ledger()
    journal.offer("rest", book.snapshot() - before - (journal.offered - offered))
    spent = journal.total()
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
        files=stage_files(stage_dir),
    )
    write_json_atomic(stage_dir / MANIFEST_FILE, manifest.model_dump(mode="json"))
    return manifest
