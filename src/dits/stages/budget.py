"""The ``budget`` stage: Optima given DITS's compute (the ``q-budget`` method, docs/design.md section 7).

DITS spends compute that Optima does not: the influence stage. The method's claim is that this compute beats
the same compute spent on more Q-value search, so ``q-budget`` grows extra trees, from train tasks no other
stage uses, until the search it adds costs what the influence stage it is compared with cost. Its pool is
the lineage's pool plus the extra trees' pairs (mined with the pool's ``T_norm``, so every Q is on one
scale); the select stage then ranks them by Q and keeps as many pairs as ``mix`` keeps from the smaller
pool, so DPO costs the two the same and the only difference is where the extra compute went.

How many extra trees: ``ceil(influence FLOPs / mean FLOPs of the pool's trees)``, from the influence
manifest and the cost each tree carries (:attr:`~dits.search.tree.Tree.flops`; the pool's ``T_norm``
calibration, which the extra trees reuse, is not in it). Both survive a resume, and the count is fixed
before any tree grows (rather than growing until the ledger says enough), so a killed and resumed run
grows exactly the trees an uninterrupted one does.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from pydantic import BaseModel

from dits.artifacts import (
    PAIRS_FILE,
    T_NORM_FILE,
    TREES_FILE,
    read_jsonl,
    read_manifest,
    write_json_atomic,
    write_jsonl_atomic,
)
from dits.records import PreferencePair
from dits.search.rollout import TNormCalibration
from dits.search.tree import Tree
from dits.stages.context import ModelRef, Product, StageContext, example_ids
from dits.stages.search import grow_pool
from dits.tasks.source import examples_for

__all__ = ["POOL_FILE", "BudgetPlan", "budget_plan", "budget_stage", "plan_extra_trees"]

log = logging.getLogger(__name__)

POOL_FILE = "pool.jsonl"
"""The budget stage's pool: the lineage's pairs, then the extra trees' pairs."""
PLAN_FILE = "plan.json"


class BudgetPlan(BaseModel):
    """How much extra search buys the compute of the compared influence stage."""

    target_flops: float
    """The influence stage's ledger FLOPs."""
    flops_per_tree: float
    """The mean FLOPs of the pool's trees."""
    trees: int


def plan_extra_trees(trees_path: Path, target_flops: float) -> BudgetPlan:
    """The extra trees that cost ``target_flops``, priced at the mean tree of ``trees_path``."""
    trees = read_jsonl(trees_path, Tree)
    per_tree = sum(t.flops for t in trees) / len(trees) if trees else 0.0
    if per_tree <= 0:
        raise ValueError(f"the trees of {trees_path} carry no cost; cannot price extra trees")
    return BudgetPlan(
        target_flops=target_flops, flops_per_tree=per_tree, trees=math.ceil(target_flops / per_tree)
    )


def budget_plan(pool: Product, influence: Product) -> BudgetPlan:
    """The extra trees that cost the influence stage's FLOPs, priced at the pool's mean tree."""
    manifest = read_manifest(Path(influence.path))
    if manifest is None:
        raise ValueError(f"the influence stage at {influence.path} has not finished")
    return plan_extra_trees(pool.file(TREES_FILE), float(manifest.ledger.get("flops", 0.0)))


def budget_stage(
    ctx: StageContext,
    iteration: int,
    owner: str,
    model: ModelRef,
    pool: Product,
    influence: Product,
    first_spare: int,
) -> Product:
    """Grow the planned extra trees on train tasks ``first_spare, first_spare + 1, ...`` (tasks no other
    stage uses) and write ``pool.jsonl``: ``pool``'s pairs followed by theirs. Counts: ``trees`` (extra),
    ``pairs`` (the whole pool), ``base_pairs`` (the lineage's pool alone) and the plan's target FLOPs."""
    cfg = ctx.cfg
    plan = budget_plan(pool, influence)
    tasks = examples_for(cfg.task, "train", limit=first_spare + plan.trees, up_to=True)[first_spare:]
    if len(tasks) < plan.trees:
        raise ValueError(
            f"{owner}: matching the influence stage's {plan.target_flops:.3g} FLOPs takes {plan.trees} extra "
            f"search tasks, but only {len(tasks)} unused train tasks are left in {cfg.task.dataset}; "
            "lower the influence cost (influence.val_tasks, samples_per_task) or task.train"
        )
    seed = ctx.seed("budget", iteration)
    inputs = {"model": model.digest, "pool": pool.digest, "influence": influence.digest,
              "tasks": example_ids(tasks), "seed": seed,
              **cfg.sections("protocol", "reward", "search", "rollout", "pairs")}  # fmt: skip

    def body(out: Path) -> dict[str, float]:
        engine = ctx.activate(model)
        cal = TNormCalibration.model_validate_json(pool.file(T_NORM_FILE).read_text(encoding="utf-8"))
        s = grow_pool(engine, tasks, cfg, out, seed=seed, t_norm=cal.t_norm, progress=ctx.progress,
                      executor=ctx.executor, model=model, nll_engine=ctx.holder.initial())  # fmt: skip
        base = read_jsonl(pool.file(PAIRS_FILE), PreferencePair)
        extra = read_jsonl(out / PAIRS_FILE, PreferencePair)
        write_jsonl_atomic(out / POOL_FILE, [*base, *extra])
        write_json_atomic(out / PLAN_FILE, plan.model_dump())
        log.info("%s: %d extra trees (%d pairs) for %.3g FLOPs of influence; pool %d pairs",
                 owner, s.trees, s.pairs, plan.target_flops, len(base) + len(extra))  # fmt: skip
        return {"trees": s.trees, "rollouts": s.rollouts, "pairs": len(base) + len(extra),
                "base_pairs": len(base), "target_flops": plan.target_flops}  # fmt: skip

    return ctx.run("budget", iteration, owner, inputs, body)[0]
