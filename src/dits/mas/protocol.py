"""The two-agent protocol: roles, prompts, and the ONE renderer of what an agent sees.

Generation, SFT rows, DPO prompts, log-prob scoring and evaluation all build views with
:func:`render_view`, so a model is trained on exactly the context layout it is later run with (the
reference implementations rendered contexts one way at inference and another in training data).
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from dits.engine.base import Message, View
from dits.tasks.example import AGENTS, Example


class ProtocolConfig(BaseModel):
    """How the agents talk. Defaults are docs/design.md section 4's."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    max_turns: int = Field(10, ge=1, description="turn limit; hitting it scores the transcript as a failure")
    max_new_tokens: int = Field(64, ge=1, description="an utterance is cut at this many tokens")
    turn_prefix: bool = Field(False, description="force '<Name>:' at the start of every utterance")
    fallback_parse: bool = Field(
        True,
        description="when an utterance has no <A></A> tag, parse a final answer from plain text "
        "(tasks.answers.fallback_answer); only agents whose role gives answers are parsed",
    )
    worked_example: bool = Field(True, description="show short worked examples as earlier chat turns")


_EXCHANGE_RULES = (
    "You are {me}. You and {other} answer a question together. Each of you has private notes that the "
    "other cannot see. Share the fact from your notes that matters in one short sentence. When you know "
    "the answer, give it as <A>answer</A>."
)
_SOLVER_RULES = (
    "You are {me}. Solve the problem step by step in a few short lines. {other} checks your work. "
    "End with the final answer as {fmt}. If {other} finds a mistake, fix it and give the answer again."
)
_CRITIC_RULES = (
    "You are {me}. {other} solves the problem. Check each step of {other}'s reasoning. Point out any "
    "mistake briefly. Do not give the final answer yourself. If every step is right, say that it is right."
)

# Worked examples are rendered as earlier chat turns (user/assistant pairs), not as prose in the system
# prompt: SmolLM2-135M never produced an <A> tag from a prose example but copies the format of earlier
# turns reliably (calibration in benchmarks/task_calibration.py). ``{other}`` is the partner's name.
_EXCHANGE_DEMOS: tuple[tuple[str, str], ...] = (
    ("Question: In which city does Kelo live?\nYour notes:\nMira lives in Tosk.\nKelo lives in Varn.",
     "Kelo lives in Varn. <A>Varn</A>"),
    ("Question: In which city does Sela live?\nYour notes:\nBrom is married to Tiva.",
     "My notes say nothing about Sela."),
    ("Question: In which country does Pum live?\nYour notes:\nGrell is in the country of Dusland.\n\n"
     "{other}: Pum lives in Grell.",
     "Grell is in the country of Dusland. <A>Dusland</A>"),
    ("Question: In which city does Fen live?\nYour notes:\nOra lives in Hask.\n\n"
     "{other}: Fen lives in Lorn. <A>Lorn</A>",
     "<A>Lorn</A>"),
)  # fmt: skip
_SOLVER_DEMOS: tuple[tuple[str, str], ...] = (
    ("Problem: Tom has 3 bags with 4 apples each. He eats 2. How many apples are left?",
     "3 bags of 4 is 3 * 4 = 12. He eats 2, so 12 - 2 = 10. {ans10}"),
    ("Problem: Ann has 5 cards. She buys 6 more. How many cards does she have now?\n\n"
     "{other}: 5 + 6 = 11 is right.",
     "{ans11}"),
)  # fmt: skip
_CRITIC_DEMOS: tuple[tuple[str, str], ...] = (
    ("Problem: Tom has 3 bags with 4 apples each. He eats 2. How many apples are left?\n\n"
     "{other}: 3 * 4 = 12. 12 - 2 = 10. {ans10}",
     "3 * 4 = 12 is right and 12 - 2 = 10 is right."),
    ("Problem: Ann has 5 cards. She buys 6 more. How many cards does she have now?\n\n"
     "{other}: 5 + 6 = 12. {ans12}",
     "5 + 6 = 11, not 12."),
)  # fmt: skip


def answer_format(example: Example) -> str:
    return r"\boxed{answer}" if example.metric == "math" else "<A>answer</A>"


def _tagged(example: Example, value: str) -> str:
    return rf"\boxed{{{value}}}" if example.metric == "math" else f"<A>{value}</A>"


def gives_answers(example: Example, speaker: int) -> bool:
    """Whose utterances are parsed for a final answer: both agents in exchange, only the solver in debate."""
    return example.mode == "exchange" or speaker == 0


def system_prompt(example: Example, speaker: int) -> str:
    me, other = AGENTS[speaker], AGENTS[1 - speaker]
    if example.mode == "exchange":
        return _EXCHANGE_RULES.format(me=me, other=other)
    rules = _SOLVER_RULES if speaker == 0 else _CRITIC_RULES
    return rules.format(me=me, other=other, fmt=answer_format(example))


def demo_messages(example: Example, speaker: int) -> list[Message]:
    """The worked examples as earlier chat turns of this agent (same roles and layout as the real task)."""
    if example.mode == "exchange":
        demos = _EXCHANGE_DEMOS
    else:
        demos = _SOLVER_DEMOS if speaker == 0 else _CRITIC_DEMOS
    fill = {
        "other": AGENTS[1 - speaker],
        **{f"ans{n}": _tagged(example, str(n)) for n in (10, 11, 12)},
    }
    msgs: list[Message] = []
    for user, reply in demos:
        msgs.append({"role": "user", "content": user.format(**fill)})
        msgs.append({"role": "assistant", "content": reply.format(**fill)})
    return msgs


def task_message(example: Example, speaker: int, *, notes: bool = True) -> str:
    """The first user message: the question, the options, and this agent's private notes (``notes=False``:
    none, for a caller that gives the notes itself)."""
    label = "Question" if example.mode == "exchange" else "Problem"
    lines = [f"{label}: {example.question}"]
    if example.choices:
        lines += [f"{chr(65 + i)}. {c}" for i, c in enumerate(example.choices)]
    if example.mode == "exchange" and notes:
        notes = example.contexts[speaker].strip() or "(none)"
        lines.append(f"Your notes:\n{notes}")
    return "\n".join(lines)


def speaker_of(turn_index: int) -> int:
    """Alice (0) speaks first; they alternate."""
    return turn_index % 2


def render_view(example: Example, turns: Sequence[str], speaker: int, cfg: ProtocolConfig) -> View:
    """What ``speaker`` sees before taking the next turn after ``turns``.

    Layout: system (role, rules), the worked examples as earlier turns, then one user message with the
    task and the agent's notes, then the conversation with the agent's own turns as ``assistant`` and
    the partner's as ``user``. The partner's turns that come before the agent's first turn are appended to
    the task message, so roles strictly alternate (some chat templates require it).
    """
    if len(turns) % 2 != speaker:
        turn_of = AGENTS[speaker_of(len(turns))]
        raise ValueError(f"after {len(turns)} turns it is {turn_of}'s turn, not {AGENTS[speaker]}'s")
    other = AGENTS[1 - speaker]
    msgs: list[Message] = [{"role": "system", "content": system_prompt(example, speaker)}]
    if cfg.worked_example:
        msgs += demo_messages(example, speaker)
    user = task_message(example, speaker)
    for i, text in enumerate(turns):
        if speaker_of(i) == speaker:
            msgs.append({"role": "user", "content": user})
            msgs.append({"role": "assistant", "content": own_turn_content(text, speaker, cfg)})
            user = ""
        else:
            line = f"{other}: {text}"
            user = f"{user}\n\n{line}" if user else line
    msgs.append({"role": "user", "content": user})
    return msgs


def turn_prefix(speaker: int, cfg: ProtocolConfig) -> str:
    """Text forced at the start of the agent's turn (part of the prompt, not of the utterance)."""
    return f"{AGENTS[speaker]}:" if cfg.turn_prefix else ""


def prefixed(prefix: str, text: str) -> str:
    """An own turn as the agent's assistant message: the forced prefix (if any), a space, the utterance.

    Generation forces ``prefix`` and the model continues with " text" (stored stripped), so this is the
    exact text the model produced; every consumer (renderer, SFT rows, DPO responses) goes through here."""
    return f"{prefix} {text}" if prefix else text


def own_turn_content(text: str, speaker: int, cfg: ProtocolConfig) -> str:
    return prefixed(turn_prefix(speaker, cfg), text)


def continuation(prefix: str, text: str) -> str:
    """What the model wrote after the forced ``prefix``: the text to score as the completion of a view
    encoded with that prefix. With a prefix it is " text", not the stored (stripped) text: scoring "Alice:"
    + "the" instead of "Alice:" + " the" scores a token the model did not emit."""
    return prefixed(prefix, text)[len(prefix) :]
