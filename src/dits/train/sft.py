"""Supervised fine-tuning on the iSFT rows with TRL's SFTTrainer (docs/design.md section 7b).

A row is TRL's conversational prompt-completion format: ``prompt`` is the renderer's view (the one
:func:`dits.mas.protocol.render_view` builds for generation too), ``completion`` the agent's turn as one
assistant message. The loss is on the completion only (``completion_only_loss``): the prompt positions get
label -100. The completion includes the chat template's end-of-turn marker, so the model learns to stop.
Length checks, staging, token counting and the ledger are the shared :class:`~dits.train.trainer.DitsTrainer`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, ClassVar, Literal

from trl import SFTConfig, SFTTrainer

from dits.engine.policy import TrainablePolicy
from dits.train.config import TrainConfig
from dits.train.rows import LengthCheck, completion_rows
from dits.train.trainer import DitsTrainer, TrainResult, train_and_save

log = logging.getLogger(__name__)

__all__ = ["DitsSFTTrainer", "check_sft_lengths", "sft_trainer", "train_sft"]


class DitsSFTTrainer(DitsTrainer, SFTTrainer):
    """TRL's SFTTrainer on prompt-completion rows, with the loss on the completion only."""

    kind: ClassVar[Literal["sft"]] = "sft"
    what: ClassVar[str] = "SFT row"
    responses: ClassVar[tuple[str, ...]] = ("completion",)

    to_rows = staticmethod(completion_rows)

    @staticmethod
    def trl_config(common: dict[str, Any], cfg: TrainConfig, check: LengthCheck) -> SFTConfig:
        return SFTConfig(
            **common,
            max_length=check.max_length,
            completion_only_loss=True,
            assistant_only_loss=False,
            packing=False,
            padding_free=False,
        )


def check_sft_lengths(tokenizer: Any, rows: Sequence[Any], cfg: TrainConfig) -> LengthCheck:
    """Tokenise every row as TRL will and find those that would be truncated (see ``check_lengths``)."""
    return DitsSFTTrainer.length_check(tokenizer, rows, cfg)


def sft_trainer(
    engine: TrainablePolicy, rows: Sequence[Any], cfg: TrainConfig, *, init_adapter: str | None = None
) -> AbstractContextManager[DitsSFTTrainer]:
    """A ready TRL SFTTrainer on the engine's model (not yet trained); the engine is restored on exit and the
    tokens it trained are charged to the ledger. ``trainer.dits_lengths`` holds the length check."""
    return DitsSFTTrainer.staged(engine, rows, cfg, init_adapter=init_adapter)


def train_sft(
    engine: TrainablePolicy,
    rows: Sequence[Any],
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    adapter_name: str = "sft",
    init_adapter: str | None = None,
) -> TrainResult:
    """Fine-tune on ``rows``; save the adapter (or, with ``full_finetune``, the model) to ``out_dir``.

    LoRA: a fresh adapter, or a copy of ``init_adapter`` (a loaded adapter's name or a saved adapter's
    directory) trained further; the result is loaded into the engine as ``adapter_name`` (replacing one of
    that name) but not made active: the adapter active before stays active. Full fine-tuning changes
    ``engine.base`` in place. Trained tokens (non-padding, every step) are charged to ``engine.ledger``.
    """
    staged = sft_trainer(engine, rows, cfg, init_adapter=init_adapter)
    result = train_and_save(
        staged, engine, cfg, out_dir, adapter_name=adapter_name, init_adapter=init_adapter
    )
    log.info(
        "SFT: %d rows, %d steps, %d tokens, loss %s",
        result.rows, result.steps, result.trained_tokens, result.train_loss,
    )  # fmt: skip
    return result
