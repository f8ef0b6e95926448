"""The engine interface every other part of dits calls: generate, score, adapters.

Backends (``hf`` here, ``vllm`` on GPUs) implement :class:`Engine`; callers only see these records, so a
backend can be swapped without touching the search, the protocol or the influence estimators.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

from dits.ledger import Ledger


class Message(TypedDict):
    """One chat message as transformers' chat templates take it."""

    role: Literal["system", "user", "assistant"]
    content: str


View = list[Message]
"""What one agent sees before it speaks: its system prompt, then the conversation so far."""

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``temperature == 0`` means greedy (``n`` must then be 1 or gives n equal copies)."""

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()
    seed: int = 0
    prefix: str = ""
    """Text forced at the start of the assistant turn (e.g. ``"Alice:"``); it is part of the prompt,
    not of the returned completion."""

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"sampling.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    """One sampled continuation of a view."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    """Tokens in ``token_ids`` (the utterance; no end-of-turn token)."""
    finish_reason: FinishReason
    generated_tokens: int = 0
    """Decode steps spent, including an end-of-turn token: what the ledger is charged."""


@dataclass
class ScoredCompletion:
    """Per-token log-probs of a given completion under the current model (adapter included)."""

    token_ids: list[int]
    logprobs: list[float] = field(default_factory=list)
    tensor: Any = None
    """Differentiable log-probs (a torch tensor) when the caller asked to keep the graph."""

    @property
    def total(self) -> float:
        return float(sum(self.logprobs))


class Engine(ABC):
    """A batched text generator and scorer over one base model with switchable LoRA adapters."""

    ledger: Ledger

    @abstractmethod
    def generate(
        self, views: Sequence[View], sampling: SamplingParams, seeds: Sequence[int] | None = None
    ) -> list[list[Completion]]:
        """Return ``sampling.n`` completions for each view, in input order.

        ``seeds[i]`` seeds view i's samples, so its tokens do not depend on the rest of the batch (up to
        floating-point rounding, which batch shape can change in the last bits)."""

    @abstractmethod
    def score(
        self, views: Sequence[View], completions: Sequence[str], prefix: str = "", *, temperature: float = 1.0
    ) -> list[ScoredCompletion]:
        """Log-probs of each completion's tokens given its view (with the forced ``prefix``, if any), under
        ``softmax(logits / temperature)``: the distribution a sample at that temperature (top_p 1) was
        drawn from, which is what importance weights of such samples need."""

    def score_alone(self, texts: Sequence[str], prefix: str = "") -> list[ScoredCompletion]:
        """Log-probs of each text as a lone assistant turn: the chat template's assistant header (and the
        forced ``prefix``), no system prompt, no conversation. The readability term of the reward scores
        utterances this way, so copying one's context does not make an utterance look fluent."""
        raise NotImplementedError(f"{type(self).__name__} does not score texts on their own")

    @abstractmethod
    def load_adapter(self, name: str, path: str) -> None:
        """Load a PEFT LoRA adapter from ``path`` under ``name`` (does not activate it)."""

    def adapter_names(self) -> list[str]:
        """The adapters loaded (what :meth:`set_adapter` accepts besides ``None``)."""
        raise NotImplementedError(f"{type(self).__name__} holds no adapters")

    @abstractmethod
    def set_adapter(self, name: str | None) -> None:
        """Activate adapter ``name``; ``None`` runs the bare base model."""

    @property
    @abstractmethod
    def active_adapter(self) -> str | None:
        """The adapter generate/score currently use."""

    @abstractmethod
    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` under the model's tokenizer (no special tokens)."""

    def close(self) -> None:  # noqa: B027 - a no-op unless the engine holds something outside Python
        """Release what the engine holds outside this process's Python objects (a vLLM engine's workers
        and device memory); the engine is not used afterwards."""
