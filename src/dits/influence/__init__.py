"""Influence of a candidate training chunk on the validation metric (DESIGN.md section 7).

A new estimator subclasses :class:`~dits.influence.base.InfluenceEstimator` (``_prepare`` once per θ,
``_score_chunk`` per candidate) in its own module here, is registered in ``_ESTIMATORS`` below and named in
``InfluenceConfig.estimator``; it works on a :class:`~dits.engine.policy.TrainablePolicy`.
"""

from __future__ import annotations

from dits.influence.base import InfluenceConfig, InfluenceEstimator, MetricFn, chunk_pairs, default_metric
from dits.influence.gradient import GradientEstimator
from dits.influence.likelihood import LikelihoodEstimator
from dits.influence.retention import RetentionEstimator
from dits.influence.rollout import RolloutEstimator
from dits.records import Cost, InfluenceScore, pair_key

__all__ = [
    "ESTIMATOR_NAMES",
    "Cost",
    "GradientEstimator",
    "InfluenceConfig",
    "InfluenceEstimator",
    "InfluenceScore",
    "LikelihoodEstimator",
    "MetricFn",
    "RetentionEstimator",
    "RolloutEstimator",
    "chunk_pairs",
    "default_metric",
    "make_estimator",
    "pair_key",
]

_ESTIMATORS: dict[str, type[InfluenceEstimator]] = {
    "rollout": RolloutEstimator,
    "likelihood": LikelihoodEstimator,
    "gradient": GradientEstimator,
    "retention": RetentionEstimator,
}
ESTIMATOR_NAMES: tuple[str, ...] = tuple(_ESTIMATORS)
"""The values ``InfluenceConfig.estimator`` accepts (for command-line choices)."""


def make_estimator(cfg: InfluenceConfig, metric_fn: MetricFn | None = None) -> InfluenceEstimator:
    """The estimator ``cfg.estimator`` names (call ``prepare`` on it next)."""
    return _ESTIMATORS[cfg.estimator](cfg, metric_fn)
