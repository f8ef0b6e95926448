"""θ, the adapter an estimator is prepared on: a named LoRA on the engine.

θ must be a LoRA because the one-step probe trains an adapter's tensors and copies them back. For the
base model, :func:`probe_adapter` adds a fresh LoRA with B = 0 (the same function as the base), its A
drawn from a seeded generator so that a rerun builds the same θ and a resumed scoring run can check it
(:func:`adapter_digest`) instead of silently mixing scores of two different probes.
"""

from __future__ import annotations

import hashlib

import torch

from dits.engine.policy import TrainablePolicy
from dits.train.config import LoraSettings

__all__ = ["PROBE_ADAPTER", "adapter_digest", "probe_adapter"]

PROBE_ADAPTER = "influence-probe"


def probe_adapter(
    engine: TrainablePolicy, lora: LoraSettings, *, seed: int, name: str = PROBE_ADAPTER
) -> str:
    """Add (or re-create) a fresh LoRA ``name`` whose initialisation depends only on ``seed``; it is not
    made active. Returns the name."""
    if name in engine.adapter_names():
        engine.delete_adapter(name)
    engine.add_adapter(name, lora.to_peft(), seed=seed)
    engine.model.eval()
    return name


def adapter_digest(engine: TrainablePolicy, name: str) -> str:
    """A short hash of an adapter's tensors (names and exact bytes): θ's identity in a manifest."""
    h = hashlib.sha256()
    for pname, p in sorted(engine.adapter_parameters(name).items()):
        h.update(pname.encode())
        h.update(str(p.dtype).encode())
        h.update(p.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
