"""Influence of a candidate training chunk on the validation metric (docs/design.md section 7).

A new estimator subclasses :class:`~dits.influence.base.InfluenceEstimator` (``_prepare`` once per θ,
``_score_chunk`` per candidate) with its name, ``class Mine(InfluenceEstimator, name="mine")``, in its own
module, imported below (or by the user's code before the config is read); that registers it in
:data:`ESTIMATORS`, from which ``influence.estimator``, ``guide.estimator`` and the command line take their
allowed values. It works on a :class:`~dits.engine.policy.TrainablePolicy`.
"""

from __future__ import annotations

from dits.influence.base import (
    ESTIMATORS,
    InfluenceConfig,
    InfluenceEstimator,
    MetricFn,
    chunk_pairs,
    default_metric,
)
from dits.influence.gradient import GradientEstimator
from dits.influence.likelihood import LikelihoodEstimator
from dits.influence.retention import RetentionEstimator
from dits.influence.rollout import RolloutEstimator
from dits.records import Cost, InfluenceScore, pair_key

__all__ = [
    "ESTIMATORS",
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


def make_estimator(cfg: InfluenceConfig, metric_fn: MetricFn | None = None) -> InfluenceEstimator:
    """The estimator ``cfg.estimator`` names (call ``prepare`` on it next)."""
    return ESTIMATORS[cfg.estimator](cfg, metric_fn)
