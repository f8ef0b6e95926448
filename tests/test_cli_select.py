"""``dits select``: the kept pairs and their TRL rows equal ``select_pairs`` run here on the same inputs."""

from __future__ import annotations

import pytest

from dits.artifacts import SELECTED_FILE, append_jsonl, read_jsonl
from dits.cli import main
from dits.influence.base import chunk_pairs
from dits.records import Cost, InfluenceScore, PreferencePair, pair_key
from dits.select import SelectConfig, select_pairs

Q = [0.9, 0.5, 0.7, 0.1, 0.6, 0.8, 0.55]
CHUNK_SCORES = [0.02, -0.01, 0.05, 0.0]


def _pairs() -> list[PreferencePair]:
    return [
        PreferencePair(
            tree_task_id=f"t{i % 3}",
            node_id=f"n{i}",
            prefix=[f"Alice: turn {i}"],
            speaker=1,
            chosen=f"good {i}",
            rejected=f"bad {i}",
            chosen_id=f"n{10 + i}",
            rejected_id=f"n{20 + i}",
            q_chosen=q,
            q_rejected=q - 0.3,
            visits_chosen=2,
            visits_rejected=1,
            prompt=[{"role": "system", "content": "be Bob"}, {"role": "user", "content": f"Alice: turn {i}"}],
            response_prefix="Bob:",
        )
        for i, q in enumerate(Q)
    ]


def _scores(pairs: list[PreferencePair]) -> list[InfluenceScore]:
    chunks = chunk_pairs(pairs, 2, seed=0)
    assert len(chunks) == len(CHUNK_SCORES)
    return [
        InfluenceScore(candidate=i, pair_ids=[pair_key(p) for p in c], score=v, estimator="x", cost=Cost())
        for i, (c, v) in enumerate(zip(chunks, CHUNK_SCORES, strict=True))
    ]


@pytest.fixture
def files(tmp_path):
    pairs = _pairs()
    pairs_path = tmp_path / "pairs.jsonl"
    pairs_path.write_text("".join(p.model_dump_json() + "\n" for p in pairs))
    scores_path = tmp_path / "scores.jsonl"
    append_jsonl(scores_path, _scores(pairs))
    return pairs_path, scores_path


@pytest.mark.parametrize(
    ("strategy", "extra"),
    [("mix", ["--weight", "0.5"]), ("influence", []), ("q", ["--ratio", "0.3"]), ("random", ["--seed", "4"]),
     ("all", [])],
)  # fmt: skip
def test_cli_selection_equals_select_pairs(files, tmp_path, capsys, strategy, extra):
    pairs_path, scores_path = files
    out = tmp_path / "out"
    argv = ["select", "--pairs", str(pairs_path), "--scores", str(scores_path), "--strategy", strategy]
    assert main([*argv, *extra, "--out", str(out)]) == 0

    pairs = _pairs()
    opts = dict(zip(extra[::2], extra[1::2], strict=True))
    cfg = SelectConfig(
        strategy=strategy,
        ratio=float(opts.get("--ratio", 0.5)),
        weight=float(opts.get("--weight", 1.0)),
        seed=int(opts.get("--seed", 0)),
    )
    expected = select_pairs(pairs, _scores(pairs), cfg)
    kept = read_jsonl(out / SELECTED_FILE, PreferencePair)
    assert [p.model_dump() for p in kept] == [p.model_dump() for p in expected]
    n = len(Q) if strategy == "all" else max(1, int(len(Q) * cfg.ratio))
    assert len(kept) == n

    from dits.train.rows import preference_dataset

    ds = preference_dataset(kept)  # what the DPO stage trains on
    assert ds["prompt"] == [p.prompt for p in expected]
    turn = lambda text: [{"role": "assistant", "content": f"Bob: {text}"}]  # noqa: E731
    assert ds["chosen"] == [turn(f"good {p.node_id[1:]}") for p in expected]
    assert ds["rejected"] == [turn(f"bad {p.node_id[1:]}") for p in expected]

    mean_q = sum(p.q_chosen for p in expected) / len(expected)
    printed = capsys.readouterr().out
    assert f"kept {n} of {len(Q)} pairs, mean Q(chosen) {mean_q:.3f}" in printed


def test_mix_by_hand(files, tmp_path):
    """The mix on these inputs, computed without select.py: norm(Q) + norm(I), top 3 of 7."""
    pairs_path, scores_path = files
    pairs = _pairs()
    infl = {k: s.score for s in _scores(pairs) for k in s.pair_ids}
    i_vals = [infl[pair_key(p)] for p in pairs]
    lo_q, hi_q, lo_i, hi_i = min(Q), max(Q), min(i_vals), max(i_vals)
    mix = [(q - lo_q) / (hi_q - lo_q) + (v - lo_i) / (hi_i - lo_i) for q, v in zip(Q, i_vals, strict=True)]
    top = sorted(sorted(range(len(Q)), key=lambda i: -mix[i])[:3])
    out = tmp_path / "out"
    main(["select", "--pairs", str(pairs_path), "--scores", str(scores_path), "--out", str(out)])
    assert [p.node_id for p in read_jsonl(out / SELECTED_FILE, PreferencePair)] == [f"n{i}" for i in top]


def test_missing_scores_are_a_clear_error(files, tmp_path):
    pairs_path, scores_path = files
    out = str(tmp_path / "out")
    with pytest.raises(SystemExit, match="needs influence scores"):
        main(["select", "--pairs", str(pairs_path), "--strategy", "mix", "--out", out])
    with pytest.raises(SystemExit, match="no scores file"):
        main(["select", "--pairs", str(pairs_path), "--scores", str(tmp_path / "nope.jsonl"), "--out", out])
    partial = tmp_path / "partial.jsonl"
    partial.write_text("".join(line + "\n" for line in scores_path.read_text().splitlines()[:-1]))
    with pytest.raises(SystemExit, match=r"have no influence score.*did `dits influence` finish"):
        main(["select", "--pairs", str(pairs_path), "--scores", str(partial), "--strategy", "influence",
              "--out", out])  # fmt: skip
    assert not (tmp_path / "out" / SELECTED_FILE).exists()
