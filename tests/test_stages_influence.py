"""``dits influence``: a run cut after k chunks and resumed writes the scores of an uninterrupted run, and
the command gives the pipeline's influence stage's scores for the same config.

Embedded model, tiny settings (1 validation task, K = 2, 2 turns of 12 tokens, rank-2 LoRA), the gradient
estimator (the cheapest) and a hash metric so that the scores are not all zero (the model solves nothing).
"""

from __future__ import annotations

import json

import pytest

from dits.artifacts import SCORES_FILE, StageChanged, StageIncomplete, read_jsonl
from dits.config import RunConfig, parse_config
from dits.influence.base import chunk_pairs
from dits.influence.inputs import PROBE_ADAPTER, adapter_digest, probe_adapter
from dits.mas.protocol import render_view, turn_prefix
from dits.records import InfluenceScore, PreferencePair, pair_key
from dits.stages.context import ModelRef, Product, StageContext
from dits.stages.influence import influence_stage, score_pool
from dits.tasks.builtin import make_builtin
from tests.helpers import INFLUENCE_PROTOCOL, hash_metric
from tests.threads import one_torch_thread

THETA = "test-theta"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def _cfg(task: dict | None = None, **influence) -> RunConfig:
    return parse_config(
        {
            "engine": {"dtype": "float32"},  # the shared engine's
            "protocol": INFLUENCE_PROTOCOL.model_dump(mode="json"),
            "task": {"dataset": "facts", "dev": 1, **(task or {})},
            "influence": {"estimator": "gradient", "chunk_size": 1, "samples_per_task": 2, "optimizer": "sgd",
                          "lr": 1e-3, **influence},
            "train": {"lora": {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}},
        }
    )  # fmt: skip


def _pairs() -> list[PreferencePair]:
    out = []
    for i, ex in enumerate(make_builtin("facts", "train", 4, seed=0)):
        out.append(
            PreferencePair(
                tree_task_id=ex.id,
                node_id=f"n{i}",
                prefix=[],
                speaker=0,
                chosen=f"My notes say the answer is <A>{ex.answers[0]}</A>",
                rejected="I do not know." if i % 2 else "<A>nobody</A>",
                chosen_id=f"n{10 + i}",
                rejected_id=f"n{20 + i}",
                q_chosen=1.0,
                q_rejected=0.0,
                visits_chosen=1,
                visits_rejected=1,
                prompt=render_view(ex, [], 0, INFLUENCE_PROTOCOL),
                response_prefix=turn_prefix(0, INFLUENCE_PROTOCOL),
            )
        )
    return out


def _drop(engine, name: str) -> None:
    if name in engine.adapter_names():
        engine.delete_adapter(name)


@pytest.fixture
def theta(engine):
    yield probe_adapter(engine, _cfg().train.lora, seed=0, name=THETA)
    _drop(engine, THETA)


@pytest.fixture
def pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(p.model_dump_json() + "\n" for p in _pairs()))
    return path


def _rows(path) -> list[tuple[int, list[str], float]]:
    return [(s.candidate, s.pair_ids, s.score) for s in read_jsonl(path, InfluenceScore)]


def test_a_cut_run_resumes_to_the_uninterrupted_scores(engine, theta, pairs_file, tmp_path):
    cfg = _cfg()
    val = make_builtin("facts", "dev", 1, seed=0)
    kw = {"theta": theta, "val_examples": val, "metric_fn": hash_metric, "progress": False}
    full = score_pool(engine, pairs_file, cfg, tmp_path / "full", **kw)
    assert full.complete and full.scored_now == 4
    expected_ids = [[pair_key(p) for p in c] for c in chunk_pairs(_pairs(), 1, cfg.influence.seed)]
    assert [s.pair_ids for s in full.scores] == expected_ids
    assert any(s.score != 0 for s in full.scores)  # a real signal, so equality below means something

    cut = score_pool(engine, pairs_file, cfg, tmp_path / "cut", limit=2, **kw)
    assert cut.scored_now == 2 and [s.candidate for s in cut.scores] == [0, 1] and not cut.complete
    scores_path = tmp_path / "cut" / SCORES_FILE
    with scores_path.open("a") as f:  # a kill in the middle of the third append
        f.write(full.scores[2].model_dump_json()[:40])
    resumed = score_pool(engine, pairs_file, cfg, tmp_path / "cut", **kw)
    assert resumed.scored_now == 2 and resumed.complete

    lines = scores_path.read_text().splitlines()
    assert len(lines) == 4 and sorted(json.loads(x)["candidate"] for x in lines) == [0, 1, 2, 3]
    assert _rows(scores_path) == _rows(tmp_path / "full" / SCORES_FILE)
    assert [s.score for s in resumed.scores] == [s.score for s in full.scores]

    # Finished: nothing is scored again (and the estimator is not even prepared).
    before = engine.ledger.snapshot()
    again = score_pool(engine, pairs_file, cfg, tmp_path / "cut", **kw)
    assert again.scored_now == 0 and engine.ledger.snapshot() == before


def test_the_stage_refuses_a_changed_config_or_probe(engine, pairs_file, tmp_path):
    def stage(cfg: RunConfig) -> None:
        ctx = StageContext.single(cfg, tmp_path, engine=engine, progress=False)
        influence_stage(ctx, 0, None, ModelRef.base(cfg), pairs_file, "pool", limit=0)

    with pytest.raises(StageIncomplete, match="0 of 4 chunks scored"):  # started, not finished
        stage(_cfg())
    with pytest.raises(StageChanged, match=r"influence\.lr: 0\.001 -> 0\.002"):
        stage(_cfg(lr=2e-3))
    shape = json.loads(_cfg().model_dump_json())
    shape["train"]["lora"]["r"] = 4
    with pytest.raises(StageChanged, match=r"probe\.lora\.r: 2 -> 4"):  # θ's probe is an input too
        stage(parse_config(shape))
    assert PROBE_ADAPTER not in engine.adapter_names()  # the probe is removed after the stage
    digest = adapter_digest(engine, probe_adapter(engine, _cfg().train.lora, seed=0, name=THETA))
    assert adapter_digest(engine, probe_adapter(engine, _cfg().train.lora, seed=0, name=THETA)) == digest
    assert adapter_digest(engine, probe_adapter(engine, _cfg().train.lora, seed=1, name=THETA)) != digest
    _drop(engine, THETA)


def _cli(engine, monkeypatch, cfg: RunConfig, pairs_file, out, *extra: str) -> int:
    from dits.cli import main

    monkeypatch.setattr("dits.stages.context.engine_from_config", lambda _cfg, **_kw: engine)
    config = out.parent / f"{out.name}.yaml"
    config.write_text(cfg.model_dump_json())  # JSON is YAML
    argv = ["influence", "--pairs", str(pairs_file), "--config", str(config), "--out", str(out)]
    return main([*argv, "--no-progress", *extra])


def test_cli_and_the_pipeline_stage_give_identical_scores(engine, pairs_file, tmp_path, monkeypatch):
    """One config, two ways of running it. The config is chosen so that the two former bugs would show:
    a dev split longer than V (the CLI used to score on all of it) and a probe seed that is not the run
    seed's per-iteration derivation (the pipeline used to seed θ's probe differently). The hash metric
    stands in for the task metric, which the untrained model scores 0 everywhere (all scores 0)."""
    from dits.pipeline import STAGES, Step

    monkeypatch.setattr("dits.influence.base.default_metric", hash_metric)
    cfg = _cfg({"dev": 3}, val_tasks=2, seed=5)
    assert _cli(engine, monkeypatch, cfg, pairs_file, tmp_path / "cli") == 0

    ctx = StageContext(cfg, tmp_path / "run", StageContext.single(cfg, tmp_path, engine=engine).holder,
                       progress=False)  # fmt: skip
    step = Step(0, None, frozenset({"mix"}), ModelRef.base(cfg), [], [])
    step.products["search"] = Product(path=str(pairs_file.parent), digest="pool")
    made = STAGES["influence"].run(ctx, step)
    assert made.path == str(tmp_path / "run" / "iter_0" / "influence")
    ran = read_jsonl(made.file(SCORES_FILE), InfluenceScore)
    assert ctx.manifests[-1].inputs["val"] == [ex.id for ex in make_builtin("facts", "dev", 2, seed=0)]
    assert len(ran) == 4 and any(s.score != 0 for s in ran)
    assert _rows(made.file(SCORES_FILE)) == _rows(tmp_path / "cli" / SCORES_FILE)


def test_cli_scores_the_first_chunks_and_says_where(engine, pairs_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    cfg = _cfg(chunk_size=3)
    assert _cli(engine, monkeypatch, cfg, pairs_file, out, "--limit", "1") == 0
    printed = capsys.readouterr().out
    assert "1 of 2 chunks scored (1 now;" in printed and str(out / SCORES_FILE) in printed
    (score,) = read_jsonl(out / SCORES_FILE, InfluenceScore)
    assert score.candidate == 0
    assert score.pair_ids == [pair_key(p) for p in chunk_pairs(_pairs(), 3, 0)[0]]
    assert not (out / "manifest.json").exists()  # cut by --limit: the stage is not finished
    assert _cli(engine, monkeypatch, cfg, pairs_file, out) == 0  # the rerun scores the rest
    assert "all 2 chunks scored" in capsys.readouterr().out
    assert (out / "manifest.json").exists() and len(read_jsonl(out / SCORES_FILE, InfluenceScore)) == 2


def test_warmup_theta_is_dpo_on_the_whole_pool_kept_and_charged(engine, pairs_file, tmp_path, monkeypatch):
    """``influence.warmup_steps``: θ is the model after that many LoRA DPO steps on every pair of the pool
    (the reference's warm-up model), saved in the stage directory, charged to the stage, removed after it;
    scores differ from the un-warmed θ's. A second run reloads the saved θ instead of training again."""
    from dits.train.trainer import TrainResult

    monkeypatch.setattr("dits.influence.base.default_metric", hash_metric)

    def stage(cfg: RunConfig, out):  # type: ignore[no-untyped-def]
        ctx = StageContext.single(cfg, out, engine=engine, progress=False)
        influence_stage(ctx, 0, None, ModelRef.base(cfg), pairs_file, "pool", limit=1)

    plain = _cfg(lr=1e-2)
    warm = _cfg(lr=1e-2, warmup_steps=1)
    warm = warm.model_copy(update={"train": warm.train.model_copy(update={"dpo": warm.train.dpo.model_copy(
        update={"lr": 1e-2, "batch_size": 4})})})  # fmt: skip
    before = engine.ledger.snapshot()
    for cfg, out in ((plain, tmp_path / "plain"), (warm, tmp_path / "warm")):
        with pytest.raises(StageIncomplete):
            stage(cfg, out)
    trained = (engine.ledger.snapshot() - before).trained_tokens
    result = TrainResult.model_validate_json((tmp_path / "warm" / "warmup" / "train_result.json").read_text())
    assert (result.kind, result.steps, result.rows) == ("dpo", 1, 4)  # one step on the whole pool of 4
    assert result.trained_tokens > 0 and trained >= result.trained_tokens
    assert "influence-warmup" not in engine.adapter_names()
    [p], [w] = (read_jsonl(d / SCORES_FILE, InfluenceScore) for d in (tmp_path / "plain", tmp_path / "warm"))
    assert p.pair_ids == w.pair_ids and p.score != w.score

    saved = (tmp_path / "warm" / "warmup" / "train_result.json").stat().st_mtime_ns
    with pytest.raises(StageIncomplete):  # resumed: the saved θ is loaded, not trained again
        stage(warm, tmp_path / "warm")
    assert (tmp_path / "warm" / "warmup" / "train_result.json").stat().st_mtime_ns == saved
    assert len(read_jsonl(tmp_path / "warm" / SCORES_FILE, InfluenceScore)) == 2
