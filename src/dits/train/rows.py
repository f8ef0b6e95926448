"""Training rows in TRL's conversational formats, tokenised as TRL tokenises them, and the length check.

The one place a pair or an SFT row becomes what TRL trains on: :func:`preference_rows` (prompt / chosen /
rejected; DPO and the one-step influence probe) and :func:`completion_rows` (prompt / completion; SFT).
The prompt is always the renderer's view (:func:`dits.mas.protocol.render_view`), the responses the agent's
own turns as the renderer writes them (forced turn prefix included), so training sees the layout inference
uses. Lengths are checked before training with the same tokenisation: a row is never cut, it is dropped
and counted (or rejected).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from dits.engine.base import Message, View
from dits.records import PreferencePair

log = logging.getLogger(__name__)

__all__ = [
    "LengthCheck",
    "RowLengths",
    "Rows",
    "TruncationError",
    "as_messages",
    "assistant_turn_text",
    "chat_ids",
    "check_lengths",
    "completion_rows",
    "preference_dataset",
    "preference_rows",
    "row_label",
    "sequence_lengths",
]


Rows = list[dict[str, list[dict[str, str]]]]
"""Rows in one of TRL's conversational formats: a ``prompt`` and the response(s), each a list of messages."""


class TruncationError(ValueError):
    """Rows that do not fit the configured lengths, with ``on_truncation="error"``."""


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


# ---------------------------------------------------------------------------------------------- rows


def row_label(row: Any, i: int) -> str:
    """How a length-check message names a row: its pair or its (example, turn)."""
    if isinstance(row, PreferencePair):
        return f"pair {i} ({row.label})"
    get = row.get if isinstance(row, Mapping) else lambda k, d=None: getattr(row, k, d)
    ex, turn = get("example_id"), get("turn")
    return f"row {i}" + (f" ({ex} turn {turn})" if ex is not None else "")


def preference_rows(
    pairs: Sequence[PreferencePair | Mapping[str, Any]],
) -> Rows:
    """Pairs (:class:`PreferencePair` with a rendered ``prompt``, or ``{"prompt", "chosen", "rejected"}``
    mappings) as TRL conversational preference rows."""
    out = []
    for i, pair in enumerate(pairs):
        if isinstance(pair, PreferencePair):
            if pair.prompt is None:
                raise ValueError(f"{row_label(pair, i)} has no prompt; mine it from a tree of a known task")
            out.append(
                {
                    "prompt": as_messages(pair.prompt, "prompt"),
                    "chosen": assistant(pair.chosen_response),
                    "rejected": assistant(pair.rejected_response),
                }
            )
        else:
            missing = {"prompt", "chosen", "rejected"} - set(pair)
            if missing:
                raise KeyError(f"pair {i} lacks {sorted(missing)}")
            out.append({k: as_messages(pair[k], k) for k in ("prompt", "chosen", "rejected")})
    return out


def preference_dataset(pairs: Sequence[PreferencePair | Mapping[str, Any]]) -> Any:  # -> datasets.Dataset
    """:func:`preference_rows` as the ``datasets.Dataset`` TRL's ``DPOTrainer`` reads (e.g. the
    ``selected.jsonl`` of a select stage, read back with :func:`dits.artifacts.read_jsonl`)."""
    from datasets import Dataset

    return Dataset.from_list(preference_rows(pairs))


def completion_rows(rows: Sequence[Any]) -> Rows:
    """:class:`~dits.records.SftRow` records or ``{"prompt", "completion"}`` mappings as TRL
    prompt-completion rows."""
    out = []
    for i, row in enumerate(rows):
        data = row.model_dump() if isinstance(row, BaseModel) else dict(row)
        if "prompt" not in data or "completion" not in data:
            raise KeyError(f"SFT row {i} needs 'prompt' and 'completion', got {sorted(data)}")
        out.append(
            {
                "prompt": as_messages(data["prompt"], "prompt"),
                "completion": as_messages(data["completion"], "completion"),
            }
        )
    return out


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
