"""What the SFT and DPO runs share around a TRL trainer: its arguments, quieting it, saving what it
trained, and the :class:`TrainResult` record."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from dits.artifacts import TRAIN_RESULT_FILE
from dits.engine.policy import TrainablePolicy
from dits.train.config import TrainConfig
from dits.train.rows import LengthCheck
from dits.train.staging import TRAIN_ADAPTER, load_result

__all__ = ["TrainResult", "finish_training", "quiet_datasets", "quiet_trainer", "summarise", "trainer_kwargs"]


class TrainResult(BaseModel):
    """What one SFT or DPO run did; written next to the adapter as ``train_result.json``."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["sft", "dpo"]
    path: str
    """The saved adapter (PEFT ``save_pretrained``, safetensors), or the whole model with full fine-tuning."""
    adapter_name: str | None
    """Name the adapter is loaded under in the engine (None with full fine-tuning: the base changed)."""
    full_finetune: bool
    init_adapter: str | None = None
    rows: int
    """Rows (SFT) or pairs (DPO) trained on."""
    truncated: int
    """Rows that would have been truncated and were dropped instead."""
    dropped: list[str]
    """Which rows, and why."""
    max_length: int
    steps: int
    epochs: float
    trained_tokens: int
    """Non-padding tokens through forward + backward, summed over every step (so × epochs)."""
    reference_tokens: int = 0
    """DPO: tokens through the reference model (forward only)."""
    loss_history: list[float]
    train_loss: float | None
    seconds: float
    log_history: list[dict[str, float]]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2))


def trainer_kwargs(engine: TrainablePolicy, section: Any, cfg: TrainConfig, work_dir: str) -> dict[str, Any]:
    """``TrainingArguments`` fields both trainers get: no checkpoints, no reporting, the engine's device,
    mixed precision in the engine's compute dtype (autocast over float32 trainable weights: LoRA adapters,
    or the master weights of full fine-tuning), a log entry per step."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    ckpt = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {
        "output_dir": work_dir,
        "per_device_train_batch_size": section.batch_size,
        "gradient_accumulation_steps": section.grad_accum,
        "learning_rate": section.lr,
        "num_train_epochs": section.epochs,
        "max_steps": section.max_steps or -1,
        "lr_scheduler_type": section.lr_scheduler,
        "warmup_steps": section.warmup,
        "weight_decay": section.weight_decay,
        "max_grad_norm": section.max_grad_norm,
        ckpt: section.gradient_checkpointing,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "bf16": engine.dtype == "bfloat16",
        "fp16": engine.dtype == "float16",
        "use_cpu": str(engine.device).startswith("cpu"),
        "dataloader_num_workers": 0,
    }


@contextmanager
def quiet_datasets() -> Iterator[None]:
    """No progress bars from TRL's ``Dataset.map`` calls on a handful of rows."""
    import datasets

    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()


def quiet_trainer(trainer: Any) -> Any:
    """Drop the callback that prints every log dict to stdout (the log history keeps them)."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def finish_training(
    trainer: Any,
    engine: TrainablePolicy,
    cfg: TrainConfig,
    out: Path,
    *,
    kind: Literal["sft", "dpo"],
    adapter_name: str,
    init_adapter: str | None,
    trained_tokens: int,
    reference_tokens: int = 0,
    started: float,
) -> TrainResult:
    """Save what a finished trainer produced (adapter, or full weights), reload it into the engine, and
    record the run as a :class:`TrainResult` in ``out/train_result.json``. Call inside the staging context."""
    check: LengthCheck = trainer.dits_lengths
    if cfg.full_finetune:
        engine.base.save_pretrained(out)
        engine.tokenizer.save_pretrained(out)
    else:
        engine.model.save_pretrained(out, selected_adapters=[TRAIN_ADAPTER])
        load_result(engine, adapter_name, out)
    losses, train_loss, history = summarise(trainer)
    result = TrainResult(
        kind=kind,
        path=str(out),
        adapter_name=None if cfg.full_finetune else adapter_name,
        full_finetune=cfg.full_finetune,
        init_adapter=init_adapter,
        rows=len(check.kept),
        truncated=len(check.dropped),
        dropped=check.dropped,
        max_length=check.max_length,
        steps=trainer.state.global_step,
        epochs=float(trainer.state.epoch or 0.0),
        trained_tokens=trained_tokens,
        reference_tokens=reference_tokens,
        loss_history=losses,
        train_loss=train_loss,
        seconds=time.perf_counter() - started,
        log_history=history,
    )
    result.save(out / TRAIN_RESULT_FILE)
    return result


def summarise(trainer: Any) -> tuple[list[float], float | None, list[dict[str, float]]]:
    """(per-step loss, mean train loss, numeric log entries) from the trainer's log history."""
    history = [
        {k: float(v) for k, v in entry.items() if isinstance(v, int | float)}
        for entry in trainer.state.log_history
    ]
    losses = [e["loss"] for e in history if "loss" in e]
    train_loss = next((e["train_loss"] for e in reversed(history) if "train_loss" in e), None)
    return losses, train_loss, history
