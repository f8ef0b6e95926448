"""The first-order estimator: one backward per candidate, no step taken.

Once under θ: with the likelihood estimator's K sampled conversations per task, the gradient of its own
estimate, ``g = ∇ mean_task mean_j (metric_j − b_task) · log π(conv_j)`` on the LoRA tensors (b_task the
task's mean metric: the baseline that makes it exactly ``∇M̂`` of the self-normalised estimate at θ).
Per candidate: ``u`` = the first step on z (``−lr·∇L_DPO(z)``; or, with ``step_geometry="optimizer"`` and
AdamW, the fresh optimizer's first step ``−lr·∇L/(|∇L|+ε)``), and ``I(z) ≈ u·g``. With SGD this is the
derivative of the likelihood estimate along the step, so for a small lr the two agree (tested).

``projection_dim`` d: both vectors are multiplied by a fixed seeded Gaussian matrix (per adapter tensor)
scaled by 1/sqrt(d), which preserves dot products in expectation; its memory is d × (adapter size) floats,
which is what storing many candidate gradients at dimension d would save.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from dits.influence.base import active_adapter
from dits.influence.likelihood import Dialogue, LikelihoodEstimator
from dits.records import PreferencePair
from dits.seeding import derive_seed

__all__ = ["GradientEstimator"]

_ADAM_EPS = 1e-8  # torch.optim.AdamW's default, which one_step uses
_BACKWARD_TOKENS = 768
"""Tokens per backward of the validation gradient: bounds the autograd graph held at once (one graph over a
validation task's K whole conversations peaked at 4 GB on the 135M model)."""


class GradientEstimator(LikelihoodEstimator, name="gradient"):
    @contextmanager
    def _grad_on_adapter(self) -> Iterator[dict[str, torch.nn.Parameter]]:
        """Adapter active, gradients enabled for its tensors only (flags restored), and the forward charged
        as training tokens (a forward plus a backward) instead of scoring."""
        engine = self.engine
        params = engine.adapter_parameters(self.adapter)
        wanted = {id(p) for p in params.values()}
        flags = [(p, p.requires_grad) for p in engine.model.parameters()]
        try:
            with active_adapter(engine, self.adapter), engine.booked_as_training():
                for p in engine.model.parameters():
                    p.requires_grad_(id(p) in wanted)
                with torch.enable_grad():
                    yield params
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)

    def _dialogue_batches(
        self, weights: dict[int, float]
    ) -> Iterator[tuple[str, list[tuple[float, Dialogue]]]]:
        """Each weighted conversation's speaker dialogues as (weight, dialogue), in batches of one forced
        prefix and about :data:`_BACKWARD_TOKENS` tokens (message contents counted, template tokens not):
        one graph is held per batch, not one per validation task."""
        by_prefix: dict[str, list[tuple[float, Dialogue]]] = {}
        for i, a in weights.items():
            for d in self._dialogues[i]:
                by_prefix.setdefault(d.prefix, []).append((a, d))
        for prefix, group in by_prefix.items():
            batch: list[tuple[float, Dialogue]] = []
            size = 0
            for a, d in group:
                view, text = d.turns[-1]  # the row: the last view, which holds the earlier turns
                n = sum(self.engine.count_tokens(m["content"]) for m in view) + self.engine.count_tokens(text)
                if batch and size + n > _BACKWARD_TOKENS:
                    yield prefix, batch
                    batch, size = [], 0
                batch.append((a, d))
                size += n
            if batch:
                yield prefix, batch

    def _prepare(self) -> None:
        self._sample()
        n_tasks = len(self.examples)
        weights: dict[int, float] = {}  # conversation -> its advantage, (metric − task mean) / (K · tasks)
        for t in range(n_tasks):
            idx = [i for i, c in enumerate(self.cache) if c.task == t]
            m = torch.tensor([self.cache[i].metric for i in idx], dtype=torch.float64)
            adv = (m - m.mean()) / (len(idx) * n_tasks)
            weights.update((i, float(a)) for i, a in zip(idx, adv.tolist(), strict=True) if a != 0)
        self._set_validation_gradient(weights, self.cfg.temperature)
        self.baseline = 0.0

    def _set_validation_gradient(self, weights: dict[int, float], temperature: float) -> None:
        """``g = ∇ Σ_i w_i log π(conversation i)`` over the cached conversations, ``log π`` at
        ``temperature``; then the projection state is reset (a new g)."""
        with self._grad_on_adapter() as params:
            grads = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
            # g = ∇ Σ_i a_i Σ_turns log π(turn): linear in the turns, so summed over batches of dialogues.
            for prefix, batch in self._dialogue_batches(weights):
                scored = self.engine.score_turns(
                    [d.turns for _, d in batch], prefix, keep_graph=True, temperature=temperature
                )
                terms = [
                    a * sc.tensor.sum()
                    for (a, _), turns in zip(batch, scored, strict=True)
                    for sc in turns
                    if sc.tensor is not None and sc.tensor.numel() and sc.tensor.requires_grad
                ]
                if not terms:
                    continue
                got = torch.autograd.grad(sum(terms), list(params.values()), allow_unused=True)
                for name, gr in zip(params, got, strict=True):
                    if gr is not None:
                        grads[name] += gr.float()
        self.val_grad = grads
        self._projections: dict[str, torch.Tensor] = {}
        self._projection_key: tuple[int, int] | None = None
        self._val_proj: torch.Tensor | None = None

    def _project(self, vec: dict[str, torch.Tensor]) -> torch.Tensor:
        """``P·vec / sqrt(d)``; matrices made on first use (and anew when ``projection_dim`` or the seed
        changes)."""
        d = self.cfg.projection_dim
        assert d is not None
        if self._projection_key != (d, self.cfg.seed):
            self._projections, self._val_proj = {}, None
            self._projection_key = (d, self.cfg.seed)
        out = torch.zeros(d, dtype=torch.float64)
        for name, v in vec.items():
            mat = self._projections.get(name)
            if mat is None:
                gen = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "projection", name))
                mat = torch.randn((d, v.numel()), generator=gen, dtype=torch.float64)
                self._projections[name] = mat
            out += mat @ v.detach().cpu().double().flatten()
        return out / math.sqrt(d)

    def dpo_gradient(self, chunk: list[PreferencePair]) -> dict[str, torch.Tensor]:
        """``∇L_DPO(z)`` on the adapter's tensors at θ (reference = θ, as in the step itself): one forward
        and backward per pair, the reference log-probs being the forward's own (see
        :func:`~dits.train.step.dpo_loss`)."""
        from dits.train.step import backward_dpo

        with self._grad_on_adapter() as params:
            for p in params.values():
                p.grad = None
            try:
                backward_dpo(self.engine, chunk, self.cfg.beta)  # one pair's graph at a time
                return {
                    n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().clone()
                    for n, p in params.items()
                }
            finally:
                for p in params.values():
                    p.grad = None

    def _score_chunk(self, chunk: list[PreferencePair]) -> tuple[float, dict[str, float]]:
        grad = self.dpo_gradient(chunk)
        lr = self.cfg.lr
        if self.cfg.step_geometry == "optimizer" and self.cfg.optimizer == "adamw":
            update = {n: -lr * g / (g.abs() + _ADAM_EPS) for n, g in grad.items()}
        else:
            update = {n: -lr * g for n, g in grad.items()}
        if self.cfg.projection_dim:
            projected = self._project(update)
            if self._val_proj is None:  # (after the update's projection, which resets it on a new key)
                self._val_proj = self._project(self.val_grad)
            value = float(projected @ self._val_proj)
        else:
            value = float(
                sum((u.double() * self.val_grad[n].double().to(u.device)).sum() for n, u in update.items())
            )
        norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grad.values()))
        return value, {"dpo_grad_norm": norm}
