"""The one-step probe behind influence estimation (docs/design.md section 7): ``θ_z`` = θ after ONE optimizer
step of DPO on candidate z, evaluated, then put back.

Why not a TRL trainer per candidate: building a DPOTrainer (dataset tokenisation, accelerate setup, optimizer
and scheduler construction, the reference-adapter copy) costs seconds per candidate before the single step,
and a run scores hundreds of candidates. Here the loss is computed from the engine's own differentiable
log-probs (:meth:`HFEngine.score_tensors` with ``keep_graph``), the step is one fresh optimizer on the
adapter's LoRA tensors only, and :meth:`StepHandle.restore` copies the saved tensors back bit for bit.

The loss is TRL's sigmoid DPO loss on the same sequences TRL trains on: the assistant turn is scored as the
chat template renders it (content plus end-of-turn marker), summed over its tokens; ``tests/test_train.py``
checks it against ``DPOTrainer.compute_loss`` on one batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from dits.engine.policy import TrainablePolicy
from dits.records import PreferencePair
from dits.train.rows import assistant_turn_text, preference_rows

__all__ = ["RefLogps", "StepHandle", "dpo_loss", "one_step", "reference_logps", "sequence_logps"]

RefLogps = tuple[torch.Tensor, torch.Tensor]
"""Summed log-probs of (chosen, rejected) turns under the reference policy, one entry per pair."""

Pairs = Sequence[PreferencePair | Mapping[str, Any]]


def _scoring_inputs(engine: TrainablePolicy, pairs: Pairs) -> tuple[list, list[str]]:
    """Views and turn texts, chosen rows first then rejected rows (TRL's batch layout)."""
    rows = preference_rows(pairs)
    views, texts = [], []
    for key in ("chosen", "rejected"):
        for i, row in enumerate(rows):
            msgs = row[key]
            if len(msgs) != 1 or msgs[0]["role"] != "assistant":
                raise ValueError(f"pair {i}: {key} must be one assistant message")
            views.append(row["prompt"])
            texts.append(assistant_turn_text(engine.tokenizer, row["prompt"], msgs[0]["content"]))
    return views, texts


def sequence_logps(engine: TrainablePolicy, pairs: Pairs) -> RefLogps:
    """Summed log-probs of each pair's chosen and rejected turn under the engine's current adapter;
    differentiable when grad mode is on (the caller's choice)."""
    views, texts = _scoring_inputs(engine, pairs)
    with engine.adapter_scope():
        scored = engine.score_tensors(views, texts, "", keep_graph=True)
    sums = torch.stack([sc.tensor.sum() for sc in scored])
    n = len(pairs)
    return sums[:n], sums[n:]


def reference_logps(engine: TrainablePolicy, pairs: Pairs) -> RefLogps:
    """Reference log-probs for :func:`dpo_loss`: the current adapter's, without a graph. Set the engine to
    the reference policy (the model DPO starts from) before calling."""
    with torch.no_grad():
        chosen, rejected = sequence_logps(engine, pairs)
    return chosen.detach(), rejected.detach()


def dpo_loss(
    engine: TrainablePolicy, pairs: Pairs, beta: float, ref_logps: RefLogps | None = None
) -> torch.Tensor:
    """Mean sigmoid DPO loss ``-log σ(β[(π_c - ref_c) - (π_r - ref_r)])`` with the policy = the engine's
    active adapter (differentiable) and the given reference log-probs. Without them the reference is the
    current policy itself (the start of a DPO step from here): its log-probs are the policy forward's own,
    detached, so no second forward runs; the loss is log 2 and the gradient ``-β/2·∇(π_c - π_r)``."""
    if ref_logps is not None:
        ref_c, ref_r = (torch.as_tensor(t, dtype=torch.float32) for t in ref_logps)
        if ref_c.shape != (len(pairs),) or ref_r.shape != (len(pairs),):
            raise ValueError(f"ref_logps must hold {len(pairs)} chosen and rejected values")
    with torch.enable_grad():
        pol_c, pol_r = sequence_logps(engine, pairs)
        if ref_logps is None:
            ref_c, ref_r = pol_c.detach(), pol_r.detach()
        delta = (pol_c - ref_c.to(pol_c.device)) - (pol_r - ref_r.to(pol_r.device))
        return -F.logsigmoid(beta * delta).mean()


def backward_dpo(
    engine: TrainablePolicy, pairs: Pairs, beta: float, ref_logps: RefLogps | None = None
) -> float:
    """Accumulate ``∇`` of :func:`dpo_loss` over ``pairs`` into the trainable tensors' ``.grad``, one pair
    per backward: the loss is a mean of per-pair terms, so this is exact, and only one pair's graph is held
    at a time (a chunk of 5 pairs' graph is ~10 sequences' activations). ``ref_logps`` None: the reference
    is the policy itself (see :func:`dpo_loss`). Returns the loss."""
    total = 0.0
    for i, pair in enumerate(pairs):
        ref = None if ref_logps is None else (ref_logps[0][i : i + 1], ref_logps[1][i : i + 1])
        loss = dpo_loss(engine, [pair], beta, ref) / len(pairs)
        loss.backward()
        total += float(loss.detach())
    return total


@dataclass
class StepHandle:
    """The adapter after one step; :meth:`restore` (or leaving a ``with`` block) puts θ back exactly."""

    adapter: str
    loss: float
    """DPO loss before the step."""
    grad_norm: float
    update_norm: float
    """‖θ_z − θ‖ over the adapter's tensors."""
    trained_tokens: int
    _params: dict[str, torch.nn.Parameter] = field(repr=False)
    _saved: dict[str, torch.Tensor] = field(repr=False)
    restored: bool = False

    def restore(self) -> None:
        with torch.no_grad():
            for name, p in self._params.items():
                p.copy_(self._saved[name])
        self.restored = True

    def __enter__(self) -> StepHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


@contextmanager
def _only_trainable(model: torch.nn.Module, params: Mapping[str, torch.nn.Parameter]) -> Iterator[None]:
    """Gradients for ``params`` only, so the backward does not reach the base weights (the caller restores
    the flags); no gradient is left behind."""
    wanted = {id(p) for p in params.values()}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in wanted)
        yield
    finally:
        for p in model.parameters():
            p.grad = None


def one_step(
    engine: TrainablePolicy,
    adapter_name: str,
    pairs: Pairs,
    lr: float,
    beta: float,
    optimizer: Literal["adamw", "sgd"] = "adamw",
    *,
    ref_logps: RefLogps | None = None,
    weight_decay: float = 0.0,
) -> StepHandle:
    """Take exactly one optimizer step of DPO on ``pairs`` on adapter ``adapter_name`` and return a handle
    that restores it. A FRESH optimizer each call (AdamW's first step is then ``lr · g / (|g| + ε)`` per
    tensor entry, as in the reference code's probe; or plain SGD), on that adapter's tensors only, in the
    model's current (eval) mode so no dropout makes the step random.

    ``ref_logps`` default: the adapter itself before the step, taken from the policy forward (see
    :func:`dpo_loss`). The active adapter is the same afterwards as before. The policy forward + backward is
    charged to the ledger as trained tokens (a chosen and a rejected turn share their prompt's forward).
    """
    if lr < 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if optimizer not in ("adamw", "sgd"):
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
    previous = engine.active_adapter
    params = engine.adapter_parameters(adapter_name)
    saved = {n: p.detach().clone() for n, p in params.items()}
    flags = [(p, p.requires_grad) for p in engine.model.parameters()]  # PEFT's set_adapter flips them too
    engine.set_adapter(adapter_name)
    try:
        with _only_trainable(engine.model, params):
            before = engine.ledger.snapshot()
            with engine.booked_as_training():  # the policy forward is part of the training step
                loss = backward_dpo(engine, pairs, beta, ref_logps)
            trained = (engine.ledger.snapshot() - before).trained_tokens
            norms = [p.grad.norm() for p in params.values() if p.grad is not None]
            grad_norm = float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
            tensors = list(params.values())
            if optimizer == "adamw":
                opt: torch.optim.Optimizer = torch.optim.AdamW(tensors, lr=lr, weight_decay=weight_decay)
            else:
                opt = torch.optim.SGD(tensors, lr=lr, weight_decay=weight_decay)
            opt.step()
    except BaseException:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])
        raise
    finally:
        engine.set_adapter(previous)
        for p, flag in flags:
            p.requires_grad_(flag)
    with torch.no_grad():
        update = torch.stack([(p - saved[n]).norm() for n, p in params.items()])
    return StepHandle(
        adapter=adapter_name,
        loss=loss,
        grad_norm=grad_norm,
        update_norm=float(torch.linalg.vector_norm(update)),
        trained_tokens=trained,
        _params=params,
        _saved=saved,
    )
