"""The statistics every result is reported with: bootstrap intervals, paired differences, rank correlation,
and the reliability of a noisy ground truth.

One module so that the report (:mod:`dits.report`), the evaluation summary and the benchmarks compute an
interval the same way (percentile bootstrap, 2000 resamples, seed 0 unless told), and so that each can be
tested here against an independent computation rather than through a script.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel
from scipy import stats

__all__ = [
    "Interval",
    "bootstrap_ci",
    "paired_bootstrap",
    "pooled_ci",
    "pooled_paired_ci",
    "spearman",
    "spearman_brown",
    "spearman_interval",
    "task_reliability",
    "tasks_for",
    "top_half",
    "top_half_agreement",
]


class Interval(BaseModel):
    """A mean with the bounds of its confidence interval."""

    mean: float
    low: float
    high: float


# -- means and differences ----------------------------------------------------------------------------


def bootstrap_ci(values: Sequence[float], *, confidence: float = 0.95, seed: int = 0) -> Interval:
    """Mean with a percentile bootstrap interval (scipy, 2000 resamples): test metrics are 0/1 or bounded
    and far from normal on a few dozen tasks, so no normal approximation. A constant sample gives a
    zero-width interval (scipy would refuse it)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("no values to summarise")
    mean = float(x.mean())
    if x.size == 1 or np.all(x == x[0]):
        return Interval(mean=mean, low=mean, high=mean)
    res = stats.bootstrap(
        (x,), np.mean, confidence_level=confidence, n_resamples=2000, method="percentile", random_state=seed
    )
    return Interval(
        mean=mean, low=float(res.confidence_interval.low), high=float(res.confidence_interval.high)
    )


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], *, confidence: float = 0.95, seed: int = 0
) -> Interval:
    """``mean(a − b)`` over paired observations (the same test tasks under two models) with a percentile
    bootstrap interval that resamples the pairs together: the per-task difference keeps the correlation
    two models have on the same tasks, so the interval is narrower than two independent ones suggest."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired samples differ in length: {x.size} vs {y.size}")
    return bootstrap_ci(x - y, confidence=confidence, seed=seed)


def pooled_ci(per_seed: Sequence[Sequence[float]], *, confidence: float = 0.95, seed: int = 0) -> Interval:
    """One method evaluated under several seeds: the mean and bootstrap interval over every (seed, task)
    value. Pooling, rather than averaging per-seed means, lets the interval reflect task noise and seed
    noise together, and weighs each evaluated task once."""
    return bootstrap_ci([v for values in per_seed for v in values], confidence=confidence, seed=seed)


def pooled_paired_ci(
    a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], *, confidence: float = 0.95, seed: int = 0
) -> Interval:
    """``a − b`` per (seed, task), the same tasks in the same order under both in each seed, pooled over
    seeds: :func:`paired_bootstrap` of the concatenated values (pairs stay pairs across the pooling)."""
    if len(a) != len(b):
        raise ValueError(f"paired evaluations differ in seeds: {len(a)} vs {len(b)}")
    diffs: list[float] = []
    for xa, xb in zip(a, b, strict=True):
        if len(xa) != len(xb):
            raise ValueError(f"paired samples differ in length: {len(xa)} vs {len(xb)}")
        diffs += [x - y for x, y in zip(xa, xb, strict=True)]
    return bootstrap_ci(diffs, confidence=confidence, seed=seed)


# -- ranks --------------------------------------------------------------------------------------------


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rho (ties averaged, scipy); None when either side is constant (undefined): an estimator
    is judged by how it ranks candidates, not by its scale."""
    if len(set(a)) < 2 or len(set(b)) < 2:
        return None
    return float(stats.spearmanr(a, b).statistic)


def spearman_interval(
    est: Sequence[float], truth: Sequence[float], *, resamples: int = 4000, seed: int = 0
) -> tuple[float, float] | None:
    """95% percentile-bootstrap interval of :func:`spearman` over the candidates (resampled with
    replacement; resamples where either side is constant are skipped). At N = 24 its width, not the point
    estimate, says whether an estimator is distinguishable from zero or from another. None if undefined."""
    rng = np.random.default_rng(seed)
    a, b, n = np.asarray(est), np.asarray(truth), len(truth)
    rhos = []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        rho = spearman(a[idx].tolist(), b[idx].tolist())
        if rho is not None:
            rhos.append(rho)
    if not rhos:
        return None
    low, high = np.percentile(rhos, [2.5, 97.5])
    return float(low), float(high)


def top_half(values: Sequence[float]) -> set[int]:
    """Indices of the N//2 largest values; ties broken by index so the set is deterministic."""
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return set(order[: len(values) // 2])


def top_half_agreement(est: Sequence[float], truth: Sequence[float]) -> float:
    """Share of the truth's top half that ``est`` also puts in its top half: what selection by a ratio of
    0.5 cares about (which half, not the order inside it). 0 when the truth has no top half."""
    t = top_half(truth)
    return len(top_half(est) & t) / len(t) if t else 0.0


# -- reliability of a ground truth --------------------------------------------------------------------


def task_reliability(deltas: Sequence[Sequence[float]]) -> float | None:
    """Reliability of the candidates' mean change over G tasks, from every task at once (Hoyt's two-way
    ANOVA: candidates × tasks, task main effects removed, ``(MS_cand − MS_err) / MS_cand``; it equals
    Cronbach's α, the mean of all split-half reliabilities). A single split-half Spearman at N = 24 has a
    standard error near 0.2; this uses all G·(G−1)/2 task pairs, so it says far more steadily whether the
    ground truth is above its noise. ``deltas[z][t]``: candidate z's change on task t. None if undefined."""
    n, g = len(deltas), len(deltas[0]) if deltas else 0
    if n < 2 or g < 2:
        return None
    grand = statistics.fmean(x for row in deltas for x in row)
    rows = [statistics.fmean(row) for row in deltas]
    cols = [statistics.fmean(row[t] for row in deltas) for t in range(g)]
    ms_cand = g * sum((r - grand) ** 2 for r in rows) / (n - 1)
    ss_err = sum((deltas[z][t] - rows[z] - cols[t] + grand) ** 2 for z in range(n) for t in range(g))
    ms_err = ss_err / ((n - 1) * (g - 1))
    return None if ms_cand == 0 else 1 - ms_err / ms_cand


def spearman_brown(reliability: float, factor: float) -> float:
    """Spearman-Brown: the reliability of a measurement ``factor`` times as long (2: a whole from its
    halves; 0.5: a half from the whole), ``k·r / (1 + (k − 1)·r)``."""
    return factor * reliability / (1 + (factor - 1) * reliability)


def tasks_for(reliability: float, g: int, target: float) -> float | None:
    """Spearman-Brown inverted: the ground-truth tasks at which the reliability measured on g tasks would
    reach ``target`` (None when it holds no signal at all)."""
    if reliability <= 0:
        return None
    per_task = reliability / (g - (g - 1) * reliability)
    return target * (1 - per_task) / (per_task * (1 - target))
