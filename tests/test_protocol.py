"""The renderer, the turn loop and its stop rule, with a scripted engine (no model)."""

from __future__ import annotations

import pytest

from dits.mas.dialogue import Turn, run_dialogues, speaks_for_both
from dits.mas.protocol import ProtocolConfig, render_view
from tests.fakes import ScriptedEngine
from tests.helpers import ARITH, FACTS

PLAIN = ProtocolConfig(worked_example=False)


def test_render_view_roles_and_private_notes():
    turns = ["I know Zorvath lives in Melbrook.", "Thanks.", "<A>Melbrook</A>"]
    bob = render_view(FACTS, turns[:1], 1, PLAIN)
    assert [m["role"] for m in bob] == ["system", "user"]
    assert (
        "Kiral lives in Doma." in bob[1]["content"]
        and "Zorvath lives in Melbrook." not in bob[1]["content"].split("Alice:")[0]
    )
    assert bob[1]["content"].endswith("Alice: I know Zorvath lives in Melbrook.")
    assert bob[0]["content"].startswith("You are Bob.")
    alice = render_view(FACTS, turns[:2], 0, PLAIN)
    assert [m["role"] for m in alice] == ["system", "user", "assistant", "user"]
    assert alice[2]["content"] == turns[0] and alice[3]["content"] == "Bob: Thanks."
    assert "Kiral" not in alice[1]["content"]
    with pytest.raises(ValueError, match="Bob's turn"):
        render_view(FACTS, turns[:1], 0, ProtocolConfig())


def test_forced_prefix_is_rendered_on_own_turns():
    v = render_view(FACTS, ["hello", "hi"], 0, ProtocolConfig(turn_prefix=True, worked_example=False))
    assert v[2]["content"] == "Alice: hello"


@pytest.mark.parametrize("example", [FACTS, ARITH])
@pytest.mark.parametrize("speaker", [0, 1])
def test_worked_examples_are_earlier_turns_before_the_real_task(example, speaker):
    turns = ["first"] if speaker == 1 else ["first", "second"]
    plain = render_view(example, turns, speaker, PLAIN)
    shown = render_view(example, turns, speaker, ProtocolConfig())
    demos = shown[1 : len(shown) - len(plain) + 1]
    # the demos are whole user/assistant exchanges, then the view continues exactly as without them
    assert [m["role"] for m in demos] == ["user", "assistant"] * (len(demos) // 2) and demos
    assert [shown[0], *shown[len(demos) + 1 :]] == plain
    partner = "Bob" if speaker == 0 else "Alice"
    text = " ".join(m["content"] for m in demos)
    if example.mode == "exchange":
        assert f"{partner}: " in text and "<A>" in text and "Bob: Pum" not in text.replace(f"{partner}:", "")
    elif speaker == 0:  # the solver is shown tagged answers; the critic never gives one itself
        assert all("<A>" in m["content"] for m in demos if m["role"] == "assistant")
    else:
        assert not any("<A>" in m["content"] for m in demos if m["role"] == "assistant")


def test_math_demos_use_boxed_answers():
    math = ARITH.model_copy(update={"metric": "math"})
    view = render_view(math, [], 0, ProtocolConfig())
    assert r"\boxed{10}" in view[2]["content"] and "<A>" not in view[2]["content"]


def test_stop_on_agreement_and_one_call_per_round():
    script = {0: "I think <A>Melbrook</A>", 1: "Yes, <A>melbrook</A>."}
    eng = ScriptedEngine(lambda v: script[0 if v[0]["content"].startswith("You are Alice") else 1])
    trs = run_dialogues(
        eng, [FACTS, FACTS.model_copy(update={"id": "f2"})], ProtocolConfig(fallback_parse=False)
    )
    assert [t.stop_reason for t in trs] == ["agreed", "agreed"]
    assert [len(t.turns) for t in trs] == [2, 2]
    assert trs[0].answer == "melbrook" and trs[0].metric == 1.0
    assert len(eng.calls) == 2 and all(len(c) == 2 for c in eng.calls)  # batched: both conversations per call


def test_turn_limit_is_a_failure_even_with_a_right_answer():
    answers = iter(["<A>Melbrook</A>", "<A>Doma</A>"] * 10)
    eng = ScriptedEngine(lambda v: next(answers))
    (tr,) = run_dialogues(eng, [FACTS], ProtocolConfig(max_turns=4))
    assert tr.stop_reason == "max_turns" and len(tr.turns) == 4 and tr.metric == 0.0


def test_debate_critic_answers_are_not_parsed():
    # Bob states a number in his critique; only Alice's answers count, so it takes Alice twice to stop.
    def reply(v):
        return (
            "12 + 7 = 19 <A>19</A>"
            if v[0]["content"].startswith("You are Alice")
            else "19 is right <A>19</A>"
        )

    (tr,) = run_dialogues(ScriptedEngine(reply), [ARITH], ProtocolConfig())
    assert [t.answer for t in tr.turns] == ["19", None, "19"]
    assert tr.stop_reason == "agreed" and tr.metric == 1.0


def test_prefix_continuation_replays_the_stop_rule():
    eng = ScriptedEngine(lambda v: "<A>Melbrook</A>")
    prefix = [Turn(speaker=0, text="<A>Melbrook</A>", tokens=1, answer="Melbrook")]
    (tr,) = run_dialogues(eng, [FACTS], ProtocolConfig(), prefixes=[prefix])
    assert len(tr.turns) == 2 and tr.stop_reason == "agreed"
    (done,) = run_dialogues(
        eng, [FACTS], ProtocolConfig(), prefixes=[[*prefix, prefix[0].model_copy(update={"speaker": 1})]]
    )
    assert len(done.turns) == 2 and len(eng.calls) == 1  # an ended prefix costs no generation


def test_speaks_for_both():
    assert speaks_for_both("Sure.\nBob: I agree", 0)
    assert not speaks_for_both("Bob said he agrees", 0)
    assert speaks_for_both("Alice: ok", 1)
