"""Untrained baselines, all batched: single-agent chain of thought, self-consistency, multi-agent debate.

They return the same :class:`Transcript` record as the two-agent protocol so evaluation, summaries and
reports treat every method alike.
"""

from __future__ import annotations

from collections.abc import Sequence

from dits.engine.base import Engine, SamplingParams, View
from dits.mas.dialogue import Transcript, Turn
from dits.mas.protocol import ProtocolConfig, answer_format, task_message
from dits.seeding import derive_seed
from dits.tasks.answers import fallback_answer, parse_answer
from dits.tasks.example import Example
from dits.tasks.metrics import answers_agree, score_answer

_COT_RULES = (
    "Answer the question. Think step by step in a few short lines, then give the final answer as {fmt}."
)
_COT_EXAMPLE = (
    "Example:\nQuestion: Tom has 3 bags with 4 apples each. He eats 2. How many apples are left?\n"
    "Answer: 3 * 4 = 12 apples. 12 - 2 = 10. {ans}"
)
_DEBATE_FOLLOWUP = (
    "Another agent answered:\n{other}\n\nUse it as extra advice. Check both answers and give your updated "
    "final answer as {fmt}."
)


def single_agent_view(example: Example, cfg: ProtocolConfig) -> View:
    """One agent with everything: the question, the options, and both agents' notes."""
    fmt = answer_format(example)
    ans = r"\boxed{10}" if example.metric == "math" else "<A>10</A>"
    system = _COT_RULES.format(fmt=fmt)
    if cfg.worked_example:
        system += "\n\n" + _COT_EXAMPLE.format(ans=ans)
    user = task_message(example, 0, notes=False)
    notes = "\n".join(c.strip() for c in example.contexts if c.strip())
    if notes:
        user += f"\nNotes:\n{notes}"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def _parse(example: Example, text: str, cfg: ProtocolConfig) -> str | None:
    ans = parse_answer(text, example)
    return fallback_answer(text, example) if ans is None and cfg.fallback_parse else ans


def majority(example: Example, answers: Sequence[str | None]) -> str | None:
    """The most frequent answer, answers counted equal under the metric; ties go to the earliest."""
    groups: list[tuple[str, int]] = []
    for a in answers:
        if a is None:
            continue
        for i, (rep, n) in enumerate(groups):
            if answers_agree(example, a, rep):
                groups[i] = (rep, n + 1)
                break
        else:
            groups.append((a, 1))
    if not groups:
        return None
    best = max(n for _, n in groups)
    return next(rep for rep, n in groups if n == best)


def _transcript(example: Example, turns: list[Turn], answer: str | None) -> Transcript:
    stop = "answered" if answer is not None else "no_answer"
    return Transcript(
        example_id=example.id,
        turns=turns,
        stop_reason=stop,
        answer=answer,
        metric=score_answer(example, answer),
    )


def run_cot(
    engine: Engine,
    examples: Sequence[Example],
    cfg: ProtocolConfig,
    *,
    k: int = 1,
    temperature: float = 0.0,
    seed: int = 0,
    max_new_tokens: int | None = None,
) -> list[Transcript]:
    """Chain of thought (k = 1, greedy) or self-consistency (k samples, majority vote)."""
    views = [single_agent_view(ex, cfg) for ex in examples]
    sp = SamplingParams(
        n=k, temperature=temperature, max_new_tokens=max_new_tokens or cfg.max_new_tokens * 2, seed=seed
    )
    outs = engine.generate(views, sp, seeds=[derive_seed(seed, ex.id) for ex in examples])
    result = []
    for ex, comps in zip(examples, outs, strict=True):
        turns = [
            Turn(
                speaker=0,
                text=c.text.strip(),
                tokens=c.completion_tokens,
                truncated=c.finish_reason == "length",
                answer=_parse(ex, c.text, cfg),
            )
            for c in comps
        ]
        answer = turns[0].answer if k == 1 else majority(ex, [t.answer for t in turns])
        result.append(_transcript(ex, turns, answer))
    return result


def run_debate(
    engine: Engine,
    examples: Sequence[Example],
    cfg: ProtocolConfig,
    *,
    agents: int = 2,
    rounds: int = 2,
    temperature: float = 0.7,
    seed: int = 0,
) -> list[Transcript]:
    """Multi-agent debate (Du et al., 2023), untrained: every agent answers alone, then for ``rounds - 1``
    rounds reads the others' latest answers and updates; the final answer is the majority of the last
    round. Agents sample (``temperature``) so they do not start as identical copies; each agent sees its
    own notes only, the same information constraint as the two-agent protocol."""
    fmt_for = {ex.id: answer_format(ex) for ex in examples}
    base_views = []
    for ex in examples:
        for a in range(agents):
            v = single_agent_view(ex.model_copy(update={"contexts": [ex.contexts[a % 2], ""]}), cfg)
            base_views.append((ex, a, v))
    history: dict[tuple[str, int], list[dict[str, str]]] = {(ex.id, a): list(v) for ex, a, v in base_views}
    turns: dict[str, list[Turn]] = {ex.id: [] for ex in examples}
    latest: dict[tuple[str, int], str] = {}
    for r in range(rounds):
        keys = [(ex, a) for ex, a, _ in base_views]
        if r > 0:
            for ex, a in keys:
                others = "\n\n".join(latest[(ex.id, b)] for b in range(agents) if b != a)
                msg = _DEBATE_FOLLOWUP.format(other=others, fmt=fmt_for[ex.id])
                history[(ex.id, a)].append({"role": "user", "content": msg})
        sp = SamplingParams(temperature=temperature, max_new_tokens=cfg.max_new_tokens * 2)
        outs = engine.generate(
            [history[(ex.id, a)] for ex, a in keys],
            sp,
            seeds=[derive_seed(seed, ex.id, a, r) for ex, a in keys],
        )
        for (ex, a), out in zip(keys, outs, strict=True):
            c = out[0]
            text = c.text.strip()
            latest[(ex.id, a)] = text
            history[(ex.id, a)].append({"role": "assistant", "content": text})
            turns[ex.id].append(
                Turn(
                    speaker=a,
                    text=text,
                    tokens=c.completion_tokens,
                    truncated=c.finish_reason == "length",
                    answer=_parse(ex, text, cfg),
                )
            )
    result = []
    for ex in examples:
        last = turns[ex.id][-agents:]
        result.append(_transcript(ex, turns[ex.id], majority(ex, [t.answer for t in last])))
    return result
