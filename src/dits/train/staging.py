"""Staging the engine's own model for a TRL trainer, and putting the engine back afterwards.

Training happens on the engine's own model, so what is trained is exactly what generates and scores (no second
copy of the weights). A training run must leave the engine as it found it apart from the new adapter, because
the search, the influence estimators and other tests share it. TRL changes a model it is given in a few
places, and :func:`staged_model` undoes each: it patches ``base.forward`` with a fused LM head (restored),
sets the global RNG seeds (restored), turns on train mode (back to eval), may enable gradient checkpointing
(disabled), flips ``requires_grad`` (restored), and, for DPO on a PEFT model, adds a ``"ref"`` adapter
(deleted).

TRL's PEFT path (1.x) trains the adapter named ``"default"`` and, when the model already holds one, copies it
to ``"ref"`` as the DPO reference; so the adapter being trained is staged under ``"default"`` for the run and
saved/reloaded under its real name afterwards. Both names are therefore reserved while training.
"""

from __future__ import annotations

import copy
import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dits.engine.policy import TrainablePolicy
from dits.seeding import derive_seed
from dits.train.config import TrainConfig

log = logging.getLogger(__name__)

__all__ = ["REF_ADAPTER", "TRAIN_ADAPTER", "load_result", "staged_model"]

TRAIN_ADAPTER = "default"
"""Name the adapter being trained has during a run (TRL's PEFT code path expects it)."""
REF_ADAPTER = "ref"
"""Name TRL's DPOTrainer gives the frozen copy of the start adapter (the reference policy)."""


def _stage_adapter(engine: TrainablePolicy, cfg: TrainConfig, init_adapter: str | None) -> None:
    """Put the start policy under ``"default"``: a fresh LoRA, a copy of a loaded adapter, or a saved one.

    A fresh LoRA is seeded from ``train.seed``, not the process's global generator, so a trained adapter
    depends only on its config and data, whether the run was resumed or not."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    if init_adapter is None:
        engine.add_adapter(TRAIN_ADAPTER, cfg.lora.to_peft(), seed=derive_seed(cfg.seed, "lora-init"))
    elif init_adapter in engine.adapter_names():
        src_cfg = copy.deepcopy(engine.adapter_config(init_adapter))
        src_cfg.inference_mode = False
        engine.add_adapter(TRAIN_ADAPTER, src_cfg)
        state = get_peft_model_state_dict(engine.model, adapter_name=init_adapter)
        set_peft_model_state_dict(engine.model, state, adapter_name=TRAIN_ADAPTER)
    elif (Path(init_adapter) / "adapter_config.json").is_file():
        engine.load_adapter(TRAIN_ADAPTER, str(init_adapter))
        engine.adapter_config(TRAIN_ADAPTER).inference_mode = False
    else:
        raise KeyError(
            f"init_adapter {init_adapter!r} is neither a loaded adapter {engine.adapter_names()} nor a "
            "directory with an adapter_config.json"
        )
    engine.set_adapter(TRAIN_ADAPTER)
    trainable = {id(p) for p in engine.adapter_parameters(TRAIN_ADAPTER).values()}
    for p in engine.model.parameters():  # the staged adapter and nothing else (restored on exit)
        p.requires_grad_(id(p) in trainable)


def _rng_state() -> tuple[Any, ...]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[Any, ...]) -> None:
    py, npy, cpu, cuda = state
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


@contextmanager
def staged_model(engine: TrainablePolicy, cfg: TrainConfig, init_adapter: str | None) -> Iterator[Any]:
    """The model a TRL trainer should train, and on exit the engine restored (see the module docstring).

    LoRA: ``engine.model`` with the start adapter staged as ``"default"`` and active. Full fine-tuning:
    ``engine.base`` itself (which then stays changed: that is the point)."""
    base = engine.base
    prev_active = engine.active_adapter
    had_peft = bool(engine.adapter_names())
    forward_patch = base.__dict__.get("forward")
    grad_flags = {id(p): p.requires_grad for p in engine.model.parameters()}
    rng = _rng_state()
    if cfg.full_finetune:
        if init_adapter is not None:
            raise ValueError("init_adapter is for LoRA training; full fine-tuning trains the base in place")
        if had_peft:
            raise ValueError(
                f"full fine-tuning needs an engine without LoRA adapters (loaded: {engine.adapter_names()}): "
                "their layers sit inside the base model and would be trained or saved with it"
            )
        engine.hold_master_weights()
    else:
        taken = [n for n in (TRAIN_ADAPTER, REF_ADAPTER) if n in engine.adapter_names()]
        if taken:
            raise ValueError(
                f"adapter names {taken} are reserved for training; load adapters under other names"
            )
    try:
        if cfg.full_finetune:
            yield engine.base
        else:
            _stage_adapter(engine, cfg, init_adapter)
            yield engine.model
    finally:
        _restore(engine, base, forward_patch, grad_flags, prev_active, cfg)
        _set_rng_state(rng)


def _restore(
    engine: TrainablePolicy,
    base: Any,
    forward_patch: Any,
    grad_flags: dict[int, bool],
    prev_active: str | None,
    cfg: TrainConfig,
) -> None:
    if forward_patch is None:
        base.__dict__.pop("forward", None)  # TRL's fused-LM-head patch
    else:
        base.forward = forward_patch
    if cfg.sft.gradient_checkpointing or cfg.dpo.gradient_checkpointing:
        disable = (
            getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable
        )
        disable()
        if getattr(base, "_require_grads_hook", None) is not None:
            base.disable_input_require_grads()
    for name in (REF_ADAPTER, TRAIN_ADAPTER):  # deleting the last adapter takes the LoRA layers out again
        if name in engine.adapter_names():
            engine.delete_adapter(name)
    for p in engine.model.parameters():
        flag = grad_flags.get(id(p))
        if flag is not None:
            p.requires_grad_(flag)
    engine.model.eval()
    if prev_active is not None and prev_active not in engine.adapter_names():
        log.warning("adapter %r active before training no longer exists; no adapter is active", prev_active)
        prev_active = None
    engine.set_adapter(prev_active)


def load_result(engine: TrainablePolicy, name: str, path: Path) -> None:
    """Load a saved adapter under ``name``, replacing an adapter of that name."""
    if name in (TRAIN_ADAPTER, REF_ADAPTER):
        raise ValueError(f"adapter name {name!r} is reserved for training")
    if name in engine.adapter_names():
        if engine.active_adapter == name:
            engine.set_adapter(None)
        engine.delete_adapter(name)
    engine.load_adapter(name, str(path))
