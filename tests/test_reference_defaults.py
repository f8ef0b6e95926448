"""Where the loop follows the published references by default (issue: faithful to the published method).

Each test fails on the earlier behaviour: a silent GSM8K fallback for unknown datasets, one task slice for
iSFT and search, SFT always from the previous model, no readability penalty for runaway or empty
conversations, partial F1 credit on yes/no answers, no warm-up θ, no mixHILQ / mixLIHQ, no mas-sc.
"""

from __future__ import annotations

import pytest
import yaml

from dits.config import ConfigError, load_config
from dits.mas.dialogue import Transcript, Turn
from dits.pipeline import DEMO, STAGES, Step, iteration_tasks
from dits.records import PreferencePair
from dits.reward import RewardConfig, compute_reward
from dits.select import SelectConfig, minmax, select_pairs
from dits.stages.context import ModelRef
from dits.tasks import loaders
from dits.tasks.metrics import f1_score
from dits.tasks.source import examples_for
from tests.fakes import ScriptedEngine


def test_a_dataset_without_published_defaults_fails_naming_it():
    spec = loaders.DATASETS["facts"]
    loaders.DATASETS.add("mytask", type(spec)("mytask", "exchange", "f1", builtin=True))
    try:
        with pytest.raises(ValueError, match="'mytask' has no published defaults"):
            loaders.method_defaults("mytask")
        with pytest.raises(ConfigError, match="mytask"):
            load_config(None, {"task.dataset": "mytask"})
        # Setting every dataset-dependent key by hand is enough.
        by_hand = {"task.dataset": "mytask", "train.dpo.beta": 0.2, "train.sft_from": "initial"}
        cfg = load_config(None, by_hand)
        assert cfg.influence.beta == 0.2
    finally:
        loaders.DATASETS.remove("mytask")
    with pytest.raises(ConfigError, match=r"unknown task\.dataset 'nosuch'"):
        load_config(None, {"task.dataset": "nosuch"})


def test_influence_beta_follows_the_dpo_beta_unless_set():
    assert load_config(None, {"task.dataset": "gsm8k", "train.dpo.beta": 0.3}).influence.beta == 0.3
    cfg = load_config(None, {"task.dataset": "gsm8k", "influence.beta": 0.2})
    assert (cfg.train.dpo.beta, cfg.influence.beta) == (0.5, 0.2)
    # The resolved numbers are what config.yaml records, so a rerun from it is the same run.
    assert load_config(None, None, defaults=yaml.safe_load(cfg.to_yaml())) == cfg


def _cfg(**over):  # type: ignore[no-untyped-def]
    return load_config(None, {"task.train": 3, "pipeline.iterations": 2, **over}, defaults=DEMO)


def test_search_tasks_come_after_the_isft_tasks():
    cfg = _cfg()
    train = examples_for(cfg.task, "train", limit=12)
    it0, it1 = iteration_tasks(cfg, 0), iteration_tasks(cfg, 1)
    assert it0 == {"sft-data": train[0:3], "search": train[3:6]}
    assert it1 == {"sft-data": train[6:9], "search": train[9:12]}
    # A recipe without iSFT searches one block per iteration.
    assert iteration_tasks(_cfg(**{"pipeline.recipe": "idpo"}), 1) == {"search": train[3:6]}


@pytest.mark.parametrize(("dataset", "start"), [("facts", "previous"), ("arith", "initial")])
def test_isft_starts_from_the_model_the_dataset_prescribes(monkeypatch, dataset, start):
    import dits.pipeline as pipeline

    seen = {}
    monkeypatch.setattr(
        pipeline, "train_stage", lambda ctx, it, owner, model, data, kind: seen.setdefault("m", model)
    )
    cfg = load_config(
        None, {"task.dataset": dataset}, defaults={k: v for k, v in DEMO.items() if k != "task"}
    )
    ctx = type("Ctx", (), {"cfg": cfg})()
    previous = ModelRef(kind="adapter", path="/x", digest="abc")
    step = Step(1, None, frozenset(), previous, {}, [], products={"sft-data": object()})  # type: ignore[dict-item]
    STAGES["sft"].run(ctx, step)  # type: ignore[arg-type]
    assert seen["m"] == (previous if start == "previous" else ModelRef.base(cfg))


def _transcript(texts: list[str], tokens: list[int]) -> Transcript:
    turns = [
        Turn(speaker=i % 2, text=t, tokens=n) for i, (t, n) in enumerate(zip(texts, tokens, strict=True))
    ]
    return Transcript(example_id="e", turns=turns, stop_reason="agreed", answer="a", metric=1.0)


def test_readability_is_minus_one_for_runaway_or_empty_conversations():
    ex = examples_for(_cfg().task, "test", limit=1)[0]
    cfg = RewardConfig()
    ok = compute_reward(ex, _transcript(["a b", "c d"], [60, 60]), [2.0, 2.0], 100.0, cfg)
    assert ok.read == pytest.approx(0.5)  # λ_read 1.0 / max NLL 2.0
    runaway = compute_reward(ex, _transcript(["a b", "c d"], [1500, 501]), [2.0, 2.0], 100.0, cfg)
    assert runaway.read == -1.0
    assert compute_reward(ex, _transcript(["a b", "c d"], [1500, 500]), [2.0, 2.0], 100.0, cfg).read > 0
    empty = compute_reward(ex, _transcript(["", " "], [0, 0]), [float("nan")] * 2, 100.0, cfg)
    assert empty.read == -1.0


def test_yes_no_answers_get_no_partial_f1():
    assert f1_score("no", "no, he did not") == 0.0
    assert f1_score("yes it is", "yes") == 0.0
    assert f1_score("Yes.", "yes") == 1.0
    assert f1_score("the city of Varn", "Varn") == pytest.approx(0.5)  # P 1/3, R 1: partial credit stays


def _pair(i: int, q: float) -> PreferencePair:
    return PreferencePair(tree_task_id=f"e{i}", node_id=f"n{i}", prefix=[], speaker=0, chosen=f"c{i}",
                          rejected=f"r{i}", chosen_id=f"n{i}a", rejected_id=f"n{i}b", q_chosen=q,
                          q_rejected=0.0, visits_chosen=1, visits_rejected=1)  # fmt: skip


def test_mix_ablations_rank_by_influence_minus_q_and_back():
    qs, infl = [0.9, 0.5, 0.7, 0.6], [0.1, 0.8, 0.4, -0.2]
    pairs = [_pair(i, q) for i, q in enumerate(qs)]
    nq, ni = minmax(qs), minmax(infl)
    hilq = sorted(range(4), key=lambda i: -(ni[i] - nq[i]))[:2]
    lihq = sorted(range(4), key=lambda i: -(nq[i] - ni[i]))[:2]
    got_h = select_pairs(pairs, infl, SelectConfig(strategy="mixHILQ"))
    got_l = select_pairs(pairs, infl, SelectConfig(strategy="mixLIHQ"))
    assert [p.tree_task_id for p in got_h] == [f"e{i}" for i in sorted(hilq)] == ["e1", "e2"]
    assert [p.tree_task_id for p in got_l] == [f"e{i}" for i in sorted(lihq)] == ["e0", "e3"]


def test_mas_sc_votes_over_the_agreed_answers_of_k_sampled_conversations():
    """Scripted agents: the seed decides what they say, so the k conversations differ. The vote takes the
    most frequent agreed answer; a conversation that hit the turn limit does not vote; the record's tokens
    are all k conversations' tokens."""
    from dits.evaluate import MAS_SC_TEMPERATURE, run_mas_sc
    from dits.mas.protocol import ProtocolConfig

    ex = examples_for(_cfg().task, "test", limit=1)[0]
    gold = ex.answers[0]
    scripts = [f"<A>{gold}</A>", "<A>Nowhere</A>", "I am not sure."]

    def reply(view):  # type: ignore[no-untyped-def]
        last = view[-1]["content"].splitlines()[-1]
        if last.startswith(("Alice: ", "Bob: ")):  # echo the partner: answers agree, "not sure" never does
            return last.split(": ", 1)[1]
        return scripts[reply.first % 3]  # the first turns, in batch order: conversation j says script j % 3

    class Engine(ScriptedEngine):
        def generate(self, views, sampling, seeds=None):  # type: ignore[no-untyped-def]
            assert sampling.temperature == MAS_SC_TEMPERATURE
            out = []
            for v in views:
                out += super().generate([v], sampling, seeds)
                reply.first += 1
            return out

    reply.first = 0  # type: ignore[attr-defined]
    proto = ProtocolConfig(max_turns=4, max_new_tokens=8, fallback_parse=False)  # untagged: no answer
    [tr] = run_mas_sc(Engine(reply), [ex], proto, k=5, seed=0)
    # Scripts of the 5 conversations: 0, 1, 2, 0, 1 -> gold twice, Nowhere twice (tie: the earlier, gold);
    # the "not sure" one runs to the turn limit and does not vote.
    assert tr.answer == gold and tr.metric == 1.0
    assert tr.comm_tokens == sum(t.tokens for t in tr.turns) and len(tr.turns) == 2 + 2 + 4 + 2 + 2
    with pytest.raises(ValueError, match="k >= 1"):
        run_mas_sc(Engine(reply), [ex], proto, k=0)
    reply.first = 0  # type: ignore[attr-defined]
    [one] = run_mas_sc(Engine(reply), [ex], proto, k=1)  # k = 1: the one conversation's agreed answer
    assert (one.answer, len(one.turns)) == (gold, 2)
