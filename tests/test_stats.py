"""``dits.stats`` against independent computations: bootstrap intervals (a hand-rolled bootstrap and the
normal approximation), pooling and pairing (the same interval over hand-concatenated values), Spearman's rho
(ranks computed here), and the ground-truth reliability statistics (Cronbach's α in its textbook form,
Spearman-Brown by hand)."""

from __future__ import annotations

import math
import random
import statistics

import numpy as np
import pytest

from dits import stats
from dits.evaluate import EvalRecord
from dits.mas.dialogue import Transcript
from dits.report import compare

# -- bootstrap intervals ------------------------------------------------------------------------------


def test_bootstrap_ci_matches_a_hand_rolled_bootstrap_and_the_normal_approximation() -> None:
    """n = 400 draws of a 0/1 metric: the percentile interval lands where 10 000 resamples of our own and
    the normal approximation mean ± 1.96·sd/√n put it (within Monte Carlo error)."""
    rng = np.random.default_rng(5)
    x = (rng.random(400) < 0.3).astype(float)
    ci = stats.bootstrap_ci(x.tolist())
    assert ci.mean == pytest.approx(x.mean(), abs=1e-15)
    means = x[rng.integers(0, x.size, (10_000, x.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    assert ci.low == pytest.approx(low, abs=0.006) and ci.high == pytest.approx(high, abs=0.006)
    half = 1.96 * x.std(ddof=1) / math.sqrt(x.size)
    assert ci.low == pytest.approx(x.mean() - half, abs=0.008)
    assert ci.high == pytest.approx(x.mean() + half, abs=0.008)
    # A lower confidence gives a strictly narrower interval inside it; the seed fixes the draw.
    narrow = stats.bootstrap_ci(x.tolist(), confidence=0.5)
    assert ci.low < narrow.low < narrow.high < ci.high
    assert stats.bootstrap_ci(x.tolist(), seed=0) == ci != stats.bootstrap_ci(x.tolist(), seed=1)


def test_bootstrap_ci_of_a_constant_or_single_value_has_zero_width_and_empty_refuses() -> None:
    assert stats.bootstrap_ci([0.25, 0.25, 0.25]) == stats.Interval(mean=0.25, low=0.25, high=0.25)
    assert stats.bootstrap_ci([0.7]) == stats.Interval(mean=0.7, low=0.7, high=0.7)
    with pytest.raises(ValueError, match="no values"):
        stats.bootstrap_ci([])


def test_paired_bootstrap_is_the_interval_of_the_per_task_differences() -> None:
    rng = random.Random(2)
    a = [float(rng.random() < 0.6) for _ in range(50)]
    b = [float(rng.random() < 0.4) for _ in range(50)]
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    got = stats.paired_bootstrap(a, b)
    assert got == stats.bootstrap_ci(diffs)
    assert got.mean == pytest.approx(statistics.fmean(a) - statistics.fmean(b), abs=1e-12)
    with pytest.raises(ValueError, match="differ in length"):
        stats.paired_bootstrap(a, b[:-1])


def test_pooled_intervals_are_over_every_seed_and_task() -> None:
    """Pooling is the interval over the concatenated (seed, task) values, not over per-seed means; pairing
    keeps each seed's tasks aligned (a reordering within one seed changes the paired result)."""
    rng = random.Random(3)
    a = [[float(rng.random() < 0.5 + 0.1 * s) for _ in range(30)] for s in range(3)]
    b = [[float(rng.random() < 0.45) for _ in range(30)] for _ in range(3)]
    flat_a, flat_b = [v for s in a for v in s], [v for s in b for v in s]
    assert stats.pooled_ci(a) == stats.bootstrap_ci(flat_a)
    assert stats.pooled_ci(a).mean == pytest.approx(sum(flat_a) / 90, abs=1e-12)
    paired = stats.pooled_paired_ci(a, b)
    assert paired == stats.paired_bootstrap(flat_a, flat_b)
    assert paired.mean == pytest.approx((sum(flat_a) - sum(flat_b)) / 90, abs=1e-12)
    assert paired.low < paired.mean < paired.high
    shuffled = [list(reversed(b[0])), *b[1:]]
    assert stats.pooled_paired_ci(a, shuffled).mean == pytest.approx(paired.mean)  # the mean is not paired
    assert stats.pooled_paired_ci(a, shuffled) != paired  # the interval is
    with pytest.raises(ValueError, match="seeds"):
        stats.pooled_paired_ci(a, b[:2])
    with pytest.raises(ValueError, match="differ in length"):
        stats.pooled_paired_ci(a, [b[0][:-1], *b[1:]])


def _record(task: str, metric: float) -> EvalRecord:
    tr = Transcript(example_id=task, turns=[], stop_reason="agreed", answer=None, metric=metric)
    return EvalRecord(method="mas", dataset="facts", split="test", transcript=tr)


def test_the_reports_comparison_is_the_paired_interval_of_the_tasks_in_id_order() -> None:
    """``dits report``'s comparison pairs two evaluations by task id (records in any order) and gives
    :func:`dits.stats.paired_bootstrap` of the per-task metrics."""
    rng = random.Random(4)
    ids = [f"t{i:02d}" for i in range(24)]
    ma = {i: float(rng.random() < 0.6) for i in ids}
    mb = {i: float(rng.random() < 0.3) for i in ids}
    a = [_record(i, ma[i]) for i in ids]
    b = [_record(i, mb[i]) for i in reversed(ids)]
    comp = compare("mix", "q", a, b, 0)
    want = stats.paired_bootstrap([ma[i] for i in ids], [mb[i] for i in ids])
    assert (comp.difference, comp.low, comp.high, comp.n) == (want.mean, want.low, want.high, 24)
    assert comp.difference == pytest.approx(sum(ma.values()) / 24 - sum(mb.values()) / 24, abs=1e-12)


# -- ranks --------------------------------------------------------------------------------------------


def _ranks(xs: list[float]) -> list[float]:
    """1-based ranks, ties given the mean of the ranks they span."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _pearson(x: list[float], y: list[float]) -> float:
    mx, my = statistics.fmean(x), statistics.fmean(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    return sxy / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


def test_spearman_is_pearson_of_the_tie_averaged_ranks() -> None:
    rng = random.Random(6)
    a = [float(rng.randint(0, 5)) for _ in range(30)]  # many ties
    b = [x + rng.gauss(0, 2) for x in a]
    assert stats.spearman(a, b) == pytest.approx(_pearson(_ranks(a), _ranks(b)), abs=1e-12)
    # No ties: the textbook 1 − 6·Σd² / (n(n² − 1)).
    c, d = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6], [2.0, 7.0, 1.0, 8.0, 2.8, 1.8]
    rd = [x - y for x, y in zip(_ranks(c), _ranks(d), strict=True)]
    n = len(c)
    assert stats.spearman(c, d) == pytest.approx(1 - 6 * sum(x * x for x in rd) / (n * (n * n - 1)))
    assert stats.spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None
    assert stats.spearman([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]) is None


def test_spearman_interval_brackets_the_estimate_and_follows_the_ranks() -> None:
    rng = random.Random(1)
    truth = [rng.gauss(0, 1) for _ in range(24)]
    # Agreeing in rank and reversing it: every resample's rho is 1 (or −1), up to scipy's rounding.
    assert stats.spearman_interval([3 * t + 1 for t in truth], truth) == pytest.approx((1.0, 1.0), abs=1e-12)
    assert stats.spearman_interval([-t for t in truth], truth) == pytest.approx((-1.0, -1.0), abs=1e-12)
    noisy = [t + rng.gauss(0, 1) for t in truth]
    interval = stats.spearman_interval(noisy, truth)
    rho = stats.spearman(noisy, truth)
    assert interval is not None and rho is not None
    low, high = interval
    assert low < rho < high
    # Only the ranks matter: a monotone transform of either side leaves the interval unchanged.
    assert stats.spearman_interval([x**3 for x in noisy], truth) == (low, high)
    # A hand count: with N = 2 every non-constant resample is the two points, whose rho is 1.
    assert stats.spearman_interval([0.0, 1.0], [5.0, 7.0], resamples=50) == pytest.approx(
        (1.0, 1.0), abs=1e-12
    )
    assert stats.spearman_interval([1.0, 1.0], [5.0, 7.0]) is None


def test_top_half_agreement_by_hand() -> None:
    truth = [0.9, 0.1, 0.5, 0.7, 0.3, 0.2]  # top half: indices 0, 3, 2
    est = [0.8, 0.6, 0.0, 0.9, 0.1, 0.2]  # top half: indices 3, 0, 1
    assert stats.top_half(truth) == {0, 2, 3} and stats.top_half(est) == {0, 1, 3}
    assert stats.top_half_agreement(est, truth) == pytest.approx(2 / 3)
    assert stats.top_half([1.0, 1.0, 1.0, 1.0]) == {0, 1}  # ties: the earlier index wins
    assert stats.top_half_agreement(truth, truth) == 1.0
    assert stats.top_half_agreement([5.0], [1.0]) == 0.0  # one candidate: no top half


# -- reliability --------------------------------------------------------------------------------------


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
    assert stats.task_reliability(rows) == pytest.approx(_cronbach(rows), rel=1e-9)
    assert stats.task_reliability(rows[:1]) is None and stats.task_reliability([[1.0], [2.0]]) is None


def test_task_reliability_tracks_signal_to_noise() -> None:
    """With effect variance a and per-task noise variance e over g tasks, the reliability is
    a / (a + e/g); a seeded large sample lands near it, pure noise near zero."""
    rng = random.Random(1)
    n, g, a, e = 400, 16, 1.0, 8.0
    rows = [
        [eff + rng.gauss(0, e**0.5) for _ in range(g)] for eff in (rng.gauss(0, a**0.5) for _ in range(n))
    ]
    assert stats.task_reliability(rows) == pytest.approx(a / (a + e / g), abs=0.05)
    noise = [[rng.gauss(0, 1) for _ in range(g)] for _ in range(n)]
    reliability = stats.task_reliability(noise)
    assert reliability is not None and abs(reliability) < 0.1


def test_spearman_brown_by_hand() -> None:
    """Two halves of reliability 0.5 make a whole of 2·0.5/(1 + 0.5) = 2/3; halving goes back; the
    benchmark's split-half forms (2r/(1+r) and α/(2−α)) are the same numbers to the last bit."""
    assert stats.spearman_brown(0.5, 2) == pytest.approx(2 / 3)
    assert stats.spearman_brown(2 / 3, 0.5) == pytest.approx(0.5)
    assert stats.spearman_brown(0.3, 1) == pytest.approx(0.3)
    for r in (0.1, 0.37, 0.8, -0.2):
        assert stats.spearman_brown(r, 2) == 2 * r / (1 + r)
        assert stats.spearman_brown(r, 0.5) == r / (2 - r)


def test_tasks_for_inverts_spearman_brown() -> None:
    """Spearman-Brown from g tasks to tasks_for(...) tasks gives back the target."""
    rel, g = 0.4, 32
    tasks = stats.tasks_for(rel, g, 0.75)
    assert tasks is not None
    k = tasks / g
    assert k * rel / (1 + (k - 1) * rel) == pytest.approx(0.75)
    assert stats.spearman_brown(rel, k) == pytest.approx(0.75)
    assert stats.tasks_for(0.0, g, 0.6) is None
