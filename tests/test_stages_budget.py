"""The ``budget`` stage (``q-budget``): the count of extra trees worked by hand from the trees' FLOPs and the
influence stage's ledger, then the stage on the seeded engine: which tasks it grows, with which ``T_norm``,
and the pool it writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dits.artifacts import (
    MANIFEST_FILE,
    PAIRS_FILE,
    T_NORM_FILE,
    TREES_FILE,
    StageManifest,
    read_jsonl,
    write_json_atomic,
)
from dits.records import PreferencePair
from dits.search.tree import Tree
from dits.stages.budget import POOL_FILE, BudgetPlan, budget_plan, budget_stage, plan_extra_trees
from dits.stages.context import EngineHolder, ModelRef, Product, StageContext
from dits.stages.search import search_stage
from dits.tasks.source import examples_for
from tests.helpers import LOW, SeededEngine, search_config


def _trees_file(path: Path, flops: list[float]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, f in enumerate(flops):
        t = Tree.new(f"t{i}")
        t.record_rollout("n0", ["hello", "there"], 0.5)
        t.flops = f
        lines.append(t.to_json())
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize(
    ("flops", "target", "trees"),
    [
        ([100.0, 200.0, 300.0], 450.0, 3),  # mean 200: 450 / 200 = 2.25, rounded up
        ([100.0, 200.0, 300.0], 400.0, 2),  # exactly two trees' worth: no third
        ([100.0, 200.0, 300.0], 401.0, 3),  # a FLOP over: one more tree
        ([100.0, 200.0, 300.0], 0.0, 0),  # nothing to match
        ([50.0], 1e4, 200),
        ([3e12, 5e12], 1.2e13, 3),  # mean 4e12: 1.2e13 / 4e12 = 3 exactly
    ],
)
def test_plan_prices_extra_trees_at_the_mean_tree_rounded_up(tmp_path, flops, target, trees) -> None:
    plan = plan_extra_trees(_trees_file(tmp_path / TREES_FILE, flops), target)
    assert plan == BudgetPlan(target_flops=target, flops_per_tree=sum(flops) / len(flops), trees=trees)


def test_plan_refuses_trees_without_a_cost(tmp_path) -> None:
    with pytest.raises(ValueError, match="carry no cost"):
        plan_extra_trees(_trees_file(tmp_path / "a" / TREES_FILE, [0.0, 0.0]), 100.0)
    with pytest.raises(ValueError, match="carry no cost"):
        plan_extra_trees(_trees_file(tmp_path / "b" / TREES_FILE, []), 100.0)


def _influence(path: Path, ledger: dict[str, float] | None) -> Product:
    """A finished influence stage's product (its manifest, with ``ledger``), or an unfinished one."""
    path.mkdir(parents=True, exist_ok=True)
    if ledger is not None:
        m = StageManifest(stage="influence", iteration=0, method=None, digest="i", inputs={}, ledger=ledger)
        write_json_atomic(path / MANIFEST_FILE, m.model_dump())
    return Product(path=str(path), digest="infl")


def test_budget_plan_reads_the_influence_stages_ledger_flops(tmp_path) -> None:
    pool = tmp_path / "search"
    _trees_file(pool / TREES_FILE, [10.0, 30.0])  # mean 20
    product = Product(path=str(pool), digest="pool")
    infl = _influence(tmp_path / "influence", {"flops": 50.0, "generated_tokens": 1e9})
    assert budget_plan(product, infl) == BudgetPlan(target_flops=50.0, flops_per_tree=20.0, trees=3)
    free = _influence(tmp_path / "free", {"generated_tokens": 7.0})  # no FLOPs charged: no extra search
    assert budget_plan(product, free).trees == 0
    with pytest.raises(ValueError, match="has not finished"):
        budget_plan(product, _influence(tmp_path / "running", None))


# -- the stage on the seeded engine -------------------------------------------------------------------


def _context(tmp_path: Path) -> StageContext:
    cfg = search_config(explore=2)
    cfg = cfg.model_copy(update={"task": cfg.task.model_copy(update={"train": 2})})
    return StageContext(cfg, tmp_path / "run", EngineHolder(cfg, SeededEngine()), progress=False)


def test_budget_stage_grows_the_planned_trees_on_the_spare_tasks_and_appends_their_pairs(tmp_path) -> None:
    """Pool of 2 trees; the influence stage cost 2.5 mean trees, so ⌈2.5⌉ = 3 extra trees on train tasks
    2, 3, 4 (after the pool's), mined with the pool's T_norm; ``pool.jsonl`` is the pool's pairs then
    theirs."""
    ctx = _context(tmp_path)
    cfg, model = ctx.cfg, ModelRef.base(ctx.cfg)
    train = examples_for(cfg.task, "train", limit=5)
    pool = search_stage(ctx, 0, None, model, train[:2], pairs=LOW)
    pool_trees = [json.loads(line) for line in Path(pool.file(TREES_FILE)).read_text().splitlines()]
    mean = sum(t["flops"] for t in pool_trees) / len(pool_trees)
    assert mean > 0
    infl = _influence(tmp_path / "influence", {"flops": 2.5 * mean})

    product = budget_stage(ctx, 0, "q-budget", model, pool, infl, first_spare=2)
    out = Path(product.path)
    extra = read_jsonl(out / TREES_FILE, Tree)
    assert sorted(t.task_id for t in extra) == sorted(ex.id for ex in train[2:5])
    assert not {t.task_id for t in extra} & {t["task_id"] for t in pool_trees}

    t_norm = json.loads(Path(pool.file(T_NORM_FILE)).read_text())["t_norm"]
    assert json.loads((out / T_NORM_FILE).read_text())["t_norm"] == t_norm

    base = read_jsonl(Path(pool.file(PAIRS_FILE)), PreferencePair)
    theirs = read_jsonl(out / PAIRS_FILE, PreferencePair)
    assert read_jsonl(out / POOL_FILE, PreferencePair) == [*base, *theirs]
    assert {p.tree_task_id for p in theirs} <= {ex.id for ex in train[2:5]}
    assert product.counts == {
        "trees": 3.0,
        "rollouts": product.counts["rollouts"],
        "pairs": float(len(base) + len(theirs)),
        "base_pairs": float(len(base)),
        "target_flops": 2.5 * mean,
    }
    assert product.counts["rollouts"] > 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan == {"target_flops": 2.5 * mean, "flops_per_tree": mean, "trees": 3}
