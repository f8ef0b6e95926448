"""The trainer base SFT and DPO share, as TRL's own trainers share ``_BaseTrainer``.

:class:`DitsTrainer` is mixed in front of TRL's ``SFTTrainer`` / ``DPOTrainer``. It owns what a run of
either needs around TRL, so each is written once: the length check of the rows (a row that would be cut is
dropped or rejected before TRL sees it), the staging of the engine's own model (a LoRA adapter or the master
weights of full fine-tuning, see :mod:`dits.train.staging`), the count of every token the run pushes
through the model, and the ledger charge of that count when the run ends. A subclass says only what
differs: its TRL class, its row format, its config section and its TRL arguments.

:func:`finish_training` saves what a trainer trained and records the run as a :class:`TrainResult`.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict

from dits.artifacts import TRAIN_RESULT_FILE
from dits.engine.policy import TrainablePolicy
from dits.ledger import Ledger
from dits.train.config import DpoSettings, SftSettings, TrainConfig
from dits.train.rows import LengthCheck, RowLengths, Rows, check_lengths, row_label, sequence_lengths
from dits.train.staging import TRAIN_ADAPTER, load_result, staged_model

__all__ = ["DitsTrainer", "TokenCounts", "TrainResult", "finish_training", "summarise", "trainer_kwargs"]


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


@dataclass
class TokenCounts:
    """Tokens one run pushed through the model, charged to the ledger when the run ends."""

    trained: int = 0
    """Non-padding tokens through the policy's forward + backward."""
    ref_prompt: int = 0
    """DPO: prompt tokens through the reference model (forward only)."""
    ref_completion: int = 0
    """DPO: response tokens through the reference model (forward only)."""

    @property
    def reference(self) -> int:
        return self.ref_prompt + self.ref_completion

    def charge(self, ledger: Ledger) -> None:
        """Book the run in one ledger call: training as trained tokens, the reference forward as scoring."""
        if self.trained or self.reference:
            ledger.charge(
                trained_tokens=self.trained, prompt_tokens=self.ref_prompt, scored_tokens=self.ref_completion
            )


class DitsTrainer:
    """Mixin in front of a TRL trainer class: ``class DitsSFTTrainer(DitsTrainer, SFTTrainer)``.

    Build one with :meth:`staged`, which checks the lengths, stages the engine's model and charges the
    ledger on exit. The instance owns its length check (``dits_lengths``, whose kept rows are exactly the
    dataset it trains on) and its token counts (``dits_counts``, counted in :meth:`compute_loss` on every
    training batch). A subclass sets the class attributes, :meth:`to_rows` and :meth:`trl_config`; it may
    refine :meth:`count_batch` and :meth:`check_staging`."""

    kind: ClassVar[Literal["sft", "dpo"]]
    what: ClassVar[str]
    """How the length check names one row ("SFT row", "pair")."""
    responses: ClassVar[tuple[str, ...]]
    """The row's response keys, each a sequence the length check measures after the prompt."""

    dits_counts: TokenCounts
    dits_lengths: LengthCheck

    def __init__(self, *args: Any, lengths: LengthCheck, **kwargs: Any) -> None:
        from transformers.trainer_callback import PrinterCallback

        self.dits_counts = TokenCounts()
        self.dits_lengths = lengths
        with quiet_datasets():
            super().__init__(*args, **kwargs)
        self.remove_callback(PrinterCallback)  # type: ignore[attr-defined]  # logs stay in the history
        kept = len(self.train_dataset)  # type: ignore[attr-defined]
        if kept != len(lengths.kept):
            raise RuntimeError(f"TRL kept {kept} of {len(lengths.kept)} checked {self.what}s")

    # ------------------------------------------------------------------------------------- per subclass

    @staticmethod
    def to_rows(items: Sequence[Any]) -> Rows:
        """The caller's rows in this trainer's TRL format."""
        raise NotImplementedError

    @staticmethod
    def trl_config(common: dict[str, Any], cfg: TrainConfig, check: LengthCheck) -> Any:
        """TRL's config object from the :func:`trainer_kwargs` both kinds share and the length check."""
        raise NotImplementedError

    def count_batch(self, inputs: Mapping[str, Any]) -> None:
        """Count one training batch: its non-padding tokens go forward and backward through the policy."""
        self.dits_counts.trained += int(inputs["attention_mask"].sum())

    def check_staging(self, engine: TrainablePolicy) -> None:
        """Called once the trainer is built, before it is handed out: raise if TRL set it up wrongly."""

    # ------------------------------------------------------------------------------------- shared

    def compute_loss(
        self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        if self.model.training:  # type: ignore[attr-defined]  # not evaluation
            self.count_batch(inputs)
        return super().compute_loss(  # type: ignore[misc]
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )

    @classmethod
    def section(cls, cfg: TrainConfig) -> SftSettings | DpoSettings:
        """The config section of this kind of run."""
        return cfg.sft if cls.kind == "sft" else cfg.dpo

    @classmethod
    def length_check(
        cls, tokenizer: Any, items: Sequence[Any], cfg: TrainConfig, data: Rows | None = None
    ) -> LengthCheck:
        """Tokenise every row as TRL will and find those that would be truncated (see ``check_lengths``);
        ``data`` is ``to_rows(items)`` where the caller already has it."""
        data = cls.to_rows(items) if data is None else data
        lengths = []
        for i, (item, row) in enumerate(zip(items, data, strict=True)):
            prompt, fulls = sequence_lengths(tokenizer, row["prompt"], [row[k] for k in cls.responses])
            lengths.append(RowLengths(row_label(item, i), prompt, fulls, cls.responses))
        s = cls.section(cfg)
        return check_lengths(
            lengths,
            max_length=s.max_length,
            max_prompt_length=s.max_prompt_length if isinstance(s, DpoSettings) else None,
            on_truncation=s.on_truncation,
            what=cls.what,
        )

    @classmethod
    @contextmanager
    def staged(
        cls, engine: TrainablePolicy, items: Sequence[Any], cfg: TrainConfig, *, init_adapter: str | None
    ) -> Iterator[Self]:
        """A ready trainer on the engine's staged model (not yet trained), over the rows that fit. On exit
        the engine is restored (:func:`~dits.train.staging.staged_model`) and the tokens counted are
        charged to ``engine.ledger``."""
        from datasets import Dataset

        data = cls.to_rows(items)
        check = cls.length_check(engine.tokenizer, items, cfg, data)
        dataset = Dataset.from_list([data[i] for i in check.kept])
        with (
            tempfile.TemporaryDirectory(prefix=f"dits-{cls.kind}-") as work,
            staged_model(engine, cfg, init_adapter) as model,
        ):
            args = cls.trl_config(trainer_kwargs(engine, cls.section(cfg), cfg, work), cfg, check)
            trainer = cls(
                model=model,
                args=args,
                train_dataset=dataset,
                processing_class=engine.tokenizer,
                lengths=check,
            )
            trainer.check_staging(engine)
            try:
                yield trainer
            finally:
                trainer.dits_counts.charge(engine.ledger)


def trainer_kwargs(
    engine: TrainablePolicy, section: SftSettings | DpoSettings, cfg: TrainConfig, work_dir: str
) -> dict[str, Any]:
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


def train_and_save(
    staged: AbstractContextManager[DitsTrainer],
    engine: TrainablePolicy,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    adapter_name: str,
    init_adapter: str | None,
) -> TrainResult:
    """Enter a staged trainer (:meth:`DitsTrainer.staged`), train, and save: the one run of SFT and DPO."""
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with staged as trainer:
        trainer.train()
        return finish_training(
            trainer, engine, cfg, out, adapter_name=adapter_name, init_adapter=init_adapter, started=start
        )


def finish_training(
    trainer: DitsTrainer,
    engine: TrainablePolicy,
    cfg: TrainConfig,
    out: Path,
    *,
    adapter_name: str,
    init_adapter: str | None,
    started: float,
) -> TrainResult:
    """Save what a finished trainer produced (adapter, or full weights), reload it into the engine, and
    record the run as a :class:`TrainResult` in ``out/train_result.json``. Call inside
    :meth:`DitsTrainer.staged` (the engine is restored on leaving it)."""
    check = trainer.dits_lengths
    if cfg.full_finetune:
        engine.base.save_pretrained(out)
        engine.tokenizer.save_pretrained(out)
    else:
        engine.model.save_pretrained(out, selected_adapters=[TRAIN_ADAPTER])
        load_result(engine, adapter_name, out)
    losses, train_loss, history = summarise(trainer)
    state = trainer.state  # type: ignore[attr-defined]
    result = TrainResult(
        kind=trainer.kind,
        path=str(out),
        adapter_name=None if cfg.full_finetune else adapter_name,
        full_finetune=cfg.full_finetune,
        init_adapter=init_adapter,
        rows=len(check.kept),
        truncated=len(check.dropped),
        dropped=check.dropped,
        max_length=check.max_length,
        steps=state.global_step,
        epochs=float(state.epoch or 0.0),
        trained_tokens=trainer.dits_counts.trained,
        reference_tokens=trainer.dits_counts.reference,
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
