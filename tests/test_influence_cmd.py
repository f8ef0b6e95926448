"""``dits influence``: a run cut after k chunks and resumed writes the scores of an uninterrupted run.

Embedded model, tiny settings (1 validation task, K = 2, 2 turns of 12 tokens, rank-2 LoRA), the gradient
estimator (the cheapest) and a hash metric so that the scores are not all zero (the model solves nothing).
"""

from __future__ import annotations

import json

import pytest
import torch

from dits.config import RunConfig, parse_config
from dits.influence.base import chunk_pairs, pair_key
from dits.influence.inputs import adapter_digest, probe_adapter
from dits.influence_cmd import SCORES_FILE, read_scores, run_influence
from dits.mas.protocol import render_view, turn_prefix
from dits.synthesize import PreferencePair
from dits.tasks.builtin import make_builtin
from tests.test_influence import PROTOCOL, hash_metric

THETA = "test-theta"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cfg(**influence) -> RunConfig:
    return parse_config(
        {
            "protocol": PROTOCOL.model_dump(mode="json"),
            "task": {"dataset": "facts", "dev": 1},
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
                prompt=render_view(ex, [], 0, PROTOCOL),
                response_prefix=turn_prefix(0, PROTOCOL),
            )
        )
    return out


def _drop(engine, name: str) -> None:
    if name in getattr(engine.model, "peft_config", {}):
        if engine.active_adapter == name:
            engine.set_adapter(None)
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
    return [(s.candidate, s.pair_ids, s.score) for s in read_scores(path)]


def test_a_cut_run_resumes_to_the_uninterrupted_scores(engine, theta, pairs_file, tmp_path):
    cfg = _cfg()
    val = make_builtin("facts", "dev", 1, seed=0)
    kw = {"adapter": theta, "val_examples": val, "metric_fn": hash_metric, "progress": False}
    full = run_influence(engine, pairs_file, cfg, tmp_path / "full", **kw)
    assert full.complete and full.scored_now == 4
    expected_ids = [[pair_key(p) for p in c] for c in chunk_pairs(_pairs(), 1, cfg.influence.seed)]
    assert [s.pair_ids for s in full.scores] == expected_ids
    assert any(s.score != 0 for s in full.scores)  # a real signal, so equality below means something

    cut = run_influence(engine, pairs_file, cfg, tmp_path / "cut", limit=2, **kw)
    assert cut.scored_now == 2 and [s.candidate for s in cut.scores] == [0, 1] and not cut.complete
    scores_path = tmp_path / "cut" / SCORES_FILE
    with scores_path.open("a") as f:  # a kill in the middle of the third append
        f.write(full.scores[2].model_dump_json()[:40])
    resumed = run_influence(engine, pairs_file, cfg, tmp_path / "cut", **kw)
    assert resumed.scored_now == 2 and resumed.complete

    lines = scores_path.read_text().splitlines()
    assert len(lines) == 4 and sorted(json.loads(x)["candidate"] for x in lines) == [0, 1, 2, 3]
    assert _rows(scores_path) == _rows(tmp_path / "full" / SCORES_FILE)
    assert [s.score for s in resumed.scores] == [s.score for s in full.scores]

    # Finished: nothing is scored again (and the estimator is not even prepared).
    before = engine.ledger.snapshot()
    again = run_influence(engine, pairs_file, cfg, tmp_path / "cut", **kw)
    assert again.scored_now == 0 and engine.ledger.snapshot() == before


def test_a_changed_config_or_theta_is_refused(engine, theta, pairs_file, tmp_path):
    val = make_builtin("facts", "dev", 1, seed=0)
    kw = {"adapter": theta, "val_examples": val, "progress": False}
    run_influence(engine, pairs_file, _cfg(), tmp_path, limit=0, **kw)
    with pytest.raises(ValueError, match=r"another config.*changed: influence"):
        run_influence(engine, pairs_file, _cfg(lr=2e-3), tmp_path, limit=0, **kw)
    digest = adapter_digest(engine, theta)
    probe_adapter(engine, _cfg().train.lora, seed=0, name=THETA)
    assert adapter_digest(engine, theta) == digest  # a seeded probe is rebuilt exactly...
    probe_adapter(engine, _cfg().train.lora, seed=1, name=THETA)
    with pytest.raises(ValueError, match="changed: theta"):  # ...and another θ is caught
        run_influence(engine, pairs_file, _cfg(), tmp_path, limit=0, **kw)


def test_cli_scores_the_first_chunks_and_says_where(engine, pairs_file, tmp_path, monkeypatch, capsys):
    from dits import influence_cmd
    from dits.cli import main
    from dits.influence.inputs import PROBE_ADAPTER

    monkeypatch.setattr(influence_cmd, "engine_from_config", lambda cfg: engine)
    config = tmp_path / "cfg.yaml"
    config.write_text(json.dumps(json.loads(_cfg().model_dump_json())))  # JSON is YAML
    out = tmp_path / "out"
    argv = ["influence", "--pairs", str(pairs_file), "--config", str(config), "--out", str(out)]
    try:
        assert main([*argv, "--no-progress", "--limit", "1", "--set", "influence.chunk_size=3"]) == 0
    finally:
        _drop(engine, PROBE_ADAPTER)
    printed = capsys.readouterr().out
    assert "1 of 2 chunks scored (1 now;" in printed and str(out / SCORES_FILE) in printed
    (score,) = read_scores(out / SCORES_FILE)
    assert score.candidate == 0
    assert score.pair_ids == [pair_key(p) for p in chunk_pairs(_pairs(), 3, 0)[0]]
