"""Untrained baselines (``dits.baselines``) on scripted engines: the single agent's prompt, the majority vote
worked by hand, chain of thought / self-consistency transcripts, and the debate's rounds (who sees what,
which seeds, the final vote), each against records written out here by hand."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from dits.baselines import majority, run_cot, run_debate, single_agent_view
from dits.engine.base import Completion, SamplingParams, View
from dits.mas.dialogue import Transcript, Turn
from dits.mas.protocol import ProtocolConfig
from dits.seeding import derive_seed
from dits.tasks.example import Example
from tests.fakes import ScriptedEngine
from tests.helpers import EXAMPLES

ZORVATH, KELO = EXAMPLES  # facts (f1): Zorvath lives in Melbrook (Alice's notes); Kelo in Varn (Bob's)
MATH = Example(
    id="m1",
    dataset="math",
    split="test",
    question="What is 2 + 3?",
    answers=["5"],
    contexts=["", ""],
    mode="debate",
    metric="math",
)
NUMERIC = Example(
    id="n1",
    dataset="arith",
    split="test",
    question="What is 6 * 7?",
    answers=["42"],
    contexts=["", ""],
    mode="debate",
    metric="numeric",
)
CFG = ProtocolConfig(max_new_tokens=8, worked_example=False, fallback_parse=False)
"""Only tagged answers count (the f1 fallback would take a whole untagged reply as the answer)."""


class SampledEngine(ScriptedEngine):
    """``replies(view, n, i)`` gives the n sampled texts of the call's i-th view (ScriptedEngine repeats one
    text n times); a copy of every call's views (the debate appends to its histories in place), its
    sampling parameters and seeds are recorded."""

    def __init__(self, replies: Callable[[View, int, int], list[str]]) -> None:
        super().__init__(lambda view: "")
        self.replies = replies
        self.sampled: list[tuple[SamplingParams, list[int] | None]] = []

    def generate(self, views: Sequence[View], sampling: SamplingParams, seeds=None) -> list[list[Completion]]:
        self.calls.append([list(v) for v in views])
        self.sampled.append((sampling, None if seeds is None else list(seeds)))
        out = []
        for i, view in enumerate(views):
            texts = self.replies(view, sampling.n, i)
            assert len(texts) == sampling.n
            comps = []
            for text in texts:
                words = text.split()
                cut = len(words) > sampling.max_new_tokens
                kept = words[: sampling.max_new_tokens]
                comps.append(
                    Completion(" " + " ".join(kept) + " ", [], 0, len(kept), "length" if cut else "stop")
                )
            out.append(comps)
        return out


def _user(view: View) -> str:
    return view[1]["content"]


# -- the single agent's prompt ------------------------------------------------------------------------


def test_single_agent_view_gives_one_agent_the_question_and_both_agents_notes() -> None:
    ex = ZORVATH.model_copy(update={"contexts": ["Zorvath lives in Melbrook.", "Kelo lives in Varn."]})
    view = single_agent_view(ex, CFG)
    assert [m["role"] for m in view] == ["system", "user"]
    assert "<A>answer</A>" in view[0]["content"] and "Example:" not in view[0]["content"]
    user = _user(view)
    assert user.startswith("Question: In which city does Zorvath live?")
    assert user.endswith("\nNotes:\nZorvath lives in Melbrook.\nKelo lives in Varn.")
    # With the worked example: the system prompt shows it, in the example's answer format.
    shown = single_agent_view(ex, CFG.model_copy(update={"worked_example": True}))[0]["content"]
    assert "Example:" in shown and "<A>10</A>" in shown and r"\boxed" not in shown
    math_sys = single_agent_view(MATH, CFG.model_copy(update={"worked_example": True}))[0]["content"]
    assert r"\boxed{answer}" in math_sys and r"\boxed{10}" in math_sys and "<A>" not in math_sys
    # No notes at all: no notes section.
    bare = _user(single_agent_view(ex.model_copy(update={"contexts": ["", "  "]}), CFG))
    assert "Notes:" not in bare


def test_single_agent_view_does_not_tell_the_agent_it_has_no_notes_when_it_has_some() -> None:
    user = _user(single_agent_view(ZORVATH, CFG))
    assert "Zorvath lives in Melbrook." in user
    assert "(none)" not in user


# -- majority vote ------------------------------------------------------------------------------------


def test_majority_counts_answers_equal_under_the_metric_and_ties_go_to_the_earliest() -> None:
    assert majority(ZORVATH, ["Varn", "Melbrook", "melbrook.", None, "Varn", "the Melbrook"]) == "Melbrook"
    assert majority(ZORVATH, ["Varn", "Melbrook"]) == "Varn"  # 1-1: the earliest
    assert majority(ZORVATH, ["Melbrook", "Varn", "Varn", "Melbrook"]) == "Melbrook"  # 2-2: the earliest
    assert majority(ZORVATH, [None, None]) is None and majority(ZORVATH, []) is None
    # numeric: values, not strings; the representative is the first of its group as written
    assert majority(NUMERIC, ["42.0", "41", "42", "41", "42"]) == "42.0"


# -- chain of thought and self-consistency ------------------------------------------------------------


def test_cot_is_one_greedy_sample_per_task_parsed_and_scored() -> None:
    def reply(view: View, n: int, i: int) -> list[str]:
        if "Zorvath" in _user(view):
            return ["Notes say Melbrook. <A>Melbrook</A>"]
        return ["one two three four five six seven eight nine ten"]  # 10 words: within 2 × 8

    engine = SampledEngine(reply)
    got = run_cot(engine, [ZORVATH, KELO], CFG, seed=3)
    (views,) = engine.calls
    assert views == [single_agent_view(ZORVATH, CFG), single_agent_view(KELO, CFG)]
    ((sp, seeds),) = engine.sampled
    assert (sp.n, sp.temperature, sp.max_new_tokens) == (1, 0.0, 16)  # twice a turn's budget
    assert seeds == [derive_seed(3, "ex-a"), derive_seed(3, "ex-b")]
    assert got == [
        Transcript(
            example_id="ex-a",
            turns=[Turn(speaker=0, text="Notes say Melbrook. <A>Melbrook</A>", tokens=4, answer="Melbrook")],
            stop_reason="answered",
            answer="Melbrook",
            metric=1.0,
        ),
        Transcript(
            example_id="ex-b",
            turns=[Turn(speaker=0, text="one two three four five six seven eight nine ten", tokens=10)],
            stop_reason="no_answer",
            answer=None,
            metric=0.0,
        ),
    ]


def test_cot_marks_a_reply_cut_at_its_token_budget_and_honours_an_explicit_budget() -> None:
    engine = SampledEngine(lambda view, n, i: ["w " * 20 + "<A>Varn</A>"])
    (tr,) = run_cot(engine, [KELO], CFG, max_new_tokens=5)
    assert engine.sampled[0][0].max_new_tokens == 5
    assert tr.turns == [Turn(speaker=0, text="w w w w w", tokens=5, truncated=True, answer=None)]
    assert (tr.answer, tr.metric, tr.stop_reason) == (None, 0.0, "no_answer")


def test_self_consistency_takes_the_majority_of_k_samples() -> None:
    samples = {
        "ex-a": ["<A>Varn</A>", "<A>Melbrook</A>", "no idea", "<A>melbrook</A>", "<A>Varn</A>"],
        "ex-b": ["<A>Melbrook</A>", "no idea", "<A>Varn</A>", "nothing", "<A>Zorvath</A>"],
    }

    def reply(view: View, n: int, i: int) -> list[str]:
        return samples["ex-a" if "Zorvath" in _user(view) else "ex-b"][:n]

    engine = SampledEngine(reply)
    got = run_cot(engine, [ZORVATH, KELO], CFG, k=5, temperature=0.7, seed=1)
    ((sp, seeds),) = engine.sampled
    assert (sp.n, sp.temperature) == (5, 0.7) and seeds == [derive_seed(1, "ex-a"), derive_seed(1, "ex-b")]
    # ex-a: Varn 2, Melbrook 2 (one lower-case), no answer 1 -> the tie goes to Varn (first seen): wrong.
    # ex-b: Melbrook, Varn, Zorvath once each -> Melbrook (first seen): wrong.
    assert [(t.answer, t.metric, t.stop_reason) for t in got] == [
        ("Varn", 0.0, "answered"),
        ("Melbrook", 0.0, "answered"),
    ]
    assert [t.text for t in got[0].turns] == samples["ex-a"]
    assert [t.answer for t in got[0].turns] == ["Varn", "Melbrook", None, "melbrook", "Varn"]
    assert all(t.speaker == 0 for t in got[0].turns)

    def three_to_two(view: View, n: int, i: int) -> list[str]:
        return ["<A>Melbrook</A>", "<A>Varn</A>", "<A>melbrook</A>", "<A>Varn</A>", "<A>Melbrook</A>"][:n]

    (tr,) = run_cot(SampledEngine(three_to_two), [ZORVATH], CFG, k=5, temperature=0.7)
    assert (tr.answer, tr.metric) == ("Melbrook", 1.0)


# -- debate -------------------------------------------------------------------------------------------


def _debater(view: View) -> str:
    """Knows only its own notes: answers from them; without notes says it does not know, until another
    agent's answer is in its history, which it then repeats."""
    user = _user(view)
    if "Kelo lives in Varn." in user:
        return "<A>Varn</A>"
    if "Zorvath lives in Melbrook." in user:
        return "<A>Melbrook</A>"
    followups = [m["content"] for m in view[2:] if m["role"] == "user"]
    if followups and "<A>Varn</A>" in followups[-1]:
        return "Fine, <A>Varn</A>"
    return "I do not know."


def test_debate_rounds_share_the_latest_answers_and_the_last_round_votes() -> None:
    """2 agents, 3 rounds on the Kelo task (Bob's notes): agent 0 sees only Alice's (empty) notes, agent 1
    only Bob's; from round 2 each reads the other's latest answer. Worked by hand: round 1 "I do not
    know." / Varn, rounds 2 and 3 Varn / Varn: the vote is Varn."""
    engine = SampledEngine(lambda view, n, i: [_debater(view)])
    (tr,) = run_debate(engine, [KELO], CFG, agents=2, rounds=3, temperature=0.7, seed=5)
    assert len(engine.calls) == 3 and all(len(views) == 2 for views in engine.calls)
    assert [seeds for _, seeds in engine.sampled] == [
        [derive_seed(5, "ex-b", a, r) for a in range(2)] for r in range(3)
    ]
    assert all(sp.temperature == 0.7 and sp.n == 1 and sp.max_new_tokens == 16 for sp, _ in engine.sampled)

    first = engine.calls[0]
    assert first[0] == single_agent_view(KELO.model_copy(update={"contexts": ["", ""]}), CFG)
    assert first[1] == single_agent_view(
        KELO.model_copy(update={"contexts": ["Kelo lives in Varn.", ""]}), CFG
    )
    assert "Kelo lives in Varn." not in _user(first[0])

    texts = [  # per round, agent 0's and agent 1's reply
        ["I do not know.", "<A>Varn</A>"],
        ["Fine, <A>Varn</A>", "<A>Varn</A>"],
        ["Fine, <A>Varn</A>", "<A>Varn</A>"],
    ]
    for r in (1, 2):  # each agent's history: its view, then per round its answer and the other's
        for a in range(2):
            history = engine.calls[r][a]
            assert history[:2] == first[a]
            tail = history[2:]
            assert len(tail) == 2 * r
            for j in range(r):
                assert tail[2 * j] == {"role": "assistant", "content": texts[j][a]}
                follow = tail[2 * j + 1]
                assert follow["role"] == "user" and texts[j][1 - a] in follow["content"]
                assert f"Another agent answered:\n{texts[j][1 - a]}\n" in follow["content"]

    assert [(t.speaker, t.text, t.answer) for t in tr.turns] == [
        (a, texts[r][a], "Varn" if "Varn" in texts[r][a] else None) for r in range(3) for a in range(2)
    ]
    assert (tr.answer, tr.metric, tr.stop_reason) == ("Varn", 1.0, "answered")


def test_debate_votes_over_the_last_round_only() -> None:
    """3 agents on the math task, 2 rounds: round 1 all say 5; round 2 agents 0 and 2 switch to 7 and 8,
    agent 1 stays at 5 -> 7, 5, 8 once each: the earliest (agent 0's 7) wins, although 5 led overall."""
    round2 = {0: r"\boxed{7}", 1: r"\boxed{5}", 2: r"\boxed{8}"}

    def reply(view: View, n: int, i: int) -> list[str]:
        if len(view) == 2:
            return [r"\boxed{5}"]
        return [round2[i]]  # one task: row i is agent i

    engine = SampledEngine(reply)
    (tr,) = run_debate(engine, [MATH], CFG, agents=3, rounds=2)
    assert [t.speaker for t in tr.turns] == [0, 1, 2, 0, 1, 2]
    assert [t.answer for t in tr.turns] == ["5", "5", "5", "7", "5", "8"]
    assert (tr.answer, tr.metric) == ("7", 0.0)
    # Agent 0's second-round prompt holds both other agents' first answers.
    follow = engine.calls[1][0][-1]["content"]
    assert follow.startswith("Another agent answered:\n" + r"\boxed{5}" + "\n\n" + r"\boxed{5}" + "\n\n")
