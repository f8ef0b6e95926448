"""The model side of the search: a :data:`~dits.search.mcts.Rollouter` that talks through the engine.

Every request of every tree of a shard is continued in ONE :func:`~dits.mas.dialogue.run_dialogues` call (so
the engine sees one batch per turn round, never a batch of one per tree), and every finished transcript's
readability NLLs are scored in ONE :func:`~dits.reward.utterance_nlls` call. Each request samples with its
own seed, so a rollout's text does not depend on which other requests share its batch; this is what lets a
resumed or re-sharded run reproduce an uninterrupted one.

``T_norm`` (the reward's token normaliser) is calibrated once per run by :func:`calibrate_t_norm` and then
passed in, so every reward of a run uses the same value.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field

from dits.engine.base import Engine
from dits.mas.dialogue import Transcript, Turn, parse_turn, run_dialogues
from dits.mas.protocol import ProtocolConfig, speaker_of
from dits.reward import RewardBreakdown, RewardConfig, compute_reward, t_norm_from, utterance_nlls
from dits.search.mcts import RolloutRequest, RolloutResult
from dits.seeding import derive_seed
from dits.tasks.example import Example, examples_by_id

__all__ = ["DialogueRollouter", "RolloutStats", "TNormCalibration", "calibrate_t_norm"]


class RolloutStats(BaseModel):
    """What the rollouter has served so far (for progress bars and summaries)."""

    calls: int = 0
    rollouts: int = 0
    terminal_prefixes: int = 0
    """Requests whose prefix had already ended: served without generating."""
    utterances: int = 0
    """New utterances generated."""


class DialogueRollouter:
    """Continue conversations from tree prefixes with the engine and reward them (Optima's reward).

    A prefix arrives as plain utterance texts. To rebuild the :class:`Turn` records the stop rule and the
    reward need, the rollouter remembers every turn it generated, keyed by (task, turn index, text): a
    prefix utterance then keeps its exact generated token count and its "cut at the limit" flag, so a
    conversation gets the same reward whether it was sampled in one piece or continued from a node. Texts
    it never generated (a tree grown elsewhere) fall back to ``engine.count_tokens`` and count as cut when
    they reach ``max_new_tokens``. Call :meth:`forget` for finished trees to free the memory.
    """

    def __init__(
        self,
        engine: Engine,
        examples: Mapping[str, Example] | Sequence[Example],
        protocol: ProtocolConfig,
        reward: RewardConfig,
        t_norm: float,
        *,
        temperature: float = 0.7,
        top_p: float = 1.0,
        nll_engine: Engine | None = None,
    ) -> None:
        """``nll_engine`` scores the readability NLLs (the initial model; default ``engine``, whose base with
        adapters disabled is the initial model unless a full fine-tune replaced it)."""
        if t_norm <= 0:
            raise ValueError(f"t_norm must be > 0, got {t_norm}")
        self.engine = engine
        self.nll_engine = nll_engine or engine
        self.examples = dict(examples) if isinstance(examples, Mapping) else examples_by_id(examples)
        self.protocol = protocol
        self.reward_cfg = reward
        self.t_norm = float(t_norm)
        self.temperature = temperature
        self.top_p = top_p
        self.stats = RolloutStats()
        self._turns: dict[str, dict[tuple[int, str], Turn]] = {}

    # -- prefix reconstruction ----------------------------------------------------------------------

    def prefix_turns(self, example: Example, prefix: Sequence[str]) -> list[Turn]:
        """The :class:`Turn` records of a prefix given as texts (see the class docstring)."""
        known = self._turns.get(example.id, {})
        turns: list[Turn] = []
        for k, text in enumerate(prefix):
            hit = known.get((k, text))
            if hit is not None:
                turns.append(hit)
                continue
            speaker = speaker_of(k)
            tokens = self.engine.count_tokens(text)
            turns.append(
                Turn(
                    speaker=speaker,
                    text=text,
                    tokens=tokens,
                    truncated=tokens >= self.protocol.max_new_tokens,
                    answer=parse_turn(example, speaker, text, self.protocol),
                )
            )
        return turns

    def _remember(self, task_id: str, turns: Sequence[Turn]) -> None:
        known = self._turns.setdefault(task_id, {})
        for k, turn in enumerate(turns):
            known.setdefault((k, turn.text), turn)

    def forget(self, task_ids: Iterable[str]) -> None:
        """Drop the remembered turns of these tasks (their trees are finished)."""
        for t in task_ids:
            self._turns.pop(t, None)

    # -- the Rollouter protocol ---------------------------------------------------------------------

    def __call__(self, requests: list[RolloutRequest]) -> list[RolloutResult]:
        """Serve all requests with one dialogue run and one scoring call; results in request order."""
        if not requests:
            return []
        missing = sorted({r.task_id for r in requests if r.task_id not in self.examples})
        if missing:
            raise KeyError(f"rollout requests for unknown task ids: {missing[:5]}")
        examples = [self.examples[r.task_id] for r in requests]
        prefixes = [self.prefix_turns(ex, r.prefix) for ex, r in zip(examples, requests, strict=True)]
        transcripts = run_dialogues(
            self.engine,
            examples,
            self.protocol,
            temperature=self.temperature,
            top_p=self.top_p,
            seeds=[r.seed for r in requests],
            prefixes=prefixes,
        )
        for r, tr in zip(requests, transcripts, strict=True):
            self._remember(r.task_id, tr.turns)
        rewards = self.rewards(examples, transcripts)
        results: list[RolloutResult] = []
        for r, tr, terms in zip(requests, transcripts, rewards, strict=True):
            new = tr.texts[len(r.prefix) :]
            self.stats.utterances += len(new)
            self.stats.terminal_prefixes += int(not new)
            results.append(
                RolloutResult(
                    continuation=new,
                    reward=terms.total,
                    terms=terms.model_dump(),
                    metric=tr.metric,
                    stop_reason=tr.stop_reason,
                    tokens=tr.comm_tokens,
                )
            )
        self.stats.calls += 1
        self.stats.rollouts += len(requests)
        return results

    def rewards(
        self, examples: Sequence[Example], transcripts: Sequence[Transcript]
    ) -> list[RewardBreakdown]:
        """The rewards' terms, scoring each distinct transcript once in a single ``utterance_nlls`` call."""
        index: dict[tuple[str, tuple[str, ...]], int] = {}
        uniq_ex: list[Example] = []
        uniq_tr: list[Transcript] = []
        where: list[int] = []
        for ex, tr in zip(examples, transcripts, strict=True):
            key = (ex.id, tuple(tr.texts))
            if key not in index:
                index[key] = len(uniq_tr)
                uniq_ex.append(ex)
                uniq_tr.append(tr)
            where.append(index[key])
        nlls = utterance_nlls(self.nll_engine, uniq_tr, self.protocol)
        return [
            compute_reward(ex, tr, nlls[w], self.t_norm, self.reward_cfg)
            for ex, tr, w in zip(examples, transcripts, where, strict=True)
        ]


# -- T_norm --------------------------------------------------------------------------------------------


class TNormCalibration(BaseModel):
    """``T_norm`` and the sample it came from; persisted so a resumed run rewards with the same value."""

    model_config = ConfigDict(extra="forbid")

    t_norm: float
    percentile: float
    temperature: float
    top_p: float
    seed: int
    example_ids: list[str]
    comm_tokens: list[int]
    """Communication tokens of each calibration conversation, in ``example_ids`` order."""
    turns: list[int] = Field(default_factory=list)
    """Utterances of each calibration conversation."""


def calibrate_t_norm(
    engine: Engine,
    examples: Sequence[Example],
    protocol: ProtocolConfig,
    reward: RewardConfig | None = None,
    *,
    temperature: float = 0.7,
    top_p: float = 1.0,
    seed: int = 0,
) -> TNormCalibration:
    """Sample one conversation per task at the rollout temperature, in one batched dialogue run, and take
    the ``reward.t_norm_percentile``-th (80th) percentile of communication tokens (docs/design.md
    section 5)."""
    if not examples:
        raise ValueError("calibrate_t_norm needs at least one example")
    reward = reward or RewardConfig()
    seeds = [derive_seed("dits.t_norm", seed, ex.id) for ex in examples]
    transcripts = run_dialogues(engine, examples, protocol, temperature=temperature, top_p=top_p, seeds=seeds)
    tokens = [tr.comm_tokens for tr in transcripts]
    return TNormCalibration(
        t_norm=t_norm_from(tokens, reward.t_norm_percentile),
        percentile=reward.t_norm_percentile,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        example_ids=[ex.id for ex in examples],
        comm_tokens=tokens,
        turns=[len(tr.turns) for tr in transcripts],
    )
