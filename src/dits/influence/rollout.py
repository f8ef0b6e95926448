"""The reference estimator: take the step, run the agents greedily on the validation tasks, compare.

Exact for the quantity (up to the validation sample), and the most expensive: V full conversations per
candidate. Unlike the reference code, the score is baselined: ``M(θ)`` is measured once under the same
greedy protocol and subtracted, so a candidate that changes nothing scores 0.
"""

from __future__ import annotations

from dits.influence.base import InfluenceEstimator, active_adapter
from dits.mas.dialogue import Transcript, run_dialogues
from dits.records import PreferencePair

__all__ = ["RolloutEstimator"]


class RolloutEstimator(InfluenceEstimator, name="rollout", guides=False):
    def _metric(self) -> tuple[float, list[Transcript]]:
        transcripts = run_dialogues(self.engine, self.examples, self.protocol, temperature=0.0)
        values = [self.metric_fn(ex, t) for ex, t in zip(self.examples, transcripts, strict=True)]
        return sum(values) / len(values), transcripts

    def _prepare(self) -> None:
        self.baseline, self.baseline_transcripts = self._metric()

    def _score_chunk(self, chunk: list[PreferencePair]) -> tuple[float, dict[str, float]]:
        with self.step(chunk) as handle, active_adapter(self.engine, self.adapter):
            value, _ = self._metric()
        return value - self.baseline, {"metric": value, "update_norm": handle.update_norm}
