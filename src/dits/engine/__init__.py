"""Engines: one interface (:class:`Engine`), backends ``hf`` (transformers) and ``vllm`` (vLLM, CUDA or CPU).

A new backend implements :class:`~dits.engine.base.Engine` (generate, score, adapters, close) in its own
module here and is registered once in :data:`BACKENDS` below (how to build it, which config options it
takes); to be trained in-process it also implements :class:`~dits.engine.policy.TrainablePolicy`.
"""

from __future__ import annotations

from typing import Any

from dits.engine.base import Completion, Engine, Message, SamplingParams, ScoredCompletion, View
from dits.engine.config import BACKENDS, Backend, EngineConfig
from dits.engine.policy import TrainablePolicy
from dits.ledger import Ledger


def _hf(model: str, **options: Any) -> Engine:
    from dits.engine.hf import HFEngine

    return HFEngine(model, **options)


def _hf_options(cfg: EngineConfig, lora_rank: int, trainable_base: bool) -> dict[str, Any]:
    return {"device": cfg.device, "token_budget": cfg.token_budget, "max_batch": cfg.max_batch,
            "trainable_base": trainable_base}  # fmt: skip


def _vllm(model: str, **options: Any) -> Engine:
    from dits.engine.vllm import VLLMEngine, VLLMSettings

    ledger = options.pop("ledger", None)
    return VLLMEngine(model, VLLMSettings(**options), ledger=ledger)


def _vllm_options(cfg: EngineConfig, lora_rank: int, trainable_base: bool) -> dict[str, Any]:
    return {
        "device": cfg.device,
        "max_num_seqs": cfg.max_batch,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "kv_cache_gib": cfg.kv_cache_gib,
        "max_model_len": cfg.max_model_len,
        "max_lora_rank": cfg.max_lora_rank or lora_rank,
        "max_loras": cfg.max_loras,
    }


BACKENDS.add("hf", Backend(_hf, _hf_options, trains=True))
BACKENDS.add("vllm", Backend(_vllm, _vllm_options, trains=False))


def make_engine(backend: str = "hf", model: str = "smollm2-135m", **kwargs: Any) -> Engine:
    """Build an engine by backend name (:data:`BACKENDS`); a backend's library is imported only when asked
    for."""
    if backend not in BACKENDS:
        raise ValueError(f"engine.backend must be one of {list(BACKENDS)}, got {backend!r}")
    return BACKENDS[backend].make(model, **kwargs)


def engine_from_config(
    cfg: EngineConfig,
    *,
    model: str | None = None,
    ledger: Ledger | None = None,
    lora_rank: int = 16,
    trainable_base: bool = False,
) -> Engine:
    """The engine a config section names; ``model`` replaces its model (a full fine-tune's directory),
    ``ledger`` makes the new engine charge an existing account, ``lora_rank`` is the rank of the run's
    adapters (what vLLM must serve unless ``engine.max_lora_rank`` says otherwise), ``trainable_base``
    says the run fine-tunes every weight (``hf`` then holds float32 master weights)."""
    backend = BACKENDS[cfg.backend]
    options = {"dtype": cfg.dtype, "trust_remote_code": cfg.trust_remote_code, "ledger": ledger,
               **backend.options(cfg, lora_rank, trainable_base)}  # fmt: skip
    return backend.make(model or cfg.model, **options)


def policy_from_config(
    cfg: EngineConfig, *, model: str | None = None, ledger: Ledger | None = None, trainable_base: bool = False
) -> TrainablePolicy:
    """The trainable side for a config whose generation backend cannot train (``vllm``): an ``hf`` engine
    on the same model, dtype and device (float32 master weights with ``trainable_base``)."""
    from dits.engine.hf import HFEngine

    return HFEngine(
        model or cfg.model,
        device=cfg.device,
        dtype=cfg.dtype,
        trainable_base=trainable_base,
        token_budget=cfg.token_budget,
        max_batch=cfg.max_batch,
        trust_remote_code=cfg.trust_remote_code,
        ledger=ledger,
    )


__all__ = [
    "BACKENDS",
    "Backend",
    "Completion",
    "Engine",
    "EngineConfig",
    "Message",
    "SamplingParams",
    "ScoredCompletion",
    "View",
    "engine_from_config",
    "make_engine",
    "policy_from_config",
]
