"""Training hyperparameters: LoRA shape, SFT and DPO sections (docs/design.md section 7b).

The published recipe (Optima / DITS) is full fine-tuning of Llama-3-8B-Instruct on 8 GPUs: SFT lr 2e-5 (QA) /
1e-6 (debate), 1-3 epochs; DPO lr 5e-7, beta 0.1-0.7, 1 epoch, batch 64; max length 2048. Those learning rates
are for updating all 8B weights; a rank-8 LoRA on a 135M model moves far less per step, so the defaults here
are the usual LoRA ones (SFT 1e-4, DPO 5e-5 -- the latter is also the reference code's influence-probe lr) and
small batches for a CPU. :meth:`TrainConfig.reference` gives the published full fine-tuning numbers.

Lengths default to ``None``: "as long as the longest row", computed from the data before training, so
nothing is truncated. A set limit drops (or, with ``on_truncation="error"``, rejects) the rows that would not
fit; no row is ever trained on a cut-off or empty response.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["DpoSettings", "LoraSettings", "SftSettings", "TrainConfig"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class LoraSettings(_Section):
    """Shape of the LoRA adapter trained when ``full_finetune`` is off."""

    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def to_peft(self) -> Any:
        """The equivalent ``peft.LoraConfig`` (a fresh one each call: PEFT mutates configs it is given)."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )


class _Phase(_Section):
    """What SFT and DPO share: optimisation, batching, lengths."""

    lr: float = Field(gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(
        None, ge=1, description="stop after this many optimizer steps (overrides epochs)"
    )
    batch_size: int = Field(4, ge=1, description="rows (SFT) or pairs (DPO) per device per micro-batch")
    grad_accum: int = Field(1, ge=1)
    warmup: float = Field(0.0, ge=0, description="< 1: fraction of the steps; >= 1: a number of steps")
    lr_scheduler: Literal["linear", "constant", "cosine"] = "linear"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    max_length: int | None = Field(
        None, ge=2, description="prompt + response tokens; None: the longest row, so nothing is cut"
    )
    on_truncation: Literal["drop", "error"] = Field(
        "drop", description="rows longer than the limits: drop them (and report the count) or raise"
    )
    gradient_checkpointing: bool = Field(False, description="recompute activations (pays on big models only)")


class SftSettings(_Phase):
    lr: float = Field(1e-4, gt=0, description="LoRA default; the paper's full FT uses 2e-5 QA / 1e-6 debate")
    epochs: float = Field(2.0, gt=0, description="the paper trains 1-3 epochs")


class DpoSettings(_Phase):
    lr: float = Field(5e-5, gt=0, description="LoRA default; the paper's full FT uses 5e-7")
    beta: float = Field(
        0.1, gt=0, description="in a run config the dataset's published β unless set (0.1-0.7, DITS recipes)"
    )
    max_prompt_length: int | None = Field(
        None,
        ge=1,
        description="drop pairs with a longer prompt (TRL 1.x no longer cuts prompts); None: no limit",
    )


class TrainConfig(_Section):
    """Everything ``train_sft`` / ``train_dpo`` read."""

    lora: LoraSettings = LoraSettings()
    full_finetune: bool = Field(False, description="train every weight of the base model instead of a LoRA")
    sft_from: Literal["initial", "previous"] = Field(
        "previous",
        description="the model iSFT of iteration i > 0 starts from; in a run config the dataset's published "
        "choice unless set (Optima: previous for information exchange, initial for debate; DITS: initial)",
    )
    seed: int = 0
    sft: SftSettings = SftSettings()
    dpo: DpoSettings = DpoSettings()

    @classmethod
    def reference(cls, mode: Literal["exchange", "debate"] = "exchange", **overrides: Any) -> TrainConfig:
        """The published full fine-tuning hyperparameters (Llama-3-8B, 8 GPUs, max length 2048)."""
        sft = SftSettings(lr=2e-5 if mode == "exchange" else 1e-6, epochs=2, batch_size=8, max_length=2048)
        dpo = DpoSettings(lr=5e-7, epochs=1, batch_size=8, grad_accum=8, max_length=2048)
        return cls.model_validate({"full_finetune": True, "sft": sft, "dpo": dpo, **overrides})
