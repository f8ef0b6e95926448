"""The trainable-policy seam: what training and the influence estimators need of an engine beyond
generate / score.

:class:`~dits.engine.base.Engine` is enough to run conversations and score them; SFT, DPO, the one-step
probe and the gradient estimator also need the torch module itself, its tokenizer, differentiable
log-probs, the tensors of one adapter, and a way to book the forward passes they run as training. A backend
that can be trained in-process (``hf``) implements :class:`TrainablePolicy`; one that cannot (``vllm``)
serves generation and scoring while a trainable policy on the same weights does the training.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

import torch

from dits.engine.base import ScoredCompletion, View
from dits.ledger import Ledger

__all__ = ["TrainablePolicy"]


@runtime_checkable
class TrainablePolicy(Protocol):
    """An engine whose model can be trained in place (LoRA adapters or all weights)."""

    ledger: Ledger
    device: Any
    tokenizer: Any
    base: torch.nn.Module
    """The base model (full fine-tuning trains and saves this)."""
    model: torch.nn.Module
    """What runs: the base, or the PEFT wrapper around it when adapters are loaded."""
    dtype: str
    """The compute dtype (what training's autocast and the engine's forwards compute in)."""
    weights_dtype: str
    """The dtype the base weights are stored in."""

    def hold_master_weights(self) -> None:
        """Store the base weights in float32 from now on (full fine-tuning with a half compute dtype), so
        that training updates are not rounded to the compute dtype."""

    @property
    def active_adapter(self) -> str | None: ...

    def set_adapter(self, name: str | None) -> None: ...

    def add_adapter(self, name: str, config: Any, *, seed: int | None = None) -> None:
        """A fresh trainable adapter from a ``peft.LoraConfig``; with ``seed``, initialised from a
        generator seeded with it (not from the process's global one)."""

    def load_adapter(self, name: str, path: str) -> None: ...

    def delete_adapter(self, name: str) -> None: ...

    def adapter_names(self) -> list[str]: ...

    def adapter_config(self, name: str) -> Any:
        """The PEFT config of a loaded adapter."""

    def adapter_parameters(self, name: str) -> dict[str, torch.nn.Parameter]:
        """The trainable tensors of one adapter, by parameter name."""

    def adapter_scope(self) -> AbstractContextManager[object]:
        """Run the model with the active adapter, or with every adapter off when none is active."""

    def score_tensors(
        self,
        views: Sequence[View],
        completions: Sequence[str],
        prefix: str = "",
        *,
        keep_graph: bool = False,
        temperature: float = 1.0,
    ) -> list[ScoredCompletion]:
        """Per-token log-probs under ``softmax(logits / temperature)``; with ``keep_graph`` differentiable
        (grad mode and adapter scope are the caller's)."""

    def score_turns(
        self,
        dialogues: Sequence[Sequence[tuple[View, str]]],
        prefix: str = "",
        *,
        keep_graph: bool = False,
        temperature: float = 1.0,
    ) -> list[list[ScoredCompletion]]:
        """:meth:`score_tensors` of each turn of each dialogue (one speaker's successive turns), in one
        forward per dialogue where the chat template renders earlier turns inside later views unchanged."""

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` under the model's tokenizer."""

    def booked_as_training(self) -> AbstractContextManager[object]:
        """Inside, the forward passes this engine runs are charged as trained tokens (forward + backward)
        instead of prompt / scored tokens."""
