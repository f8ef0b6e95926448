"""The Optima reward against hand-computed values."""

from __future__ import annotations

import math

import pytest

from dits.mas.dialogue import Transcript, Turn
from dits.mas.protocol import ProtocolConfig, prefixed
from dits.reward import RewardConfig, compute_reward, t_norm_from, utterance_nlls
from tests.fakes import ScriptedEngine
from tests.helpers import ARITH, FACTS


def _tr(texts, tokens, metric=1.0, truncated=False):
    turns = [
        Turn(speaker=i % 2, text=t, tokens=n, truncated=truncated and i == 0)
        for i, (t, n) in enumerate(zip(texts, tokens, strict=True))
    ]
    return Transcript(example_id="f1", turns=turns, stop_reason="agreed", answer="x", metric=metric)


def test_reward_by_hand_exchange():
    tr = _tr(["a b", "c d e", "f"], [30, 20, 10])  # T = 60
    r = compute_reward(FACTS, tr, [2.0, 4.0, 1.0], t_norm=120.0, cfg=RewardConfig())
    # task 1, token -0.6 * 60/120 = -0.3, readability 1.0 / max(2, 4, 1) = 0.25
    assert (r.task, r.token, r.read) == (1.0, pytest.approx(-0.3), pytest.approx(0.25))
    assert r.total == pytest.approx(0.95)


def test_reward_debate_weights_and_penalties():
    tr = _tr(["x", "y"], [30, 20], metric=1.0)  # T = 50 > 40
    r = compute_reward(ARITH, tr, [0.5, 2.0], t_norm=100.0, cfg=RewardConfig())
    assert r.token == pytest.approx(-0.4 * 0.5) and r.read == pytest.approx(0.9 / 2.0)
    short = compute_reward(ARITH, _tr(["x", "y"], [20, 20]), [1.0, 1.0], 100.0, RewardConfig())
    assert short.token == -1.0  # T <= 40
    cut = compute_reward(ARITH, _tr(["x", "y"], [30, 30], truncated=True), [1.0, 1.0], 100.0, RewardConfig())
    assert cut.token == -1.0  # an utterance cut at the limit
    rep = compute_reward(ARITH, _tr(["same", "same"], [30, 30]), [1.0, 1.0], 100.0, RewardConfig())
    assert rep.read == 0.0  # repeated utterance
    both = compute_reward(FACTS, _tr(["hi\nBob: I agree", "ok"], [30, 30]), [1.0, 1.0], 100.0, RewardConfig())
    assert both.task == 0.0  # Alice spoke for Bob


def test_reward_config_overrides_weights():
    r = compute_reward(
        FACTS, _tr(["a", "b"], [50, 50]), [1.0, 1.0], 200.0, RewardConfig(lambda_tok=-1.0, lambda_read=0.5)
    )
    assert r.token == pytest.approx(-0.5) and r.read == pytest.approx(0.5)


def test_t_norm_is_the_80th_percentile():
    assert t_norm_from(list(range(1, 101))) == pytest.approx(80.2)  # numpy linear interpolation
    with pytest.raises(ValueError):
        t_norm_from([])


def test_utterance_nlls_mean_per_token_under_base_model():
    eng = ScriptedEngine(lambda v: "")
    eng.set_adapter("trained")
    tr = _tr(["one two three", "four"], [3, 1])
    (nlls,) = utterance_nlls(eng, [tr], ProtocolConfig())
    # fake log-probs alternate -1, -2 per token: "one two three" -> mean 4/3, "four" -> 1
    assert nlls == [pytest.approx(4 / 3), pytest.approx(1.0)]
    assert eng.active_adapter == "trained"  # restored after scoring with adapters off
    empty = _tr(["", "x"], [0, 1])
    assert math.isnan(utterance_nlls(eng, [empty], ProtocolConfig())[0][0])


def test_the_readability_term_is_clipped():
    tiny = compute_reward(FACTS, _tr(["a b", "c"], [30, 20]), [0.01, 0.02], 100.0, RewardConfig())
    assert tiny.read == 1.0  # 1.0 / 0.02 = 50 without the clip
    assert compute_reward(
        FACTS, _tr(["a b", "c"], [30, 20]), [0.01, 0.02], 100.0, RewardConfig(read_clip=60.0)
    ).read == pytest.approx(50.0)


# -- the real model ---------------------------------------------------------------------------------


def _manual_nll(engine, text: str, prefix: str = "") -> float:
    """Mean NLL of ``text`` after the raw assistant header, one unpadded forward of the base model with
    every adapter off (other tests leave adapters loaded): no engine scoring code, no chat template."""
    import torch

    tok = engine.tokenizer
    head = tok("<|im_start|>assistant\n" + prefix, add_special_tokens=False)["input_ids"]
    # The utterance as the model wrote it after the prefix ("Alice: text"), tokenised whole.
    full = tok("<|im_start|>assistant\n" + prefixed(prefix, text), add_special_tokens=False)["input_ids"]
    assert full[: len(head)] == head
    ids = full[len(head) :]
    engine.set_adapter(None)
    with torch.no_grad(), engine.adapter_scope():
        logits = engine.model(input_ids=torch.tensor([head + ids])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return -sum(float(logp[len(head) + j - 1, t]) for j, t in enumerate(ids)) / len(ids)


def test_an_utterance_is_scored_alone_under_the_initial_model(engine):
    from dits.train.config import LoraSettings

    proto = ProtocolConfig(turn_prefix=True)
    tr = _tr(["Zorvath lives in Melbrook.", "Then the answer is <A>Melbrook</A>."], [6, 9])
    name = "reward-test"
    engine.add_adapter(name, LoraSettings(r=2, alpha=4, target_modules=["q_proj"]).to_peft())
    try:
        import torch

        with torch.no_grad():  # a non-zero adapter, active: the NLLs must not see it
            for p in engine.adapter_parameters(name).values():
                p.add_(0.05)
        engine.set_adapter(name)
        (nlls,) = utterance_nlls(engine, [tr], proto)
        assert engine.active_adapter == name
    finally:
        engine.delete_adapter(name)
    expected = [_manual_nll(engine, t.text, ("Alice:", "Bob:")[t.speaker]) for t in tr.turns]
    assert nlls == pytest.approx(expected, rel=1e-4)


def test_copying_the_notes_no_longer_outranks_a_correct_answer(engine):
    """The measured failure: scored after the agent's view, a copy of its private notes had a near-zero
    NLL and a readability term (up to 8.6) far above the task term, so a wrong transcript that copies
    outranked a right one. Scored alone and clipped, the correct transcript wins."""
    from dits.tasks.builtin import make_builtin

    proto = ProtocolConfig()
    ex = make_builtin("facts", "train", 1, seed=0, hops=1, n_distractor=0)[0]
    notes = [c for c in ex.contexts if c]
    copier = _tr([notes[0], notes[-1]], [40, 40], metric=0.0)
    answer = f"<A>{ex.answers[0]}</A>"
    correct = _tr([f"I think it is {answer}", f"Agreed, {answer}"], [40, 40], metric=1.0)
    rewards = {}
    for key, tr in (("copier", copier), ("correct", correct)):
        (nll,) = utterance_nlls(engine, [tr], proto)
        rewards[key] = compute_reward(ex, tr, nll, 100.0, RewardConfig())
    assert rewards["correct"].total > rewards["copier"].total
    assert max(r.read for r in rewards.values()) <= 1.0 < rewards["correct"].task + 1e-9 + 1.0
