"""What SFT and DPO share: tokenising as TRL does, the length check, staging the model, the result record.

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
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from dits.engine.base import Message, View
from dits.mas.protocol import ProtocolConfig, own_turn_content
from dits.search.pairs import PairCandidate
from dits.train.config import TrainConfig

log = logging.getLogger(__name__)

__all__ = [
    "REF_ADAPTER",
    "TRAIN_ADAPTER",
    "LengthCheck",
    "TrainResult",
    "TruncationError",
    "adapter_parameters",
    "assistant_turn_text",
    "chat_ids",
    "sequence_lengths",
]

TRAIN_ADAPTER = "default"
"""Name the adapter being trained has during a run (TRL's PEFT code path expects it)."""
REF_ADAPTER = "ref"
"""Name TRL's DPOTrainer gives the frozen copy of the start adapter (the reference policy)."""


class TruncationError(ValueError):
    """Rows that do not fit the configured lengths, with ``on_truncation="error"``."""


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


# ---------------------------------------------------------------------------------------------- tokenising


def chat_ids(
    tokenizer: Any, messages: Sequence[Message], *, add_generation_prompt: bool = False
) -> list[int]:
    """Token ids of chat-templated messages, exactly as TRL's dataset preparation makes them."""
    out = tokenizer.apply_chat_template(
        [dict(m) for m in messages],
        tokenize=True,
        return_dict=True,
        add_generation_prompt=add_generation_prompt,
    )
    return list(out["input_ids"])


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def sequence_lengths(
    tokenizer: Any, prompt: Sequence[Message], completions: Sequence[Sequence[Message]]
) -> tuple[int, list[int]]:
    """(prompt tokens, full length of prompt + each completion), with TRL's rule that the completion starts
    where the tokenised prompt and prompt + completion first differ."""
    head = chat_ids(tokenizer, prompt, add_generation_prompt=True)
    fulls = [chat_ids(tokenizer, [*prompt, *c]) for c in completions]
    return min(common_prefix(head, f) for f in fulls), [len(f) for f in fulls]


def assistant_turn_text(tokenizer: Any, view: View, content: str) -> str:
    """The text the chat template appends for an assistant turn after ``view``: the content and the
    end-of-turn marker. Scoring this (not the bare content) is what TRL's losses see: the model also learns
    where to stop."""
    head = tokenizer.apply_chat_template(list(view), add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(
        [*view, {"role": "assistant", "content": content}], add_generation_prompt=False, tokenize=False
    )
    if not full.startswith(head):
        raise ValueError("the chat template renders the prompt differently when a reply follows it")
    return full[len(head) :]


def assistant(content: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": content}]


# ---------------------------------------------------------------------------------------------- pairs


def pair_contents(pair: PairCandidate, protocol: ProtocolConfig | None = None) -> tuple[str, str]:
    """The assistant-message texts of a pair's chosen and rejected turns (forced turn prefix included)."""
    cfg = protocol or ProtocolConfig()
    return own_turn_content(pair.chosen, pair.speaker, cfg), own_turn_content(
        pair.rejected, pair.speaker, cfg
    )


def pair_label(pair: Any, i: int) -> str:
    if isinstance(pair, PairCandidate):
        return f"pair {i} (tree {pair.tree_task_id} node {pair.node_id})"
    return f"pair {i}"


def dpo_dataset_rows(
    pairs: Sequence[PairCandidate | Mapping[str, Any]], protocol: ProtocolConfig | None = None
) -> list[dict[str, list[dict[str, str]]]]:
    """Pairs (``PairCandidate`` with a rendered ``prompt``, or ``{"prompt", "chosen", "rejected"}`` mappings)
    as TRL conversational preference rows."""
    out = []
    for i, pair in enumerate(pairs):
        if isinstance(pair, PairCandidate):
            if pair.prompt is None:
                raise ValueError(f"{pair_label(pair, i)} has no prompt; mine pairs with render= to fill it")
            chosen, rejected = pair_contents(pair, protocol)
            out.append(
                {
                    "prompt": as_messages(pair.prompt, "prompt"),
                    "chosen": assistant(chosen),
                    "rejected": assistant(rejected),
                }
            )
        else:
            missing = {"prompt", "chosen", "rejected"} - set(pair)
            if missing:
                raise KeyError(f"pair {i} lacks {sorted(missing)}")
            out.append({k: as_messages(pair[k], k) for k in ("prompt", "chosen", "rejected")})
    return out


# ---------------------------------------------------------------------------------------------- lengths


class LengthCheck(BaseModel):
    """Outcome of checking every row against the length limits before training."""

    model_config = ConfigDict(extra="forbid")

    total: int
    kept: list[int]
    dropped: list[str]
    """Label and reason of each row that would have been truncated (dropped, or reported in the error)."""
    max_length: int
    """The limit the trainer runs with: the configured one, or the longest kept row."""
    max_prompt_length: int | None = None
    kept_tokens: int = 0
    """Tokens of the kept rows' sequences (prompt counted once per sequence), one epoch."""
    kept_completion_tokens: int = 0


@dataclass
class RowLengths:
    label: str
    prompt: int
    sequences: list[int]
    names: tuple[str, ...] = ("completion",)


def check_lengths(
    rows: Sequence[RowLengths],
    *,
    max_length: int | None,
    max_prompt_length: int | None,
    on_truncation: Literal["drop", "error"],
    what: str,
) -> LengthCheck:
    """Which rows fit. A row is never cut: one that would be (or whose response would be empty) is dropped,
    or with ``on_truncation="error"`` named in a :class:`TruncationError`."""
    kept: list[int] = []
    dropped: list[str] = []
    for i, r in enumerate(rows):
        reasons = []
        if max_prompt_length is not None and r.prompt > max_prompt_length:
            reasons.append(f"prompt is {r.prompt} tokens > max_prompt_length {max_prompt_length}")
        for name, n in zip(r.names, r.sequences, strict=True):
            if n <= r.prompt:
                reasons.append(f"{name} is empty after tokenisation")
            elif max_length is not None and n > max_length:
                reasons.append(f"prompt+{name} is {n} tokens > max_length {max_length}")
        if reasons:
            dropped.append(f"{r.label}: {'; '.join(reasons)}")
        else:
            kept.append(i)
    if dropped and on_truncation == "error":
        shown = "\n  ".join(dropped[:10]) + (
            f"\n  ... and {len(dropped) - 10} more" if len(dropped) > 10 else ""
        )
        raise TruncationError(f"{len(dropped)} of {len(rows)} {what}s do not fit:\n  {shown}")
    if not kept:
        raise TruncationError(f"no {what} fits the length limits ({len(rows)} given): {dropped[:3]}")
    if dropped:
        log.warning(
            "dropping %d of %d %ss that would be truncated: %s", len(dropped), len(rows), what, dropped[:3]
        )
    longest = max(max(rows[i].sequences) for i in kept)
    return LengthCheck(
        total=len(rows),
        kept=kept,
        dropped=dropped,
        max_length=max_length if max_length is not None else longest,
        max_prompt_length=max_prompt_length,
        kept_tokens=sum(sum(rows[i].sequences) for i in kept),
        kept_completion_tokens=sum(n - rows[i].prompt for i in kept for n in rows[i].sequences),
    )


# ---------------------------------------------------------------------------------------------- adapters


def is_peft(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def adapter_names(engine: Any) -> list[str]:
    return list(engine.model.peft_config) if is_peft(engine.model) else []


def adapter_parameters(engine: Any, name: str) -> dict[str, torch.nn.Parameter]:
    """The trainable tensors of one adapter (LoRA A/B, and any modules-to-save copies), by parameter name.

    Found through PEFT's own per-layer registries rather than by matching names, so an adapter called e.g.
    ``"model"`` cannot capture the base weights."""
    model = engine.model
    if not is_peft(model) or name not in model.peft_config:
        raise KeyError(f"unknown adapter {name!r}; loaded adapters: {adapter_names(engine)}")
    wanted: set[int] = set()
    for module in model.modules():
        for layer_name in getattr(module, "adapter_layer_names", ()):
            holder: Any = module
            for part in layer_name.split("."):
                holder = getattr(holder, part, None)
            if isinstance(holder, torch.nn.ModuleDict) and name in holder:
                wanted.update(id(p) for p in holder[name].parameters())
            elif isinstance(holder, torch.nn.ParameterDict) and name in holder:
                wanted.add(id(holder[name]))
    params = {n: p for n, p in model.named_parameters() if id(p) in wanted}
    if not params:
        raise ValueError(f"adapter {name!r} has no trainable tensors")
    return params


def _stage_adapter(engine: Any, cfg: TrainConfig, init_adapter: str | None) -> None:
    """Put the start policy under ``"default"``: a fresh LoRA, a copy of a loaded adapter, or a saved one."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    if init_adapter is None:
        engine.add_adapter(TRAIN_ADAPTER, cfg.lora.to_peft())
    elif init_adapter in adapter_names(engine):
        src_cfg = copy.deepcopy(engine.model.peft_config[init_adapter])
        src_cfg.inference_mode = False
        engine.add_adapter(TRAIN_ADAPTER, src_cfg)
        state = get_peft_model_state_dict(engine.model, adapter_name=init_adapter)
        set_peft_model_state_dict(engine.model, state, adapter_name=TRAIN_ADAPTER)
    elif (Path(init_adapter) / "adapter_config.json").is_file():
        engine.load_adapter(TRAIN_ADAPTER, str(init_adapter))
        engine.model.peft_config[TRAIN_ADAPTER].inference_mode = False
    else:
        raise KeyError(
            f"init_adapter {init_adapter!r} is neither a loaded adapter {adapter_names(engine)} nor a "
            "directory with an adapter_config.json"
        )
    engine.set_adapter(TRAIN_ADAPTER)
    trainable = {id(p) for p in adapter_parameters(engine, TRAIN_ADAPTER).values()}
    for p in engine.model.parameters():  # the staged adapter and nothing else (restored on exit)
        p.requires_grad_(id(p) in trainable)


@dataclass
class Staged:
    """What a trainer is given, and what the run has to undo."""

    model: Any
    full_finetune: bool
    counts: dict[str, int] = field(
        default_factory=lambda: {"trained": 0, "ref_prompt": 0, "ref_completion": 0}
    )


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
def staged_model(engine: Any, cfg: TrainConfig, init_adapter: str | None) -> Iterator[Staged]:
    """The model a TRL trainer should train, and on exit the engine restored (see the module docstring).

    LoRA: ``engine.model`` with the start adapter staged as ``"default"`` and active. Full fine-tuning:
    ``engine.base`` itself (which then stays changed: that is the point)."""
    base = engine.base
    prev_active = engine.active_adapter
    had_peft = is_peft(engine.model)
    forward_patch = base.__dict__.get("forward")
    grad_flags = {id(p): p.requires_grad for p in engine.model.parameters()}
    rng = _rng_state()
    if cfg.full_finetune:
        if init_adapter is not None:
            raise ValueError("init_adapter is for LoRA training; full fine-tuning trains the base in place")
        if had_peft:
            raise ValueError(
                f"full fine-tuning needs an engine without LoRA adapters (loaded: {adapter_names(engine)}): "
                "their layers sit inside the base model and would be trained or saved with it"
            )
        staged = Staged(model=base, full_finetune=True)
    else:
        taken = [n for n in (TRAIN_ADAPTER, REF_ADAPTER) if n in adapter_names(engine)]
        if taken:
            raise ValueError(
                f"adapter names {taken} are reserved for training; load adapters under other names"
            )
        staged = Staged(model=None, full_finetune=False)
    try:
        if not cfg.full_finetune:
            _stage_adapter(engine, cfg, init_adapter)
            staged.model = engine.model
        yield staged
    finally:
        _restore(engine, base, forward_patch, grad_flags, prev_active, cfg)
        _set_rng_state(rng)


def _restore(
    engine: Any,
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
    if is_peft(engine.model):
        keep = [n for n in engine.model.peft_config if n not in (TRAIN_ADAPTER, REF_ADAPTER)]
        if keep:  # make a surviving adapter PEFT's active one first, or deleting the active one warns
            engine.model.set_adapter(keep[0])
        for name in (REF_ADAPTER, TRAIN_ADAPTER):
            if name in engine.model.peft_config:
                engine.model.delete_adapter(name)
        if not engine.model.peft_config:
            # Nothing else lives in the PEFT wrapper (we created it, or emptied it): take the LoRA layers out
            # again, so the engine is back to the plain base (a PeftModel with no adapter cannot run).
            engine.model = engine.model.unload()
    for p in engine.model.parameters():
        flag = grad_flags.get(id(p))
        if flag is not None:
            p.requires_grad_(flag)
    engine.model.eval()
    if prev_active is not None and prev_active not in adapter_names(engine):
        log.warning("adapter %r active before training no longer exists; no adapter is active", prev_active)
        prev_active = None
    engine.set_adapter(prev_active)


def load_result(engine: Any, name: str, path: Path) -> None:
    """Load a saved adapter under ``name``, replacing an adapter of that name."""
    if name in (TRAIN_ADAPTER, REF_ADAPTER):
        raise ValueError(f"adapter name {name!r} is reserved for training")
    if name in adapter_names(engine):
        if engine.active_adapter == name:
            engine.set_adapter(None)
        engine.model.delete_adapter(name)
    engine.load_adapter(name, str(path))


# ---------------------------------------------------------------------------------------------- trainer args


def trainer_kwargs(engine: Any, section: Any, cfg: TrainConfig, work_dir: str) -> dict[str, Any]:
    """``TrainingArguments`` fields both trainers get: no checkpoints, no reporting, the engine's device,
    the model's own dtype (no autocast), a log entry per step."""
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
        "bf16": False,
        "fp16": False,
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
    engine: Any,
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
    import time

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
    result.save(out / "train_result.json")
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


def as_messages(value: Any, what: str) -> list[dict[str, str]]:
    """Chat messages from messages, or, for a completion (not a prompt), from its text."""
    if isinstance(value, str) and what != "prompt":
        return assistant(value)
    if (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and all(isinstance(m, Mapping) for m in value)
    ):
        return [dict(m) for m in value]
    allowed = "a list of chat messages (the renderer's view)" if what == "prompt" else "text or chat messages"
    raise TypeError(f"{what} must be {allowed}, got {type(value).__name__}")
