"""The Optima reward of a transcript (docs/design.md section 5).

``R = R_task + λ_tok · T / T_norm + λ_read / max_i NLL_i`` with T the communication tokens, ``T_norm`` a high
percentile of T over a calibration sample, and ``NLL_i`` the mean per-token negative log-likelihood of
utterance i under the frozen initial model, each utterance scored on its own (no system prompt, no
context), the term bounded by ``read_clip``. Penalties: T ≤ 40 or an utterance cut at the token limit → the
token term is −1; T above ``max_tokens`` (2000) or an empty conversation → the readability term is −1 (as
in the reference); a repeated utterance → the readability term is 0; an utterance that speaks for both
agents → the task term is 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from dits.engine.base import Engine
from dits.mas.dialogue import Transcript, speaks_for_both
from dits.mas.protocol import ProtocolConfig, continuation, turn_prefix
from dits.tasks.example import Example
from dits.tasks.loaders import method_defaults


class RewardConfig(BaseModel):
    """Reward weights; ``None`` takes the dataset's published default (:mod:`dits.tasks.defaults`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    lambda_tok: float | None = None
    lambda_read: float | None = None
    t_norm_percentile: float = Field(80.0, gt=0, le=100)
    min_tokens: int = Field(40, ge=0, description="T at or below this gets token term -1")
    max_tokens: int = Field(
        2000, ge=1, description="T above this, or an empty conversation, gets readability term -1 (reference)"
    )
    read_clip: float = Field(
        1.0,
        gt=0,
        description="upper bound of the readability term λ_read / max NLL: on a model whose NLLs are tiny "
        "it would otherwise dwarf the task term (at most 1)",
    )


class RewardBreakdown(BaseModel):
    """The three terms and their sum, kept so a reward can be audited after the fact."""

    task: float
    token: float
    read: float

    @property
    def total(self) -> float:
        return self.task + self.token + self.read


def weights_for(example: Example, cfg: RewardConfig) -> tuple[float, float]:
    """(λ_tok, λ_read): the config's, or the dataset's published ones where the config leaves ``None``."""
    if cfg.lambda_tok is not None and cfg.lambda_read is not None:
        return cfg.lambda_tok, cfg.lambda_read
    d = method_defaults(example.dataset)
    return (
        cfg.lambda_tok if cfg.lambda_tok is not None else d.lambda_tok,
        cfg.lambda_read if cfg.lambda_read is not None else d.lambda_read,
    )


def t_norm_from(token_counts: Sequence[int], percentile: float = 80.0) -> float:
    """``T_norm``: a high percentile of communication tokens over a calibration sample (never below 1)."""
    if not token_counts:
        raise ValueError("T_norm needs at least one calibration transcript")
    return max(1.0, float(np.percentile(np.asarray(token_counts, dtype=float), percentile)))


def utterance_nlls(
    engine: Engine, transcripts: Sequence[Transcript], cfg: ProtocolConfig
) -> list[list[float]]:
    """Mean per-token NLL of every utterance under the frozen initial model, in one score call per speaker.

    Each utterance is scored on its own (:meth:`~dits.engine.base.Engine.score_alone`: the assistant header
    and the forced turn prefix, no system prompt, no context), as Optima and the DITS reference do: scored
    after the agent's view, an utterance that copies the agent's private notes gets a near-zero NLL, and
    the readability term would then rank copying above answering. ``engine`` must run the initial model:
    its base with adapters disabled (the caller keeps a separate engine when a full fine-tune has replaced
    the base). Empty utterances get NaN (skipped).
    """
    out: list[list[float]] = [[float("nan")] * len(tr.turns) for tr in transcripts]
    previous = engine.active_adapter
    engine.set_adapter(None)
    try:
        for speaker in (0, 1):  # the forced turn prefix is per speaker
            group = [(i, k, t.text) for i, tr in enumerate(transcripts) for k, t in enumerate(tr.turns)
                     if t.speaker == speaker]  # fmt: skip
            if not group:
                continue
            prefix = turn_prefix(speaker, cfg)
            scored = engine.score_alone([continuation(prefix, g[2]) for g in group], prefix)
            for (i, k, _), sc in zip(group, scored, strict=True):
                if sc.logprobs:
                    out[i][k] = -float(np.mean(sc.logprobs))
    finally:
        engine.set_adapter(previous)
    return out


def compute_reward(
    example: Example, transcript: Transcript, nlls: Sequence[float], t_norm: float, cfg: RewardConfig
) -> RewardBreakdown:
    """The Optima reward of one transcript, given its utterances' NLLs under the initial model."""
    lt, lr = weights_for(example, cfg)
    texts = transcript.texts
    task = transcript.metric
    if any(speaks_for_both(t.text, t.speaker) for t in transcript.turns):
        task = 0.0
    T = transcript.comm_tokens
    token = -1.0 if (cfg.min_tokens >= T or any(t.truncated for t in transcript.turns)) else lt * T / t_norm
    finite = [x for x in nlls if np.isfinite(x)]
    repeated = len(set(texts)) < len(texts)
    if cfg.max_tokens < T or not any(t.strip() for t in texts):  # runaway or empty: the reference's −1
        read = -1.0
    elif repeated or not finite:
        read = 0.0
    else:
        read = min(lr / max(max(finite), 1e-6), cfg.read_clip)
    return RewardBreakdown(task=task, token=token, read=read)
