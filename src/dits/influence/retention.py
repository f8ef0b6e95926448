"""The retention estimator: does the step keep the validation conversations the model already gets right?

Once under θ: the V greedy validation conversations (what :class:`~dits.influence.rollout.RolloutEstimator`
measures its baseline on) and their metrics ``m_t``; then ``g = ∇ (1/V) Σ_t m_t · log π(conv_t)`` on the
adapter's tensors (log π at temperature 1: greedy decoding follows the untempered argmax). Per candidate,
as :class:`~dits.influence.gradient.GradientEstimator`: ``u`` = the step on z, and ``I(z) ≈ u·g``, the
first-order change of the metric-weighted log-likelihood of the conversations that score.

Why not the gradient of the metric itself: the greedy metric has none, and the gradient estimator's
stand-in (the policy gradient of K sampled conversations at T 0.7) does not rank chunks against the greedy
ground truth of ``benchmarks/influence_fidelity.py``. A probe step mostly changes the greedy metric by
moving greedy paths off their argmax; a path that scores is lost when the step lowers its likelihood, and
one that fails is seldom fixed by a step not aimed at it. So how much the step lowers the scoring paths'
likelihood ranks its harm; in that benchmark this estimator ranks chunks at least as well as rollout itself
(figures in ``benchmarks/README.md``). The score is in nats per task, not in metric units: it ranks
candidates (selection min-max normalises it), and its sign is not ΔM's.

What it does not do: make the pairs it ranks first better training data. In
``benchmarks/selection_quality.py`` they train no better than random ones: one step's effect is not many
steps' value, and the pairs that disturb the model least may be the ones it has least to learn from.
"""

from __future__ import annotations

import logging

from dits.influence.gradient import GradientEstimator
from dits.mas.dialogue import run_dialogues

__all__ = ["RetentionEstimator"]

log = logging.getLogger(__name__)


class RetentionEstimator(GradientEstimator, name="retention"):
    def _prepare(self) -> None:
        self._cache(run_dialogues(self.engine, self.examples, self.protocol, temperature=0.0), 1)
        n = len(self.cache)
        weights = {i: c.metric / n for i, c in enumerate(self.cache) if c.metric != 0}
        if not weights:
            log.warning(
                "retention: none of the %d greedy validation conversations scores, so every candidate "
                "scores 0 (ties); use more influence.val_tasks or another estimator",
                n,
            )
        self._set_validation_gradient(weights, temperature=1.0)
        self.baseline = sum(c.metric for c in self.cache) / n
