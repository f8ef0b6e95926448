"""The influence-fidelity benchmark's ground-truth reliability, against independent computations."""

from __future__ import annotations

import importlib.util
import random
import statistics
import sys

import pytest

from tests.conftest import REPO


def _bench():
    if str(REPO / "benchmarks") not in sys.path:  # as when run as a script: it imports its sibling modules
        sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(
        "influence_fidelity", REPO / "benchmarks/influence_fidelity.py"
    )
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


fid = _bench()


def _cronbach(rows: list[list[float]]) -> float:
    """The textbook form: tasks as items, candidates as subjects, k/(k-1)·(1 − Σ item var / total var)."""
    k = len(rows[0])
    items = [statistics.variance([r[t] for r in rows]) for t in range(k)]
    totals = statistics.variance([sum(r) for r in rows])
    return k / (k - 1) * (1 - sum(items) / totals)


def test_task_reliability_is_cronbachs_alpha() -> None:
    rng = random.Random(0)
    effect = [rng.gauss(0, 1) for _ in range(12)]
    task_shift = [rng.gauss(0, 3) for _ in range(9)]  # common to every candidate: must not count as signal
    rows = [[e + s + rng.gauss(0, 2) for s in task_shift] for e in effect]
    assert fid.task_reliability(rows) == pytest.approx(_cronbach(rows), rel=1e-9)


def test_task_reliability_tracks_signal_to_noise() -> None:
    """With effect variance a and per-task noise variance e over g tasks, the reliability is
    a / (a + e/g); a seeded large sample lands near it, pure noise near zero."""
    rng = random.Random(1)
    n, g, a, e = 400, 16, 1.0, 8.0
    rows = [
        [eff + rng.gauss(0, e**0.5) for _ in range(g)] for eff in (rng.gauss(0, a**0.5) for _ in range(n))
    ]
    assert fid.task_reliability(rows) == pytest.approx(a / (a + e / g), abs=0.05)
    noise = [[rng.gauss(0, 1) for _ in range(g)] for _ in range(n)]
    assert abs(fid.task_reliability(noise)) < 0.1


def test_tasks_for_inverts_spearman_brown() -> None:
    """Spearman-Brown from g tasks to tasks_for(...) tasks gives back the target."""
    rel, g = 0.4, 32
    k = fid.tasks_for(rel, g, 0.75) / g
    assert k * rel / (1 + (k - 1) * rel) == pytest.approx(0.75)
    assert fid.tasks_for(0.0, g, 0.6) is None


def test_spearman_interval_brackets_the_estimate_and_follows_the_ranks() -> None:
    rng = random.Random(1)
    truth = [rng.gauss(0, 1) for _ in range(24)]
    # Agreeing in rank and reversing it: every resample's rho is 1 (or −1), up to scipy's rounding.
    assert fid.spearman_interval([3 * t + 1 for t in truth], truth) == pytest.approx((1.0, 1.0), abs=1e-12)
    assert fid.spearman_interval([-t for t in truth], truth) == pytest.approx((-1.0, -1.0), abs=1e-12)
    noisy = [t + rng.gauss(0, 1) for t in truth]
    low, high = fid.spearman_interval(noisy, truth)
    assert low < fid.spearman(noisy, truth) < high
    # Only the ranks matter: a monotone transform of either side leaves the interval unchanged.
    assert fid.spearman_interval([x**3 for x in noisy], truth) == (low, high)
    # A hand count: with N = 2 every non-constant resample is the two points, whose rho is 1.
    assert fid.spearman_interval([0.0, 1.0], [5.0, 7.0], resamples=50) == pytest.approx((1.0, 1.0), abs=1e-12)
    assert fid.spearman_interval([1.0, 1.0], [5.0, 7.0]) is None
