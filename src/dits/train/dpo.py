"""DPO on the mined preference pairs with TRL's DPOTrainer (docs/design.md section 7b).

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
Length checks, staging, token counting and the ledger are the shared :class:`~dits.train.trainer.DitsTrainer`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from trl import DPOConfig, DPOTrainer

from dits.engine.policy import TrainablePolicy
from dits.records import PreferencePair
from dits.train.config import TrainConfig
from dits.train.rows import LengthCheck, preference_rows
from dits.train.staging import REF_ADAPTER, TRAIN_ADAPTER
from dits.train.trainer import DitsTrainer, TrainResult, train_and_save

log = logging.getLogger(__name__)

__all__ = ["DitsDPOTrainer", "check_dpo_lengths", "dpo_trainer", "train_dpo"]

Pairs = Sequence[PreferencePair | Mapping[str, Any]]


class DitsDPOTrainer(DitsTrainer, DPOTrainer):
    """TRL's DPOTrainer on preference rows with the sigmoid loss. It also counts the reference forward:
    per batch when the reference is scored alongside the policy (LoRA), or once over the kept pairs when
    it is precomputed before the first step (full fine-tuning)."""

    kind: ClassVar[Literal["dpo"]] = "dpo"
    what: ClassVar[str] = "pair"
    responses: ClassVar[tuple[str, ...]] = ("chosen", "rejected")

    to_rows = staticmethod(preference_rows)

    def __init__(self, *args: Any, lengths: LengthCheck, **kwargs: Any) -> None:
        super().__init__(*args, lengths=lengths, **kwargs)
        if self.precompute_ref_logps:  # the reference forward already ran, once over the data
            self.dits_counts.ref_prompt += lengths.kept_tokens - lengths.kept_completion_tokens
            self.dits_counts.ref_completion += lengths.kept_completion_tokens

    @staticmethod
    def trl_config(common: dict[str, Any], cfg: TrainConfig, check: LengthCheck) -> DPOConfig:
        return DPOConfig(
            **common,
            beta=cfg.dpo.beta,
            loss_type=["sigmoid"],
            max_length=check.max_length,
            truncation_mode="keep_start",
            precompute_ref_log_probs=cfg.full_finetune,
        )

    def count_batch(self, inputs: Mapping[str, Any]) -> None:
        super().count_batch(inputs)
        if not self.precompute_ref_logps:
            tokens = int(inputs["attention_mask"].sum())
            completion = int(inputs["completion_mask"].sum())
            self.dits_counts.ref_prompt += tokens - completion
            self.dits_counts.ref_completion += completion

    def check_staging(self, engine: TrainablePolicy) -> None:
        """With LoRA, the reference adapter must exist and equal the start adapter, or DPO trains against
        the wrong model."""
        if self.precompute_ref_logps:
            return
        if REF_ADAPTER not in engine.adapter_names():
            raise RuntimeError("TRL did not create the reference adapter; this TRL version is not supported")
        ref = engine.adapter_parameters(REF_ADAPTER)
        start = engine.adapter_parameters(TRAIN_ADAPTER)
        for name, p in start.items():
            q = ref.get(name.replace(f".{TRAIN_ADAPTER}.", f".{REF_ADAPTER}."))
            if q is None or not torch.equal(p, q) or q.requires_grad:
                raise RuntimeError(f"reference adapter differs from the start adapter at {name}")


def check_dpo_lengths(tokenizer: Any, pairs: Pairs, cfg: TrainConfig) -> LengthCheck:
    """Tokenise every pair as TRL will and find those that would be truncated (see ``check_lengths``)."""
    return DitsDPOTrainer.length_check(tokenizer, pairs, cfg)


def dpo_trainer(
    engine: TrainablePolicy, pairs: Pairs, cfg: TrainConfig, *, init_adapter: str | None = None
) -> AbstractContextManager[DitsDPOTrainer]:
    """A ready TRL DPOTrainer on the engine's model (not yet trained). Inside, the policy is the engine's
    active adapter ``"default"`` and the reference is ``"ref"`` (LoRA). On exit the engine is restored and
    the tokens trained are charged to the ledger. ``trainer.dits_lengths`` holds the length check."""
    return DitsDPOTrainer.staged(engine, pairs, cfg, init_adapter=init_adapter)


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
    staged = dpo_trainer(engine, pairs, cfg, init_adapter=init_adapter)
    result = train_and_save(
        staged, engine, cfg, out_dir, adapter_name=adapter_name, init_adapter=init_adapter
    )
    log.info(
        "DPO: %d pairs (%d dropped), %d steps, loss %s",
        result.rows,
        result.truncated,
        result.steps,
        result.train_loss,
    )
    return result
