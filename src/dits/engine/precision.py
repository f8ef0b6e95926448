"""Which numeric precision runs where: ``engine.dtype: auto`` and the mixed-precision rule.

``engine.dtype`` is the *compute* dtype: what matrix products run in. ``auto`` (the default) is bf16 where the
device computes bf16 products natively (a CUDA GPU that supports it; a CPU whose flags include ``amx_bf16``
or ``avx512_bf16``, e.g. Xeon Sapphire Rapids / Cooper Lake, AMD Zen 4), float32 elsewhere: on a CPU without
those units torch emulates bf16 and it is slower than float32. The flags are read, never assumed.

Weights that are trained stay float32 ("master weights") whatever the compute dtype, so that an update of
5e-7 is not rounded away (bf16 keeps 8 significant bits: its spacing near 0.01 is about 6e-5):

- LoRA: the frozen base is stored in the compute dtype, the adapters in float32 (PEFT's
  ``autocast_adapter_dtype``); TRL trains under bf16 autocast (``TrainingArguments.bf16``).
- Full fine-tuning: the base itself is trained, so it is stored in float32 and every forward runs under
  ``torch.autocast`` to the compute dtype (the engine's own forwards and TRL's alike).
"""

from __future__ import annotations

import functools
import platform
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

__all__ = [
    "DTYPES",
    "HALF",
    "autocast",
    "bf16_flags_in",
    "cpu_bf16_flags",
    "cpu_has_native_bf16",
    "resolve_device",
    "resolve_dtype",
    "weights_dtype",
]

DTYPES = ("auto", "float32", "bfloat16", "float16")
HALF = ("bfloat16", "float16")
_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def bf16_flags_in(cpuinfo: str) -> frozenset[str]:
    """The flags among ``amx_bf16`` / ``avx512_bf16`` on the ``flags`` lines of a ``/proc/cpuinfo`` text."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags.update(value.split())
    return frozenset(f for f in _BF16_CPU_FLAGS if f in flags)


@functools.cache
def cpu_bf16_flags() -> frozenset[str]:
    """This CPU's bf16 flags (Linux x86); empty where ``/proc/cpuinfo`` does not exist (other systems:
    float32, the safe choice)."""
    try:
        return bf16_flags_in(Path("/proc/cpuinfo").read_text())
    except OSError:
        return frozenset()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products in hardware (AMX or AVX512-BF16), on x86-64."""
    return platform.machine().lower() in ("x86_64", "amd64") and bool(cpu_bf16_flags())


def resolve_device(device: str | None) -> str:
    """The device an engine runs on: ``device``, or CUDA when there is one, else the CPU."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str, device: str | None = None) -> str:
    """``auto`` → ``bfloat16`` where ``device`` computes it natively, else ``float32``; others unchanged."""
    if dtype != "auto":
        return dtype
    dev = resolve_device(device)
    if dev.startswith("cuda"):
        native = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    elif dev.startswith("cpu"):
        native = cpu_has_native_bf16()
    else:  # mps, xpu, ...: not measured here
        native = False
    return "bfloat16" if native else "float32"


def weights_dtype(compute: str, trainable_base: bool) -> str:
    """The dtype the base weights are stored in: float32 when they are trained (full fine-tuning) and the
    compute is half precision (master weights), else the compute dtype."""
    return "float32" if trainable_base and compute in HALF else compute


def autocast(device: str, compute: str, weights: str) -> AbstractContextManager[object]:
    """``torch.autocast`` to ``compute`` when the weights are stored wider than the compute, else nothing."""
    if compute == weights:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=getattr(torch, compute))
