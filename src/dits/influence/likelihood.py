"""The forward-only estimator: importance-weight a fixed sample of validation conversations.

Once under θ: sample K conversations per validation task, keep each one's metric and ``log π_θ`` (the sum
of the turn log-probs of BOTH agents, agent tokens only, each turn scored on the view its speaker had). Per
candidate: take the step, re-score the same conversations, and estimate ``M(θ_z)`` per task by self-
normalised importance sampling, ``Σ_j softmax(w)_j · metric_j`` with ``w_j = log π_θz − log π_θ``
(log space, so long conversations do not under/overflow). ``M̂(θ)`` is the same sum with w = 0, so a step of
size zero gives exactly zero. The estimate degrades as θ_z moves away from θ (the effective sample size,
reported per score, drops); for a small step it is cheap and smooth where the greedy rollout is 0/1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dits.engine.base import View
from dits.influence.base import InfluenceEstimator, active_adapter
from dits.mas.dialogue import Transcript, run_dialogues
from dits.mas.protocol import ProtocolConfig, continuation, render_view, turn_prefix
from dits.records import PreferencePair
from dits.seeding import derive_seed
from dits.tasks.example import Example

__all__ = [
    "CachedConversation",
    "Dialogue",
    "LikelihoodEstimator",
    "conversation_turns",
    "speaker_dialogues",
    "weighted_metric",
]


@dataclass
class CachedConversation:
    """One sampled validation conversation and what the estimators need of it."""

    task: int
    """Index of its example in the validation list."""
    transcript: Transcript
    metric: float
    logp: float
    """``log π_θ`` of all its turns."""


def conversation_turns(
    example: Example, transcript: Transcript, cfg: ProtocolConfig
) -> list[tuple[View, str, str]]:
    """(view, completion, forced prefix) of each turn: what its speaker saw, was made to open with, and then
    wrote (:func:`~dits.mas.protocol.continuation`: the tokens the model emitted, not the stripped text)."""
    texts = transcript.texts
    out = []
    for k, turn in enumerate(transcript.turns):
        prefix = turn_prefix(turn.speaker, cfg)
        view = render_view(example, texts[:k], turn.speaker, cfg)
        out.append((view, continuation(prefix, turn.text), prefix))
    return out


@dataclass
class Dialogue:
    """One speaker's turns of one conversation, in order: what :meth:`score_turns` scores in one row."""

    prefix: str
    turns: list[tuple[View, str]]
    """(view, completion) per turn."""


def speaker_dialogues(example: Example, transcript: Transcript, cfg: ProtocolConfig) -> list[Dialogue]:
    """:func:`conversation_turns` grouped by speaker (each speaker's views hold its earlier turns)."""
    by_speaker: dict[int, Dialogue] = {}
    turns = conversation_turns(example, transcript, cfg)
    for turn, (view, completion, prefix) in zip(transcript.turns, turns, strict=True):
        by_speaker.setdefault(turn.speaker, Dialogue(prefix, [])).turns.append((view, completion))
    return list(by_speaker.values())


def weighted_metric(
    log_w: torch.Tensor, metrics: torch.Tensor, task: torch.Tensor, n_tasks: int
) -> tuple[float, float]:
    """Mean over tasks of the self-normalised weighted metric, and the smallest per-task effective sample
    size (1 / Σ p², K when the weights are uniform)."""
    values, ess = [], []
    for t in range(n_tasks):
        sel = task == t
        p = torch.softmax(log_w[sel].double(), dim=0)
        values.append((p * metrics[sel].double()).sum())
        ess.append(float(1.0 / (p * p).sum()))
    return float(torch.stack(values).mean()), min(ess)


class LikelihoodEstimator(InfluenceEstimator, name="likelihood"):
    def _sample(self) -> None:
        """K conversations per task at the configured temperature, each with its own seed."""
        k = self.cfg.samples_per_task
        examples = [ex for ex in self.examples for _ in range(k)]
        seeds = [
            derive_seed(self.cfg.seed, "influence", t, j) for t in range(len(self.examples)) for j in range(k)
        ]
        transcripts = run_dialogues(
            self.engine, examples, self.protocol, temperature=self.cfg.temperature, seeds=seeds
        )
        self._cache(transcripts, k)

    def _cache(self, transcripts: Sequence[Transcript], k: int) -> None:
        """Keep ``k`` conversations per validation task (in task order) with their metrics and their
        speaker dialogues (what scoring them needs)."""
        examples = [ex for ex in self.examples for _ in range(k)]
        self.cache = [
            CachedConversation(i // k, tr, float(self.metric_fn(ex, tr)), 0.0)
            for i, (ex, tr) in enumerate(zip(examples, transcripts, strict=True))
        ]
        self._dialogues = [
            speaker_dialogues(self.examples[c.task], c.transcript, self.protocol) for c in self.cache
        ]
        self._task = torch.tensor([c.task for c in self.cache])
        self._metrics = torch.tensor([c.metric for c in self.cache], dtype=torch.float64)

    def _prepare(self) -> None:
        self._sample()
        for c, lp in zip(self.cache, self.conversation_logps(), strict=True):
            c.logp = lp
        self._base_logp = torch.tensor([c.logp for c in self.cache], dtype=torch.float64)
        self.baseline, _ = weighted_metric(
            torch.zeros_like(self._base_logp), self._metrics, self._task, len(self.examples)
        )

    def conversation_logps(self, indices: Sequence[int] | None = None) -> list[float]:
        """``log π`` of the cached conversations under the engine's active adapter (no graph), at the
        temperature they were sampled at: the importance weights compare the distributions the samples
        came from (θ at T) and would come from (θ_z at T); scoring at T = 1 weighted them by the wrong
        ratio. A speaker's turns of a conversation are scored in one forward (``score_turns``)."""
        idx = list(range(len(self.cache))) if indices is None else list(indices)
        sums = dict.fromkeys(idx, 0.0)
        by_prefix: dict[str, list[tuple[int, Dialogue]]] = {}
        for i in idx:
            for d in self._dialogues[i]:
                by_prefix.setdefault(d.prefix, []).append((i, d))
        with torch.inference_mode(), self.engine.adapter_scope():
            for prefix, items in by_prefix.items():
                scored = self.engine.score_turns(
                    [d.turns for _, d in items], prefix, temperature=self.cfg.temperature
                )
                for (i, _), turns in zip(items, scored, strict=True):
                    sums[i] += sum(float(sum(sc.logprobs)) for sc in turns)
        return [sums[i] for i in idx]

    def _score_chunk(self, chunk: list[PreferencePair]) -> tuple[float, dict[str, float]]:
        with self.step(chunk) as handle, active_adapter(self.engine, self.adapter):
            logp = torch.tensor(self.conversation_logps(), dtype=torch.float64)
        log_w = logp - self._base_logp
        value, ess = weighted_metric(log_w, self._metrics, self._task, len(self.examples))
        diag = {
            "metric": value,
            "min_ess": ess,
            "max_abs_log_weight": float(log_w.abs().max()),
            "update_norm": handle.update_norm,
        }
        return value - self.baseline, diag
