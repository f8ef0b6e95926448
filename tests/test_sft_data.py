"""iSFT data: best-of-n selection against brute force, rows against the renderer, one batched sampling run."""

from __future__ import annotations

import json
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
from tests.helpers import EXAMPLES, SeededEngine


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


_EPS = {"facts": 0.5, "arith": 0.6, "math": 0.6}  # the published ε of these datasets (Optima)
_SLICE = {"facts": (0.0, 0.7), "arith": (0.0, 0.7), "math": (0.1, 0.8)}


def _brute(samples, examples, threshold, keep_slice):  # type: ignore[no-untyped-def]
    """Independent restatement of the reference (thunlp/Optima process_dataloader_for_sft), per dataset:
    per task the max reward (first sample among ties); all tasks' best ranked by reward then task order;
    the ranks [int(lo*n), int(hi*n)) kept; then those below ε dropped."""
    best = []
    for ex in examples:
        mine = [s for s in samples if s.example_id == ex.id]
        top = max(s.reward for s in mine)
        best.append((ex, min((s for s in mine if s.reward == top), key=lambda s: s.sample)))
    pos = {ex.id: i for i, ex in enumerate(examples)}
    kept = set()
    for dataset in {ex.dataset for ex in examples}:
        ranked = sorted(
            (b for ex, b in best if ex.dataset == dataset), key=lambda s: (-s.reward, pos[s.example_id])
        )
        lo, hi = keep_slice or _SLICE[dataset]
        eps = threshold if threshold is not None else _EPS[dataset]
        n = len(ranked)
        kept |= {(s.example_id, s.sample) for s in ranked[int(lo * n) : int(hi * n)] if s.reward >= eps}
    return [(b.example_id, b.sample) for _, b in best if (b.example_id, b.sample) in kept]


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
    # Per dataset, the top int(0.7 * 2) = 1 of 2 tasks by reward, then ε: facts keeps x0#1 (0.5 >= 0.5),
    # arith keeps d3#1.
    got = select_conversations(samples, examples, SftDataConfig())
    assert _ids(got) == [("x0", 1), ("d3", 1)]
    assert _ids(select_conversations(samples, examples, SftDataConfig(keep_slice=(0.0, 1.0)))) == [
        ("x0", 1),
        ("d3", 1),
    ]
    everything = SftDataConfig(threshold=0.0, keep_slice=(0.0, 1.0))
    assert _ids(select_conversations(samples, examples, everything)) == [
        ("x0", 1),
        ("x1", 0),
        ("d2", 0),
        ("d3", 1),
    ]


def test_selection_of_ten_tasks_keeps_the_references_conversations():
    """Ten tasks whose best rewards are 0.9 ... 0.1. The reference cuts the ranked list to its top
    int(0.7 * 10) = 7 and then drops those below ε (0.5 for facts): 7 kept. Filtering first and keeping 70%
    of the 7 qualifying (the earlier rule) would keep 4. MATH keeps ranks 1..7 (10%–80%), then ε 0.6."""
    rewards = [0.52, 0.9, 0.3, 0.7, 0.6, 0.1, 0.8, 0.55, 0.45, 0.65]
    facts = [_example(i, "exchange") for i in range(10)]
    samples = [s for i, r in enumerate(rewards) for s in (_conv(f"x{i}", 0, r - 0.05), _conv(f"x{i}", 1, r))]
    got = select_conversations(samples, facts, SftDataConfig())
    assert _ids(got) == [(f"x{i}", 1) for i in (0, 1, 3, 4, 6, 7, 9)]  # 0.52 ... 0.9: the top seven
    math = [ex.model_copy(update={"dataset": "math"}) for ex in facts]
    got = select_conversations(samples, math, SftDataConfig())
    # Ranked: 0.9 (dropped: rank 0), 0.8, 0.7, 0.65, 0.6, 0.55, 0.52, 0.45 (ranks 1..7), then ε = 0.6.
    assert _ids(got) == [(f"x{i}", 1) for i in (3, 4, 6, 9)]


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
        SftDataConfig(threshold=0.3, keep_slice=(0.0, 0.5)),
        SftDataConfig(keep_slice=(0.2, 1.0)),
    ):
        got = select_conversations(samples, examples, cfg)
        assert _ids(got) == _brute(samples, examples, cfg.threshold, cfg.keep_slice)
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

    # The reference's iSFT T_norm: each task's longest sample.
    assert data.t_norm is None
    longest = {
        ex.id: max(s.transcript.comm_tokens for s in data.samples if s.example_id == ex.id) for ex in examples
    }
    by_id = {ex.id: ex for ex in examples}
    batch = [by_id[s.example_id] for s in data.samples]
    nlls = utterance_nlls(SeededEngine(), [s.transcript for s in data.samples], proto)
    for s, ex, nll in zip(data.samples, batch, nlls, strict=True):
        want = compute_reward(ex, s.transcript, nll, longest[ex.id], reward)
        assert s.reward == pytest.approx(want.total)
    assert len({s.breakdown.token for s in data.samples}) > 1

    percentile = build_sft_data(
        SeededEngine(),
        examples,
        proto,
        reward,
        cfg=cfg.model_copy(update={"token_norm": "percentile"}),
        seed=1,
    )
    toks = [s.transcript.comm_tokens for s in percentile.samples]
    assert percentile.t_norm == pytest.approx(max(1.0, float(np.percentile(toks, 80))))

    assert _ids(data.kept) == _brute(data.samples, examples, -10.0, (0.0, 0.7))
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
