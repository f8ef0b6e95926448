"""The resumable map: a run killed anywhere and resumed writes the file an uninterrupted run writes, running
only the units it had not finished; and the sft-data stage, which runs on it, resumes the same way."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from dits.config import SftDataConfig
from dits.executor import Workbench
from dits.ledger import Ledger
from dits.mas.protocol import ProtocolConfig
from dits.reward import RewardConfig
from dits.stages.sft_data import build_sft_data
from dits.stages.units import Unit, UnitMap
from tests.helpers import EXAMPLES, SeededEngine


class Rec(BaseModel):
    key: str
    value: int


def _key(r: Rec) -> str:
    return r.key


class _Engine:
    def __init__(self) -> None:
        self.ledger = Ledger(params=1)


class Square:
    """Each record's value is its number squared; the ledger is charged one generated token per record.
    ``fail_at`` raises at that unit (a kill mid-run); ``calls`` records the units run."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.fail_at, self.calls = fail_at, []

    def __call__(self, bench: Workbench, payload: list[int]) -> list[Rec]:
        if self.fail_at is not None and payload[0] == self.fail_at:
            raise KeyboardInterrupt
        self.calls.append(payload[0])
        bench.ledger.charge(generated_tokens=len(payload))
        return [Rec(key=str(n), value=n * n) for n in payload]


UNITS = [Unit(list(range(i, i + 3)), tuple(str(n) for n in range(i, i + 3))) for i in range(0, 12, 3)]


def _run(path: Path | None, work: Square, **kw: object) -> UnitMap:
    m = UnitMap(UNITS, path, Rec, _key, **kw)  # type: ignore[arg-type]
    for _ in m.run(work, None, None, engine=_Engine(), desc="t", unit="rec", progress=False):  # type: ignore[arg-type]
        pass
    return m


def test_a_killed_map_resumes_to_the_uninterrupted_file(tmp_path: Path) -> None:
    whole = _run(tmp_path / "whole.jsonl", Square())
    assert [r.value for r in whole.records()] == [n * n for n in range(12)]

    path = tmp_path / "cut.jsonl"
    with pytest.raises(KeyboardInterrupt):
        _run(path, Square(fail_at=6))
    assert len(path.read_text().splitlines()) == 6  # units 0 and 3 finished and were kept
    again = Square()
    resumed = _run(path, again)
    assert again.calls == [6, 9]
    assert resumed.found == 6 and resumed.complete
    assert path.read_bytes() == (tmp_path / "whole.jsonl").read_bytes()


def test_a_torn_or_short_unit_is_rerun_whole_and_only_its_missing_records_appended(tmp_path: Path) -> None:
    whole = tmp_path / "whole.jsonl"
    _run(whole, Square())
    lines = whole.read_text().splitlines(keepends=True)
    path = tmp_path / "torn.jsonl"
    path.write_text("".join(lines[:4]) + lines[4][:7])  # unit 3 cut after one record and a half
    again = Square()
    _run(path, again)
    assert again.calls == [3, 6, 9]
    assert path.read_bytes() == whole.read_bytes()


def test_ledger_limit_check_and_foreign_records(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text(Rec(key="elsewhere", value=-1).model_dump_json() + "\n")
    m = _run(path, Square(), limit=2)
    assert m.spent.generated_tokens == 6  # two units of three records, charged by the work
    assert not m.complete and [r.key for r in m.records()] == [str(n) for n in range(6)]
    assert path.read_text().splitlines()[0].startswith('{"key":"elsewhere"')  # kept, not ours to drop

    def refuse(r: Rec) -> None:
        if r.key == "4":
            raise ValueError("not this pool's record 4")

    with pytest.raises(ValueError, match="record 4"):
        UnitMap(UNITS, path, Rec, _key, check=refuse)
    path.write_text(path.read_text() + Rec(key="1", value=1).model_dump_json() + "\n")
    with pytest.raises(ValueError, match="holds Rec '1' twice"):
        UnitMap(UNITS, path, Rec, _key)


def test_a_unit_returning_other_records_is_refused(tmp_path: Path) -> None:
    class Wrong(Square):
        def __call__(self, bench: Workbench, payload: list[int]) -> list[Rec]:
            return list(reversed(super().__call__(bench, payload)))

    with pytest.raises(ValueError, match="other than the ones it names"):
        _run(tmp_path / "w.jsonl", Wrong())
    assert not (tmp_path / "w.jsonl").exists()  # nothing of the bad unit was written


class _KilledAfter(SeededEngine):
    """The scripted engine, killed at its ``n``-th generate call."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.left = n

    def generate(self, views, sampling, seeds=None):  # type: ignore[no-untyped-def]
        self.left -= 1
        if self.left < 0:
            raise KeyboardInterrupt
        return super().generate(views, sampling, seeds)


def test_sft_data_resumes_from_its_stored_batches(tmp_path: Path) -> None:
    proto = ProtocolConfig(max_turns=4, max_new_tokens=12)
    reward = RewardConfig(min_tokens=0)
    examples = [ex.model_copy(update={"id": f"{ex.id}-{i}"}) for i in range(2) for ex in EXAMPLES]
    cfg = SftDataConfig(n_samples=3, threshold=-10.0)
    kw = {"cfg": cfg, "seed": 1, "batch": 3}  # one task's three samples per batch
    full = SeededEngine()
    whole = build_sft_data(full, examples, proto, reward, tmp_path / "whole", **kw)  # type: ignore[arg-type]
    first = SeededEngine()
    build_sft_data(first, examples[:1], proto, reward, **kw)  # type: ignore[arg-type]

    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):  # killed in the second batch's first turn
        build_sft_data(_KilledAfter(len(first.calls)), examples, proto, reward, cut, **kw)  # type: ignore[arg-type]
    assert len((cut / "dialogues.jsonl").read_text().splitlines()) == 3  # the first batch survived
    assert not (cut / "samples.jsonl").exists()
    again = SeededEngine()
    resumed = build_sft_data(again, examples, proto, reward, cut, **kw)  # type: ignore[arg-type]
    assert len(again.calls) == len(full.calls) - len(first.calls)  # the stored batch was not sampled again
    assert resumed.samples == whole.samples
    for name in ("dialogues.jsonl", "samples.jsonl", "sft.jsonl"):
        assert (cut / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
