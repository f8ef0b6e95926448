"""Stage bookkeeping under kills, corruption and a second process: a stage's ledger is an uninterrupted
run's, a run directory has one process, a damaged stage is refused with its path and the way out."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import BaseModel

from dits.artifacts import (
    COSTS_FILE,
    MANIFEST_FILE,
    STARTED_FILE,
    CostJournal,
    RunLocked,
    StageChanged,
    StageCorrupt,
    lock_dir,
    read_jsonl,
    run_stage,
    unlock_dir,
)
from dits.ledger import Ledger


class Rec(BaseModel):
    n: int


class Killed(Exception):
    pass


def _stage(stage_dir: Path, ledger: Ledger, *, kill_after: int | None = None, inputs: dict | None = None,
           force: bool = False):  # fmt: skip
    """A stage of five units: a setup that costs 7 generated tokens once per process, each unit 10 plus its
    index, each entered in the journal before its record is appended (as :class:`UnitMap` does), and a
    closing step of 3 outside any unit."""

    def body(out: Path) -> dict[str, float]:
        journal = CostJournal(out)
        with journal.measure("setup", ledger):
            ledger.charge(generated_tokens=7)
        done = {r.n for r in read_jsonl(out / "units.jsonl", Rec, repair=True)}
        for i in range(5):
            if i in done:
                continue
            if kill_after is not None and i == kill_after:
                raise Killed
            with journal.measure(f"unit:{i}", ledger):
                ledger.charge(generated_tokens=10 + i)
            with (out / "units.jsonl").open("a") as f:
                f.write(Rec(n=i).model_dump_json() + "\n")
        ledger.charge(generated_tokens=3)
        return {"units": 5}

    return run_stage(stage_dir, stage="s", iteration=0, method=None, inputs=inputs or {"a": 1}, body=body,
                     ledger=lambda: ledger, force=force)  # fmt: skip


def test_a_resumed_stage_is_charged_what_an_uninterrupted_one_is(tmp_path: Path) -> None:
    whole = _stage(tmp_path / "whole", Ledger(params=1))
    assert whole.ledger["generated_tokens"] == 7 + sum(10 + i for i in range(5)) + 3

    ledger = Ledger(params=1)  # one ledger across the three attempts, as in one long-lived process
    for kill in (2, 4):
        with pytest.raises(Killed):
            _stage(tmp_path / "cut", ledger, kill_after=kill)
    fresh = Ledger(params=1)  # a new process
    resumed = _stage(tmp_path / "cut", fresh)
    assert ledger.counts.generated_tokens + fresh.counts.generated_tokens == 70 + 2 * 7  # setup thrice
    assert resumed.ledger == whole.ledger
    tags = [json.loads(line)["tag"] for line in (tmp_path / "cut" / COSTS_FILE).read_text().splitlines()]
    assert sorted(tags) == sorted(["setup", *(f"unit:{i}" for i in range(5)), "rest"])


def test_a_run_directory_has_one_process(tmp_path: Path) -> None:
    code = (
        "import sys, time; from dits.artifacts import lock_dir; lock_dir(sys.argv[1]); "
        "print('locked', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLocked, match=f"in use by pid {holder.pid} on "):
            lock_dir(tmp_path)
        os.kill(holder.pid, signal.SIGKILL)  # gone without cleaning up: the system releases its lock
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    start = time.monotonic()
    lock_dir(tmp_path)
    lock_dir(tmp_path)  # re-entrant within a process
    unlock_dir(tmp_path)
    unlock_dir(tmp_path)
    assert time.monotonic() - start < 5
    assert (tmp_path / ".lock").read_text() == ""  # given back: no holder named


@pytest.mark.parametrize("text", ["garbage", "{}", '{"digest": 3}', ""])
@pytest.mark.parametrize("name", [MANIFEST_FILE, STARTED_FILE])
def test_unreadable_bookkeeping_names_the_file_and_force_redoes_it(
    tmp_path: Path, name: str, text: str
) -> None:
    stage = tmp_path / "s"
    _stage(stage, Ledger(params=1))
    (stage / name).write_text(text)
    with pytest.raises(StageCorrupt, match=rf"{stage / name} is not a valid {name} .*--force"):
        _stage(stage, Ledger(params=1))
    redone = _stage(stage, Ledger(params=1), force=True)
    assert redone.counts == {"units": 5.0} and (stage / name).read_text() != text


@pytest.mark.parametrize("damage", ["torn", "deleted"])
def test_a_finished_stage_whose_files_changed_is_refused(tmp_path: Path, damage: str) -> None:
    stage = tmp_path / "s"
    first = _stage(stage, Ledger(params=1))
    assert set(first.files) == {"units.jsonl", COSTS_FILE}
    units = stage / "units.jsonl"
    if damage == "torn":
        units.write_bytes(units.read_bytes()[:-5])
    else:
        units.unlink()
    with pytest.raises(StageCorrupt, match=rf"{units}: (changed|missing) since the stage finished"):
        _stage(stage, Ledger(params=1))
    _stage(stage, Ledger(params=1), force=True)
    assert [r.n for r in read_jsonl(units, Rec)] == list(range(5))


def test_a_failed_start_does_not_block_a_corrected_one(tmp_path: Path) -> None:
    stage = tmp_path / "s"
    with pytest.raises(Killed):  # died before any unit: nothing of its work on disk
        _stage(stage, Ledger(params=1), kill_after=0, inputs={"model": "a.gguf"})
    assert _stage(stage, Ledger(params=1), inputs={"model": "b.gguf"}).inputs == {"model": "b.gguf"}
    # a start that left work is not thrown away unasked
    other = tmp_path / "t"
    with pytest.raises(Killed):
        _stage(other, Ledger(params=1), kill_after=2, inputs={"model": "a.gguf"})
    with pytest.raises(StageChanged, match=r"model: 'a\.gguf' -> 'b\.gguf'"):
        _stage(other, Ledger(params=1), inputs={"model": "b.gguf"})


def test_half_written_files_of_a_killed_process_are_removed(tmp_path: Path) -> None:
    stage = tmp_path / "s"
    stage.mkdir()
    stale = stage / ".summary.json.tmp12345"
    stale.write_text("{")
    _stage(stage, Ledger(params=1))
    assert not stale.exists()


def test_a_torn_line_is_repaired_only_in_a_stage_s_own_running_file(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text('{"n": 1}\n{"n": 2}\n{"n": 3')
    with pytest.raises(ValueError, match=rf"{path}:3: torn last line"):
        read_jsonl(path, Rec)
    assert path.read_text().endswith('{"n": 3')  # a strict read changes nothing
    assert [r.n for r in read_jsonl(path, Rec, repair=True)] == [1, 2]
    assert path.read_text() == '{"n": 1}\n{"n": 2}\n'
    path.write_text('{"n": 1}\n{"m": 2}\n')
    with pytest.raises(ValueError, match=rf"{path}:2: malformed Rec record \(n: Field required\)"):
        read_jsonl(path, Rec, repair=True)
