"""Influence estimators on the embedded model (tiny: 2 validation tasks, K = 2, 2 turns of 12 tokens).

What is checked: a step of size zero gives exactly zero influence (every estimator); the adapter is restored
bit for bit after each candidate; the likelihood estimate equals an importance-weighted average computed
here by hand (manual unpadded forwards, weights in plain Python); the gradient estimate is the derivative
of the likelihood estimate along an SGD step (finite difference), and the retention estimate that of the
metric-weighted log-likelihood of the greedy conversations. The metric is a hash of the conversation
text in [0, 1): the model is too small to solve tasks, and a metric that varies between samples is what
makes the weights matter.
"""

from __future__ import annotations

import math
import uuid

import pytest
import torch

from dits.influence import InfluenceConfig, InfluenceEstimator, make_estimator
from dits.mas.dialogue import Transcript
from dits.mas.protocol import ProtocolConfig, prefixed, render_view, turn_prefix
from dits.records import PreferencePair
from dits.tasks.builtin import make_builtin
from dits.tasks.example import Example
from tests.helpers import INFLUENCE_PROTOCOL, hash_metric
from tests.threads import one_torch_thread

EPS = 1e-2
"""SGD step size for the finite difference. A 10x smaller step makes float32 log-prob noise (~1e-5 nats per
conversation) the larger error (~4%, up to 20% at 1e-4); the curvature error of this step is removed by
Richardson extrapolation (see the test)."""
FD_TOLERANCE = 0.10


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def _drop_adapter(engine, name: str) -> None:
    if name in engine.adapter_names():
        engine.delete_adapter(name)


@pytest.fixture(scope="module")
def adapter(engine):
    """A small seeded LoRA with non-zero B, so the DPO gradient reaches both A and B."""
    from dits.train.config import LoraSettings

    name = f"infl_{uuid.uuid4().hex[:6]}"
    engine.add_adapter(name, LoraSettings(r=2, alpha=4, target_modules=["q_proj", "v_proj"]).to_peft())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in engine.adapter_parameters(name).items():
            # Both from a seeded generator: PEFT draws A from the global RNG, whose state depends on what
            # ran earlier in the session, and the scores below would then depend on the test selection.
            p.copy_(torch.randn(p.shape, generator=gen) * (0.02 if "lora_B" in n else 0.04))
    engine.model.eval()
    previous = engine.active_adapter
    yield name
    engine.set_adapter(previous if previous != name else None)
    _drop_adapter(engine, name)


@pytest.fixture(scope="module")
def val_examples() -> list[Example]:
    return make_builtin("facts", "dev", 2, seed=0)


@pytest.fixture(scope="module")
def chunks() -> list[list[PreferencePair]]:
    train = make_builtin("facts", "train", 3, seed=0)
    pairs = [
        PreferencePair(
            tree_task_id=ex.id,
            node_id=f"n{i}",
            prefix=[],
            speaker=0,
            chosen=f"My notes say the answer is <A>{ex.answers[0]}</A>",
            rejected="I do not know.",
            chosen_id=f"c{i}",
            rejected_id=f"r{i}",
            q_chosen=1.0,
            q_rejected=0.0,
            visits_chosen=1,
            visits_rejected=1,
            prompt=render_view(ex, [], 0, INFLUENCE_PROTOCOL),
        )
        for i, ex in enumerate(train)
    ]
    return [pairs[:1], pairs[1:]]


def _prepared(engine, adapter, val_examples, estimator: str, **cfg) -> InfluenceEstimator:
    est = make_estimator(
        InfluenceConfig(estimator=estimator, val_tasks=2, samples_per_task=2, seed=0, **cfg), hash_metric
    )
    est.prepare(engine, adapter, val_examples, INFLUENCE_PROTOCOL)
    return est


def _with_lr(est: InfluenceEstimator, lr: float) -> InfluenceEstimator:
    est.cfg = est.cfg.model_copy(update={"lr": lr})
    return est


@pytest.fixture(scope="module")
def likelihood(engine, adapter, val_examples) -> InfluenceEstimator:
    est = _prepared(engine, adapter, val_examples, "likelihood", optimizer="sgd")
    by_task = [[c.metric for c in est.cache if c.task == t] for t in range(2)]  # type: ignore[attr-defined]
    assert any(len(set(m)) > 1 for m in by_task), "test needs a metric that differs between samples"
    return est


@pytest.fixture(scope="module")
def gradient(engine, adapter, val_examples) -> InfluenceEstimator:
    return _prepared(engine, adapter, val_examples, "gradient", optimizer="sgd")


def _adapter_state(engine, name: str) -> dict[str, torch.Tensor]:

    return {n: p.detach().clone() for n, p in engine.adapter_parameters(name).items()}


def _assert_same(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys()
    for n in before:
        assert torch.equal(before[n], after[n]), n


def test_rollout_zero_step_is_zero_and_adapter_restored_bit_for_bit(engine, adapter, val_examples, chunks):
    before = _adapter_state(engine, adapter)
    active = engine.active_adapter
    est = _prepared(engine, adapter, val_examples, "rollout", lr=0.0)
    assert est.prepare_cost.flops > 0
    [zero] = est.score(chunks[:1])
    assert zero.score == 0.0
    _with_lr(est, 1e-2)  # AdamW: every adapter entry moves by ~lr, so restoring has something to undo
    scores = est.score(chunks)
    assert [s.candidate for s in scores] == [0, 1]
    assert all(s.diagnostics["update_norm"] > 0 and s.cost.flops > 0 for s in scores)
    assert scores[1].pair_ids == [
        f"{p.tree_task_id}:{p.node_id}:c{i + 1}:r{i + 1}" for i, p in enumerate(chunks[1])
    ]
    _assert_same(before, _adapter_state(engine, adapter))
    assert engine.active_adapter == active


def test_zero_step_is_exactly_zero_for_the_cheap_estimators(
    engine, adapter, likelihood, gradient, retention, chunks
):
    before = _adapter_state(engine, adapter)
    for est in (likelihood, gradient, retention):
        [s] = _with_lr(est, 0.0).score(chunks[:1])
        assert s.score == 0.0, est.name
    [s] = _with_lr(gradient, 1.0).score(chunks[:1])
    assert s.score != 0.0  # the zero above is the step size, not a zero gradient
    _assert_same(before, _adapter_state(engine, adapter))


def _manual_logp(engine, example: Example, transcript: Transcript, temperature: float = 1.0) -> float:
    """log π of a conversation under softmax(logits / temperature) over the whole vocabulary: one unpadded
    forward per turn, outside the engine's scoring code."""
    tok = engine.tokenizer
    texts = transcript.texts
    total = 0.0
    with torch.no_grad():
        for k, turn in enumerate(transcript.turns):
            view = render_view(example, texts[:k], turn.speaker, INFLUENCE_PROTOCOL)
            head = tok.apply_chat_template(view, add_generation_prompt=True, tokenize=False)
            prefix = turn_prefix(turn.speaker, INFLUENCE_PROTOCOL)
            prompt = tok(head + prefix, add_special_tokens=False)["input_ids"]
            # The turn as the protocol renders it, tokenised whole: its tokens after the prompt's.
            full = tok(head + prefixed(prefix, turn.text), add_special_tokens=False)["input_ids"]
            assert full[: len(prompt)] == prompt
            comp = full[len(prompt) :]
            if not comp:
                continue
            ids = torch.tensor([prompt + comp], device=engine.device)
            logp = torch.log_softmax(engine.model(input_ids=ids).logits[0].float() / temperature, dim=-1)
            total += sum(float(logp[len(prompt) + j - 1, t]) for j, t in enumerate(comp))
    return total


def test_likelihood_equals_brute_force_importance_weighting(
    engine, adapter, val_examples, likelihood, chunks
):
    from dits.train.step import one_step

    """The estimate equals self-normalised importance weighting with weights computed by hand at the
    temperature the conversations were sampled at (and not at temperature 1, which weights samples of
    π_θ at T by the ratio of the untempered policies)."""
    lr = 1.0  # a big SGD step: log-weights of order 1, so the weighting is far from uniform
    [s] = _with_lr(likelihood, lr).score(chunks[:1])
    cache = likelihood.cache  # type: ignore[attr-defined]
    temperature = likelihood.cfg.temperature
    assert temperature != 1.0
    previous = engine.active_adapter
    engine.set_adapter(adapter)
    expected = {}
    try:
        for t_score in (temperature, 1.0):
            base = [_manual_logp(engine, val_examples[c.task], c.transcript, t_score) for c in cache]
            with one_step(engine, adapter, chunks[0], lr=lr, beta=0.1, optimizer="sgd"):
                engine.set_adapter(adapter)
                stepped = [_manual_logp(engine, val_examples[c.task], c.transcript, t_score) for c in cache]
            expected[t_score] = _snis_difference(cache, base, stepped, len(val_examples))
    finally:
        engine.set_adapter(previous)
    assert abs(expected[temperature]) > 1e-3  # the weights do move the estimate
    assert s.score == pytest.approx(expected[temperature], abs=2e-4)
    assert abs(expected[1.0] - expected[temperature]) > 1e-3  # scoring at T 1 would be measurably off
    assert s.diagnostics["max_abs_log_weight"] > 0.1


def _snis_difference(cache, base: list[float], stepped: list[float], n_tasks: int) -> float:
    """Mean over tasks of Σ softmax(w)·metric with w = stepped − base, minus the plain mean metric."""
    new, old = [], []
    for t in range(n_tasks):
        rows = [(c.metric, stepped[i] - base[i]) for i, c in enumerate(cache) if c.task == t]
        top = max(w for _, w in rows)
        weights = [math.exp(w - top) for _, w in rows]
        new.append(sum(m * w for (m, _), w in zip(rows, weights, strict=True)) / sum(weights))
        old.append(sum(m for m, _ in rows) / len(rows))
    return sum(new) / len(new) - sum(old) / len(old)


def test_gradient_matches_finite_difference_of_likelihood(likelihood, gradient, chunks):
    """SGD, step EPS: the first-order part of M̂(θ − EPS·∇L) − M̂(θ) equals −EPS·∇L·∇M̂ within FD_TOLERANCE
    (relative). The finite difference is Richardson-extrapolated from steps EPS and 2·EPS
    (``2·FD(ε) − FD(2ε)/2`` cancels the curvature term), because when the first-order score is small
    (~2e-4 here) the ε² term alone was 13% of it."""
    assert [c.transcript for c in gradient.cache] == [c.transcript for c in likelihood.cache]  # type: ignore[attr-defined]
    fd1 = [s.score for s in _with_lr(likelihood, EPS).score(chunks)]
    fd2 = [s.score for s in _with_lr(likelihood, 2 * EPS).score(chunks)]
    first = _with_lr(gradient, EPS).score(chunks)
    for a1, a2, b in zip(fd1, fd2, first, strict=True):
        assert abs(b.score) > 1e-5
        assert 2 * a1 - a2 / 2 == pytest.approx(b.score, rel=FD_TOLERANCE)
    # The gradient score is linear in lr.
    [scaled] = _with_lr(gradient, 2 * EPS).score(chunks[:1])
    assert scaled.score == pytest.approx(2 * first[0].score, rel=1e-9)


@pytest.fixture(scope="module")
def retention(engine, adapter, val_examples) -> InfluenceEstimator:
    return _prepared(engine, adapter, val_examples, "retention", optimizer="sgd")


def test_retention_is_the_derivative_of_the_metric_weighted_greedy_likelihood(
    engine, adapter, val_examples, retention, chunks
):
    """Its conversations are the greedy ones, and for an SGD step its score is the first-order change of
    (1/V) Σ_t m_t · log π(greedy conversation t): a Richardson-extrapolated finite difference of that sum,
    log π by hand (unpadded forwards at temperature 1). The unweighted sum's change differs, so the metric
    weights are what the score follows."""
    from dits.mas.dialogue import run_dialogues
    from dits.train.step import one_step

    previous = engine.active_adapter
    engine.set_adapter(adapter)
    try:
        greedy = run_dialogues(engine, val_examples, INFLUENCE_PROTOCOL, temperature=0.0)
        assert [c.transcript for c in retention.cache] == greedy  # type: ignore[attr-defined]
        metrics = [hash_metric(ex, tr) for ex, tr in zip(val_examples, greedy, strict=True)]

        def logps() -> list[float]:
            return [_manual_logp(engine, ex, tr) for ex, tr in zip(val_examples, greedy, strict=True)]

        base = logps()
        change: dict[float, list[float]] = {}
        for lr in (EPS, 2 * EPS):
            with one_step(engine, adapter, chunks[0], lr=lr, beta=0.1, optimizer="sgd"):
                engine.set_adapter(adapter)
                change[lr] = [a - b for a, b in zip(logps(), base, strict=True)]
    finally:
        engine.set_adapter(previous)
    first = [2 * a - b / 2 for a, b in zip(change[EPS], change[2 * EPS], strict=True)]
    weighted = sum(m * d for m, d in zip(metrics, first, strict=True)) / len(first)
    unweighted = sum(first) / len(first)
    [s] = _with_lr(retention, EPS).score(chunks[:1])
    assert abs(s.score) > 1e-5
    assert s.score == pytest.approx(weighted, rel=FD_TOLERANCE)
    assert abs(unweighted - weighted) > 3 * FD_TOLERANCE * abs(weighted)
    assert retention.baseline == pytest.approx(sum(metrics) / len(metrics))


def test_retention_with_no_scoring_conversation_warns_and_scores_zero(
    engine, adapter, val_examples, chunks, caplog
):
    """With nothing solved there is nothing to keep: every score is exactly 0 (a tie), and the log says so
    instead of letting selection rank by ties silently."""
    est = make_estimator(InfluenceConfig(estimator="retention", val_tasks=2, lr=1.0), lambda ex, tr: 0.0)
    with caplog.at_level("WARNING", logger="dits.influence.retention"):
        est.prepare(engine, adapter, val_examples, INFLUENCE_PROTOCOL)
    assert "none of the 2 greedy validation conversations scores" in caplog.text
    assert [s.score for s in est.score(chunks)] == [0.0, 0.0]


def test_projected_gradient_is_seeded_and_zero_at_lr0(gradient, chunks):
    exact = _with_lr(gradient, 1.0).score(chunks[:1])[0].score
    gradient.cfg = gradient.cfg.model_copy(update={"projection_dim": 8, "lr": 0.0})
    try:
        [zero] = gradient.score(chunks[:1])
        assert zero.score == 0.0
        [a] = _with_lr(gradient, 1.0).score(chunks[:1])
        [b] = gradient.score(chunks[:1])
        assert a.score == b.score != 0.0
        assert a.score != exact  # the projection was applied
    finally:
        gradient.cfg = gradient.cfg.model_copy(update={"projection_dim": None})


def test_projected_gradient_equals_the_unprojected_one_in_expectation(gradient, chunks):
    """Over projection seeds, the mean projected score is the exact dot product u·g, within 4 standard
    errors of a Gaussian projection's variance ((u·g)² + |u|²|g|²)/d; the spread across seeds matches that
    variance (a wrong 1/sqrt(d) scale or a reused matrix would fail one of the two). The DPO gradient is
    computed once and projected per seed (what ``score`` does per candidate, checked for the first seed)."""
    d, seeds = 4, 60
    update = {n: -g for n, g in gradient.dpo_gradient(chunks[0]).items()}  # SGD, lr 1
    u2 = sum(float((u.double() ** 2).sum()) for u in update.values())
    g2 = sum(float((v.double() ** 2).sum()) for v in gradient.val_grad.values())
    cfg = gradient.cfg
    exact = _with_lr(gradient, 1.0).score(chunks[:1])[0].score
    values = []
    try:
        for seed in range(seeds):
            gradient.cfg = cfg.model_copy(update={"projection_dim": d, "lr": 1.0, "seed": 1000 + seed})
            values.append(float(gradient._project(update) @ gradient._project(gradient.val_grad)))
            if seed == 0:
                assert gradient.score(chunks[:1])[0].score == pytest.approx(values[0], rel=1e-9)
    finally:
        gradient.cfg = cfg
    var = (exact**2 + u2 * g2) / d
    mean = sum(values) / seeds
    spread = sum((v - mean) ** 2 for v in values) / (seeds - 1)
    assert abs(mean - exact) < 4 * math.sqrt(var / seeds)
    assert 0.5 * var < spread < 2.0 * var
    assert len(set(values)) == seeds


def test_gradient_candidate_is_charged_like_the_step_it_stands_for(engine, adapter, gradient, chunks):
    """The DPO gradient of a candidate costs what the step's own forward and backward cost: the policy
    forward and backward, booked as training; neither runs a reference forward (the reference is θ)."""
    from dits.train.step import one_step

    before = engine.ledger.snapshot()
    with one_step(engine, adapter, chunks[0], lr=0.0, beta=0.1, optimizer="sgd"):
        pass
    step = engine.ledger.snapshot() - before
    before = engine.ledger.snapshot()
    gradient.dpo_gradient(chunks[0])  # type: ignore[attr-defined]
    grad = engine.ledger.snapshot() - before
    assert step.trained_tokens > 0 and step.scored_tokens == step.prompt_tokens == 0
    assert grad == step


def test_the_scored_turns_are_the_tokens_the_model_wrote(engine):
    """With a forced turn prefix ("Alice:") the model writes " the ...", stored stripped. The estimators
    must score those tokens: scoring the stripped text scores "the" (another token) after "Alice:", and the
    importance weights and validation gradient are then about conversations the model did not produce."""
    from dits.engine import SamplingParams
    from dits.influence.likelihood import conversation_turns
    from dits.mas.dialogue import run_dialogues

    proto = ProtocolConfig(max_turns=2, max_new_tokens=8, worked_example=False, turn_prefix=True)
    examples = make_builtin("facts", "dev", 2, seed=1)
    checked = 0
    for ex, tr in zip(examples, run_dialogues(engine, examples, proto), strict=True):
        for k, (view, completion, prefix) in enumerate(conversation_turns(ex, tr, proto)):
            assert prefix == turn_prefix(tr.turns[k].speaker, proto) != ""
            greedy = SamplingParams(temperature=0.0, max_new_tokens=8, prefix=prefix)
            [[written]] = engine.generate([view], greedy)
            assert written.text.strip() == tr.turns[k].text  # the same turn, regenerated
            [scored] = engine.score([view], [completion], prefix)
            assert scored.token_ids == written.token_ids
            checked += 1
    assert checked == 4
