"""SIGKILL at ten moments of a tiny ``dits run``, each followed by a rerun: the finished run holds the same
artifacts as one never killed, and every stage (so ``q-budget``'s budget and the report's FLOPs) is
charged the same. Each run is its own process, killed by the signal no handler sees."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.helpers import TINY

ARTIFACTS = [
    "base/evaluate/transcripts.jsonl",
    "base/baseline-cot/transcripts.jsonl",
    "iter_0/search/trees.jsonl",
    "iter_0/search/pairs.jsonl",
    "iter_0/budget-q-budget/trees.jsonl",
    "iter_0/budget-q-budget/pool.jsonl",
    "iter_0/select-q/selected.jsonl",
    "iter_0/select-mix/selected.jsonl",
    "iter_0/select-q-budget/selected.jsonl",
    "iter_0/dpo-q/adapter_model.safetensors",
    "iter_0/dpo-mix/adapter_model.safetensors",
    "iter_0/dpo-q-budget/adapter_model.safetensors",
    "iter_0/evaluate-q/transcripts.jsonl",
    "iter_0/evaluate-mix/transcripts.jsonl",
    "iter_0/evaluate-q-budget/transcripts.jsonl",
]


def _lines(rel: str, n: int = 1) -> Callable[[Path], bool]:
    def there(run: Path) -> bool:
        p = run / rel
        return p.is_file() and p.read_bytes().count(b"\n") >= n

    return there


def _exists(rel: str) -> Callable[[Path], bool]:
    return lambda run: (run / rel).exists()


KILLS: list[tuple[str, Callable[[Path], bool]]] = [
    ("the untrained model's evaluation started", _exists("base/evaluate/stage.json")),
    ("the CoT baseline written", _lines("base/baseline-cot/transcripts.jsonl")),
    ("T_norm calibrated", _exists("iter_0/search/t_norm.json")),
    ("the first tree appended", _lines("iter_0/search/trees.jsonl")),
    ("the first influence score appended", _lines("iter_0/influence/scores.jsonl")),
    ("q's DPO started", _exists("iter_0/dpo-q/stage.json")),
    ("q's evaluation started", _exists("iter_0/evaluate-q/stage.json")),
    ("mix's DPO started", _exists("iter_0/dpo-mix/stage.json")),
    ("q-budget's extra search started", _exists("iter_0/budget-q-budget/stage.json")),
    ("the scaling curve started", _exists("base/scaling-k2/stage.json")),
]
"""In the order the pipeline reaches them (lineages q, mix, then q-budget, which matches mix's cost)."""


def _env() -> dict[str, str]:
    # One thread: the same floating-point order in every process, and the suite's other tests unslowed.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(config: Path, runs: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "dits.cli", "run", str(config), "--runs-dir", str(runs), "--no-progress"]
    return subprocess.Popen(argv, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _scores_without_cost(path: Path) -> list[tuple]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [(r["candidate"], r["pair_ids"], r["score"]) for r in rows]


@pytest.mark.slow
def test_ten_sigkills_end_in_the_uninterrupted_run(tmp_path: Path) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "pipeline": {**TINY["pipeline"], "evaluate_base": True}}))
    whole = _run(config, tmp_path / "whole")
    assert whole.wait(timeout=1800) == 0, whole.stderr.read().decode() if whole.stderr else ""

    run = tmp_path / "cut" / "tiny"
    for what, moment in KILLS:
        assert not moment(run), f"{what}: already past before this run started"
        proc = _run(config, tmp_path / "cut")
        while not moment(run) and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL, f"the run ended before {what}"
    final = _run(config, tmp_path / "cut")
    assert final.wait(timeout=1800) == 0, final.stderr.read().decode() if final.stderr else ""

    a, b = tmp_path / "whole" / "tiny", run
    for rel in ARTIFACTS:
        if rel.endswith("scores.jsonl"):
            assert _scores_without_cost(a / rel) == _scores_without_cost(b / rel), rel
        else:
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert _scores_without_cost(a / "iter_0/influence/scores.jsonl") == _scores_without_cost(
        b / "iter_0/influence/scores.jsonl"
    )
    manifests = sorted(p.relative_to(a) for p in a.glob("*/*/manifest.json"))
    assert manifests == sorted(p.relative_to(b) for p in b.glob("*/*/manifest.json"))
    for rel in manifests:
        assert json.loads((b / rel).read_text())["ledger"] == json.loads((a / rel).read_text())["ledger"], rel
    results = [json.loads((d / "results.json").read_text()) for d in (a, b)]
    flops = [{m: (v["flops"], v["tokens"]) for m, v in r["methods"].items()} for r in results]
    assert flops[0] == flops[1] and flops[0]["q-budget"][0] > flops[0]["q"][0]
    assert not list(b.rglob(".*.tmp*"))  # no half-written file left behind
