"""Supervised fine-tuning on the iSFT rows with TRL's SFTTrainer (DESIGN.md section 7b).

A row is TRL's conversational prompt-completion format: ``prompt`` is the renderer's view (the one
:func:`dits.mas.protocol.render_view` builds for generation too), ``completion`` the agent's turn as one
assistant message. The loss is on the completion only (``completion_only_loss``): the prompt positions get
label -100. The completion includes the chat template's end-of-turn marker, so the model learns to stop.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from dits.engine.policy import TrainablePolicy
from dits.train.config import TrainConfig
from dits.train.rows import (
    LengthCheck,
    RowLengths,
    check_lengths,
    completion_rows,
    row_label,
    sequence_lengths,
)
from dits.train.staging import staged_model
from dits.train.trainer import TrainResult, finish_training, quiet_datasets, quiet_trainer, trainer_kwargs

log = logging.getLogger(__name__)

__all__ = ["check_sft_lengths", "sft_trainer", "train_sft"]


class _CountingSFTTrainer(SFTTrainer):
    """SFTTrainer that counts the non-padding tokens of every batch it trains on (for the ledger)."""

    dits_counts: dict[str, int]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
        if self.model.training:
            self.dits_counts["trained"] += int(inputs["attention_mask"].sum())
        return super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )


def check_sft_lengths(tokenizer: Any, rows: Sequence[Any], cfg: TrainConfig) -> LengthCheck:
    """Tokenise every row as TRL will and find those that would be truncated (see ``check_lengths``)."""
    data = completion_rows(rows)
    lengths = []
    for i, (row, d) in enumerate(zip(rows, data, strict=True)):
        prompt, (full,) = sequence_lengths(tokenizer, d["prompt"], [d["completion"]])
        lengths.append(RowLengths(row_label(row, i), prompt, [full]))
    s = cfg.sft
    return check_lengths(
        lengths,
        max_length=s.max_length,
        max_prompt_length=None,
        on_truncation=s.on_truncation,
        what="SFT row",
    )


@contextmanager
def sft_trainer(
    engine: TrainablePolicy, rows: Sequence[Any], cfg: TrainConfig, *, init_adapter: str | None = None
) -> Iterator[SFTTrainer]:
    """A ready TRL SFTTrainer on the engine's model (not yet trained); the engine is restored on exit and the
    tokens it trained are charged to the ledger. ``trainer.dits_lengths`` holds the length check."""
    check = check_sft_lengths(engine.tokenizer, rows, cfg)
    data = completion_rows(rows)
    dataset = Dataset.from_list([data[i] for i in check.kept])
    with (
        tempfile.TemporaryDirectory(prefix="dits-sft-") as work,
        staged_model(engine, cfg, init_adapter) as staged,
    ):
        args = SFTConfig(
            **trainer_kwargs(engine, cfg.sft, cfg, work),
            max_length=check.max_length,
            completion_only_loss=True,
            assistant_only_loss=False,
            packing=False,
            padding_free=False,
        )
        with quiet_datasets():
            trainer = _CountingSFTTrainer(
                model=staged.model, args=args, train_dataset=dataset, processing_class=engine.tokenizer
            )
        quiet_trainer(trainer)
        trainer.dits_counts = staged.counts
        if len(trainer.train_dataset) != len(check.kept):
            raise RuntimeError(f"TRL kept {len(trainer.train_dataset)} of {len(check.kept)} checked rows")
        trainer.dits_lengths = check  # type: ignore[attr-defined]
        try:
            yield trainer
        finally:
            if staged.counts["trained"]:
                engine.ledger.charge(trained_tokens=staged.counts["trained"])


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
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with sft_trainer(engine, rows, cfg, init_adapter=init_adapter) as trainer:
        trainer.train()
        result = finish_training(
            trainer,
            engine,
            cfg,
            out,
            kind="sft",
            adapter_name=adapter_name,
            init_adapter=init_adapter,
            trained_tokens=trainer.dits_counts["trained"],
            started=start,
        )
    log.info(
        "SFT: %d rows, %d steps, %d tokens, loss %s",
        result.rows, result.steps, result.trained_tokens, result.train_loss,
    )  # fmt: skip
    return result
