"""SFT and DPO on TRL + PEFT, and the one-step DPO probe the influence estimators use.

``rows`` (TRL rows and length checks), ``staging`` (the engine's model staged for a trainer and restored),
``trainer`` (the base both trainers share: length check, staging, token counts and ledger, saving,
:class:`TrainResult`), ``sft`` and ``dpo`` (what each adds to it), ``step`` (the one-step probe), ``config``
(the ``train`` section).

Imported lazily: ``dits.train.config`` is light, the trainers pull in TRL (seconds to import).
"""

from __future__ import annotations

import importlib
from typing import Any

from dits.train.config import DpoSettings, LoraSettings, SftSettings, TrainConfig

_LAZY = {
    "TrainResult": "dits.train.trainer",
    "TruncationError": "dits.train.rows",
    "LengthCheck": "dits.train.rows",
    "preference_dataset": "dits.train.rows",
    "train_sft": "dits.train.sft",
    "sft_trainer": "dits.train.sft",
    "train_dpo": "dits.train.dpo",
    "dpo_trainer": "dits.train.dpo",
    "dpo_loss": "dits.train.step",
    "one_step": "dits.train.step",
    "reference_logps": "dits.train.step",
    "StepHandle": "dits.train.step",
}

__all__ = ["DpoSettings", "LoraSettings", "SftSettings", "TrainConfig", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dits.train' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
