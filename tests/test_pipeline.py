"""The loop: stage skip/refuse/resume rules, kill-and-rerun equivalence, and the report vs. the artifacts."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from dits.artifacts import StageChanged, differences, read_manifest, run_stage
from dits.ledger import Ledger
from tests.helpers import TINY
from tests.threads import one_torch_thread

# -- stage rules (no model) ---------------------------------------------------------------------------


def _stage(tmp: Path, inputs: dict, calls: list[int], force: bool = False, fail: bool = False):
    book = Ledger(params=10)

    def body(out: Path) -> dict[str, float]:
        calls.append(1)
        with open(out / "records.jsonl", "a") as fh:
            fh.write("x\n")
        book.charge(prompt_tokens=3)
        if fail:
            raise KeyboardInterrupt
        return {"records": (out / "records.jsonl").read_text().count("\n")}

    return run_stage(tmp / "s", stage="s", iteration=0, method=None, inputs=inputs, body=body,
                     ledger=lambda: book, force=force)  # fmt: skip


def test_finished_stage_is_skipped_and_charged_its_own_cost(tmp_path):
    calls: list[int] = []
    first = _stage(tmp_path, {"a": 1}, calls)
    again = _stage(tmp_path, {"a": 1}, calls)
    assert len(calls) == 1 and again == first
    assert first.ledger["prompt_tokens"] == 3 and first.ledger["flops"] == 2 * 10 * 3
    assert read_manifest(tmp_path / "s") == first


def test_cut_stage_resumes_in_place_and_changed_inputs_are_refused(tmp_path):
    calls: list[int] = []
    with pytest.raises(KeyboardInterrupt):
        _stage(tmp_path, {"a": 1, "b": {"c": 2}}, calls, fail=True)
    assert read_manifest(tmp_path / "s") is None
    # A rerun with other inputs is refused, naming the key, whether the stage finished or not.
    with pytest.raises(StageChanged, match=r"b\.c: 2 -> 3"):
        _stage(tmp_path, {"a": 1, "b": {"c": 3}}, calls)
    done = _stage(tmp_path, {"a": 1, "b": {"c": 2}}, calls)  # resumes: the appended record is kept
    assert done.counts["records"] == 2
    with pytest.raises(StageChanged, match=r"a: 1 -> 5"):
        _stage(tmp_path, {"a": 5, "b": {"c": 2}}, calls)
    redone = _stage(tmp_path, {"a": 5, "b": {"c": 2}}, calls, force=True)  # wiped, then redone
    assert redone.counts["records"] == 1 and redone.inputs["a"] == 5


def test_differences_lists_leaves():
    assert differences({"x": {"y": 1, "z": 2}}, {"x": {"y": 1, "z": 3}, "w": 0}) == [
        "w: '(absent)' -> 0",
        "x.z: 2 -> 3",
    ]


# -- a tiny real run -------------------------------------------------------------------------------


def _run(engine, root: Path, **kw):
    from dits.config import parse_config
    from dits.pipeline import Pipeline

    return Pipeline(parse_config(TINY), root, engine=engine, progress=False, **kw).run()


@pytest.fixture(scope="module")
def one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def uninterrupted(engine, one_thread, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs_a")
    _run(engine, root)
    return root / "tiny"


ARTIFACTS = [
    "iter_0/search/trees.jsonl",
    "iter_0/search/pairs.jsonl",
    "iter_0/influence/scores.jsonl",
    "iter_0/select-q/selected.jsonl",
    "iter_0/select-mix/selected.jsonl",
    "iter_0/budget-q-budget/trees.jsonl",
    "iter_0/budget-q-budget/pool.jsonl",
    "iter_0/select-q-budget/selected.jsonl",
    "iter_0/dpo-q/adapter_model.safetensors",
    "iter_0/dpo-mix/adapter_model.safetensors",
    "iter_0/evaluate-q/transcripts.jsonl",
    "iter_0/evaluate-mix/transcripts.jsonl",
    "base/evaluate/transcripts.jsonl",
]


def _scores_without_cost(path: Path) -> list[tuple]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [(r["candidate"], r["pair_ids"], r["score"]) for r in rows]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_artifacts(engine, one_thread, uninterrupted, tmp_path, monkeypatch):
    import dits.stages.search
    import dits.stages.units
    import dits.train.trainer

    def killed(*_a, **_k):
        raise KeyboardInterrupt("killed")

    # 1) killed in the search stage, after the trees were appended and before the pairs were written
    with monkeypatch.context() as m:
        m.setattr(dits.stages.search, "mine_tree_pairs", killed)
        with pytest.raises(KeyboardInterrupt):
            _run(engine, tmp_path)
    run = tmp_path / "tiny"
    assert (run / "iter_0/search/trees.jsonl").exists() and read_manifest(run / "iter_0/search") is None
    # 2) killed in the influence stage, right after its first chunk's score was appended
    append = dits.stages.units.append_jsonl

    def append_then_die(path, records):  # type: ignore[no-untyped-def]
        append(path, records)
        if Path(path).name == "scores.jsonl":
            raise KeyboardInterrupt("killed")

    with monkeypatch.context() as m:
        m.setattr(dits.stages.units, "append_jsonl", append_then_die)
        with pytest.raises(KeyboardInterrupt):
            _run(engine, tmp_path)
    assert len((run / "iter_0/influence/scores.jsonl").read_text().splitlines()) == 1
    # 3) killed in the first DPO training, before the adapter was saved
    with monkeypatch.context() as m:
        m.setattr(dits.train.trainer, "finish_training", killed)
        with pytest.raises(KeyboardInterrupt):
            _run(engine, tmp_path)
    assert read_manifest(run / "iter_0/search") is not None
    assert read_manifest(run / "iter_0/dpo-q") is None
    # 4) the rerun completes: the same artifacts, and every stage charged what the uninterrupted run was
    _run(engine, tmp_path)
    for rel in ARTIFACTS:
        a, b = uninterrupted / rel, run / rel
        if rel.endswith("scores.jsonl"):  # costs are wall seconds; the scores themselves must match
            assert _scores_without_cost(a) == _scores_without_cost(b), rel
        else:
            assert a.read_bytes() == b.read_bytes(), rel
    for manifest in uninterrupted.glob("*/*/manifest.json"):
        rel = manifest.relative_to(uninterrupted)
        ledger = json.loads(manifest.read_text())["ledger"]
        assert json.loads((run / rel).read_text())["ledger"] == ledger, rel
    from dits.report import collect_rows

    def flops(run_dir: Path) -> dict:  # the report's FLOPs per method (q-budget's priced from influence)
        return {(r.method, r.iteration, r.kind, r.k): (r.flops, r.tokens) for r in collect_rows(run_dir)}

    assert flops(run) == flops(uninterrupted)


@pytest.mark.slow
def test_report_numbers_equal_a_recomputation_from_artifacts(uninterrupted):
    from dits.artifacts import read_jsonl
    from dits.evaluate import EvalRecord
    from dits.report import collect_rows, write_report
    from dits.stats import bootstrap_ci

    report = write_report(uninterrupted).read_text()
    rows = {(r.method, r.iteration): r for r in collect_rows(uninterrupted) if r.kind == "model"}
    assert set(rows) == {("untrained", None), ("q", 0), ("q-budget", 0), ("mix", 0)}
    manifests = [json.loads(p.read_text()) for p in uninterrupted.glob("iter_0/*/manifest.json")]
    infl = next(m for m in manifests if m["stage"] == "influence")["ledger"]["flops"]
    for method in ("q", "mix"):
        records = read_jsonl(uninterrupted / f"iter_0/evaluate-{method}/transcripts.jsonl", EvalRecord)
        metrics = [r.transcript.metric for r in records]
        ci = bootstrap_ci(metrics)
        tokens = [sum(t.tokens for t in r.transcript.turns) for r in records]
        kept = (uninterrupted / f"iter_0/select-{method}/selected.jsonl").read_text().count("\n")
        flops = _own(manifests, None) + _own(manifests, method) - (infl if method == "q" else 0.0)
        row = rows[(method, 0)]
        assert row.metric == pytest.approx(sum(metrics) / len(metrics))
        assert (row.low, row.high) == pytest.approx((ci.low, ci.high))
        assert row.comm_tokens == pytest.approx(sum(tokens) / len(tokens))
        assert row.pairs_kept == kept
        assert row.flops == pytest.approx(flops) and flops > 0
        assert f"| {method} | 0 | {row.metric:.3f} |" in report
    # q and mix share the pool; only mix pays for the influence stage
    assert rows[("mix", 0)].flops - rows[("q", 0)].flops == pytest.approx(
        infl + _own(manifests, "mix") - _own(manifests, "q")
    )
    for png in ("metric_vs_tokens.png", "metric_vs_flops.png", "influence_vs_q.png"):
        assert (uninterrupted / png).read_bytes()[:4] == b"\x89PNG" and f"]({png})" in report


@pytest.mark.slow
def test_results_json_is_recomputed_from_the_transcripts(uninterrupted):
    from dits.artifacts import read_jsonl
    from dits.evaluate import EvalRecord
    from dits.report import write_report
    from dits.stats import paired_bootstrap

    write_report(uninterrupted)
    res = json.loads((uninterrupted / "results.json").read_text())
    dirs = {"untrained": "base/evaluate", **{m: f"iter_0/evaluate-{m}" for m in ("q", "q-budget", "mix")}}
    per_task = {
        m: {r.transcript.example_id: r.transcript.metric
            for r in read_jsonl(uninterrupted / d / "transcripts.jsonl", EvalRecord)}
        for m, d in dirs.items()
    }  # fmt: skip
    assert set(res["methods"]) == set(dirs)
    for m, metrics in per_task.items():
        assert res["methods"][m]["metric"] == pytest.approx(sum(metrics.values()) / len(metrics))
    got = {(c["method"], c["baseline"]): c for c in res["comparisons"]}
    want = {("q", "untrained"), ("q-budget", "untrained"), ("mix", "untrained"), ("mix", "q"),
            ("mix", "q-budget")}  # fmt: skip
    assert set(got) == want
    for (m, b), c in got.items():
        ids = sorted(per_task[b])
        diffs = [per_task[m][i] - per_task[b][i] for i in ids]
        assert c["difference"] == pytest.approx(sum(diffs) / len(diffs)) and c["n"] == len(ids)
        ci = paired_bootstrap([per_task[m][i] for i in ids], [per_task[b][i] for i in ids])
        assert (c["low"], c["high"]) == pytest.approx((ci.low, ci.high))
        assert f"{m} − {b}: {c['difference']:+.3f}" in (uninterrupted / "report.md").read_text()


@pytest.mark.slow
def test_baselines_and_scaling_points_are_in_the_report_with_token_ratios(uninterrupted):
    """``pipeline.baselines: [cot]`` evaluates the untrained model with CoT; ``pipeline.scaling: [2]`` runs
    mas-sc with 2 conversations per task on the untrained and each final model. Their rows are recomputed
    from their transcripts, and every row's tokens are given relative to the untrained system and CoT."""
    from dits.artifacts import read_jsonl
    from dits.evaluate import EvalRecord
    from dits.report import collect_rows, write_report

    report = write_report(uninterrupted).read_text()
    rows = {(r.method, r.iteration, r.kind): r for r in collect_rows(uninterrupted)}
    dirs = {
        ("cot", None, "baseline"): "base/baseline-cot",
        ("untrained mas-sc", None, "scaling"): "base/scaling-k2",
        **{(f"{m} mas-sc", 0, "scaling"): f"iter_0/scaling-{m}-k2" for m in ("q", "q-budget", "mix")},
    }
    assert {k for k in rows if k[2] != "model"} == set(dirs)
    for key, d in dirs.items():
        records = read_jsonl(uninterrupted / d / "transcripts.jsonl", EvalRecord)
        assert len(records) == 3
        tokens = [sum(t.tokens for t in r.transcript.turns) for r in records]
        row = rows[key]
        assert row.metric == pytest.approx(sum(r.transcript.metric for r in records) / 3)
        assert row.comm_tokens == pytest.approx(sum(tokens) / 3)
        if key[2] == "scaling":  # 2 whole conversations per task, each of 1 or 2 turns
            assert row.k == 2 and all(2 <= len(r.transcript.turns) <= 4 for r in records)
    base, cot = rows[("untrained", None, "model")], rows[("cot", None, "baseline")]
    q = rows[("q", 0, "model")]
    line = next(x for x in report.splitlines() if x.startswith("| q | 0 |"))
    assert f"| {q.comm_tokens / base.comm_tokens:.2f}x | {q.comm_tokens / cot.comm_tokens:.2f}x |" in line
    assert rows[("q mas-sc", 0, "scaling")].flops == q.flops  # the scaled model's lineage cost
    res = json.loads((uninterrupted / "results.json").read_text())
    assert sorted((o["method"], o["kind"]) for o in res["others"]) == sorted((k[0], k[2]) for k in dirs)


@pytest.mark.slow
def test_q_budget_grows_the_extra_trees_that_cost_the_influence_stage(uninterrupted):
    from dits.artifacts import read_jsonl, read_manifest
    from dits.records import PreferencePair
    from dits.search.pairs import keep_count
    from dits.search.tree import Tree

    run = uninterrupted / "iter_0"
    search, infl, budget = (read_manifest(run / d) for d in ("search", "influence", "budget-q-budget"))
    assert search and infl and budget and budget.counts["target_flops"] == infl.ledger["flops"]
    pool_trees = read_jsonl(run / "search/trees.jsonl", Tree)
    per_tree = sum(t.flops for t in pool_trees) / len(pool_trees)
    # a tree's cost is its share of the search's FLOPs; the rest is the T_norm calibration and mining
    assert 0 < sum(t.flops for t in pool_trees) <= search.ledger["flops"]
    want_trees = math.ceil(infl.ledger["flops"] / per_tree)
    trees = read_jsonl(run / "budget-q-budget/trees.jsonl", Tree)
    assert len(trees) == budget.counts["trees"] == want_trees
    # the extra trees are on train tasks no iteration uses: after the iteration's slice
    from dits.config import parse_config
    from dits.tasks.source import examples_for

    train = examples_for(parse_config(TINY).task, "train", limit=2 + want_trees)
    assert [t.task_id for t in trees] == [ex.id for ex in train[2:]]
    base = read_jsonl(run / "search/pairs.jsonl", PreferencePair)
    extra = read_jsonl(run / "budget-q-budget/pairs.jsonl", PreferencePair)
    pool = read_jsonl(run / "budget-q-budget/pool.jsonl", PreferencePair)
    assert pool == base + extra
    # ranked by Q over the enlarged pool, keeping as many pairs as mix keeps from the shared one
    kept = read_jsonl(run / "select-q-budget/selected.jsonl", PreferencePair)
    k = keep_count(len(base), 0.5)
    assert len(kept) == min(k, len(pool))
    top = sorted(range(len(pool)), key=lambda i: (-pool[i].q_chosen, i))[: len(kept)]
    assert kept == [pool[i] for i in sorted(top)]
    plan = json.loads((run / "budget-q-budget/plan.json").read_text())
    assert plan["target_flops"] == infl.ledger["flops"] and plan["trees"] == want_trees
    assert plan["flops_per_tree"] == pytest.approx(per_tree)
    # q-budget pays for the shared pool and its own extra search, not for the influence stage
    from dits.report import collect_rows

    row = next(r for r in collect_rows(uninterrupted) if r.method == "q-budget")
    manifests = [json.loads(p.read_text()) for p in run.glob("*/manifest.json")]
    assert row.flops == pytest.approx(
        _own(manifests, None) - infl.ledger["flops"] + _own(manifests, "q-budget")
    )


def _own(manifests: list[dict], method: str | None) -> float:
    return sum(m["ledger"]["flops"] for m in manifests if m["method"] == method and m["stage"] != "evaluate")


def test_changed_config_of_a_finished_stage_is_refused(tmp_path):
    """No model needed: a finished manifest with other inputs is enough to trigger the refusal."""
    from dits.config import parse_config
    from dits.pipeline import Pipeline
    from dits.stages.context import ModelRef
    from dits.stages.evaluate import evaluate_stage

    cfg = parse_config(TINY)
    pipe = Pipeline(cfg, tmp_path, progress=False)
    base = ModelRef(kind="base", digest="b")
    stage_dir = tmp_path / "tiny" / "base" / "evaluate"
    stage_dir.mkdir(parents=True)
    old = {"digest": "old", "inputs": {"protocol": {"max_turns": 9}}}
    (stage_dir / "stage.json").write_text(json.dumps(old))
    (stage_dir / "manifest.json").write_text(json.dumps({**old, "stage": "evaluate", "iteration": None,
                                                         "method": None}))  # fmt: skip
    with pytest.raises(StageChanged, match=r"protocol\.max_turns: 9 -> 2"):
        evaluate_stage(pipe.ctx, None, None, base, [])
    shutil.rmtree(stage_dir)


def test_the_reward_keeps_the_initial_model_after_a_full_fine_tune(monkeypatch):
    """With ``train.full_finetune`` the run's engine is rebuilt on the fine-tuned weights; the engine the
    stages hand the reward for its readability NLLs stays one of the initial weights."""
    from dits.config import parse_config
    from dits.stages.context import EngineHolder, ModelRef
    from tests.helpers import SeededEngine

    built: list[str | None] = []

    def factory(cfg, *, model=None, ledger=None, **_):  # type: ignore[no-untyped-def]
        built.append(model)
        engine = SeededEngine()
        engine.weights = model or "initial"  # type: ignore[attr-defined]
        return engine

    monkeypatch.setattr("dits.stages.context.engine_from_config", factory)
    holder = EngineHolder(parse_config({"train": {"full_finetune": True}}))
    assert holder.initial() is holder.engine and holder.engine.weights == "initial"
    holder.adopt_full("/ft/1")  # SFT trained the engine's base in place
    assert holder.initial() is not holder.engine and holder.initial().weights == "initial"
    full = holder.activate(ModelRef(kind="full", path="/ft/1", digest="d1"))
    assert full is holder.engine and holder.initial().weights == "initial"
    back = holder.activate(ModelRef(kind="base", digest="b"))  # the initial engine is reused, not rebuilt
    assert back.weights == "initial" and back is holder.initial() and built == [None, None]
    holder.adopt_full("/ft/2")  # a second lineage trains that engine in place: it is not initial now
    assert holder.initial() is not back and holder.initial().weights == "initial" and len(built) == 3


def test_vllm_full_fine_tune_rebuilds_the_served_engine_and_keeps_an_initial_scorer(monkeypatch):
    """``vllm`` + ``train.full_finetune``: the hf policy trains in place; vLLM is restarted (the old one
    closed) on the saved weights when a lineage's model is activated; the reward's initial model stays the
    initial weights without a second vLLM."""
    from dits.config import parse_config
    from dits.stages.context import EngineHolder, ModelRef
    from tests.helpers import SeededEngine

    made: list[tuple[str, str]] = []

    def fake(kind: str):  # type: ignore[no-untyped-def]
        def factory(cfg, *, model=None, ledger=None, **_):  # type: ignore[no-untyped-def]
            engine = SeededEngine()
            engine.weights, engine.kind, engine.closed = model or "initial", kind, False  # type: ignore[attr-defined]
            engine.close = lambda: setattr(engine, "closed", True)  # type: ignore[attr-defined]
            made.append((kind, model or "initial"))
            return engine

        return factory

    monkeypatch.setattr("dits.stages.context.engine_from_config", fake("vllm"))
    monkeypatch.setattr("dits.stages.context.policy_from_config", fake("hf"))
    holder = EngineHolder(parse_config({"engine": {"backend": "vllm"}, "train": {"full_finetune": True}}))
    base = ModelRef(kind="base", digest="b")
    served, policy = holder.activate(base), holder.policy(base)
    assert (served.kind, policy.kind) == ("vllm", "hf") and holder.initial() is served
    holder.adopt_full("/ft/1")  # SFT trained the policy in place; vLLM still serves the initial weights
    assert holder.policy(ModelRef(kind="full", path="/ft/1", digest="f")) is policy
    assert holder.initial() is served
    full = holder.activate(ModelRef(kind="full", path="/ft/1", digest="f"))
    assert (full.kind, full.weights) == ("vllm", "/ft/1") and served.closed
    scorer = holder.initial()  # an hf engine on the initial weights, not a second vLLM
    assert (scorer.kind, scorer.weights) == ("hf", "initial") and holder.initial() is scorer
    again = holder.policy(base)  # another lineage starts from the initial model: a fresh policy
    assert again is not policy and again.weights == "initial"
    assert made == [
        ("vllm", "initial"),
        ("hf", "initial"),
        ("vllm", "/ft/1"),
        ("hf", "initial"),
        ("hf", "initial"),
    ]
