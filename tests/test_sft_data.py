"""iSFT data: best-of-n selection against brute force, rows against the renderer, one batched sampling run."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from dits.config import SftDataConfig
from dits.mas.dialogue import Transcript, Turn
from dits.mas.protocol import ProtocolConfig, render_view
from dits.records import SftRow
from dits.reward import RewardBreakdown, RewardConfig, compute_reward, utterance_nlls
from dits.stages.sft_data import SampledConversation, build_sft_data, select_conversations, sft_rows
from dits.tasks.example import Example
from tests.test_rollout import EXAMPLES, SeededEngine


def _example(i: int, mode: str) -> Example:
    if mode == "exchange":
        return Example(
            id=f"x{i}",
            dataset="facts",
            split="train",
            question=f"Where does P{i} live?",
            answers=["Varn"],
            contexts=[f"P{i} lives in Varn.", ""],
            mode="exchange",
            metric="f1",
        )
    return Example(
        id=f"d{i}",
        dataset="arith",
        split="train",
        question=f"What is {i} + 1?",
        answers=[str(i + 1)],
        contexts=["", ""],
        mode="debate",
        metric="numeric",
    )


def _conv(example_id: str, sample: int, reward: float, texts: list[str] | None = None) -> SampledConversation:
    texts = texts or [f"utterance {sample}", "<A>x</A>"]
    turns = [Turn(speaker=k % 2, text=t, tokens=len(t.split())) for k, t in enumerate(texts)]
    tr = Transcript(example_id=example_id, turns=turns, stop_reason="agreed", answer="x", metric=0.0)
    return SampledConversation(
        example_id=example_id,
        sample=sample,
        seed=sample,
        transcript=tr,
        breakdown=RewardBreakdown(task=reward, token=0.0, read=0.0),
    )


def _brute(samples, examples, threshold, fraction):  # type: ignore[no-untyped-def]
    """Independent restatement: per task the max reward (first sample among ties); pass the threshold;
    rank all qualifying by reward then task order; keep max(1, floor(n * fraction))."""
    out = []
    for ex in examples:
        mine = [s for s in samples if s.example_id == ex.id]
        top = max(s.reward for s in mine)
        best = min((s for s in mine if s.reward == top), key=lambda s: s.sample)
        thr = threshold if threshold is not None else (0.5 if ex.mode == "exchange" else 0.6)
        if best.reward >= thr:
            out.append(best)
    pos = {ex.id: i for i, ex in enumerate(examples)}
    ranked = sorted(out, key=lambda s: (-s.reward, pos[s.example_id]))
    k = max(1, math.floor(len(ranked) * fraction + 1e-12)) if ranked else 0
    kept = {(s.example_id, s.sample) for s in ranked[:k]}
    return [(s.example_id, s.sample) for s in out if (s.example_id, s.sample) in kept]


def _ids(convs):  # type: ignore[no-untyped-def]
    return [(c.example_id, c.sample) for c in convs]


def test_selection_by_hand():
    examples = [
        _example(0, "exchange"),
        _example(1, "exchange"),
        _example(2, "debate"),
        _example(3, "debate"),
    ]
    samples = [
        _conv("x0", 0, 0.2),
        _conv("x0", 1, 0.5),  # exactly at the exchange threshold: qualifies
        _conv("x0", 2, 0.5),  # tie with sample 1: the earlier sample is the best
        _conv("x1", 0, 0.49),  # below 0.5: dropped
        _conv("d2", 0, 0.55),  # would pass 0.5 but debate needs 0.6: dropped
        _conv("d3", 0, 0.9),
        _conv("d3", 1, 0.95),
    ]
    got = select_conversations(samples, examples, SftDataConfig())
    # Two qualify (x0#1 at 0.5, d3#1 at 0.95); the top 70% of 2 is max(1, floor(1.4)) = 1: d3 only.
    assert _ids(got) == [("d3", 1)]
    assert _ids(select_conversations(samples, examples, SftDataConfig(keep_fraction=1.0))) == [
        ("x0", 1),
        ("d3", 1),
    ]
    assert _ids(select_conversations(samples, examples, SftDataConfig(threshold=0.0, keep_fraction=1.0))) == [
        ("x0", 1),
        ("x1", 0),
        ("d2", 0),
        ("d3", 1),
    ]


@pytest.mark.parametrize("seed", range(5))
def test_selection_equals_brute_force_on_random_rewards(seed):
    rng = random.Random(seed)
    examples = [_example(i, rng.choice(["exchange", "debate"])) for i in range(20)]
    samples = [
        _conv(ex.id, j, round(rng.uniform(0.0, 1.0), 1))  # one decimal: many ties
        for ex in examples
        for j in range(10)
    ]
    rng.shuffle(samples)
    for cfg in (
        SftDataConfig(),
        SftDataConfig(threshold=0.3, keep_fraction=0.5),
        SftDataConfig(keep_fraction=1),
    ):
        got = select_conversations(samples, examples, cfg)
        assert _ids(got) == _brute(samples, examples, cfg.threshold, cfg.keep_fraction)
        assert got  # the seeds give qualifying tasks


@pytest.mark.parametrize("prefix", [False, True])
def test_rows_are_the_renderers_views(prefix):
    proto = ProtocolConfig(turn_prefix=prefix)
    ex = EXAMPLES[0]
    texts = ["My notes say Zorvath lives in Melbrook.", "Then <A>Melbrook</A>", "<A>Melbrook</A>"]
    conv = _conv(ex.id, 3, 0.8, texts)
    rows = sft_rows(ex, conv, proto)
    assert len(rows) == 3
    for k, row in enumerate(rows):
        assert row.prompt == render_view(ex, texts[:k], k % 2, proto)
        name = ("Alice", "Bob")[k % 2]
        assert row.completion == [
            {"role": "assistant", "content": (f"{name}: " if prefix else "") + texts[k]}
        ]
        assert (row.turn, row.speaker, row.sample, row.reward) == (k, k % 2, 3, 0.8)
    # Alice's first completion appears verbatim as her own past turn in her next prompt (after the task).
    task = len(rows[0].prompt) - 1
    assert rows[2].prompt[task + 1] == rows[0].completion[0]


def test_build_sft_data_samples_in_one_batched_run(tmp_path):
    engine = SeededEngine()
    proto = ProtocolConfig(max_turns=5, max_new_tokens=12)
    reward = RewardConfig(min_tokens=0)
    examples = [ex.model_copy(update={"id": f"{ex.id}-{i}"}) for i in range(3) for ex in EXAMPLES]
    cfg = SftDataConfig(n_samples=4, threshold=-10.0)
    data = build_sft_data(engine, examples, proto, reward, tmp_path, cfg=cfg, seed=1)

    views, sampling, seeds = engine.calls[0]
    assert len(views) == len(seeds) == 6 * 4  # every task's every sample in the first call
    assert len(set(seeds)) == len(seeds)
    assert sampling.temperature == 0.7
    assert len(engine.calls) == max(len(s.transcript.turns) for s in data.samples)
    assert [(s.example_id, s.sample) for s in data.samples] == [
        (ex.id, j) for ex in examples for j in range(4)
    ]
    assert len({tuple(s.transcript.texts) for s in data.samples}) > 1

    toks = [s.transcript.comm_tokens for s in data.samples]
    assert data.t_norm == pytest.approx(max(1.0, float(np.percentile(toks, 80))))
    by_id = {ex.id: ex for ex in examples}
    batch = [by_id[s.example_id] for s in data.samples]
    nlls = utterance_nlls(SeededEngine(), [s.transcript for s in data.samples], proto)
    for s, ex, nll in zip(data.samples, batch, nlls, strict=True):
        assert s.reward == pytest.approx(compute_reward(ex, s.transcript, nll, data.t_norm, reward).total)

    assert _ids(data.kept) == _brute(data.samples, examples, -10.0, 0.7)
    assert len(data.kept) == 4  # floor(0.7 * 6)
    assert data.rows == [r for c in data.kept for r in sft_rows(by_id[c.example_id], c, proto)]

    lines = (tmp_path / "sft.jsonl").read_text().splitlines()
    assert [SftRow.model_validate_json(x) for x in lines] == data.rows
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 24
    assert json.loads((tmp_path / "sft_data.json").read_text())["rows"] == len(data.rows)
    from dits.train.rows import completion_rows

    ds = completion_rows(data.rows)  # what SFT trains on
    assert len(ds) == len(data.rows)
    assert ds[0] == {"prompt": data.rows[0].prompt, "completion": data.rows[0].completion}
