"""The ``engine`` section of a run config: which backend, which model, how it batches."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from dits.engine.precision import resolve_dtype
from dits.registry import Registry

if TYPE_CHECKING:
    from dits.engine.base import Engine

__all__ = ["BACKENDS", "Backend", "EngineConfig"]


@dataclass(frozen=True)
class Backend:
    """How a backend is built: ``make(model, **options)`` (importing its library only when called), the
    options a config section gives it (``options(cfg, lora_rank, trainable_base)``), and whether the engine
    it builds also trains (else an ``hf`` copy of the same weights is the trainable side)."""

    make: Callable[..., Engine]
    options: Callable[[EngineConfig, int, bool], dict[str, Any]]
    trains: bool


BACKENDS: Registry[Backend] = Registry("engine.backend")
"""Every engine backend by name (:mod:`dits.engine` registers ``hf`` and ``vllm``)."""


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    backend: Annotated[str, AfterValidator(BACKENDS.check)] = "hf"
    model: str = "smollm2-135m"
    device: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="compute dtype; auto: bfloat16 where the device computes it natively (CUDA, a CPU with "
        "AMX or AVX512-BF16), else float32. Resolved when the config is read, so a run records the dtype "
        "it ran in. Trained weights stay float32 (dits.engine.precision)",
    )
    token_budget: int = Field(32768, ge=256)
    max_batch: int = Field(64, ge=1)
    trust_remote_code: bool = False
    # vLLM only (engine.backend: vllm); see dits.engine.vllm.VLLMSettings.
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    kv_cache_gib: float = Field(2.0, gt=0)
    max_model_len: int | None = Field(None, ge=256)
    max_lora_rank: int | None = Field(
        None,
        ge=1,
        description="largest LoRA rank vLLM serves; None: the run's train.lora.r (vLLM's CPU LoRA kernels "
        "cost in proportion to it, so serving a larger rank than the run trains slows decoding)",
    )
    max_loras: int = Field(1, ge=1, description="adapters vLLM runs in one batch (dits uses one at a time)")

    @model_validator(mode="after")
    def _resolve_dtype(self) -> EngineConfig:
        if self.dtype == "auto":
            object.__setattr__(self, "dtype", resolve_dtype("auto", self.device))  # frozen: set once, here
        return self

    def identity(self) -> dict[str, str]:
        """What decides the model's outputs (not its batching): part of every stage's inputs."""
        return {"backend": self.backend, "model": self.model, "dtype": self.dtype}
