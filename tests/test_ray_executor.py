"""``executor.kind: ray`` on a local Ray cluster of 2 actors (one torch thread each): a small search and
influence stage write the same ``trees.jsonl``, ``pairs.jsonl`` and ``scores.jsonl`` records as under
``local`` (texts and structure exactly, floats to 1e-6 relative); so does a run whose worker is killed
mid-unit, and a Ray run cut off and rerun. The reference is the
``local`` executor's own run of the same config (the same code path every other test checks)."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dits.config import RunConfig, parse_config
from dits.executor import LocalExecutor
from dits.ray_executor import RayExecutor
from dits.stages.context import EngineHolder, ModelRef, StageContext, executor_for
from dits.stages.influence import influence_stage
from dits.stages.search import search_stage
from dits.tasks.source import examples_for
from tests.threads import one_torch_thread

SMALL = {
    "task": {"dataset": "facts", "train": 4, "dev": 2, "knobs": {"hops": 1, "n_distractor": 0}},
    "protocol": {"max_turns": 2, "max_new_tokens": 10},
    "search": {"explore": 1, "expand": 2},
    "pairs": {"tau": -10.0, "min_gap": 0.0},
    "influence": {"estimator": "likelihood", "chunk_size": 2, "val_tasks": 1, "samples_per_task": 1},
    "executor": {"workers": 2, "num_cpus": 1},
}


def _cfg(kind: str) -> RunConfig:
    return parse_config({**SMALL, "executor": {**SMALL["executor"], "kind": kind}})


def _flops(stage: Path) -> float:
    return json.loads((stage / "manifest.json").read_text())["ledger"]["flops"]


def _run(ctx: StageContext, *, influence: bool = True) -> dict[str, Any]:
    """Search (one task per shard, so 4 units) then influence (chunks of 2 pairs); the three artifacts (scores
    without their wall times) and the stages' ledger FLOPs."""
    cfg = ctx.cfg
    base = ModelRef.base(cfg)
    pool = search_stage(ctx, 0, None, base, examples_for(cfg.task, "train"), shard_size=1)
    out: dict[str, Any] = {
        "trees": pool.file("trees.jsonl").read_bytes(),
        "pairs": pool.file("pairs.jsonl").read_bytes(),
        "search_flops": _flops(Path(pool.path)),
    }
    if influence:
        scored = influence_stage(ctx, 0, None, base, pool.file("pairs.jsonl"), pool.digest)
        out["scores"] = [json.loads(line) for line in scored.file("scores.jsonl").read_text().splitlines()]
        for s in out["scores"]:
            s["cost"].pop("seconds")
        out["influence_flops"] = _flops(Path(scored.path))
    return out


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> dict[str, Any]:
    cfg = _cfg("local")
    ctx = StageContext(cfg, tmp_path_factory.mktemp("local"), EngineHolder(cfg), progress=False)
    assert isinstance(ctx.executor, LocalExecutor)
    # The actors' thread count (num_cpus 1): on CPUs whose kernels split a reduction by thread (AVX-512 /
    # AMX builds do), another count sums float32 in another order and the last digit of a reward differs.
    with one_torch_thread():
        out = _run(ctx)
    # Something to compare: at least two chunks of pairs (how many pairs the 4 trees give depends on the
    # sampled continuations, so the count follows the pool instead of a fixed number).
    n_pairs = out["pairs"].count(b"\n")
    assert n_pairs >= 3 and len(out["scores"]) == -(-n_pairs // SMALL["influence"]["chunk_size"])
    # The scores are 0 here (the tiny model fails the validation task), so the check rests on the
    # diagnostics: floats of the probe's update and importance weights, different for every chunk.
    assert out["scores"][0]["diagnostics"] != out["scores"][1]["diagnostics"]
    return out


@pytest.fixture(scope="module")
def ray_holder():
    """One Ray executor (2 actors) for the module: starting Ray and the actors' engines costs seconds."""
    cfg = _cfg("ray")
    holder = EngineHolder(cfg)
    executor = executor_for(cfg, holder)
    assert isinstance(executor, RayExecutor)
    yield cfg, holder, executor
    executor.close()


def _ray_ctx(ray_holder, run_dir: Path) -> StageContext:
    cfg, holder, executor = ray_holder
    return StageContext(cfg, run_dir, holder, progress=False, executor=executor)


def _close(got: Any, want: Any, where: str = "") -> None:
    """Equal records: the same keys, lengths, texts, ids, counts and seeds; floats to 1e-6 relative. A unit
    rerun in a fresh process (a replaced worker) sums float32 NLLs with other memory alignment and thread
    blocking on AVX-512 CPUs, so a reward may differ in its last digits; a lost or resampled record
    differs in its text and structure."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for k in want:
            _close(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _close(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and isinstance(got, float):
        assert math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9), (where, got, want)
    else:
        assert got == want and type(got) is type(want), (where, got, want)


def _records(jsonl: bytes) -> list[Any]:
    return [json.loads(line) for line in jsonl.splitlines()]


def _same(got: dict[str, Any], want: dict[str, Any], *, ledger: bool = True) -> None:
    _close(_records(got["trees"]), _records(want["trees"]), "trees")
    _close(_records(got["pairs"]), _records(want["pairs"]), "pairs")
    if ledger:  # each unit's compute comes back to the driver's ledger (a resumed stage counts its part)
        assert got["search_flops"] == want["search_flops"]
    if "scores" in got:
        _close(got["scores"], want["scores"], "scores")
        assert got["influence_flops"] == want["influence_flops"]  # the preparation is charged once


def test_ray_writes_the_local_artifacts(local, ray_holder, tmp_path):
    _, _, executor = ray_holder
    _same(_run(_ray_ctx(ray_holder, tmp_path)), local)
    assert len(executor._pids) == 2 and os.getpid() not in executor._pids  # it really ran elsewhere


def test_a_worker_killed_mid_unit_loses_nothing(local, ray_holder, tmp_path):
    _, _, executor = ray_holder
    killed: list[tuple[int, int]] = []

    def kill_a_busy_worker() -> None:  # the first worker seen running a unit, mid-unit
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            for pid, unit in executor.in_flight().items():
                time.sleep(0.5)  # well inside the unit (one shard takes seconds)
                os.kill(pid, signal.SIGKILL)
                killed.append((pid, unit))
                break
            time.sleep(0.05)

    replaced = executor.replaced
    killer = threading.Thread(target=kill_a_busy_worker)
    killer.start()
    got = _run(_ray_ctx(ray_holder, tmp_path), influence=False)
    killer.join()
    assert killed and killed[0][0] not in executor._pids
    assert executor.replaced == replaced + 1
    _same(got, local)


class _Cut(Exception):
    pass


class _CutAfter:
    """The Ray executor, but the run is cut off after ``n`` units come back (a killed driver)."""

    def __init__(self, inner: RayExecutor, n: int) -> None:
        self.inner, self.n = inner, n

    @property
    def setup_spent(self):  # type: ignore[no-untyped-def]
        return self.inner.setup_spent

    def map(self, work, units, model=None):
        for k, result in enumerate(self.inner.map(work, units, model)):
            if k == self.n:
                raise _Cut
            yield result

    def close(self) -> None:
        pass


def test_a_cut_ray_run_resumes(local, ray_holder, tmp_path):
    cfg, holder, executor = ray_holder
    out = tmp_path / "iter_0" / "search"
    cut = StageContext(cfg, tmp_path, holder, progress=False, executor=_CutAfter(executor, 2))
    with pytest.raises(_Cut):
        _run(cut, influence=False)
    assert (out / "trees.jsonl").read_bytes().count(b"\n") == 2  # what came back before the cut is kept
    assert not (out / "manifest.json").exists()
    _same(_run(_ray_ctx(ray_holder, tmp_path), influence=False), local, ledger=False)
