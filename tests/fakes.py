"""A scripted engine for protocol tests: replies come from a function of the view, calls are recorded."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from dits.engine.base import Completion, Engine, SamplingParams, ScoredCompletion, View
from dits.ledger import Ledger


class ScriptedEngine(Engine):
    """``reply(view) -> str``; every utterance is ``len(text.split())`` tokens; log-probs are -1 per token."""

    def __init__(self, reply: Callable[[View], str], max_tokens: int | None = None) -> None:
        self.reply = reply
        self.ledger = Ledger(params=1)
        self.calls: list[list[View]] = []
        self.max_tokens = max_tokens
        self._active: str | None = None

    def generate(self, views: Sequence[View], sampling: SamplingParams, seeds=None) -> list[list[Completion]]:
        self.calls.append(list(views))
        out = []
        for v in views:
            words = self.reply(v).split()
            limit = min(sampling.max_new_tokens, self.max_tokens or sampling.max_new_tokens)
            cut = len(words) > limit
            text = " ".join(words[:limit])
            out.append(
                [
                    Completion(
                        text,
                        list(range(len(words[:limit]))),
                        0,
                        len(words[:limit]),
                        "length" if cut else "stop",
                    )
                ]
                * sampling.n
            )
        return out

    def score_alone(self, texts: Sequence[str], prefix: str = "") -> list[ScoredCompletion]:
        return self.score([[] for _ in texts], texts, prefix)

    def score(
        self, views: Sequence[View], completions: Sequence[str], prefix: str = ""
    ) -> list[ScoredCompletion]:
        return [
            ScoredCompletion(
                list(range(len(c.split()))), [-1.0 * (1 + i % 2) for i, _ in enumerate(c.split())]
            )
            for c in completions
        ]

    def load_adapter(self, name: str, path: str) -> None:
        raise NotImplementedError

    def set_adapter(self, name: str | None) -> None:
        self._active = name

    @property
    def active_adapter(self) -> str | None:
        return self._active

    def count_tokens(self, text: str) -> int:
        return len(text.split())
