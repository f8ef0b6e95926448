"""The published per-dataset hyperparameters, in one table: what a config key left at ``None`` means.

Every registered dataset (:data:`dits.tasks.loaders.DATASETS`) carries one :class:`MethodDefaults` next to its
format and metric; the reward weights, the pair threshold τ, the iSFT threshold ε and slice, the DPO β and
which model SFT starts from are read from there and nowhere else. A dataset registered without defaults
fails with its name instead of silently borrowing another dataset's numbers.

Sources: Optima (thunlp/Optima: reward weights, τ, ε, the iSFT slice, SFT start per dataset) and DITS (its
DPO recipes: β). Where the two references differ, the column says which one is followed. The built-in tasks
follow the real dataset they stand in for: ``facts`` HotpotQA, ``arith`` GSM8K.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["DEBATE_GSM8K", "EXCHANGE", "MethodDefaults", "defaults_table"]

SftFrom = Literal["initial", "previous"]


class MethodDefaults(BaseModel):
    """One dataset's published defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lambda_tok: float = Field(description="reward: weight of T / T_norm (Optima)")
    lambda_read: float = Field(description="reward: weight of 1 / max NLL (Optima)")
    tau: float = Field(description="pairs: Q(best) must exceed it (Optima)")
    isft_threshold: float = Field(description="iSFT ε: a kept best conversation's minimum reward (Optima)")
    isft_slice: tuple[float, float] = Field(
        (0.0, 0.7), description="iSFT: the ranks kept of the best conversations sorted by reward (Optima)"
    )
    dpo_beta: float = Field(description="DPO β (the DITS recipes)")
    sft_from: SftFrom = Field(
        description="iSFT of iteration i > 0 starts from the initial model or the previous one (Optima; "
        "DITS always starts from the initial model, as its paper configs set)"
    )


EXCHANGE = MethodDefaults(
    lambda_tok=-0.6, lambda_read=1.0, tau=0.4, isft_threshold=0.5, dpo_beta=0.1, sft_from="previous"
)
"""Information exchange (HotpotQA's numbers; the other exchange datasets differ where their entry says)."""
DEBATE_GSM8K = MethodDefaults(
    lambda_tok=-0.4, lambda_read=0.9, tau=0.45, isft_threshold=0.6, dpo_beta=0.5, sft_from="initial"
)
"""GSM8K (debate)."""

_TABLE: dict[str, MethodDefaults] = {
    "hotpotqa": EXCHANGE,
    "2wiki": EXCHANGE.model_copy(update={"dpo_beta": 0.5}),
    "triviaqa": EXCHANGE.model_copy(update={"tau": 0.43, "isft_threshold": 0.6, "dpo_beta": 0.7}),
    "cbt": EXCHANGE.model_copy(update={"dpo_beta": 0.7}),
    "gsm8k": DEBATE_GSM8K,
    "math": DEBATE_GSM8K.model_copy(update={"isft_slice": (0.1, 0.8), "dpo_beta": 0.1}),
    "arc": DEBATE_GSM8K.model_copy(update={"lambda_tok": -0.5, "lambda_read": 0.6, "dpo_beta": 0.1}),
    "mmlu": DEBATE_GSM8K.model_copy(
        update={"lambda_tok": -0.6, "lambda_read": 0.7, "isft_threshold": 0.7, "dpo_beta": 0.1}
    ),
}


def defaults_table() -> dict[str, MethodDefaults]:
    """The published entries by the reference's dataset name (the registry adds aliases and built-ins)."""
    return dict(_TABLE)
