"""The turn loop: many conversations advance together, one engine call per turn for all live ones.

A conversation stops when a parsed answer equals the previously parsed answer (from either agent), or
after ``max_turns`` turns, which scores it as a failure. Tree search continues conversations from a
prefix of turns, so :func:`run_dialogues` takes optional prefixes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel

from dits.engine.base import Engine, SamplingParams
from dits.mas.protocol import ProtocolConfig, gives_answers, render_view, speaker_of, turn_prefix
from dits.seeding import derive_seed
from dits.tasks.answers import fallback_answer, parse_answer
from dits.tasks.example import AGENTS, Example
from dits.tasks.metrics import answers_agree, score_answer

StopReason = Literal["agreed", "max_turns", "answered", "no_answer"]
"""The protocol stops on agreement or the turn limit; single-agent baselines on an answer or none."""


class Turn(BaseModel):
    """One utterance and what was parsed from it."""

    speaker: int
    text: str
    tokens: int
    truncated: bool = False
    """Cut at ``max_new_tokens``."""
    answer: str | None = None


class Transcript(BaseModel):
    """A finished conversation on one example."""

    example_id: str
    turns: list[Turn]
    stop_reason: StopReason
    answer: str | None
    """The agreed answer; at the turn limit, the last parsed one (the metric is 0 there regardless)."""
    metric: float

    @property
    def comm_tokens(self) -> int:
        """Communication tokens T: all utterances, never system prompts."""
        return sum(t.tokens for t in self.turns)

    @property
    def texts(self) -> list[str]:
        return [t.text for t in self.turns]


def parse_turn(example: Example, speaker: int, text: str, cfg: ProtocolConfig) -> str | None:
    """The final answer an utterance states, if its speaker's role gives answers."""
    if not gives_answers(example, speaker):
        return None
    ans = parse_answer(text, example)
    if ans is None and cfg.fallback_parse:
        ans = fallback_answer(text, example)
    return ans


def speaks_for_both(text: str, speaker: int) -> bool:
    """An utterance that writes the partner's lines ("Bob: ...") inside its own turn."""
    other = AGENTS[1 - speaker]
    return any(line.strip().startswith(f"{other}:") for line in text.splitlines())


class _Live:
    """A conversation in progress."""

    def __init__(self, example: Example, prefix: Sequence[Turn], seed: int, max_turns: int) -> None:
        self.example = example
        self.turns: list[Turn] = list(prefix)
        self.seed = seed
        self.max_turns = max_turns
        self.last_answer: str | None = None
        self.stop: StopReason | None = None
        for t in self.turns:  # replay the prefix through the stop rule
            self._update(t)
        self._check_limit()

    def _update(self, turn: Turn) -> None:
        if turn.answer is None:
            return
        if self.last_answer is not None and answers_agree(self.example, turn.answer, self.last_answer):
            self.stop = "agreed"
        self.last_answer = turn.answer

    def _check_limit(self) -> None:
        if self.stop is None and len(self.turns) >= self.max_turns:
            self.stop = "max_turns"

    def add(self, turn: Turn) -> None:
        self.turns.append(turn)
        self._update(turn)
        self._check_limit()


def run_dialogues(
    engine: Engine,
    examples: Sequence[Example],
    cfg: ProtocolConfig,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seeds: Sequence[int] | None = None,
    prefixes: Sequence[Sequence[Turn]] | None = None,
) -> list[Transcript]:
    """Run one conversation per example (continuing ``prefixes[i]`` if given) to its end.

    Turn t of conversation i samples with seed ``derive_seed(seeds[i], t)``: the same conversation gets the
    same tokens whatever else is in the batch.
    """
    seeds = seeds if seeds is not None else list(range(len(examples)))
    prefixes = prefixes if prefixes is not None else [[] for _ in examples]
    live = [_Live(ex, pre, s, cfg.max_turns) for ex, pre, s in zip(examples, prefixes, seeds, strict=True)]
    while True:
        active = [c for c in live if c.stop is None]
        if not active:
            break
        # One engine call per round for all live conversations (two if a forced turn prefix differs by
        # speaker: the prefix is part of the prompt the engine encodes).
        groups: dict[str, list[_Live]] = {}
        for c in active:
            groups.setdefault(turn_prefix(speaker_of(len(c.turns)), cfg), []).append(c)
        for prefix, group in groups.items():
            views = [
                render_view(c.example, [t.text for t in c.turns], speaker_of(len(c.turns)), cfg)
                for c in group
            ]
            sp = SamplingParams(
                temperature=temperature, top_p=top_p, max_new_tokens=cfg.max_new_tokens, prefix=prefix
            )
            outs = engine.generate(views, sp, seeds=[derive_seed(c.seed, len(c.turns)) for c in group])
            for c, out in zip(group, outs, strict=True):
                comp, speaker = out[0], speaker_of(len(c.turns))
                text = comp.text.strip()
                turn = Turn(
                    speaker=speaker,
                    text=text,
                    tokens=comp.completion_tokens,
                    truncated=comp.finish_reason == "length",
                    answer=parse_turn(c.example, speaker, text, cfg),
                )
                c.add(turn)
    return [_finish(c) for c in live]


def _finish(c: _Live) -> Transcript:
    assert c.stop is not None
    metric = score_answer(c.example, c.last_answer) if c.stop == "agreed" else 0.0
    return Transcript(
        example_id=c.example.id, turns=c.turns, stop_reason=c.stop, answer=c.last_answer, metric=metric
    )
