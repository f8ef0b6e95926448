"""Engines: one interface (:class:`Engine`), backends ``hf`` (transformers) and ``vllm`` (GPU)."""

from __future__ import annotations

from typing import Any

from dits.engine.base import Completion, Engine, Message, SamplingParams, ScoredCompletion, View

BACKENDS = ("hf", "vllm")


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


__all__ = [
    "BACKENDS",
    "Completion",
    "Engine",
    "Message",
    "SamplingParams",
    "ScoredCompletion",
    "View",
    "make_engine",
]
