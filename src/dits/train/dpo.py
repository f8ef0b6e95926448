"""DPO on the mined preference pairs with TRL's DPOTrainer (DESIGN.md section 7b).

A pair becomes TRL's conversational preference row: ``prompt`` is the renderer's view for the speaker (the
pair's ``prompt``, filled by ``mine_pairs(render=...)``), ``chosen`` / ``rejected`` the two sibling utterances
as assistant messages (with the protocol's forced turn prefix, the way the renderer writes an agent's own
turns, as the SFT rows do).

The reference policy is the model before this training. With LoRA, TRL (1.x) copies the adapter being
trained (staged as ``"default"``, see :mod:`dits.train.staging`) to a frozen ``"ref"`` adapter before the
first step and scores the reference with it, so when training continues from the previous iteration's
adapter the reference is that adapter, not the bare base model; a fresh adapter starts at zero, so its copy
equals the base. This is checked after the trainer is built. With full fine-tuning the reference
log-probs are precomputed from the untouched model before the first step (no second model in memory).

Lengths are checked before training with the tokenizer and chat template, exactly as TRL will tokenise: a
pair whose prompt + chosen or prompt + rejected exceeds ``max_length`` (or whose prompt exceeds
``max_prompt_length``) is dropped and counted, or rejected with ``on_truncation="error"``. TRL itself would
cut such a sequence at ``max_length`` and train on what is left (the reference implementation's bug of
training on empty responses). The default ``max_length=None`` is the longest pair, so nothing is dropped.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from dits.engine.policy import TrainablePolicy
from dits.records import PreferencePair
from dits.train.config import TrainConfig
from dits.train.rows import (
    LengthCheck,
    RowLengths,
    check_lengths,
    preference_rows,
    row_label,
    sequence_lengths,
)
from dits.train.staging import REF_ADAPTER, TRAIN_ADAPTER, staged_model
from dits.train.trainer import TrainResult, finish_training, quiet_datasets, quiet_trainer, trainer_kwargs

log = logging.getLogger(__name__)

__all__ = ["check_dpo_lengths", "dpo_trainer", "train_dpo"]

Pairs = Sequence[PreferencePair | Mapping[str, Any]]


class _CountingDPOTrainer(DPOTrainer):
    """DPOTrainer that counts the tokens of every batch it trains on: policy forward + backward, and the
    reference forward when it is not precomputed (for the ledger)."""

    dits_counts: dict[str, int]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
        if self.model.training:
            tokens = int(inputs["attention_mask"].sum())
            completion = int(inputs["completion_mask"].sum())
            self.dits_counts["trained"] += tokens
            if not self.precompute_ref_logps:
                self.dits_counts["ref_prompt"] += tokens - completion
                self.dits_counts["ref_completion"] += completion
        return super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )


def check_dpo_lengths(tokenizer: Any, pairs: Pairs, cfg: TrainConfig) -> LengthCheck:
    """Tokenise every pair as TRL will and find those that would be truncated (see ``check_lengths``)."""
    rows = preference_rows(pairs)
    lengths = []
    for i, (pair, row) in enumerate(zip(pairs, rows, strict=True)):
        prompt, fulls = sequence_lengths(tokenizer, row["prompt"], [row["chosen"], row["rejected"]])
        lengths.append(RowLengths(row_label(pair, i), prompt, fulls, ("chosen", "rejected")))
    s = cfg.dpo
    return check_lengths(
        lengths,
        max_length=s.max_length,
        max_prompt_length=s.max_prompt_length,
        on_truncation=s.on_truncation,
        what="pair",
    )


def _check_reference(engine: TrainablePolicy) -> None:
    """The reference adapter must exist and equal the start adapter, or DPO trains against the wrong model."""
    if REF_ADAPTER not in engine.adapter_names():
        raise RuntimeError("TRL did not create the reference adapter; this TRL version is not supported")
    ref = engine.adapter_parameters(REF_ADAPTER)
    start = engine.adapter_parameters(TRAIN_ADAPTER)
    for name, p in start.items():
        q = ref.get(name.replace(f".{TRAIN_ADAPTER}.", f".{REF_ADAPTER}."))
        if q is None or not torch.equal(p, q) or q.requires_grad:
            raise RuntimeError(f"reference adapter differs from the start adapter at {name}")


@contextmanager
def dpo_trainer(
    engine: TrainablePolicy, pairs: Pairs, cfg: TrainConfig, *, init_adapter: str | None = None
) -> Iterator[DPOTrainer]:
    """A ready TRL DPOTrainer on the engine's model (not yet trained). Inside, the policy is the engine's
    active adapter ``"default"`` and the reference is ``"ref"`` (LoRA). On exit the engine is restored and
    the tokens trained are charged to the ledger. ``trainer.dits_lengths`` holds the length check."""
    check = check_dpo_lengths(engine.tokenizer, pairs, cfg)
    rows = preference_rows(pairs)
    dataset = Dataset.from_list([rows[i] for i in check.kept])
    s = cfg.dpo
    with (
        tempfile.TemporaryDirectory(prefix="dits-dpo-") as work,
        staged_model(engine, cfg, init_adapter) as staged,
    ):
        args = DPOConfig(
            **trainer_kwargs(engine, s, cfg, work),
            beta=s.beta,
            loss_type=["sigmoid"],
            max_length=check.max_length,
            truncation_mode="keep_start",
            precompute_ref_log_probs=cfg.full_finetune,
        )
        with quiet_datasets():
            trainer = _CountingDPOTrainer(
                model=staged.model,
                ref_model=None,
                args=args,
                train_dataset=dataset,
                processing_class=engine.tokenizer,
            )
        quiet_trainer(trainer)
        trainer.dits_counts = staged.counts
        trainer.dits_lengths = check  # type: ignore[attr-defined]
        if len(trainer.train_dataset) != len(check.kept):
            raise RuntimeError(f"TRL kept {len(trainer.train_dataset)} of {len(check.kept)} checked pairs")
        if cfg.full_finetune:  # the reference forward already ran, once over the data
            staged.counts["ref_prompt"] += check.kept_tokens - check.kept_completion_tokens
            staged.counts["ref_completion"] += check.kept_completion_tokens
        else:
            _check_reference(engine)
        try:
            yield trainer
        finally:
            c = staged.counts
            if any(c.values()):
                engine.ledger.charge(
                    trained_tokens=c["trained"],
                    prompt_tokens=c["ref_prompt"],
                    scored_tokens=c["ref_completion"],
                )


def train_dpo(
    engine: TrainablePolicy,
    pairs: Pairs,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    init_adapter: str | None = None,
    adapter_name: str = "dpo",
) -> TrainResult:
    """DPO on ``pairs``; save the adapter (or, with ``full_finetune``, the model) to ``out_dir``.

    LoRA: a fresh adapter, or ``init_adapter`` (a loaded adapter's name or a saved adapter's directory)
    trained further with itself as the reference; the result is loaded into the engine as ``adapter_name``
    (replacing one of that name) but not made active. Charges the trained tokens (policy) and the
    reference forward to the ledger.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with dpo_trainer(engine, pairs, cfg, init_adapter=init_adapter) as trainer:
        trainer.train()
        counts = dict(trainer.dits_counts)
        result = finish_training(
            trainer,
            engine,
            cfg,
            out,
            kind="dpo",
            adapter_name=adapter_name,
            init_adapter=init_adapter,
            trained_tokens=counts["trained"],
            reference_tokens=counts["ref_prompt"] + counts["ref_completion"],
            started=start,
        )
    log.info(
        "DPO: %d pairs (%d dropped), %d steps, loss %s",
        result.rows,
        result.truncated,
        result.steps,
        result.train_loss,
    )
    return result
