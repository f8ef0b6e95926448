"""Engines: one interface (:class:`Engine`), backends ``hf`` (transformers) and ``vllm`` (GPU).

A new backend implements :class:`~dits.engine.base.Engine` (generate, score, adapters) in its own module
here and is added to :func:`make_engine`; to be trained in-process it also implements
:class:`~dits.engine.policy.TrainablePolicy`.
"""

from __future__ import annotations

from typing import Any

from dits.engine.base import Completion, Engine, Message, SamplingParams, ScoredCompletion, View
from dits.engine.config import BACKENDS, EngineConfig
from dits.ledger import Ledger


def make_engine(backend: str = "hf", model: str = "smollm2-135m", **kwargs: Any) -> Engine:
    """Build an engine by backend name; the vLLM import happens only when asked for."""
    if backend == "hf":
        from dits.engine.hf import HFEngine

        return HFEngine(model, **kwargs)
    if backend == "vllm":
        # The interface is backend-neutral (views in, completions/log-probs out, adapters by name); the
        # vLLM backend is not written yet and nothing may pretend otherwise.
        raise NotImplementedError("engine.backend 'vllm' is not implemented yet; use 'hf'")
    raise ValueError(f"engine.backend must be one of {list(BACKENDS)}, got {backend!r}")


def engine_from_config(
    cfg: EngineConfig, *, model: str | None = None, ledger: Ledger | None = None
) -> Engine:
    """The engine a config section names; ``model`` replaces its model (a full fine-tune's directory),
    ``ledger`` makes the new engine charge an existing account."""
    kwargs: dict[str, Any] = {
        "dtype": cfg.dtype,
        "trust_remote_code": cfg.trust_remote_code,
        "ledger": ledger,
    }
    if cfg.backend == "hf":
        kwargs.update(device=cfg.device, token_budget=cfg.token_budget, max_batch=cfg.max_batch)
    return make_engine(cfg.backend, model or cfg.model, **kwargs)


__all__ = [
    "BACKENDS",
    "Completion",
    "Engine",
    "EngineConfig",
    "Message",
    "SamplingParams",
    "ScoredCompletion",
    "View",
    "engine_from_config",
    "make_engine",
]
